"""Each flag does what it says: the ones that no whole-run test already pins down."""

import accelerate
import pytest
import torch

import train_dreambooth_lora_ssd1b as trainer
from conftest import run_trainer, tiny_args


def parse(tiny_model, photos, tmp_path, *extra):
    return trainer.parse_args([str(a) for a in tiny_args(tiny_model, photos, tmp_path / "out", *extra)])


@pytest.fixture
def models(tiny_model):
    return trainer.load_models(tiny_model, tiny_model / "vae", None, None, torch.float32, "cpu")


def test_optimizer_flags_reach_the_optimizer(models, tiny_model, photos, tmp_path):
    args = parse(tiny_model, photos, tmp_path, "--optimizer", "adamw", "--learning_rate", 2e-4,
                 "--train_text_encoder", "--text_encoder_lr", 3e-5, "--adam_beta1", 0.8, "--adam_beta2", 0.95,
                 "--adam_weight_decay", 0.01, "--adam_epsilon", 1e-6)
    trained = trainer.add_lora(models, args.rank, args.lora_alpha, args.lora_dropout, args.train_text_encoder)
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


def test_lora_flags_shape_the_adapters(models):
    trained = trainer.add_lora(models, rank=3, alpha=6, dropout=0.1, train_text_encoder=False)
    config = trained[0].peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (3, 6, 0.1)
    targeted = {n.rsplit(".lora_A", 1)[0].split(".")[-1] for n, _ in trained[0].named_parameters() if ".lora_A" in n}
    assert targeted == {"to_q", "to_k", "to_v", "0"}, "attention projections only (to_out.0 ends in '0')"
    assert not any("lora_" in n for n, _ in models.text_encoders[0].named_parameters())


def step_loss(models, photos, tiny_model, tmp_path, *extra):
    """One training_step's loss on a fixed batch and fixed generator, under the given flags."""
    args = parse(tiny_model, photos, tmp_path, "--with_prior_preservation", "--class_prompt", "a photo of dog",
                 *extra)
    images = trainer.list_images(photos)
    dataset = trainer.DreamBoothDataset(images, args.instance_prompt, images[::-1], args.class_prompt, 64,
                                        False, False, 0, 4)
    batch = trainer.collate([dataset[0], dataset[1]])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return trainer.training_step(batch, models, args, generator, torch.float32, "cpu").item()


def test_noise_offset_snr_gamma_and_prior_weight_change_the_loss(models, photos, tiny_model, tmp_path):
    loss = lambda *extra: step_loss(models, photos, tiny_model, tmp_path, *extra)  # noqa: E731
    base = loss()
    assert loss() == base, "fixed generator, fixed batch: the same loss"
    assert loss("--noise_offset", 0.1) != base
    assert loss("--snr_gamma", 0.001) != base, "a gamma below every SNR drawn re-weights them all"
    w0, w1, w2 = (loss("--prior_loss_weight", w) for w in (0.0, 1.0, 2.0))
    assert w1 == pytest.approx(base)
    assert w2 - w1 == pytest.approx(w1 - w0, rel=1e-4) and w2 != w1, "the class term scales with the weight"


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


def test_variant_loads_the_variant_weights(tiny_model, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    StableDiffusionXLPipeline.from_pretrained(tiny_model).save_pretrained(tmp_path / "fp16", variant="fp16")
    models = trainer.load_models(tmp_path / "fp16", None, None, "fp16", torch.float32, "cpu")
    assert models.unet is not None
    with pytest.raises(OSError):
        trainer.load_models(tmp_path / "fp16", None, None, None, torch.float32, "cpu")


def test_revision_is_asked_of_the_hub(monkeypatch):
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, revision=None: asked.append(
        (repo, name, revision)))
    trainer.check_model_source("segmind/SSD-1B", "model_index.json", "--pretrained_model_name_or_path", "abc123")
    assert asked == [("segmind/SSD-1B", "model_index.json", "abc123")]
