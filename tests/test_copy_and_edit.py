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


# every kind of layer a user can put LoRA on in SSD-1B's UNet (attention, feed-forward, resnet convs and time
# projection, shortcut, down/upsamplers, proj_in/out, the time and added-condition embeddings, conv_in/out) and
# in the CLIP encoders (attention and MLP)
EVERY_UNET_LAYER = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1",
                    "conv2", "time_emb_proj", "conv_shortcut", "conv", "conv_in", "conv_out", "linear_1", "linear_2"]
EVERY_TEXT_ENCODER_LAYER = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def lora_weights(pipe, adapter):
    """{model.module path: (lora_A, lora_B, scaling)} of one loaded adapter."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for prefix, model in [("unet", pipe.unet), ("te1", pipe.text_encoder), ("te2", pipe.text_encoder_2)]:
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                found[f"{prefix}.{name.removeprefix('text_model.')}"] = (
                    module.lora_A[adapter].weight, module.lora_B[adapter].weight, module.scaling[adapter])
    return found


def peft_adapters(step):
    """{model.module path: (lora_A, lora_B, scaling)} of a step's PEFT adapters: what trained."""
    import json

    from safetensors.torch import load_file

    found = {}
    for prefix, folder in [("unet", "unet"), ("te1", "text_encoder_one"), ("te2", "text_encoder_two")]:
        config = json.loads((step / folder / "adapter_config.json").read_text())
        for key, value in load_file(step / folder / "adapter_model.safetensors").items():
            module, kind = key.removeprefix("base_model.model.").removeprefix("text_model.").rsplit(".lora_", 1)
            entry = found.setdefault(f"{prefix}.{module}", [None, None, config["lora_alpha"] / config["r"]])
            entry[kind.startswith("B")] = value
    return {module: tuple(entry) for module, entry in found.items()}


def test_a_lora_on_any_layer_is_written_under_the_kohya_name_its_loaders_map_back(tiny_model, photos, tmp_path,
                                                                                  monkeypatch):
    import inspect
    import re

    import torch
    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders import lora_conversion_utils
    from safetensors.torch import load_file, save_file

    from dreambooth_kit.artifacts import KOHYA_FILE, LORA_FILE

    # the user's one edit: more targets
    monkeypatch.setattr(trainer, "UNET_TARGETS", EVERY_UNET_LAYER)
    monkeypatch.setattr(trainer, "TEXT_ENCODER_TARGETS", EVERY_TEXT_ENCODER_LAYER)
    run_trainer(*tiny_args(tiny_model, photos, tmp_path / "out", "--max_train_steps", 1, "--optimizer", "adamw",
                           "--center_crop", "--train_text_encoder", "--learning_rate", 1e-2,
                           "--text_encoder_lr", 1e-2))
    step = tmp_path / "out" / "step0"
    kohya = load_file(step / KOHYA_FILE)
    sgm = re.compile(r"lora_unet_(input_blocks_0_0$|input_blocks_\d+_[01]_|middle_block_[012]_|output_blocks_\d+_[012]_"
                     r"|time_embed_[02]$|label_emb_0_[02]$|out_2$)|lora_te[12]_text_model_encoder_layers_\d+_"
                     r"(self_attn_[qkv]_proj|self_attn_out_proj|mlp_fc[12])$")
    modules = {key.split(".")[0] for key in kohya}
    assert all(sgm.match(module) for module in modules), sorted(m for m in modules if not sgm.match(m))
    assert not [m for m in modules if re.search("resnets|attentions|_blocks_\\d+_(conv|time_emb)|conv[12]", m)], \
        "diffusers' names left unmapped"

    # diffusers' own kohya converter maps every name back onto the module that trained it, with its weights
    trained = peft_adapters(step)
    named, weight_name = trained, KOHYA_FILE
    blocks_only = "label_emb" not in inspect.getsource(lora_conversion_utils)
    if blocks_only:
        # diffusers 0.35's converter maps the blocks only: not conv_in/out and the time and added-condition
        # embeddings (input_blocks_0_0, out_2, time_embed, label_emb), which ComfyUI and newer diffusers map
        outside = re.compile(r"lora_unet_(input_blocks_0_0|out_2|time_embed_\d|label_emb_\d_\d)[.]")
        weight_name = "blocks_only.safetensors"
        save_file({k: v for k, v in kohya.items() if not outside.match(k)}, step / weight_name)
        modules = {m for m in modules if not outside.match(m + ".")}
        named = {m: w for m, w in trained.items()
                 if not m.startswith(("unet.conv_in", "unet.conv_out", "unet.time_embedding", "unet.add_embedding"))}
    via_kohya_file = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    via_kohya_file.load_lora_weights(step, weight_name=weight_name, adapter_name="trained")
    loaded = lora_weights(via_kohya_file, "trained")
    assert set(loaded) == set(named) and len(loaded) == len(modules)
    for module, (down, up, scaling) in named.items():
        assert torch.equal(loaded[module][0], down) and torch.equal(loaded[module][1], up), module
        assert loaded[module][2] == pytest.approx(scaling), module
    # and diffusers' own file, read by its loader, lands every one of them too
    via_diffusers_file = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    via_diffusers_file.load_lora_weights(step, weight_name=LORA_FILE, adapter_name="trained")
    from_diffusers_file = lora_weights(via_diffusers_file, "trained")
    assert set(from_diffusers_file) == set(trained)
    for module, (down, up, scaling) in trained.items():
        assert torch.equal(from_diffusers_file[module][0], down), module
        assert torch.equal(from_diffusers_file[module][1], up), module
    # CLIP-L's last layer, which SDXL never reads, stays without LoRA on the MLP a user adds too; CLIP-G's has it
    assert not [m for m in trained if m.startswith("te1.encoder.layers.1.")]
    assert {"te2.encoder.layers.1.mlp.fc1", "te2.encoder.layers.1.self_attn.q_proj"} <= set(trained)
    kinds = {module.rsplit(".", 1)[-1] for module in loaded}
    assert {"conv1", "conv2", "conv_shortcut", "conv", "time_emb_proj", "fc1",
            *([] if blocks_only else ["conv_in", "conv_out"])} <= kinds


