"""The training step: SDXL's conditioning as the pipeline computes it, and the target the scheduler asks for."""

import pytest
import torch
from diffusers import DDPMScheduler

import train_dreambooth_lora_ssd1b as trainer
from dreambooth_kit import artifacts, imaging, pipeline
from conftest import run_trainer, tiny_args


@pytest.fixture
def models(tiny_model):
    return pipeline.load_models(tiny_model, tiny_model / "vae", None, None, torch.float32, "cpu")


def test_prompt_embeddings_match_the_sdxl_pipeline(models, tiny_model):
    pipe = pipeline.build_pipeline(models, str(tiny_model), None, None)
    prompts = ["a photo of sks dog", "a photo of dog"]
    with torch.no_grad():
        ours, ours_pooled = trainer.encode_prompt(models.text_encoders, models.tokenizers, prompts, "cpu")
        theirs, _, theirs_pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    assert ours.shape[-1] == models.unet.config.cross_attention_dim, "both encoders' hidden states side by side"
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours_pooled, theirs_pooled)
    assert models.tokenizers[1].pad_token == "!", "tokenizer_2 pads with '!'"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_target_follows_the_scheduler_prediction_type(models, tiny_model, photos, tmp_path, prediction_type):
    models.noise_scheduler = DDPMScheduler.from_config(models.noise_scheduler.config, prediction_type=prediction_type)
    seen = {}
    real_add_noise = models.noise_scheduler.add_noise

    def add_noise(latents, noise, timesteps):
        seen.update(latents=latents, noise=noise, timesteps=timesteps)
        return real_add_noise(latents, noise, timesteps)

    models.noise_scheduler.add_noise = add_noise
    zeros = lambda sample, *a, **k: type("Out", (), {"sample": torch.zeros_like(sample)})  # noqa: E731
    models.unet.forward = zeros
    args = trainer.parse_args([str(a) for a in tiny_args(tiny_model, photos, tmp_path / "out")])
    dataset = trainer.DreamBoothDataset(imaging.list_images(photos), "a photo of sks dog", resolution=64,
                                        center_crop=False, random_flip=False, seed=0, num_samples=2)
    batch = trainer.collate([dataset[0], dataset[1]])
    with torch.no_grad():
        loss = trainer.training_step(batch, models, torch.Generator().manual_seed(0), "cpu",
                                     **trainer.method_settings(args))

    alphas = models.noise_scheduler.alphas_cumprod[seen["timesteps"]].view(-1, 1, 1, 1)
    if prediction_type == "epsilon":
        target = seen["noise"]
    else:  # v = sqrt(a) * noise - sqrt(1 - a) * x0 (Salimans & Ho, 2022)
        target = alphas.sqrt() * seen["noise"] - (1 - alphas).sqrt() * seen["latents"]
    torch.testing.assert_close(loss, target.pow(2).mean(), rtol=1e-5, atol=1e-6)


def test_fp16_frozen_weights_leave_fp32_gradients_a_grad_scaler_can_unscale(tiny_model, photos, tmp_path):
    # what fp16 on a GPU does each step: autocast, a scaled backward, then unscale_ before clipping; unscale_
    # raises "Attempting to unscale FP16 gradients" if any trainable parameter is fp16
    models = pipeline.load_models(tiny_model, tiny_model / "vae", None, None, torch.float16, "cpu")
    trained = trainer.add_lora(models, 4, 4, 0.0, True)
    args = trainer.parse_args([str(a) for a in tiny_args(tiny_model, photos, tmp_path / "out", "--train_text_encoder",
                                                         "--optimizer", "adamw")])
    optimizer = trainer.make_optimizer(trained, args, (args.learning_rate, args.text_encoder_lr))
    dataset = trainer.DreamBoothDataset(imaging.list_images(photos), "a photo of sks dog", resolution=64,
                                        center_crop=False, random_flip=False, seed=0, num_samples=1)
    scaler = torch.amp.GradScaler("cpu")
    with torch.autocast("cpu", dtype=torch.float16):
        loss = trainer.training_step(trainer.collate([dataset[0]]), models, torch.Generator().manual_seed(0), "cpu",
                                     **trainer.method_settings(args))
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
    assert len(optimizer.param_groups) == 3, "the UNet and both text encoders train"
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads), \
        "every LoRA weight gets an fp32 gradient"
    assert {p.dtype for m in trained for p in m.parameters() if not p.requires_grad} == {torch.float16}


