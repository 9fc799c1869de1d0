"""The training step: SDXL's conditioning as the pipeline computes it, and the target the scheduler asks for."""

import pytest
import torch
from diffusers import DDPMScheduler

import train_dreambooth_lora_ssd1b as trainer
from conftest import tiny_args


@pytest.fixture
def models(tiny_model):
    return trainer.load_models(tiny_model, tiny_model / "vae", None, None, torch.float32, "cpu")


def test_prompt_embeddings_match_the_sdxl_pipeline(models, tiny_model):
    pipe = trainer.build_pipeline(models, str(tiny_model), None, None)
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
    dataset = trainer.DreamBoothDataset(trainer.list_images(photos), "a photo of sks dog", None, None, 64,
                                        False, False, 0, 2)
    batch = trainer.collate([dataset[0], dataset[1]])
    with torch.no_grad():
        loss = trainer.training_step(batch, models, args, torch.Generator().manual_seed(0), torch.float32, "cpu")

    alphas = models.noise_scheduler.alphas_cumprod[seen["timesteps"]].view(-1, 1, 1, 1)
    if prediction_type == "epsilon":
        target = seen["noise"]
    else:  # v = sqrt(a) * noise - sqrt(1 - a) * x0 (Salimans & Ho, 2022)
        target = alphas.sqrt() * seen["noise"] - (1 - alphas).sqrt() * seen["latents"]
    torch.testing.assert_close(loss, target.pow(2).mean(), rtol=1e-5, atol=1e-6)


def test_fp16_frozen_weights_leave_fp32_gradients_a_grad_scaler_can_unscale(tiny_model, photos, tmp_path):
    # what fp16 on a GPU does each step: autocast, a scaled backward, then unscale_ before clipping; unscale_
    # raises "Attempting to unscale FP16 gradients" if any trainable parameter is fp16
    models = trainer.load_models(tiny_model, tiny_model / "vae", None, None, torch.float16, "cpu")
    trained = trainer.add_lora(models, 4, 4, 0.0, True)
    args = trainer.parse_args([str(a) for a in tiny_args(tiny_model, photos, tmp_path / "out", "--train_text_encoder",
                                                         "--optimizer", "adamw")])
    optimizer = trainer.make_optimizer(trained, args)
    dataset = trainer.DreamBoothDataset(trainer.list_images(photos), "a photo of sks dog", None, None, 64,
                                        False, False, 0, 1)
    scaler = torch.amp.GradScaler("cpu")
    with torch.autocast("cpu", dtype=torch.float16):
        loss = trainer.training_step(trainer.collate([dataset[0]]), models, args, torch.Generator().manual_seed(0),
                                     torch.float16, "cpu")
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
    assert len(optimizer.param_groups) == 3, "the UNet and both text encoders train"
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads), \
        "every LoRA weight gets an fp32 gradient"
    assert {p.dtype for m in trained for p in m.parameters() if not p.requires_grad} == {torch.float16}
