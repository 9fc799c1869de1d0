"""Caches: latents and prompt embeddings computed once must train exactly as computing them every step."""

import numpy as np
import pytest
import torch

import train_dreambooth_lora_ssd1b as trainer
from dreambooth_kit import imaging, pipeline, telemetry
from conftest import run_trainer, tiny_args


@pytest.fixture
def models(tiny_model):
    return pipeline.load_models(tiny_model, tiny_model / "vae", None, None, torch.float32, "cpu")


def losses(models, photos, tiny_model, tmp_path, cached, steps=4):
    """Losses of a few steps on fixed samples and fixed noise, with or without the caches."""
    args = trainer.parse_args([str(a) for a in tiny_args(
        tiny_model, photos, tmp_path / "out", "--center_crop", "--random_flip", "--with_prior_preservation",
        "--class_prompt", "a photo of dog")])
    images = imaging.list_images(photos)
    models.latent_cache = models.prompt_cache = None
    if cached:
        accelerator = type("A", (), {"device": "cpu", "print": print, "is_main_process": True})()
        trainer.build_caches(accelerator, models, args, trainer.latent_targets(images, images, 64),
                             ["a photo of sks dog"] * len(images))
        assert models.latent_cache and models.prompt_cache
    dataset = trainer.DreamBoothDataset(images, "a photo of sks dog", images[::-1], class_prompt="a photo of dog",
                                        resolution=64, center_crop=True, random_flip=True, seed=0,
                                        num_samples=2 * steps, cached=cached)
    result = []
    for step in range(steps):
        batch = trainer.collate([dataset[2 * step], dataset[2 * step + 1]])
        assert ("latent_key" in batch) == cached and ("pixel_values" in batch) != cached
        with torch.no_grad():
            generator = torch.Generator().manual_seed(step)
            loss = trainer.training_step(batch, models, generator, "cpu", **trainer.method_settings(args))
            result.append(loss.item())
    return result


def test_cached_and_uncached_steps_give_the_same_loss_for_the_same_noise(models, photos, tiny_model, tmp_path):
    uncached = losses(models, photos, tiny_model, tmp_path, cached=False)
    cached = losses(models, photos, tiny_model, tmp_path, cached=True)
    assert cached == pytest.approx(uncached, rel=1e-5)
    assert len(set(uncached)) == len(uncached), "different steps, different samples and noise"


def test_latent_cache_holds_both_flips_with_their_own_crop_coordinates(models, photos):
    images = imaging.list_images(photos)[:2]
    cache = trainer.encode_latent_cache(models.vae, trainer.latent_targets(images, [], 64), False, True, 0, "cpu")
    assert set(cache) == {(str(p), flipped, (64, 64)) for p in images for flipped in (False, True)}
    moments, time_ids, mask = cache[(str(images[0]), False, (64, 64))]
    assert mask is None, "no mask without --masked_loss"
    assert moments.shape == (8, 8, 8), "mean and log-variance of 4 latent channels at 64/8 pixels"
    _, flipped_time_ids, _ = cache[(str(images[0]), True, (64, 64))]
    height, width, top, left = time_ids[:4].tolist()
    scaled_width = round(width * 64 / min(height, width))
    assert flipped_time_ids[3].item() == scaled_width - 64 - left, "the crop actually taken, after the flip"


def test_latent_cache_is_on_by_default_only_where_it_is_exact(photos, tmp_path):
    from PIL import Image

    targets = trainer.latent_targets(imaging.list_images(photos), [], 64)
    assert trainer.latent_cache_is_exact(targets, center_crop=True)
    assert not trainer.latent_cache_is_exact(targets, center_crop=False), "random crops"
    Image.new("RGB", (90, 90)).save(tmp_path / "square.png")
    square = trainer.latent_targets([tmp_path / "square.png"], [], 64)
    assert trainer.latent_cache_is_exact(square, center_crop=False), "a square leaves no choice"
    Image.new("RGB", (96, 64)).save(tmp_path / "wide.png")  # 3:2, in a 3:2 bucket: no choice either
    assert trainer.latent_cache_is_exact(trainer.latent_targets([tmp_path / "wide.png"], [], 64, ((64, 96),)), False)
    assert not trainer.latent_cache_is_exact(trainer.latent_targets([tmp_path / "wide.png"], [], 64), False)


