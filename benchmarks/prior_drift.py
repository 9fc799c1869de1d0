"""How far the class prompt's renders drift from the base model's: no prior, class images, the base prediction.

    python benchmarks/prior_drift.py                     # the tiny random model, on a CPU: about a minute
    python benchmarks/prior_drift.py --model PATH ...    # any SSD-1B-shaped model folder

DreamBooth's language drift: training "a photo of sks dog" also changes what "a photo of dog" renders. Prior
preservation holds the class prompt to the base model, either with class images (the paper's) or with the base
model's own prediction as the class half's target (--prior_target base_prediction). Each variant trains the same
steps with the same seed; then the class prompt renders with fixed seeds, and the drift is the mean absolute
pixel difference (0-255) from the base model's renders of the same seeds. The instance prompt's change is printed
beside it: a prior that held the class prompt by not learning at all would show there.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]
import train_dreambooth_lora_ssd1b as trainer  # noqa: E402

VARIANTS = {
    "no prior": [],
    "class images": ["--with_prior_preservation", "--prior_target", "class_images", "--num_class_images", 4],
    "base prediction": ["--with_prior_preservation", "--prior_target", "base_prediction"],
}
INSTANCE_PROMPT, CLASS_PROMPT = "a photo of sks dog", "a photo of dog"


def train(variant, model, photos, output_dir, steps, learning_rate, seed):
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    extra = VARIANTS[variant] + (["--class_prompt", CLASS_PROMPT] if VARIANTS[variant] else [])
    trainer.main([str(a) for a in [
        "--pretrained_model_name_or_path", model, "--pretrained_vae_model_name_or_path", Path(model) / "vae",
        "--instance_dir", photos, "--instance_prompt", INSTANCE_PROMPT, "--resolution", 64, "--center_crop",
        "--output_dir", output_dir, "--report_to", "none", "--optimizer", "adamw", "--learning_rate", learning_rate,
        "--max_train_steps", steps, "--checkpointing_steps", steps, "--seed", seed, *extra]])
    return Path(output_dir) / f"step{steps - 1}"


def renders(pipe, step_dir, prompts, seeds, inference_steps):
    """Each prompt's images, one per seed, as one array per prompt; the base model's when step_dir is None."""
    if step_dir is not None:
        trainer.apply_adapters(pipe, step_dir)
    images = [np.stack([np.asarray(trainer.generate_images(pipe, prompt, [seed], 64, 64, inference_steps)[0],
                                   dtype=np.float64) for seed in seeds]) for prompt in prompts]
    if step_dir is not None:
        pipe.delete_adapters("dreambooth")
    return images


def measure(model, photos, work_dir, steps=30, learning_rate=3e-3, seeds=(0, 1, 2, 3), inference_steps=8,
            seed=0, variants=tuple(VARIANTS)):
    """{variant: (class prompt's drift, instance prompt's change)} from the base model's renders."""
    prompts = (CLASS_PROMPT, INSTANCE_PROMPT)
    step_dirs = {variant: train(variant, model, photos, Path(work_dir) / variant.replace(" ", "_"), steps,
                                learning_rate, seed) for variant in variants}
    models = trainer.load_models(model, Path(model) / "vae", None, None, torch.float32, "cpu")
    pipe = trainer.build_pipeline(models, model, None, None, progress=False)
    base = renders(pipe, None, prompts, seeds, inference_steps)
    return {variant: tuple(float(np.abs(trained - before).mean()) for trained, before in
                           zip(renders(pipe, step_dir, prompts, seeds, inference_steps), base))
            for variant, step_dir in step_dirs.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the tiny random SSD-1B-shaped model, built here")
    p.add_argument("--photos", default=str(ROOT / "examples" / "dog"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--learning_rate", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="prior_drift_"))
    try:
        if args.model is None:
            from make_tiny_ssd1b import make_tiny_ssd1b

            args.model = str(make_tiny_ssd1b(work / "tiny"))
        result = measure(args.model, args.photos, work, args.steps, args.learning_rate, seed=args.seed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"| prior | class prompt's drift from the base model | instance prompt's change |  ({args.steps} steps, "
          f"lr {args.learning_rate:g}, seed {args.seed})")
    print("|---|---|---|")
    for variant, (drift, change) in result.items():
        print(f"| {variant} | {drift:.2f} | {change:.2f} |")


if __name__ == "__main__":
    main()
