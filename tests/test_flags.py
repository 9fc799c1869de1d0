"""Each flag does what it says: the ones that no whole-run test already pins down."""

import contextlib
import re
from pathlib import Path

import accelerate
import pytest
import torch

import train_dreambooth_lora_ssd1b as trainer
from dreambooth_kit import checks, imaging, messages, pipeline
from conftest import run_trainer, tiny_args


def parse(tiny_model, photos, tmp_path, *extra):
    return trainer.parse_args([str(a) for a in tiny_args(tiny_model, photos, tmp_path / "out", *extra)])


@pytest.fixture
def models(tiny_model):
    return pipeline.load_models(tiny_model, tiny_model / "vae", None, None, torch.float32, "cpu")


def test_optimizer_flags_reach_the_optimizer(models, tiny_model, photos, tmp_path):
    args = parse(tiny_model, photos, tmp_path, "--optimizer", "adamw", "--learning_rate", 2e-4,
                 "--train_text_encoder", "--text_encoder_lr", 3e-5, "--adam_beta1", 0.8, "--adam_beta2", 0.95,
                 "--adam_weight_decay", 0.01, "--adam_epsilon", 1e-6)
    trained = trainer.add_lora(models, args.rank, args.rank, args.lora_dropout, args.train_text_encoder)
    optimizer = trainer.make_optimizer(trained, args, (args.learning_rate, args.text_encoder_lr))
    assert type(optimizer) is torch.optim.AdamW
    assert [g["lr"] for g in optimizer.param_groups] == [2e-4, 3e-5, 3e-5], "unet, text_encoder, text_encoder_2"
    for group in optimizer.param_groups:
        assert (group["betas"], group["weight_decay"], group["eps"]) == ((0.8, 0.95), 0.01, 1e-6)
    lora = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert lora == sum(p.numel() for m in trained for n, p in m.named_parameters() if "lora_" in n)


def test_default_optimizer_is_8bit_adamw(models, tiny_model, photos, tmp_path):
    import bitsandbytes as bnb

    args = parse(tiny_model, photos, tmp_path)
    trained = trainer.add_lora(models, 8, 8, 0.0, False)
    optimizer = trainer.make_optimizer(trained, args, (args.learning_rate, args.text_encoder_lr))
    assert isinstance(optimizer, bnb.optim.AdamW8bit)


@pytest.mark.parametrize("extra, expected", [
    ([], (None, True, True, True)),  # diffusers' advanced script's defaults
    (["--prodigy_beta3", 0.99, "--no-prodigy_decouple", "--no-prodigy_use_bias_correction",
      "--no-prodigy_safeguard_warmup"], (0.99, False, False, False)),
])
def test_prodigy_flags_and_the_adam_flags_reach_prodigy(models, tiny_model, photos, tmp_path, capsys, extra,
                                                        expected):
    from prodigyopt import Prodigy

    args = parse(tiny_model, photos, tmp_path, "--optimizer", "prodigy", "--learning_rate", 0.5,
                 "--train_text_encoder", "--adam_beta1", 0.8, "--adam_beta2", 0.95, "--adam_weight_decay", 0.01,
                 "--adam_epsilon", 1e-6, *extra)
    trained = trainer.add_lora(models, args.rank, args.rank, args.lora_dropout, args.train_text_encoder)
    optimizer = trainer.make_optimizer(trained, args, checks.effective_learning_rates(args, 1))
    assert type(optimizer) is Prodigy
    assert [g["lr"] for g in optimizer.param_groups] == [0.5] * 3, "Prodigy takes one lr: the text encoders share it"
    for group in optimizer.param_groups:
        assert (group["betas"], group["weight_decay"], group["eps"]) == ((0.8, 0.95), 0.01, 1e-6)
        assert (group["beta3"], group["decouple"], group["use_bias_correction"],
                group["safeguard_warmup"]) == expected
    assert capsys.readouterr().out == "", "prodigyopt's print is silenced"


