#!/usr/bin/env bash
# DreamBooth end to end on the tiny pre-trained world (examples/tiny_world.py): CPU only, no network, one thread,
# quick on any machine. The shipped model (examples/tiny_world_model) learns the subject in
# examples/tiny_world_subject, a star yellow above its middle and teal below, that no caption of its world
# describes: training (LoRA on the UNet and both text encoders, which never saw "sks" in pre-training) with prior
# preservation from the base model's prediction -> validation -> infer.py -> a before/after sheet. The tiny model is
# weak: its renders take the subject's colours and their layout, roughly, not its crisp shape.
#   bash examples/offline_demo.sh [WORK_DIR]     (default work_dirs/offline_demo)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-work_dirs/offline_demo}
export HF_HUB_OFFLINE=1
# One thread unless you set another count: a model this small gains nothing from more, and on a busy machine
# OpenMP's extra threads spin waiting for a core (many times slower on a shared 2-core machine)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

python train_dreambooth_lora_ssd1b.py \
  --pretrained_model_name_or_path examples/tiny_world_model --pretrained_vae_model_name_or_path none \
  --instance_dir examples/tiny_world_subject --instance_prompt "a photo of sks star" \
  --with_prior_preservation --class_prompt "a photo of a star" --prior_target base_prediction \
  --resolution 64 --random_flip --optimizer adamw --learning_rate 1e-3 \
  --train_text_encoder --text_encoder_lr 1e-3 \
  --max_train_steps 200 --checkpointing_steps 100 \
  --validation_prompt "a photo of sks star on a night background" --validation_steps 100 \
  --validation_inference_steps 20 \
  --output_dir "$work/run" --overwrite_output_dir  # a demo: re-running it replaces its own adapters
python infer.py --checkpoint "$work/run/step199" --prompt "a photo of sks star on a grass background" \
  --num_inference_steps 20 --output "$work/renders"
python examples/before_after.py --checkpoint "$work/run/step199" --output "$work/before_after.png"
echo "adapters: $work/run/step199   validation: $work/run/validation   renders: $work/renders"
echo "before and after: $work/before_after.png"
