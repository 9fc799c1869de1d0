"""The trainer measures itself: steady-state time per step, peak memory, where the time went; it reads the loss
back from the device once per logging window, not every step, and counts no FLOPs on a real step."""

import re

import pytest
import torch

import train_dreambooth_lora_ssd1b as trainer
from dreambooth_kit import artifacts, telemetry
from conftest import run_trainer, tiny_args


@pytest.fixture
def reported(tiny_model, photos, tmp_path, monkeypatch, capsys):
    seen = {}
    real = telemetry.report
    monkeypatch.setattr(trainer, "report", lambda accelerator, clock, *a: seen.update(clock=clock)
                        or real(accelerator, clock, *a))

    def run(*extra):
        run_trainer(*tiny_args(tiny_model, photos, tmp_path / "out", "--optimizer", "adamw", *extra))
        return seen["clock"], capsys.readouterr().out
    return run


def test_run_reports_speed_memory_and_where_the_time_went(reported):
    clock, out = reported("--max_train_steps", 10, "--logging_steps", 2, "--center_crop",
                          "--checkpointing_steps", 5, "--validation_prompt", "a sks dog",
                          "--validation_inference_steps", 2)
    match = re.search(r"steady-state ([\d.]+) ms/step over (\d+) steps; peak RSS ([\d.]+) GiB", out)
    assert match, out
    ms, steps, rss = map(float, match.groups())
    assert steps == 10 - telemetry.WARMUP_STEPS, "warm-up steps are left out"
    assert rss > 0.1
    phases = dict(re.findall(r"(load|class images|caches|training|validation|saving) ([\d.]+) s", out))
    assert set(phases) == {"load", "class images", "caches", "training", "validation", "saving"}
    windows = sum(s for _, _, s in clock.windows)
    assert float(phases["training"]) == pytest.approx(windows, abs=0.05), "training time excludes side work"
    assert f"validation: 4 images of 'a sks dog' in " in out, "where the validation images went"


def test_losses_are_read_back_once_per_logging_window(reported):
    clock, _ = reported("--max_train_steps", 10, "--logging_steps", 5, "--checkpointing_steps", 100)
    # one sync at the end of warm-up, then every 5 steps; the last step also saves
    assert [(first, n) for first, n, _ in clock.windows] == [(1, 3), (4, 2), (6, 5)]


def test_no_step_runs_under_a_flop_counter(reported, monkeypatch):
    # FLOPs are counted by benchmarks/count_flops.py, on meta tensors; a real step never pays for the counter
    from torch.utils import flop_counter

    def refuse(self):
        raise AssertionError("FlopCounterMode entered during training")
    monkeypatch.setattr(flop_counter.FlopCounterMode, "__enter__", refuse)
    clock, _ = reported("--max_train_steps", 2, "--center_crop")
    assert sum(n for _, n, _ in clock.windows) == 2


def test_compiled_run_writes_adapters_every_loader_reads(tiny_model, photos, tmp_path):
    # a real torch.compile (inductor, with the machine's C compiler): its module names weights `_orig_mod.*`
    import infer
    from safetensors.torch import load_file

    out = tmp_path / "out"
    run_trainer(*tiny_args(tiny_model, photos, out, "--max_train_steps", 2, "--optimizer", "adamw", "--compile",
                           "--checkpointing_steps", 1))
    files = [out / "step1" / artifacts.LORA_FILE, out / "step1" / artifacts.KOHYA_FILE,
             out / "step1" / "unet" / "adapter_model.safetensors", out / "state-step1" / "lora_0.safetensors"]
    for file in files:
        keys = list(load_file(file))
        assert keys and not [k for k in keys if "orig_mod" in k], file
    assert any(k.startswith("lora_unet_input_blocks_") for k in load_file(files[1])), "kohya names are mapped"
    # infer.py loads the diffusers file with load_lora_weights and refuses one whose weights don't land
    rendered = infer.main(["--checkpoint", str(out / "step1"), "--num_inference_steps", "2",
                           "--output", str(tmp_path / "renders")])
    assert rendered[0].is_file()
    run_trainer(*tiny_args(tiny_model, photos, out, "--max_train_steps", 3, "--optimizer", "adamw", "--compile",
                           "--resume_from_checkpoint", "latest"))
    assert (out / "step2" / artifacts.LORA_FILE).is_file(), "a compiled run resumes from its own state"
