"""--fp8_base and --nf4_base: the frozen base held in float8 or 4-bit NF4, computed in the run's dtype, with fp32
LoRA on top; adapters that come out ordinary, and runs that resume exactly."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import infer
import train_dreambooth_lora_ssd1b as trainer
from dreambooth_kit import pipeline, quantized_base
from dreambooth_kit.artifacts import KOHYA_FILE, LORA_FILE
from dreambooth_kit.messages import UserError
from conftest import check_inputs, run_trainer, tiny_args

FP8 = torch.float8_e4m3fn
# prior preservation over class images the fp8 base makes, both text encoders trained, validation at every save
FP8_FLAGS = ["--fp8_base", "--mixed_precision", "bf16", "--optimizer", "adamw", "--learning_rate", 1e-2,
             "--train_text_encoder", "--text_encoder_lr", 1e-2, "--with_prior_preservation", "--class_prompt",
             "a photo of dog", "--num_class_images", 2, "--max_train_steps", 4, "--checkpointing_steps", 2,
             "--validation_prompt", "a photo of sks dog", "--num_validation_images", 1,
             "--validation_inference_steps", 2, "--validation_steps", 2, "--random_flip"]


@pytest.fixture(scope="module")
def fp8_run(tiny_model, photos, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("fp8") / "out"
    argv = tiny_args(tiny_model, photos, output_dir, *FP8_FLAGS, "--class_data_dir", output_dir.parent / "class")
    log = capture(lambda: run_trainer(*argv))
    return output_dir, argv, log


def capture(run):
    """What a run printed, read from its own stdout (a module fixture has no capsys)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run()
    return out.getvalue()


def adapters(step_dir):
    return {part: load_file(step_dir / part / "adapter_model.safetensors")
            for part in ["unet", "text_encoder_one", "text_encoder_two"]}


def test_fp8_base_says_it_renders_class_images_and_validation_in_float8(fp8_run):
    output_dir, _, log = fp8_run
    held = "base UNet held in float8_e4m3fn, computed in bfloat16"
    assert "making 2 class images of 'a photo of dog'" in log and log.count(held) >= 3, log[-2000:]
    assert len(list((output_dir.parent / "class").glob("*.png"))) == 2
    assert (output_dir / "validation" / "step3" / "seed0.png").is_file()
    settings = json.loads((output_dir / "step3" / "run_settings.json").read_text())
    assert settings["fp8_base"] is True and settings["nf4_base"] is False
    assert "| optimizer, precision | adamw, bf16, frozen base held in float8_e4m3fn |" in (
        output_dir / "README.md").read_text(), "the card says what the adapters were trained over"


def test_adapters_trained_on_an_fp8_base_load_unquantised_through_all_three_files(fp8_run, tiny_model, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from peft import PeftModel

    step = fp8_run[0] / "step3"
    trained = adapters(step)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for part in trained.values()
               for v in part.values())
    for weight_name in [LORA_FILE, KOHYA_FILE]:
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model)
        pipe.load_lora_weights(step, weight_name=weight_name, adapter_name="trained")
        assert {p.dtype for p in pipe.unet.parameters()} == {torch.float32}, "an ordinary, unquantised pipeline"
        loaded = {name for name, _ in pipe.unet.named_parameters() if "lora_B.trained" in name}
        assert len(loaded) == sum("lora_B" in k for k in trained["unet"]), weight_name
    unet = PeftModel.from_pretrained(StableDiffusionXLPipeline.from_pretrained(tiny_model).unet, step / "unet")
    assert any(torch.count_nonzero(p) for n, p in unet.named_parameters() if "lora_B" in n)
    path = infer.main(["--checkpoint", str(step), "--prompt", "a photo of sks dog", "--num_inference_steps", "2",
                       "--output", str(tmp_path)])[0]
    assert np.asarray(Image.open(path)).std() > 0


def test_an_fp8_run_extended_from_its_state_ends_at_the_uninterrupted_adapters(fp8_run, tmp_path):
    output_dir, argv, _ = fp8_run
    argv = [str(tmp_path / "out") if a == str(output_dir) else a for a in map(str, argv)]
    capture(lambda: run_trainer(*argv, "--max_train_steps", 2))  # a run that stopped after its first state
    capture(lambda: run_trainer(*argv, "--resume_from_checkpoint", "latest"))
    uninterrupted, resumed = adapters(output_dir / "step3"), adapters(tmp_path / "out" / "step3")
    for part in uninterrupted:
        for key in uninterrupted[part]:
            torch.testing.assert_close(resumed[part][key], uninterrupted[part][key], rtol=0, atol=1e-6)
    with pytest.raises(UserError, match="fp8_base"):  # the base it trained on is part of the run
        run_trainer(*[a for a in argv if a != "--fp8_base"], "--resume_from_checkpoint", "latest",
                    "--max_train_steps", 6)