def test_lora_flags_shape_the_adapters(models):
    trained = trainer.add_lora(models, rank=3, alpha=6, dropout=0.1, train_text_encoder=False)
    config = trained[0].peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (3, 6, 0.1)
    targeted = {n.rsplit(".lora_A", 1)[0].split(".")[-1] for n, _ in trained[0].named_parameters() if ".lora_A" in n}
    assert targeted == {"to_q", "to_k", "to_v", "0"}, "attention projections only (to_out.0 ends in '0')"
    assert not any("lora_" in n for n, _ in models.text_encoders[0].named_parameters())


def test_use_dora_trains_a_magnitude_per_output_row_kept_fp32_under_bf16(tiny_model, photos, tmp_path):
    models = pipeline.load_models(tiny_model, tiny_model / "vae", None, None, torch.bfloat16, "cpu")
    trained = trainer.add_lora(models, 4, 4, 0.0, True, use_dora=True)
    args = parse(tiny_model, photos, tmp_path, "--optimizer", "adamw", "--use_dora", "--train_text_encoder")
    optimized = {id(p) for g in trainer.make_optimizer(trained, args, (1e-4, 1e-4)).param_groups for p in g["params"]}
    for model in trained:
        layers = [m for m in model.modules() if "default" in (getattr(m, "lora_A", None) or {})]
        assert layers and all("default" in m.lora_magnitude_vector for m in layers), "DoRA on every adapted layer"
        for layer in layers:
            magnitude, base = layer.lora_magnitude_vector["default"].weight, layer.get_base_layer().weight
            assert (magnitude.dtype, base.dtype, magnitude.shape) == (torch.float32, torch.bfloat16, base.shape[:1])
            assert magnitude.requires_grad and id(magnitude) in optimized
            # the model starts as the base model: each magnitude is its base weight row's norm
            torch.testing.assert_close(magnitude, base.float().norm(dim=1), rtol=1e-2, atol=0)


class NoiseDrawn(Exception):
    """Raised by the add_noise spy to end a step once its noise is drawn."""


def spied_step(models, photos, tiny_model, tmp_path, *extra, seed=0, instances=2, stop_at_noise=False):
    """One real training_step with prior preservation on a fixed batch (`instances` instance samples, then as
    many class samples) and a fixed generator; returns its loss (None when stopped at the noise) and what the
    scheduler's add_noise and the UNet saw and returned."""
    args = parse(tiny_model, photos, tmp_path, "--with_prior_preservation", "--class_prompt", "a photo of dog",
                 *extra)
    images = imaging.list_images(photos)
    dataset = trainer.DreamBoothDataset(images, args.instance_prompt, images[::-1], class_prompt=args.class_prompt,
                                        resolution=64, center_crop=False, random_flip=False, seed=0,
                                        num_samples=instances)
    batch = trainer.collate([dataset[k] for k in range(instances)])
    seen, loss = {}, None
    real_add_noise, real_unet = models.noise_scheduler.add_noise, models.unet.forward

    def add_noise(latents, noise, timesteps):
        seen.update(noise=noise.clone(), timesteps=timesteps.clone())
        if stop_at_noise:
            raise NoiseDrawn
        return real_add_noise(latents, noise, timesteps)

    def unet(*a, **k):
        out = real_unet(*a, **k)
        seen["prediction"] = out.sample.clone()
        return out

    models.noise_scheduler.add_noise, models.unet.forward = add_noise, unet
    try:
        with torch.no_grad():
            loss = trainer.training_step(batch, models, torch.Generator().manual_seed(seed), "cpu",
                                         **trainer.method_settings(args))
    except NoiseDrawn:
        pass
    finally:
        del models.noise_scheduler.add_noise, models.unet.forward
    return loss, seen


def test_noise_offset_adds_one_gaussian_constant_per_sample_and_channel(models, photos, tiny_model, tmp_path):
    offset, offsets = 0.1, []
    for seed in range(2):  # 2 steps x 10 samples x 4 channels: enough draws to measure the offset's spread
        noise = [spied_step(models, photos, tiny_model, tmp_path, *extra, seed=seed, instances=5,
                            stop_at_noise=True)[1]["noise"] for extra in [(), ("--noise_offset", offset)]]
        difference = noise[1].double() - noise[0].double()
        per_map = difference.mean(dim=(2, 3), keepdim=True)
        torch.testing.assert_close(difference, per_map.expand_as(difference), rtol=0, atol=1e-6,
                                   msg="the offset is one value per (sample, channel), constant over the image")
        offsets.append(per_map[:, :, 0, 0])
    offsets = torch.stack(offsets)  # (step, sample, channel)
    assert offsets.shape == (2, 10, 4) and offsets.abs().min() > 0, "every map is offset"
    assert (offsets - offsets.mean(dim=2, keepdim=True)).std().item() > 0.5 * offset, "channels differ"
    assert (offsets - offsets.mean(dim=1, keepdim=True)).std().item() > 0.5 * offset, "samples differ"
    assert offsets.std().item() == pytest.approx(offset, rel=0.25), "offset ~ noise_offset * N(0, 1)"
    assert offsets.mean().abs().item() < 0.5 * offset, "centred on zero"


