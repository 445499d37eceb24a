#!/usr/bin/env bash
# Leave-one-dataset-out pretraining, the evidence of docs/pretraining.md "Does pretraining transfer?": for each
# dataset D of the development data, the ViT of CONFIG (default configs/pretrain/vit_tiny_med.yaml) pretrained
# without D (OUT/D, default runs/loo/D), plus the random init of the same size (runs/random_vit_SIZE, also the
# runs' start; made once). Other objectives: e.g. configs/pretrain/vit_tiny_ssl.yaml runs/loo_ssl.
#   scripts/pretrain_loo.sh [STEPS] [DATA_DIR] [CONFIG] [OUT]
#   accelerate launch -m l2l_peft.experiments configs/experiments/backbone_transfer_loo.yaml --output runs/backbone_transfer_loo
# Runs go round-robin over the visible GPUs, all at once (H100: three runs on one GPU got 2,400
# images/s each, one alone 7,200: no faster than in turn, but one command).
set -euo pipefail
steps=${1:-1500}
data=${2:-../shared/data}
config=${3:-configs/pretrain/vit_tiny_med.yaml}
out=${4:-runs/loo}
gpus=$(python3 -c "import torch; print(max(1, torch.cuda.device_count()))")
size=$(python3 -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1])).get('model_size', 'tiny'))" "$config")
mkdir -p "$out"
if [ ! -f "runs/random_vit_$size/model.safetensors" ]; then
  python3 -m l2l_peft.pretrain "$config" --npz-dir "$data" --output "runs/random_vit_$size" --steps 0 --no-resume --log-level WARNING
fi
pids=() i=0
for path in "$data"/*.npz; do
  name=$(basename "$path" .npz)
  CUDA_VISIBLE_DEVICES=$((i % gpus)) python3 -m l2l_peft.pretrain "$config" --npz-dir "$data" \
    --exclude "$name" --steps "$steps" --output "$out/$name" --no-resume --log-level WARNING >"$out/$name.log" 2>&1 &
  pids+=($!) i=$((i + 1))
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
for run in "$out"/*/; do echo "$run $(tail -n 1 "${run}log.jsonl" 2>/dev/null)"; done
exit $failed
