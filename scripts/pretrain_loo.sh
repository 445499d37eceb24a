#!/usr/bin/env bash
# Leave-one-dataset-out pretraining, the evidence of docs/pretraining.md "Does pretraining transfer?": for each
# dataset D of the development data, the tiny ViT of configs/pretrain/vit_tiny_med.yaml pretrained without D
# (runs/loo/D), plus the random init of the same size (runs/random_vit_tiny, also the runs' start).
#   scripts/pretrain_loo.sh [STEPS] [DATA_DIR]
#   accelerate launch -m l2l_peft.experiments configs/experiments/backbone_transfer_loo.yaml --output runs/backbone_transfer_loo
# Runs go round-robin over the visible GPUs, all at once (H100: three runs on one GPU got 2,400
# images/s each, one alone 7,200: no faster than in turn, but one command).
set -euo pipefail
steps=${1:-1500}
data=${2:-../shared/data}
gpus=$(python3 -c "import torch; print(max(1, torch.cuda.device_count()))")
mkdir -p runs/loo
python3 -m l2l_peft.pretrain configs/pretrain/vit_tiny_med.yaml --npz-dir "$data" --output runs/random_vit_tiny --steps 0 --no-resume --log-level WARNING
pids=() i=0
for path in "$data"/*.npz; do
  name=$(basename "$path" .npz)
  CUDA_VISIBLE_DEVICES=$((i % gpus)) python3 -m l2l_peft.pretrain configs/pretrain/vit_tiny_med.yaml --npz-dir "$data" \
    --exclude "$name" --steps "$steps" --output "runs/loo/$name" --no-resume --log-level WARNING >"runs/loo/$name.log" 2>&1 &
  pids+=($!) i=$((i + 1))
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
for run in runs/loo/*/; do echo "$run $(tail -n 1 "${run}log.jsonl" 2>/dev/null)"; done
exit $failed
