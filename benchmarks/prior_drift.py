"""Subject fidelity and language drift on the tiny world: no prior, class images, the base prediction.

    python benchmarks/prior_drift.py                  # examples/tiny_world_model and its subject, on a CPU
    python benchmarks/prior_drift.py --steps 300 ...  # other settings
    python benchmarks/prior_drift.py --fp8_base       # the same runs on a float8 base (or --nf4_base)

DreamBooth's two measures, on the pre-trained tiny world (examples/tiny_world.py), where training can teach:
- subject fidelity: the instance prompt's renders' distance to the subject (tiny_world.subject_distance, colours
  of the object, 0 = the subject's, 1 = none shared), as a ratio of the base model's: below 1 moved toward it;
- language drift: how much closer the class prompt's renders came to the subject (base distance - trained
  distance; 0 = no drift), and how much their pixels changed (mean absolute difference, 0-255).
Each variant trains the same steps with the same seed, then both prompts render with fixed seeds.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]
import tiny_world  # noqa: E402
import train_dreambooth_lora_ssd1b as trainer  # noqa: E402
from dreambooth_kit import imaging, pipeline

WORLD_MODEL, WORLD_SUBJECT = ROOT / "examples" / "tiny_world_model", ROOT / "examples" / "tiny_world_subject"
INSTANCE_PROMPT, CLASS_PROMPT = "a photo of sks star", "a photo of a star"
VARIANTS = {
    "no prior": [],
    "class images": ["--with_prior_preservation", "--class_prompt", CLASS_PROMPT, "--num_class_images", 20,
                     "--prior_target", "class_images"],
    "base prediction": ["--with_prior_preservation", "--class_prompt", CLASS_PROMPT,
                        "--prior_target", "base_prediction"],
}
# the settings that benchmarks/RESULTS.md's table and tests/test_world.py use
STEPS, LEARNING_RATE, RANK, SEEDS, INFERENCE_STEPS = 200, 1e-3, 8, tuple(range(8)), 20


def train_argv(model, photos, output_dir, extra=(), steps=STEPS, learning_rate=LEARNING_RATE, seed=0):
    """The trainer's flags for one run on the world's subject."""
    return [str(a) for a in [
        "--pretrained_model_name_or_path", model, "--pretrained_vae_model_name_or_path", "none",
        "--instance_dir", photos, "--instance_prompt", INSTANCE_PROMPT, "--resolution", 64, "--random_flip",
        "--output_dir", output_dir, "--report_to", "none", "--optimizer", "adamw", "--rank", RANK,
        "--learning_rate", learning_rate, "--max_train_steps", steps, "--checkpointing_steps", steps,
        "--seed", seed, *extra]]


def step_dir(output_dir, steps=STEPS):
    """Where a run of `steps` steps saves its last adapters."""
    return Path(output_dir) / f"step{steps - 1}"


def train(model, photos, output_dir, extra=(), steps=STEPS, learning_rate=LEARNING_RATE, seed=0):
    """One run of the trainer on the world's subject, in this process; returns its last step dir."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    trainer.main(train_argv(model, photos, output_dir, extra, steps, learning_rate, seed))
    return step_dir(output_dir, steps)


def world_pipeline(model):
    models = pipeline.load_models(model, None, None, None, torch.float32, "cpu")
    return pipeline.build_pipeline(models, model, None, None, progress=False)


def renders(pipe, step_dir, prompt, seeds=SEEDS, inference_steps=INFERENCE_STEPS):
    """The prompt's images, one per seed; the base model's when step_dir is None."""
    if step_dir is not None:
        pipeline.apply_adapters(pipe, step_dir)
    try:
        return pipeline.generate_images(pipe, prompt, list(seeds), 64, 64, inference_steps)
    finally:
        if step_dir is not None:
            pipe.delete_adapters("dreambooth")


def pixel_change(images, before):
    return float(np.mean([np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean()
                          for a, b in zip(images, before)]))


def scores(pipe, step_dir, base, profile):
    """{fidelity, toward, pixels} of a step dir against the base model's renders `base` (prompt -> images)."""
    instance, klass = renders(pipe, step_dir, INSTANCE_PROMPT), renders(pipe, step_dir, CLASS_PROMPT)
    d = {prompt: tiny_world.subject_distance(images, profile) for prompt, images in base.items()}
    return {"fidelity": tiny_world.subject_distance(instance, profile) / d[INSTANCE_PROMPT],
            "toward": d[CLASS_PROMPT] - tiny_world.subject_distance(klass, profile),
            "pixels": pixel_change(klass, base[CLASS_PROMPT])}


def measure(model, photos, work_dir, variants=tuple(VARIANTS), base=(), **train_kwargs):
    """{variant: scores} for each variant trained from the same seed; `base` adds flags to every run (--fp8_base)."""
    last, seconds = {}, {}
    for variant in variants:
        start = time.perf_counter()
        last[variant] = train(model, photos, Path(work_dir) / variant.replace(" ", "_"), [*VARIANTS[variant], *base],
                              **train_kwargs)
        seconds[variant] = time.perf_counter() - start
    pipe = world_pipeline(model)
    before = {prompt: renders(pipe, None, prompt) for prompt in (INSTANCE_PROMPT, CLASS_PROMPT)}
    profile = tiny_world.subject_profile([Image.open(p).convert("RGB") for p in imaging.list_images(Path(photos))])
    return {variant: {**scores(pipe, saved, before, profile), "seconds": seconds[variant]}
            for variant, saved in last.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(WORLD_MODEL))
    p.add_argument("--photos", default=str(WORLD_SUBJECT))
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--learning_rate", type=float, default=LEARNING_RATE)
    p.add_argument("--seed", type=int, default=0)
    storage = p.add_mutually_exclusive_group()
    storage.add_argument("--fp8_base", action="store_true", help="train each run on a float8 base")
    storage.add_argument("--nf4_base", action="store_true", help="train each run on a 4-bit NF4 base")
    args = p.parse_args(argv)
    base = ["--fp8_base"] if args.fp8_base else ["--nf4_base"] if args.nf4_base else []
    work = Path(tempfile.mkdtemp(prefix="prior_drift_"))
    try:
        result = measure(args.model, args.photos, work, steps=args.steps, learning_rate=args.learning_rate,
                         seed=args.seed, base=base)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"| prior | instance prompt's distance to the subject, / base model's | class prompt's move toward the "
          f"subject | class prompt's pixel change | training s |  ({args.steps} steps, lr {args.learning_rate:g}, seed "
          f"{args.seed}{', ' + base[0] if base else ''})")
    print("|---|---|---|---|---|")
    for variant, s in result.items():
        print(f"| {variant} | {s['fidelity']:.3f} | {s['toward']:.3f} | {s['pixels']:.1f} | {s['seconds']:.0f} |")


if __name__ == "__main__":
    main()
