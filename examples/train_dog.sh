#!/usr/bin/env bash
# The reference recipe (diffengine's ssd_1b_dreambooth_lora_dog) on a GPU with the hub reachable:
# 5 dog photos, "a photo of sks dog", 1024x1024, LoRA rank 8 on to_q/to_k/to_v/to_out.0, lr 1e-4, 500 steps,
# 4 validation images of "A photo of sks dog in a bucket" every 100 steps. The adapters end in
# work_dirs/ssd_1b_dreambooth_lora_dog-example/step499. Extra flags are passed on, e.g. --with_prior_preservation,
# and one of the recipe's own flags passed again replaces the recipe's value, e.g. --mixed_precision bf16.
# One process runs without a launcher, so a mistake is one line; LAUNCH picks one for several GPUs, e.g.
#   LAUNCH="accelerate launch --config_file examples/accelerate/multi_gpu.yaml" bash examples/train_dog.sh
set -euo pipefail
cd "$(dirname "$0")/.."
recipe=(  # flag value pairs
  --pretrained_model_name_or_path segmind/SSD-1B
  --pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix
  --instance_dir diffusers/dog-example
  --instance_prompt "a photo of sks dog"
  --resolution 1024 --rank 8 --learning_rate 1e-4 --max_train_steps 500
  --validation_prompt "A photo of sks dog in a bucket" --num_validation_images 4 --validation_steps 100
  --checkpointing_steps 100 --mixed_precision fp16
)

# Whether the user's flags name this recipe flag: in full, under its other name, or abbreviated as argparse allows
# (the trainer refuses a flag given twice, so the recipe must drop its own value rather than pass both)
user_gives() {
  local names=("$1") arg flag name
  [[ $1 == --instance_dir ]] && names+=(--instance_data_dir)
  for arg in "${@:2}"; do
    [[ $arg == --?* ]] || continue
    flag=${arg%%=*}
    for name in "${names[@]}"; do
      [[ $name == "$flag"* ]] && return 0
    done
  done
  return 1
}

kept=()
for ((i = 0; i < ${#recipe[@]}; i += 2)); do
  user_gives "${recipe[i]}" "$@" || kept+=("${recipe[i]}" "${recipe[i + 1]}")
done
${LAUNCH:-python} train_dreambooth_lora_ssd1b.py "${kept[@]}" "$@"