def test_validation_from_cached_embeddings_matches_the_pipeline(models, tiny_model, photos, tmp_path):
    args = trainer.parse_args([str(a) for a in tiny_args(tiny_model, photos, tmp_path / "out",
                                                         "--validation_prompt", "a photo of sks dog in a bucket")])
    pipe = pipeline.build_pipeline(models, str(tiny_model), None, None)
    plain = pipeline.generate_images(pipe, args.validation_prompt, [0, 1], 64, 64, 3)
    models.prompt_cache = trainer.encode_prompt_cache(models, [args.validation_prompt, ""], "cpu")
    headless = pipeline.build_pipeline(trainer.dataclasses.replace(models, text_encoders=[None, None]),
                                      str(tiny_model), None, None)
    cached = pipeline.generate_images(headless, None, [0, 1], 64, 64, 3,
                                     **pipeline.cached_prompt_kwargs(headless, models, args.validation_prompt))
    for a, b in zip(plain, cached):
        np.testing.assert_allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), atol=1)


def test_frozen_text_encoders_leave_the_device_and_trained_ones_stay(tiny_model, photos, tmp_path, monkeypatch):
    seen = {}
    real = trainer.train
    monkeypatch.setattr(trainer, "train", lambda accelerator, models, *a, **k: seen.update(models=models)
                        or real(accelerator, models, *a, **k))
    run_trainer(*tiny_args(tiny_model, photos, tmp_path / "a", "--max_train_steps", 1, "--optimizer", "adamw",
                           "--center_crop", "--validation_prompt", "a sks dog", "--validation_inference_steps", 2))
    models = seen["models"]
    # no "": SSD-1B's pipeline makes the negative prompt zeros, and no caption is dropped
    assert models.latent_cache and set(models.prompt_cache) == {"a photo of sks dog", "a sks dog"}
    assert (tmp_path / "a" / "validation" / "step0" / "seed0.png").is_file(), "validation ran on cached prompts"
    run_trainer(*tiny_args(tiny_model, photos, tmp_path / "b", "--max_train_steps", 1, "--optimizer", "adamw",
                           "--train_text_encoder"))
    assert seen["models"].prompt_cache is None and seen["models"].latent_cache is None


@pytest.mark.parametrize("caption_dropout, validation, zeros, empty", [
    (0.0, None, True, False), (0.0, "a sks dog", True, False), (0.1, None, True, True),
    (0.0, "a sks dog", False, True), (0.0, None, False, False)])
def test_the_empty_prompt_is_embedded_only_where_the_run_reads_it(tiny_model, photos, tmp_path, caption_dropout,
                                                                  validation, zeros, empty):
    """Each prompt is a full pass of both encoders (0.7 s for SSD-1B's on one CPU thread, on the way to the first
    step); "" is read by a dropped caption, and by validation where the pipeline does not make it zeros."""
    extra = ["--caption_dropout", caption_dropout, "--with_prior_preservation", "--class_prompt", "a photo of dog"]
    args = trainer.parse_args([str(a) for a in tiny_args(tiny_model, photos, tmp_path / "out", *extra,
                                                         *(["--validation_prompt", validation] if validation else []))])
    prompts = trainer.prompts_to_cache(["a photo of sks dog", "a sks dog in snow"], args, zeros)
    expected = {"a photo of sks dog", "a sks dog in snow", "a photo of dog", validation} - {None}
    assert prompts == sorted(expected | ({""} if empty else set()))


