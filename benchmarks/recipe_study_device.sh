#!/usr/bin/env bash
# benchmarks/recipe_study.py on the GPU machine, in detached study processes (setsid) that run on between calls
# while the machine is held, so data too large for one call can follow in the next (each within 30 s of the last).
#   setup PACK...            wheels (.whl) -> $root/site; a bf16 model directory in .devdata/model -> float32 in
#                            $root/model (once); each PACK (a pack224.py folder) unpacked into $root/data
#   start TAG "DATASETS" [STUDY ARGS...]
#                            one detached study process per dataset -> $root/study/TAG/DATASET, log in $root/logs
#                            (the backbone is $root/model unless STUDY ARGS name --model)
#   continued [STUDY ARGS...]
#                            benchmarks/continued_study.py (issue #28) detached on $root/model and $root/data, its
#                            work in $root/study/continued (follow it with: poll LIMIT continued)
#   poll LIMIT [TAG...]      follow until no study process runs or LIMIT s passed, then each TAG comes back as
#                            $OUT/TAG.tgz (raw predictions, tables; weights and checkpoints stay) and the logs as
#                            $OUT/logs.tgz; the logs' last lines print
# e.g. setup .devdata/d1 && start tune "wbc_type_bccd" --shots 5 10 --recipes lora full && poll 500 tune
# Score here: python benchmarks/recipe_analysis.py DIR ... (records of one task from several processes are merged).
set -uo pipefail
mode=$1; shift || exit 2
root=${DEVICE_ROOT:-/tmp}
export PYTHONPATH=$root/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=2
case $mode in
  setup)
    if [ ! -d "$root/site" ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$root/site" .whl/*.whl || exit 1
    fi
    if [ ! -d "$root/model" ] && [ -d .devdata/model ]; then
      python3 - "$root/model" <<'EOF' || exit 1
import shutil, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
src, dst = Path(".devdata/model"), Path(sys.argv[1])
dst.mkdir()
for f in src.iterdir():
    if f.name != "model.safetensors":
        shutil.copy(f, dst / f.name)
save_file({k: v.float() for k, v in load_file(src / "model.safetensors").items()}, dst / "model.safetensors", {"format": "pt"})
EOF
    fi
    for pack in "$@"; do
      python3 "$pack/pack224.py" unpack "$pack" "$root/data" >/dev/null || exit 1
    done
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    ls "$root/data" 2>/dev/null || echo "no data packs yet"
    ;;
  start)
    tag=$1 datasets=$2; shift 2 || exit 2
    model=(--model "$root/model")
    case " $* " in *" --model "*) model=() ;; esac
    mkdir -p "$root/logs"
    for dataset in $datasets; do
      setsid nohup python3 benchmarks/recipe_study.py --data "$root/data" --datasets "$dataset" "${model[@]}" \
        --out "$root/study/$tag/$dataset" --max-minutes 60 --chunk 2 "$@" >"$root/logs/$tag.$dataset.log" 2>&1 &
    done
    ;;
  continued)
    mkdir -p "$root/logs"
    setsid nohup python3 benchmarks/continued_study.py --data "$root/data" --model "$root/model" \
      --work "$root/study/continued" "$@" >"$root/logs/continued.log" 2>&1 &
    ;;
  poll)
    limit=$1; shift || exit 2
    end=$((SECONDS + limit)) studies='benchmarks/(recipe|continued)_study[.]py'
    while [ $SECONDS -lt $end ] && pgrep -f "$studies" >/dev/null; do
      sleep "${POLL_EVERY:-20}"
      echo "--- $(date +%T) $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader) $(pgrep -fc "$studies") running"
      tail -n 1 "$root/logs/continued.log" 2>/dev/null | cut -c1-160
    done
    for log in "$root"/logs/*.log; do echo "$(basename "$log"): $(tail -n 1 "$log" | cut -c1-160)"; done
    for tag in "$@"; do
      [ -d "$root/study/$tag" ] && tar czf "$OUT/$tag.tgz" --exclude='*.safetensors' --exclude='*.bin' \
        --exclude='*.pkl' -C "$root/study" "$tag"
    done
    tar czf "$OUT/logs.tgz" -C "$root/logs" .
    ;;
  *) echo "unknown mode $mode (setup, start, continued, poll)" >&2; exit 2 ;;
esac