def test_nf4_base_trains_and_its_adapters_load_unquantised(tiny_model, photos, tmp_path, capsys):
    from diffusers import StableDiffusionXLPipeline

    run_trainer(*tiny_args(tiny_model, photos, tmp_path / "out", "--nf4_base", "--mixed_precision", "bf16",
                           "--optimizer", "adamw", "--learning_rate", 1e-2, "--max_train_steps", 2,
                           "--validation_prompt", "a photo of sks dog", "--num_validation_images", 1,
                           "--validation_inference_steps", 1, "--validation_steps", 2))
    assert "base UNet held in 4-bit NF4 (its linear layers), computed in bfloat16" in capsys.readouterr().out
    trained = load_file(tmp_path / "out" / "step1" / "unet" / "adapter_model.safetensors")
    assert any(torch.count_nonzero(v) for k, v in trained.items() if "lora_B" in k), "training moved the adapters"
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    pipe.load_lora_weights(tmp_path / "out" / "step1", weight_name=LORA_FILE)
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.float32}


def test_an_fp8_unet_holds_its_layers_in_float8_but_its_norms_and_lora_in_higher_precision(tiny_model):
    models = pipeline.Models(None, [None, None], pipeline.load_unet(tiny_model, None, None, torch.bfloat16, "cpu",
                                                                    "fp8"), None, None)
    dtypes = {name: p.dtype for name, p in models.unet.named_parameters()}
    assert dtypes["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"] == FP8
    assert dtypes["conv_in.weight"] == FP8
    assert all(dtype == torch.bfloat16 for name, dtype in dtypes.items() if "norm" in name)
    torch.manual_seed(0)
    trainer.add_lora(models, 4, 4, 0.0, False, base="fp8")
    lora = [p for name, p in models.unet.named_parameters() if "lora_A" in name]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    # drawn in fp32, not rounded to float8 by peft on the way
    assert all(not torch.equal(p, p.to(FP8).float()) for p in lora)


def test_a_float8_layer_gives_the_gradients_of_its_weights_computed_in_bf16(tiny_model):
    # backward re-casts the float8 weight rather than keeping the forward's bf16 copy: the same numbers
    layer = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
    layer.to(torch.bfloat16).requires_grad_(False)
    reference = torch.nn.Sequential(*(torch.nn.Linear(64, 64) for _ in range(2)))
    reference = torch.nn.Sequential(reference[0], torch.nn.GELU(), reference[1])
    for mine, theirs in zip(layer[::2], reference[::2]):
        theirs.weight.data = mine.weight.to(FP8).to(torch.bfloat16)
        theirs.bias.data = mine.bias.to(FP8).to(torch.bfloat16)
    reference.requires_grad_(False)
    from diffusers.hooks import apply_layerwise_casting

    apply_layerwise_casting(layer, storage_dtype=FP8, compute_dtype=torch.bfloat16, skip_modules_pattern=None)
    quantized_base.save_weights_for_backward_in_fp8(layer, torch.bfloat16)
    x = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    layer(x).float().square().sum().backward()
    reference(x_ref).float().square().sum().backward()
    assert torch.equal(x.grad, x_ref.grad)
    assert layer[0].weight.dtype == FP8, "stored in float8 again after the pass"


def test_fp8_text_encoders_stream_in_with_the_values_of_a_whole_load(tiny_model):
    for cls, sub in [(pipeline.CLIPTextModel, "text_encoder"), (pipeline.CLIPTextModelWithProjection,
                                                                 "text_encoder_2")]:
        streamed = pipeline.load_text_encoder(cls, tiny_model, sub, None, None, torch.bfloat16, "cpu", "fp8")
        whole = dict(cls.from_pretrained(tiny_model, subfolder=sub).named_parameters())  # as stored: fp32
        for name, p in streamed.named_parameters():
            # each weight cast once from the file's values, straight to float8 or to bf16
            expected = whole[name].to(torch.bfloat16 if "embedding" in name or "norm" in name else FP8)
            assert p.dtype == expected.dtype and torch.equal(p.float(), expected.float()), name


