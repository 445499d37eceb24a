#!/usr/bin/env bash
# benchmarks/backbone_study.py on the GPU machine, longer than one 10-minute call: `start` unpacks the data
# (.devdata/all, made by ../shared/data/pack.py) and the wheels (.whl), then starts the study and the GPU test
# suite detached (setsid: they run on between calls while the machine is held); `poll` (the next calls, each
# within 30 s of the last) follows them for LIMIT seconds (or until both end), then copies logs and results to $OUT.
#   start: benchmarks/backbone_study_device.sh start 540 [STUDY ARGS...]   (carry .whl and .devdata/all; TESTS=1: tests too)
#   poll:  benchmarks/backbone_study_device.sh poll 560
# The machine goes back 30 s after a call ends: a poll that comes later finds a fresh machine and nothing running.
set -uo pipefail
mode=$1 limit=${2:-540}; shift 2; study_args=("$@")
export PYTHONPATH=/tmp/site:/tmp/repo PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
if [ "$mode" = start ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  rm -rf /tmp/repo /tmp/study && mkdir -p /tmp/repo || exit 1
  tar --exclude=./.devdata --exclude=./.whl --exclude=./.git -cf - . | tar -xf - -C /tmp/repo || exit 1
  python3 .devdata/all/pack.py unpack .devdata/all /tmp/data >/dev/null || exit 1
  cd /tmp/repo
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  setsid nohup python3 benchmarks/backbone_study.py --data /tmp/data --work /tmp/study "${study_args[@]}" >/tmp/study.log 2>&1 &
  if [ "${TESTS:-0}" = 1 ]; then  # the GPU test suite beside the study (names each failure as it happens)
    OMP_NUM_THREADS=1 setsid nohup nice -n 10 python3 -m pytest -v -rf -n 4 -p no:cacheprovider >/tmp/tests.log 2>&1 &
  fi
  cd "$OLDPWD"
fi
end=$((SECONDS + limit))
while [ $SECONDS -lt $end ]; do
  sleep 30
  echo "--- $(date +%T) $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader)"
  tail -n 2 /tmp/study.log | cut -c1-200
  for log in /tmp/study/pretrain/*/*/log.jsonl /tmp/study/ship/*/log.jsonl; do
    [ -f "$log" ] && echo "$log $(tail -n 1 "$log" | cut -c1-160)"
  done 2>/dev/null | sed 's|/tmp/study/||'
  [ -f /tmp/tests.log ] && echo "tests: $(grep -ac PASSED /tmp/tests.log) passed" && grep -a FAILED /tmp/tests.log | cut -c1-160
  pgrep -f backbone_study.py >/dev/null || pgrep -f "pytest -v -rf" >/dev/null || break
done
cp /tmp/study.log /tmp/tests.log "$OUT"/ 2>/dev/null
tar czf "$OUT/study.tgz" -C /tmp --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pkl' study 2>/dev/null
for model in /tmp/study/ship/*/; do
  [ -f "$model/model.safetensors" ] && tar czf "$OUT/ship_$(basename "$model").tgz" -C "$model" --exclude=checkpoint .
done
ls -la "$OUT"
