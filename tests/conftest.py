"""Shared fixtures: one tiny SSD-1B-shaped model per test run, the demo photos, one trained run and one DoRA run."""

import shutil
from pathlib import Path

import pytest

from make_tiny_ssd1b import make_tiny_ssd1b

ROOT = Path(__file__).resolve().parents[1]
DEMO_PHOTOS = ROOT / "examples" / "dog"


def run_trainer(*argv):
    """The trainer's main() in this process, with accelerate's process-wide state reset between runs."""
    from accelerate.state import AcceleratorState, GradientState

    import train_dreambooth_lora_ssd1b as trainer

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    trainer.main([str(a) for a in with_flags([], *argv)])


def check_inputs(argv):
    """Parse and check as main() does, up to the point where models would load: (photos, prompts, settings)."""
    import train_dreambooth_lora_ssd1b as trainer

    argv = [str(a) for a in argv]
    args = trainer.parse_args(argv)
    return trainer.check_inputs(args, trainer.derive_settings(args, argv))


def with_flags(argv, *extra):
    """argv with the extra flags: a flag argv (or an earlier extra) already has takes the new value, as a test
    that changes one flag means (the trainer refuses a flag given twice)."""
    argv, extra = list(argv), list(extra)
    while extra:
        flag = extra.pop(0)
        value = [extra.pop(0)] if extra and not str(extra[0]).startswith("--") else []
        if flag in argv and value:
            argv[argv.index(flag) + 1] = value[0]
        elif flag not in argv:
            argv += [flag, *value]
    return argv


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_tiny_ssd1b(tmp_path_factory.mktemp("tiny") / "ssd1b")


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos") / "dog"
    shutil.copytree(DEMO_PHOTOS, folder)
    return folder


def tiny_args(tiny_model, photos, output_dir, *extra):
    """Flags for a fast run on the tiny model: 64x64 pixels, plain AdamW, no tensorboard."""
    return with_flags(["--pretrained_model_name_or_path", tiny_model,
                       "--pretrained_vae_model_name_or_path", Path(tiny_model) / "vae",
                       "--instance_dir", photos, "--instance_prompt", "a photo of sks dog",
                       "--resolution", 64, "--output_dir", output_dir, "--report_to", "none"], *extra)


@pytest.fixture(scope="session")
def trained_run(tiny_model, photos, tmp_path_factory):
    """A 4-step run with prior preservation and both text encoders trained; rank 4 with alpha 8.

    The learning rate is high so the adapters visibly change outputs after so few steps.
    """
    output_dir = tmp_path_factory.mktemp("run") / "out"
    run_trainer(*tiny_args(tiny_model, photos, output_dir,
                           "--with_prior_preservation", "--class_prompt", "a photo of dog", "--num_class_images", 3,
                           "--train_text_encoder", "--text_encoder_lr", 1e-2, "--learning_rate", 1e-2,
                           "--rank", 4, "--lora_alpha", 8, "--max_train_steps", 4, "--checkpointing_steps", 2,
                           "--optimizer", "adamw", "--random_flip"))
    return output_dir


DORA_VALIDATION = ["--validation_prompt", "a photo of sks dog in a bucket", "--num_validation_images", 1,
                   "--validation_inference_steps", 2]


def dora_args(tiny_model, photos, output_dir, *extra):
    """The DoRA run's flags, validation aside: DoRA on the UNet and both text encoders, rank 4 with alpha 8."""
    return tiny_args(tiny_model, photos, output_dir, "--use_dora", "--train_text_encoder", "--text_encoder_lr", 1e-2,
                     "--learning_rate", 1e-2, "--rank", 4, "--lora_alpha", 8, "--optimizer", "adamw", *extra)


@pytest.fixture(scope="session")
def dora_run(tiny_model, photos, tmp_path_factory):
    """A 2-step DoRA run that validates at its end: validation/step1/seed0.png is the trained model's own render.

    The learning rate is high so the adapters visibly change outputs after so few steps.
    """
    output_dir = tmp_path_factory.mktemp("dora") / "out"
    run_trainer(*dora_args(tiny_model, photos, output_dir, "--max_train_steps", 2, *DORA_VALIDATION))
    return output_dir