@pytest.mark.parametrize("flags, message", [
    (["--fp8_base", "--nf4_base"], "--fp8_base and --nf4_base both say how to hold the frozen base: pass one"),
    (["--fp8_base", "--compile"], "--compile .* drop --compile, or drop --fp8_base"),
    (["--nf4_base", "--compile"], "--compile .* drop --compile, or drop --nf4_base"),
    (["--fp8_base", "--use_dora"], "--use_dora .* drop --use_dora, or pass --nf4_base instead"),
])
def test_base_precision_flags_that_cannot_run_together_are_refused_in_one_line(tiny_model, photos, tmp_path, flags,
                                                                              message):
    with pytest.raises(UserError, match=message) as refused:
        check_inputs(tiny_args(tiny_model, photos, tmp_path / "out", *flags))
    assert "\n" not in str(refused.value)


def test_nf4_where_bitsandbytes_cannot_quantise_is_refused_before_any_model_loads(tiny_model, photos, tmp_path,
                                                                                  monkeypatch):
    import bitsandbytes.functional

    def no_kernel(*args, **kwargs):
        raise RuntimeError("no 4-bit kernel for this device")

    monkeypatch.setattr(bitsandbytes.functional, "quantize_4bit", no_kernel)
    monkeypatch.setattr(trainer, "load_models", lambda *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(UserError, match=r"^--nf4_base: bitsandbytes cannot quantise to 4 bits on this cpu \(no 4-bit "
                                        r"kernel for this device\); pass --fp8_base instead, or drop --nf4_base$"):
        run_trainer(*tiny_args(tiny_model, photos, tmp_path / "out", "--nf4_base"))


def test_a_4bit_layer_answers_in_autocasts_dtype_as_a_linear_layer_does():
    # SSD-1B's time embedding is fp32 and meets bf16 norms after its 4-bit layers, which a CPU refuses to mix
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GroupNorm(4, 64))
    quantized_base.prepare_storage(model, "nf4", torch.bfloat16)
    weight = torch.randn(64, 64, dtype=torch.bfloat16)
    quantized_base.load_quantized(model, "0.weight", weight, quantized_base.quantized_slot(model, "0.weight"), "cpu")
    bf16 = dict(dtype=torch.bfloat16)
    model.load_state_dict({"0.bias": torch.zeros(64, **bf16), "1.weight": torch.ones(64, **bf16),
                           "1.bias": torch.zeros(64, **bf16)}, strict=False, assign=True)
    assert type(model[0]).__name__ == "Linear4bit" and model[0].weight.dtype == torch.uint8
    with torch.autocast("cpu", torch.bfloat16):
        out = model(torch.randn(2, 64))
    assert out.dtype == torch.bfloat16


def test_fp8_with_gradient_checkpointing_trains_every_blocks_lora_and_predicts_the_base_under_autocast(
        tiny_model, photos, tmp_path, recwarn):
    # diffusers' non-reentrant checkpointing refuses a weight whose dtype layerwise casting changed between the
    # forward and its recomputation; the reentrant kind gives grads only to blocks whose input needs them
    run_trainer(*tiny_args(tiny_model, photos, tmp_path / "out", "--fp8_base", "--gradient_checkpointing",
                           "--mixed_precision", "bf16", "--max_train_steps", 1, "--optimizer", "adamw",
                           "--learning_rate", 1e-2, "--with_prior_preservation", "--class_prompt", "a photo of dog",
                           "--prior_target", "base_prediction"))
    trained = load_file(tmp_path / "out" / "step0" / "unet" / "adapter_model.safetensors")
    lora_b = {k: v for k, v in trained.items() if "lora_B" in k}
    assert lora_b and all(torch.count_nonzero(v) for v in lora_b.values()), "a block's LoRA got no gradient"
    # the base prediction's autocast comes from the frozen weights' compute dtype, not from float8
    assert not [w for w in recwarn if "target dtype is not supported" in str(w.message)]


@pytest.fixture
def bin_model(tiny_model, tmp_path):
    """The tiny model with its UNet as .bin weights, as older hub models hold it: no file to stream from."""
    model = tmp_path / "bin_model"
    shutil.copytree(tiny_model, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), weights.with_suffix(".bin"))
    weights.unlink()
    return model


def test_a_unet_without_safetensors_is_cast_whole_under_fp8_and_refused_in_one_line_under_nf4_without_a_gpu(
        bin_model):
    unet = pipeline.load_unet(bin_model, None, None, torch.bfloat16, "cpu", "fp8")
    assert unet.conv_in.weight.dtype == FP8 and unet.conv_norm_out.weight.dtype == torch.bfloat16
    if torch.cuda.is_available():  # diffusers' own 4-bit loader works there
        return
    with pytest.raises(UserError, match=r"^--nf4_base: No GPU found.* \(this model's UNet has no safetensors file, "
                                        r"which this trainer quantises itself on any device\); pass --fp8_base "
                                        r"instead$"):
        pipeline.load_unet(bin_model, None, None, torch.bfloat16, "cpu", "nf4")