def min_snr_weights(scheduler, timesteps, gamma):
    """min(SNR, gamma) / SNR for epsilon prediction, SNR = alpha_bar / (1 - alpha_bar), in float64."""
    alpha_bar = scheduler.alphas_cumprod.double()[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    return snr, torch.clamp(snr, max=gamma) / snr


@pytest.mark.parametrize("snr_gamma", [None, 2.0])
def test_real_step_loss_is_instance_mean_plus_prior_weight_times_class_mean_of_min_snr_weighted_mse(
        models, photos, tiny_model, tmp_path, snr_gamma):
    # the trainer min-SNR-weights the class half too, on purpose: both halves are weighted before the split
    weight = 0.4
    assert models.noise_scheduler.config.prediction_type == "epsilon", "so the target is the noise"
    extra = ["--prior_loss_weight", weight] + (["--snr_gamma", snr_gamma] if snr_gamma else [])
    loss, seen = spied_step(models, photos, tiny_model, tmp_path, *extra, seed=3)
    mse = ((seen["prediction"].double() - seen["noise"].double()) ** 2).mean(dim=(1, 2, 3))  # epsilon target
    w = torch.ones(4, dtype=torch.float64)
    if snr_gamma:
        snr, w = min_snr_weights(models.noise_scheduler, seen["timesteps"], snr_gamma)
        # the clamp changes at least one weight in each half, and leaves at least one sample at weight 1
        assert (snr[:2] > snr_gamma).any() and (snr[2:] > snr_gamma).any() and (snr < snr_gamma).any(), snr
    expected = (w[:2] * mse[:2]).mean() + weight * (w[2:] * mse[2:]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    unweighted_class = (w[:2] * mse[:2]).mean() + weight * mse[2:].mean()
    if snr_gamma:
        assert loss.item() != pytest.approx(unweighted_class.item(), rel=1e-3), "the class half is weighted"


def test_training_flags_reach_the_loop(tiny_model, photos, tmp_path, monkeypatch):
    seen = {"clip": [], "crop": set()}
    real_clip, real_crop, real_opt = accelerate.Accelerator.clip_grad_norm_, trainer.crop_and_flip, trainer.make_optimizer

    def clip(self, parameters, max_norm, *a, **k):
        seen["clip"].append(max_norm)
        return real_clip(self, parameters, max_norm, *a, **k)

    def crop(image, resolution, center_crop, random_flip, rng):
        seen["crop"].add((center_crop, random_flip))
        return real_crop(image, resolution, center_crop, random_flip, rng)

    monkeypatch.setattr(accelerate.Accelerator, "clip_grad_norm_", clip)
    monkeypatch.setattr(trainer, "crop_and_flip", crop)
    monkeypatch.setattr(trainer, "make_optimizer", lambda trained, *rest: seen.update(trained=trained)
                        or real_opt(trained, *rest))
    run_trainer(*tiny_args(tiny_model, photos, tmp_path / "out", "--max_train_steps", 2, "--optimizer", "adamw",
                           "--max_grad_norm", 0.5, "--center_crop", "--random_flip", "--gradient_checkpointing",
                           "--cache_latents", "off"))
    assert seen["clip"] == [0.5, 0.5]
    assert seen["crop"] == {(True, True)}
    assert seen["trained"][0].is_gradient_checkpointing


class GradientsSeen(Exception):
    """Raised by the clip_grad_norm_ spy to end a run once the first step's gradients are read."""


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_gradient_checkpointing_leaves_every_lora_weight_of_unet_and_text_encoders_a_gradient(
        tiny_model, photos, tmp_path, monkeypatch, train_text_encoder):
    # reentrant checkpointing of blocks whose inputs need no grad (frozen embeddings, frozen conv_in, prompt
    # embeddings of frozen encoders) silently cuts the LoRA inside them out of the backward
    seen = {}
    real_add_lora = trainer.add_lora

    def add_lora(*a, **k):
        # LoRA's B starts at zero, which leaves A no gradient on the first step; start B off zero so one step
        # shows both
        trained = real_add_lora(*a, **k)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for module in trained:
                for name, p in module.named_parameters():
                    if "lora_B" in name:
                        p.copy_(0.01 * torch.randn(p.shape, generator=generator))
        seen["trained"] = trained
        return trained

    def clip(self, parameters, max_norm, *a, **k):
        seen["grads"] = [{n: p.grad for n, p in module.named_parameters() if p.requires_grad}
                         for module in seen["trained"]]
        raise GradientsSeen

    monkeypatch.setattr(trainer, "add_lora", add_lora)
    monkeypatch.setattr(accelerate.Accelerator, "clip_grad_norm_", clip)
    with pytest.raises(GradientsSeen):
        run_trainer(*tiny_args(tiny_model, photos, tmp_path / "out", "--max_train_steps", 1, "--optimizer",
                               "adamw", "--gradient_checkpointing",
                               *(["--train_text_encoder"] if train_text_encoder else [])))
    assert len(seen["trained"]) == (3 if train_text_encoder else 1)
    assert all(m.is_gradient_checkpointing for m in seen["trained"])
    for module, trained, grads in zip(["unet", "text_encoder", "text_encoder_2"], seen["trained"], seen["grads"]):
        assert grads and all("lora_" in n for n in grads), f"{module}: only LoRA trains"
        if module == "text_encoder":
            last_layer = f"layers.{trained.config.num_hidden_layers - 1}."
            assert not any(last_layer in n for n in grads), "CLIP-L's unread last layer has no LoRA"
        missing = [n for n, g in grads.items() if g is None or not torch.isfinite(g).all() or not g.abs().sum()]
        assert not missing, f"{module}: {len(missing)} of {len(grads)} LoRA weights got no gradient: {missing[:4]}"


def test_variant_loads_the_variant_weights(tiny_model, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    StableDiffusionXLPipeline.from_pretrained(tiny_model).save_pretrained(tmp_path / "fp16", variant="fp16")
    pipeline.check_models(tmp_path / "fp16", None, None, "fp16")
    models = pipeline.load_models(tmp_path / "fp16", None, None, "fp16", torch.float32, "cpu")
    assert models.unet is not None
    with pytest.raises(messages.UserError, match="has no weights in unet, text_encoder, text_encoder_2, vae"):
        pipeline.check_models(tmp_path / "fp16", None, None, None)  # before any load: only fp16 files are there
    with pytest.raises(messages.UserError, match=r"^cannot load .*fp16: .*; check --pretrained_model_name_or_path"):
        pipeline.load_models(tmp_path / "fp16", None, None, None, torch.float32, "cpu")  # what a hub snapshot gets


def test_a_variant_the_folder_lacks_and_a_vae_that_is_no_vae_are_refused_before_loading(tiny_model):
    with pytest.raises(messages.UserError, match=re.escape(
            "has no fp16 weights (--variant fp16) in unet, text_encoder, text_encoder_2: drop --variant")):
        pipeline.check_models(tiny_model, Path(tiny_model) / "vae", None, "fp16")
    with pytest.raises(messages.UserError, match=re.escape(
            "text_encoder is not a VAE folder (its config.json is for CLIPTextModel): pass an AutoencoderKL folder")):
        pipeline.check_models(tiny_model, Path(tiny_model) / "text_encoder", None, None)
    pipeline.check_models(tiny_model, Path(tiny_model) / "vae", None, None)


def test_revision_is_asked_of_the_hub(monkeypatch):
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, revision=None, **kwargs: asked.append(
        (repo, name, revision)))
    pipeline.check_model_source("segmind/SSD-1B", "model_index.json", "--pretrained_model_name_or_path", "abc123")
    assert asked == [("segmind/SSD-1B", "model_index.json", "abc123")]
