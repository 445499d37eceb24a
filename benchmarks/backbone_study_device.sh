#!/usr/bin/env bash
# benchmarks/backbone_study.py on the GPU machine, longer than one 10-minute call: `start` unpacks the data
# (.devdata/all, made by ../shared/data/pack.py) and the wheels (.whl), then starts the study detached (setsid:
# it runs on between calls while the machine is held); `poll` (the next calls, each within 30 s of the last)
# follows it for LIMIT seconds (or until it ends), then copies logs and results to $OUT. `tests` runs the test
# suite alone in the same layout (a copy without .git, wheels under /tmp/site), naming each failure.
#   start: benchmarks/backbone_study_device.sh start 540 [STUDY ARGS...]   (carry .whl and .devdata/all)
#          PACK=.devdata/q85 benchmarks/backbone_study_device.sh start ...   (another pack.py copy, e.g. --quality 85)
#   poll:  benchmarks/backbone_study_device.sh poll 560
#   tests: benchmarks/backbone_study_device.sh tests 560 [PYTEST ARGS...]   (carry .whl)
# The machine goes back 30 s after a call ends: a poll that comes later finds a fresh machine and nothing running.
# Run the suite apart from the study: beside 20 study processes its time limits and hang guards mean nothing.
# DEVICE_ROOT (default /tmp) holds the wheels, the copy, the data and the study; POLL_EVERY (30 s) paces the poll.
set -uo pipefail
mode=$1 limit=$2; shift 2 || exit 2; study_args=("$@")
root=${DEVICE_ROOT:-/tmp} every=${POLL_EVERY:-30}
export PYTHONPATH=$root/site:$root/repo PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
if [ "$mode" = start ] || [ "$mode" = tests ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$root/site" .whl/*.whl || exit 1
  rm -rf "$root/repo" && mkdir -p "$root/repo" || exit 1
  tar --exclude=./.devdata --exclude=./.whl --exclude=./.git -cf - . | tar -xf - -C "$root/repo" || exit 1
fi
if [ "$mode" = tests ]; then
  cd "$root/repo" && timeout "$limit" python3 -m pytest -v -rf -n 4 -p no:cacheprovider "${study_args[@]}" 2>&1 | tee "$OUT/tests.log" | grep -a -E "FAILED|ERROR|passed|failed"
  exit 0
fi
if [ "$mode" = start ]; then
  rm -rf "$root/study"
  pack=${PACK:-.devdata/all}
  python3 "$pack/pack.py" unpack "$pack" "$root/data" >/dev/null || exit 1
  cd "$root/repo"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  setsid nohup python3 benchmarks/backbone_study.py --data "$root/data" --work "$root/study" "${study_args[@]}" >"$root/study.log" 2>&1 &
  cd "$OLDPWD"
fi
end=$((SECONDS + limit))
while [ $SECONDS -lt $end ]; do
  sleep "$every"
  echo "--- $(date +%T) $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader)"
  tail -n 2 "$root/study.log" | cut -c1-200
  for log in "$root"/study/pretrain/*/*/log.jsonl "$root"/study/ship/*/log.jsonl; do
    [ -f "$log" ] && echo "$log $(tail -n 1 "$log" | cut -c1-160)"
  done 2>/dev/null | sed "s|$root/study/||"
  pgrep -f backbone_study.py >/dev/null || break
done
cp "$root/study.log" "$OUT"/ 2>/dev/null
tar czf "$OUT/study.tgz" -C "$root" --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pkl' study 2>/dev/null
for model in "$root"/study/ship/*/; do
  [ -f "$model/model.safetensors" ] && tar czf "$OUT/ship_$(basename "$model").tgz" -C "$model" --exclude=checkpoint .
done
ls -la "$OUT"
