#!/usr/bin/env bash
# The whole flow on a tiny, randomly initialised SSD-1B-shaped model: CPU only, no network, under 2 minutes on
# 2 cores. It proves the plumbing (class images -> training -> validation -> infer.py), never image quality.
#   bash examples/offline_demo.sh [WORK_DIR]     (default work_dirs/offline_demo)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-work_dirs/offline_demo}
export HF_HUB_OFFLINE=1

python examples/make_tiny_ssd1b.py "$work/tiny-ssd1b"
python train_dreambooth_lora_ssd1b.py \
  --pretrained_model_name_or_path "$work/tiny-ssd1b" \
  --pretrained_vae_model_name_or_path "$work/tiny-ssd1b/vae" \
  --instance_dir examples/dog --instance_prompt "a photo of sks dog" \
  --with_prior_preservation --class_prompt "a photo of dog" --num_class_images 8 \
  --resolution 64 --max_train_steps 20 --checkpointing_steps 10 \
  --validation_prompt "a photo of sks dog in a bucket" --validation_steps 10 --validation_inference_steps 10 \
  --output_dir "$work/run" --overwrite_output_dir  # a demo: re-running it replaces its own adapters
python infer.py --checkpoint "$work/run/step19" --prompt "a photo of sks dog in a bucket" \
  --num_inference_steps 20 --output "$work/renders"
echo "adapters: $work/run/step19   validation: $work/run/validation   renders: $work/renders"
