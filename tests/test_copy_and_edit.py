"""Copy and edit: a user who adds a validation prompt, an augmentation or a LoRA target changes one place, and the
prompt cache, the latent cache and the exporters follow it, or say in one line why they cannot."""

import pytest

import train_dreambooth_lora_ssd1b as trainer
from conftest import run_trainer, tiny_args


def models_of_the_run(monkeypatch):
    """The run's models as training starts: what its caches hold."""
    seen, real = {}, trainer.train
    monkeypatch.setattr(trainer, "train", lambda accelerator, models, *a, **k: seen.update(models=models)
                        or real(accelerator, models, *a, **k))
    return seen


def test_a_second_validation_prompt_needs_no_other_edit(tiny_model, photos, tmp_path, monkeypatch):
    from PIL import Image

    # the user's one edit: validation_prompts returns a second prompt
    monkeypatch.setattr(trainer, "validation_prompts", lambda args: [args.validation_prompt, "a sks dog in snow"])
    seen = models_of_the_run(monkeypatch)
    run_trainer(*tiny_args(tiny_model, photos, tmp_path / "out", "--max_train_steps", 1, "--optimizer", "adamw",
                           "--center_crop", "--validation_prompt", "a sks dog", "--validation_inference_steps", 2,
                           "--num_validation_images", 1))
    assert {"a sks dog", "a sks dog in snow"} <= set(seen["models"].prompt_cache), "both cached"
    folder = tmp_path / "out" / "validation" / "step0"
    first, second = Image.open(folder / "seed0.png"), Image.open(folder / "prompt1_seed0.png")
    assert first.tobytes() != second.tobytes(), "each prompt rendered from its own embeddings"
    assert Image.open(folder / "grid.png").height == 2 * first.height, "a row per prompt"
