"""Before any model loads, the trainer says the peak memory it expects, itemised, and where the device holds less,
the options that would fit; at the end it prints the measured peak beside the estimate. Memory itself is measured
by benchmarks/memory_estimate.py, never asserted here."""

import dataclasses
import re
import shutil
import types
from pathlib import Path

import pytest

import train_dreambooth_lora_ssd1b as trainer
from dreambooth_kit import memory
from conftest import run_trainer, tiny_args

ROOT = Path(__file__).resolve().parents[1]
TARGETS = (trainer.UNET_TARGETS, trainer.TEXT_ENCODER_TARGETS)
FULL_SIZE = {"unet": "unet_config.json", "text_encoder": "text_encoder_config.json",
             "text_encoder_2": "text_encoder_2_config.json", "vae": "vae_fp16_fix_config.json"}


@pytest.fixture(scope="module")
def full_size_counts(tmp_path_factory):
    """SSD-1B's own configs (benchmarks/ssd1b/), laid out as a model folder: counted on the meta device."""
    folder = tmp_path_factory.mktemp("ssd1b-configs")
    for sub, name in FULL_SIZE.items():
        (folder / sub).mkdir()
        shutil.copy(ROOT / "benchmarks" / "ssd1b" / name, folder / sub / "config.json")
    return memory.count_models(str(folder), None, None, TARGETS)


def setting(**changes):
    base = memory.Setting(precision="bf16", compute="bf16", resolution=1024, batch_size=1, prior=True,
                          gradient_checkpointing=False, latents_cached=True, train_text_encoder=False, rank=8,
                          optimizer="adamw8bit")
    return dataclasses.replace(base, **changes)


def test_parameters_are_counted_from_the_models_own_configs(full_size_counts):
    assert full_size_counts.unet.parameters == 1_331_334_404  # segmind/SSD-1B's, as make_full_ssd1b.py checks
    assert [t.parameters for t in full_size_counts.text_encoders] == [123_060_480, 694_659_840]
    assert full_size_counts.vae.parameters == 83_653_863
    assert memory.estimate(full_size_counts, setting()).parts["UNet"] == 2 * 1_331_334_404, "bf16: 2 bytes each"


def test_fp8_and_nf4_bases_estimate_less_weight_memory_than_bf16(full_size_counts):
    unet = {p: memory.estimate(full_size_counts, setting(precision=p)).parts["UNet"] for p in ("bf16", "fp8", "nf4")}
    assert unet["nf4"] < unet["fp8"] < unet["bf16"]
    assert unet["fp8"] > unet["bf16"] / 2, "norms stay in the compute dtype, as diffusers' layerwise casting keeps them"
    encoders = {p: memory.estimate(full_size_counts, setting(precision=p, train_text_encoder=True)).parts[
        "text encoders"] for p in ("bf16", "fp8", "nf4")}
    assert encoders["fp8"] < encoders["bf16"] == encoders["nf4"], "NF4 quantises the UNet alone"


def test_gradient_checkpointing_estimates_less_activation_memory(full_size_counts):
    on, off = (memory.estimate(full_size_counts, setting(gradient_checkpointing=gc)) for gc in (True, False))
    assert on.parts["activations"] < off.parts["activations"]
    assert on.phases["training"] < off.phases["training"]


def test_prior_preservation_doubles_the_samples_a_step_holds_activations_for(full_size_counts):
    alone, prior = (memory.estimate(full_size_counts, setting(prior=p)).parts["activations"] for p in (False, True))
    assert prior == 2 * alone


def test_options_that_fit_are_named_with_their_own_estimates(full_size_counts):
    run = setting(resolution=1024, batch_size=2)
    with_checkpointing = memory.estimate(full_size_counts, setting(resolution=1024, batch_size=2,
                                                                   gradient_checkpointing=True)).peak
    fits = memory.options_that_fit(full_size_counts, run, with_checkpointing + 1, lambda flag: True)
    assert f"--gradient_checkpointing ({memory.gib(with_checkpointing)})" in fits
    assert not any(f.startswith("--gradient_checkpointing") for f in memory.options_that_fit(
        full_size_counts, dataclasses.replace(run, gradient_checkpointing=True), 2**50, lambda flag: True)), \
        "an option the run already uses is not offered"
    assert not any("--fp8_base" in f for f in memory.options_that_fit(full_size_counts, run, with_checkpointing + 1,
                                                                      lambda flag: flag != "--fp8_base")), \
        "a flag this trainer lacks is not offered"


