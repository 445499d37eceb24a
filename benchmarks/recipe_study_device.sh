#!/usr/bin/env bash
# benchmarks/recipe_study.py on the GPU machine: one process per unseen dataset at once (ViT-tiny tasks
# leave an H200 mostly idle, so six processes finish in about the time of one). Carry .whl and
# .devdata/all (../shared/data/pack.py); raw predictions land in $OUT/study/DATASET, logs in $OUT.
#   benchmarks/recipe_study_device.sh MINUTES [STUDY ARGS...]   e.g. 4 --shots 1 5 10 --recipes lora full
# Score them here: python benchmarks/recipe_analysis.py DIR --only ... (the study's records, paired by task).
set -uo pipefail
minutes=$1; shift || exit 2
root=${DEVICE_ROOT:-/tmp}
export PYTHONPATH=$root/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$root/site" .whl/*.whl || exit 1
python3 .devdata/all/pack.py unpack .devdata/all "$root/data" >/dev/null || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
datasets=$(cd benchmarks && python3 -c "from recipe_study import UNSEEN; print(*UNSEEN)") || exit 1
for dataset in $datasets; do
  python3 benchmarks/recipe_study.py --data "$root/data" --out "$OUT/study/$dataset" --datasets "$dataset" \
    --max-minutes "$minutes" "$@" >"$OUT/$dataset.log" 2>&1 &
done
wait
tail -n 2 "$OUT"/*.log
