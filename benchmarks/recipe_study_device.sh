#!/usr/bin/env bash
# benchmarks/recipe_study.py on the GPU machine: one process per unseen dataset at once (ViT-tiny tasks
# leave an H200 mostly idle). Carry .whl and .devdata/all (../shared/data/pack.py). A call brings back
# at most 8 files: the raw predictions come back as $OUT/study.tgz (study/DATASET/study_*.pt), the logs
# as $OUT/logs.tgz (DATASET.log), and the logs' last lines are printed.
#   [DATASETS="a b"] benchmarks/recipe_study_device.sh MINUTES [STUDY ARGS...]   e.g. 4 --shots 1 5 10 --recipes lora full
# Score them here: python benchmarks/recipe_analysis.py DIR --only ... (the study's records, paired by task).
set -uo pipefail
minutes=$1; shift || exit 2
root=${DEVICE_ROOT:-/tmp}
export PYTHONPATH=$root/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$root/site" .whl/*.whl || exit 1
python3 .devdata/all/pack.py unpack .devdata/all "$root/data" >/dev/null || exit 1
rm -rf "$root/study" "$root/logs" && mkdir -p "$root/logs" || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
datasets=${DATASETS:-$(cd benchmarks && python3 -c "from recipe_study import UNSEEN; print(*UNSEEN)")} || exit 1
for dataset in $datasets; do
  python3 benchmarks/recipe_study.py --data "$root/data" --out "$root/study/$dataset" --datasets "$dataset" \
    --max-minutes "$minutes" "$@" >"$root/logs/$dataset.log" 2>&1 &
done
wait
tail -n 2 "$root"/logs/*.log
tar czf "$OUT/study.tgz" -C "$root" study && tar czf "$OUT/logs.tgz" -C "$root/logs" .