def test_a_hub_model_not_in_the_local_cache_leaves_the_estimate_unavailable_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    printed = []
    accelerator = types.SimpleNamespace(print=printed.append)
    settings = types.SimpleNamespace(pretrained_model_name_or_path="someone/not-cached-ssd1b",
                                     pretrained_vae_model_name_or_path=None)
    assert memory.announce_memory(accelerator, types.SimpleNamespace(revision=None), settings, TARGETS) is None
    assert len(printed) == 1 and "\n" not in printed[0] and printed[0].startswith("memory estimate unavailable")


@pytest.fixture(scope="module")
def small_device_run(tiny_model, photos, tmp_path_factory):
    """One tiny run on a 'device' that holds it with gradient checkpointing but not without: stdout, stderr."""
    import contextlib
    import io

    estimated, real_estimate = [], memory.estimate
    patch = pytest.MonkeyPatch()
    patch.setattr(memory, "estimate", lambda *a: estimated.append(real_estimate(*a)) or estimated[-1])
    # announce_memory estimates this run, then the same with gradient checkpointing, then reads the device
    patch.setattr(memory, "device_memory", lambda device: (estimated[1].peak + 1, "a small fake device"))
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run_trainer(*tiny_args(tiny_model, photos, tmp_path_factory.mktemp("mem") / "out", "--optimizer", "adamw",
                                   "--max_train_steps", 1))
    finally:
        patch.undo()
    return out.getvalue(), err.getvalue()


def test_the_estimate_is_printed_before_any_model_loads(small_device_run):
    out, _ = small_device_run
    assert 0 <= out.index("memory estimate: peak") < out.index("loaded the text encoders"), out


def test_the_estimate_is_itemised_with_and_without_gradient_checkpointing(small_device_run):
    out, _ = small_device_run
    assert re.search(r"gradient checkpointing on: [\d.]+ GiB; off: this run", out), out
    for part in ("UNet", "text encoders", "VAE", "LoRA", "gradients", "optimizer state", "activations", "process",
                 "by phase: load", "device: "):
        assert part in out, f"{part} is itemised"


def test_an_estimate_above_the_devices_memory_names_the_options_that_fit(small_device_run):
    _, err = small_device_run
    warning = next(line for line in err.splitlines() if "exceeds this device's" in line)
    assert "a small fake device" in warning and "options that fit: --gradient_checkpointing (" in warning


def test_the_closing_line_shows_the_measured_peak_beside_the_estimate(small_device_run):
    out, _ = small_device_run
    estimate = float(re.search(r"memory estimate: peak ([\d.]+) GiB", out)[1])
    closing = re.search(r"steady-state .*; peak RSS ([\d.]+) GiB \(estimated ([\d.]+) GiB\)", out)
    assert closing and float(closing[2]) == estimate, out


@pytest.mark.parametrize("kohya", [[], ["--no-output_kohya_format"]], ids=["kohya check first", "estimate first"])
def test_a_config_that_parses_but_builds_no_model_is_refused_in_one_line_before_loading(tiny_model, photos,
                                                                                       tmp_path, monkeypatch, kohya):
    import json

    from dreambooth_kit.messages import UserError

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "unet" / "config.json").read_text())
    (model / "unet" / "config.json").write_text(json.dumps({**config, "block_out_channels": [32]}))
    monkeypatch.setattr(trainer, "load_models", lambda *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(UserError, match=r"^--pretrained_model_name_or_path .*: its configs describe no SSD-1B the "
                                        r"libraries can build \(.*\); download the model again$"):
        run_trainer(*tiny_args(tiny_model, photos, tmp_path / "out", "--pretrained_model_name_or_path", model,
                               *kohya))