def test_two_accumulated_batches_of_one_train_as_one_batch_of_two(tiny_model, photos, tmp_path):
    # each sample's latent draw, noise and timestep come from (seed, sample), and accumulation averages: the
    # update is the same. Adam with a large epsilon and no clipping keeps the update proportional to the gradient,
    # so a summed instead of averaged gradient would show as a factor of 2
    import shutil

    from safetensors.torch import load_file

    class_dir = shutil.copytree(photos, tmp_path / "class")  # apart from the photos, as the trainer requires

    def run(name, batch_size, accumulation):
        run_trainer(*tiny_args(tiny_model, photos, tmp_path / name, "--max_train_steps", 1, "--optimizer", "adamw",
                               "--learning_rate", 1.0, "--adam_epsilon", 1.0, "--adam_weight_decay", 0,
                               "--max_grad_norm", 1e6, "--with_prior_preservation", "--class_prompt", "a photo of dog",
                               "--class_dir", class_dir, "--num_class_images", 3, "--train_batch_size", batch_size,
                               "--gradient_accumulation_steps", accumulation))
        return load_file(tmp_path / name / "step0" / artifacts.LORA_FILE)

    batched, accumulated = run("batched", 2, 1), run("accumulated", 1, 2)
    ups = [k for k in batched if "lora.up" in k or "lora_B" in k]
    assert ups and any(batched[k].abs().max() > 0 for k in ups), "LoRA's up weights start at zero, then learn"
    for key in batched:
        torch.testing.assert_close(accumulated[key], batched[key], rtol=1e-4, atol=1e-7)


def test_latents_and_noise_stay_fp32_under_bf16_so_the_smallest_timesteps_still_add_noise(tiny_model, photos,
                                                                                          tmp_path):
    # in bf16, add_noise at t=0 and t=1 rounds the noise away (the latent comes back unchanged while the target is
    # the noise), and t=2..5 share one level
    models = pipeline.load_models(tiny_model, tiny_model / "vae", None, None, torch.bfloat16, "cpu")
    seen, real_add_noise = {}, models.noise_scheduler.add_noise
    models.noise_scheduler.add_noise = lambda latents, noise, timesteps: seen.update(
        latents=latents, noise=noise) or real_add_noise(latents, noise, timesteps)
    args = trainer.parse_args([str(a) for a in tiny_args(tiny_model, photos, tmp_path / "out")])
    dataset = trainer.DreamBoothDataset(imaging.list_images(photos), "a photo of sks dog", resolution=64,
                                        center_crop=False, random_flip=False, seed=0, num_samples=2)
    batch = trainer.collate([dataset[0], dataset[1]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        trainer.training_step(batch, models, trainer.sample_generators(0, batch, "cpu"), "cpu",
                              **trainer.method_settings(args))
    assert seen["latents"].dtype == seen["noise"].dtype == torch.float32
    alphas = models.noise_scheduler.alphas_cumprod
    levels = []
    for t in range(6):
        noisy = real_add_noise(seen["latents"], seen["noise"], torch.full((2,), t))
        added = noisy - alphas[t].sqrt() * seen["latents"]
        torch.testing.assert_close(added, (1 - alphas[t]).sqrt() * seen["noise"], rtol=1e-3, atol=1e-5)
        levels.append(added.std().item())
    assert levels[0] > 0 and len(set(levels)) == 6, "noise at t=0, and a distinct level at each timestep"


@pytest.mark.parametrize("prior_target", ["class_images", "base_prediction"])
def test_time_ids_reach_the_unet_exactly_under_bf16(tiny_model, photos, tmp_path, prior_target):
    # bf16 holds 8 significant bits: a photo 1023 pixels tall would condition the UNet as one 1024 tall
    models = pipeline.load_models(tiny_model, tiny_model / "vae", None, None, torch.bfloat16, "cpu")
    trainer.add_lora(models, 4, 4, 0.0, False)  # the base prediction switches adapters off
    seen = []
    models.unet.add_time_proj.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].clone()))
    args = trainer.parse_args([str(a) for a in tiny_args(
        tiny_model, photos, tmp_path / "out", "--with_prior_preservation", "--class_prompt", "a photo of dog",
        "--prior_target", prior_target, *(["--class_dir", photos] if prior_target == "class_images" else []))])
    images = imaging.list_images(photos)
    class_images = images if prior_target == "class_images" else None
    dataset = trainer.DreamBoothDataset(images, "a photo of sks dog", class_images,
                                        class_prompt="a photo of dog", resolution=64, center_crop=False,
                                        random_flip=False, seed=0, num_samples=1)
    batch = trainer.collate([dataset[0]])
    batch["time_ids"][:, :2] = torch.tensor([1023.0, 1021.0])  # original (height, width)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        trainer.training_step(batch, models, trainer.sample_generators(0, batch, "cpu"), "cpu",
                              **trainer.method_settings(args))
    assert seen and all(s.dtype == torch.float32 for s in seen)
    assert all(s.view(-1, 6)[:, :2].tolist() == [[1023.0, 1021.0]] * len(s.view(-1, 6)) for s in seen)


def test_a_compiled_bf16_run_takes_the_base_models_prediction_under_autocast(tiny_model, photos, tmp_path, monkeypatch):
    # accelerate puts its autocast on the module it prepares, torch.compile's wrapper here, while the base
    # prediction calls the bare UNet beneath it: without an autocast of its own, fp32 latents meet bf16 weights.
    # A real torch.compile (dynamo's wrapper), with its eager backend: inductor's code generation would add minutes
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    out = tmp_path / "out"
    run_trainer(*tiny_args(tiny_model, photos, out, "--max_train_steps", 1, "--optimizer", "adamw", "--compile",
                           "--mixed_precision", "bf16", "--with_prior_preservation", "--class_prompt", "a photo of dog",
                           "--prior_target", "base_prediction"))
    assert (out / "step0" / artifacts.LORA_FILE).is_file()