def test_validation_renders_from_the_cache_where_the_pipeline_embeds_the_empty_prompt(tiny_model, photos, tmp_path):
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    run_trainer(*tiny_args(model, photos, tmp_path / "out", "--max_train_steps", 1, "--optimizer", "adamw",
                           "--center_crop", "--validation_prompt", "a sks dog", "--validation_inference_steps", 2,
                           "--num_validation_images", 1))
    assert (tmp_path / "out" / "validation" / "step0" / "seed0.png").is_file()


def test_what_the_caches_replace_is_let_go_and_validation_still_renders(tiny_model, photos, tmp_path, monkeypatch):
    import gc
    import weakref

    refs, real = {}, trainer.build_caches

    def build_caches(accelerator, models, *a):
        refs.update(text_encoders=[weakref.ref(m) for m in models.text_encoders],
                    vae_encoder=weakref.ref(models.vae.encoder))
        real(accelerator, models, *a)
        gc.collect()
        refs.update(alive=[r() is not None for r in [*refs["text_encoders"], refs["vae_encoder"]]])
    monkeypatch.setattr(trainer, "build_caches", build_caches)
    run_trainer(*tiny_args(tiny_model, photos, tmp_path / "out", "--max_train_steps", 1, "--optimizer", "adamw",
                           "--center_crop", "--validation_prompt", "a sks dog", "--validation_inference_steps", 2,
                           "--num_validation_images", 1))
    assert refs["alive"] == [False, False, False], "both text encoders and the VAE encoder are no longer held"
    # validation without them renders what infer.py renders from the saved adapters with every model loaded
    import infer
    from PIL import Image

    rendered = infer.main(["--checkpoint", str(tmp_path / "out" / "step0"), "--prompt", "a sks dog",
                           "--num_inference_steps", "2", "--output", str(tmp_path / "renders")])
    validation = Image.open(tmp_path / "out" / "validation" / "step0" / "seed0.png")
    np.testing.assert_allclose(np.asarray(validation, dtype=float), np.asarray(Image.open(rendered[0]), dtype=float),
                               atol=2)


@pytest.mark.parametrize("class_images, alive", [(False, [False, False]), (True, [True, True])])
def test_the_unet_loads_once_and_after_the_text_encoders_unless_class_images_need_both(
        class_images, alive, tiny_model, photos, tmp_path, monkeypatch):
    # A UNet load holds its weights file's pages beside the weights it makes from them; beside the text encoders
    # too, that was the whole run's peak (full-size SSD-1B in bf16 on a CPU, benchmarks/cpu_memory.py)
    import gc
    import weakref

    encoders, alive_at_unet_load = [], []
    real_load_models, real_load_unet = pipeline.load_models, pipeline.load_unet

    def load_models(*a, **k):
        models = real_load_models(*a, **k)
        encoders.extend(weakref.ref(m) for m in models.text_encoders)
        return models

    def load_unet(*a, **k):
        gc.collect()
        alive_at_unet_load.append([r() is not None for r in encoders])
        return real_load_unet(*a, **k)

    monkeypatch.setattr(trainer, "load_models", load_models)
    monkeypatch.setattr(trainer, "load_unet", load_unet)
    prior = ["--with_prior_preservation", "--class_prompt", "a photo of dog", "--num_class_images", 1,
             "--class_dir", tmp_path / "class_images"] if class_images else []
    run_trainer(*tiny_args(tiny_model, photos, tmp_path / "out", "--max_train_steps", 1, "--optimizer", "adamw",
                           *prior))
    assert alive_at_unet_load == [alive]
    assert len(list((tmp_path / "class_images").glob("*"))) == (1 if class_images else 0)


def test_release_memory_frees_cycles_made_after_the_imports_were_frozen():
    """The trainer freezes what its imports made (a full collection then skips it); what the run makes and lets go,
    reference cycles included, must still be freed when a cache lets a model go."""
    import gc
    import weakref

    assert gc.get_freeze_count() > 0, "frozen at import"
    model = torch.nn.Linear(2, 2)
    model.me = [model]  # a cycle: reference counting alone never frees it
    ref = weakref.ref(model)
    del model
    assert ref() is not None
    telemetry.release_memory()
    assert ref() is None