def test_a_lora_target_kohya_cannot_name_is_refused_before_any_model_loads(tiny_model, photos, tmp_path,
                                                                          monkeypatch):
    from dreambooth_kit.messages import UserError

    monkeypatch.setattr(trainer, "TEXT_ENCODER_TARGETS", [*trainer.TEXT_ENCODER_TARGETS, "token_embedding"])
    monkeypatch.setattr(trainer, "load_models", lambda *a, **k: pytest.fail("a model loaded"))
    message = (r"^lora_for_comfyui_and_webui.safetensors has no name for LoRA on 2 modules \(CLIP-L's "
               r"(text_model\.)?embeddings.token_embedding, CLIP-G's (text_model\.)?embeddings.token_embedding\): "
               r".*; drop the target from UNET_TARGETS or TEXT_ENCODER_TARGETS, or pass --no-output_kohya_format$")
    with pytest.raises(UserError, match=message):
        run_trainer(*tiny_args(tiny_model, photos, tmp_path / "out", "--train_text_encoder"))
    # the way out the message names
    monkeypatch.undo()
    monkeypatch.setattr(trainer, "TEXT_ENCODER_TARGETS", [*trainer.TEXT_ENCODER_TARGETS, "token_embedding"])
    run_trainer(*tiny_args(tiny_model, photos, tmp_path / "out", "--train_text_encoder", "--max_train_steps", 1,
                           "--optimizer", "adamw", "--no-output_kohya_format"))


def colour_jitter(crop, rng):
    """A user's augmentation that draws anew per sample, as augment()'s docstring asks: from its rng."""
    from PIL import ImageEnhance

    return ImageEnhance.Brightness(crop).enhance(rng.uniform(0.6, 1.4))


def jitter_from_the_global_generator(crop, rng):
    """A user's augmentation that ignores its rng: random's global generator, which a resume does not redraw."""
    import random

    return colour_jitter(crop, random)


def inverted(crop, rng):
    """A user's augmentation that draws nothing: the same pixels every step, so a cache holds it exactly."""
    from PIL import ImageOps

    return ImageOps.invert(crop)


@pytest.fixture
def models(tiny_model):
    import torch

    from dreambooth_kit import pipeline

    return pipeline.load_models(tiny_model, tiny_model / "vae", None, None, torch.float32, "cpu")


def test_an_augmentation_that_draws_nothing_trains_alike_cached_and_uncached(models, photos, tiny_model, tmp_path,
                                                                            monkeypatch):
    from test_caches import losses

    plain = losses(models, photos, tiny_model, tmp_path, cached=False)
    monkeypatch.setattr(trainer, "augment", inverted)  # the user's one edit
    uncached = losses(models, photos, tiny_model, tmp_path, cached=False)
    cached = losses(models, photos, tiny_model, tmp_path, cached=True)  # --center_crop: on by default; last, as
    # the cache lets the VAE's encoder go
    assert cached == pytest.approx(uncached, rel=1e-5), "the cache holds the augmented pixels"
    assert uncached != pytest.approx(plain, rel=1e-3), "the augmentation changed what trains"


def test_an_augmentation_that_draws_anew_turns_the_cache_off_with_a_note(tiny_model, photos, tmp_path, monkeypatch,
                                                                        capsys):
    from dreambooth_kit import imaging
    from dreambooth_kit.messages import UserError

    assert not trainer.augment_draws_anew(trainer.latent_targets(imaging.list_images(photos), [], 64), 0)
    monkeypatch.setattr(trainer, "augment", colour_jitter)  # the user's one edit
    seen = models_of_the_run(monkeypatch)
    run_trainer(*tiny_args(tiny_model, photos, tmp_path / "out", "--max_train_steps", 1, "--optimizer", "adamw",
                           "--center_crop"))  # exact crops: cached by default
    assert "note: augment() draws anew each step: latents not cached, each step encodes" in capsys.readouterr().out
    assert seen["models"].latent_cache is None
    # and the uncached path draws it anew: the same photo, centre-cropped, in two epochs
    images = imaging.list_images(photos)
    dataset = trainer.DreamBoothDataset(images[:1], "a photo of sks dog", resolution=64, center_crop=True,
                                        random_flip=False, seed=0, num_samples=2)
    assert not (dataset[0]["pixel_values"] == dataset[1]["pixel_values"]).all()
    # a global generator's draw is seen too, and --cache_latents on is refused before any model loads
    monkeypatch.setattr(trainer, "augment", jitter_from_the_global_generator)
    monkeypatch.setattr(trainer, "load_models", lambda *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(UserError, match=r"^--cache_latents on would keep one draw of augment\(\) per image"):
        run_trainer(*tiny_args(tiny_model, photos, tmp_path / "on", "--center_crop", "--cache_latents", "on"))
