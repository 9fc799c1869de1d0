"""benchmarks/: the full-size configs build SSD-1B exactly, the runner records the trainer's own report, and the
profiler records the steps asked for."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_args
from dreambooth_kit import pipeline, telemetry

BENCHMARKS = ROOT / "benchmarks"


def test_full_size_configs_build_ssd1b_with_its_parameter_count():
    result = subprocess.run([sys.executable, str(BENCHMARKS / "make_full_ssd1b.py"), "unused", "--check"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "unet             1,331,334,404  ok" in result.stdout, "the UNet the shared README counts"


def test_tiny_benchmark_records_the_trainers_report(tmp_path):
    results = tmp_path / "RESULTS.md"
    result = subprocess.run([sys.executable, str(BENCHMARKS / "run_benchmarks.py"), "--tiny", "--modes", "fast",
                             "--work_dir", str(tmp_path / "work"), "--results", str(results)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    table = [line for line in results.read_text().splitlines() if line.startswith("| tiny") and "fast" in line]
    assert len(table) == 1, results.read_text()[-2000:]
    assert "GiB RSS" in table[0] and "train_dreambooth_lora_ssd1b.py" in results.read_text()


# diffusers' train_dreambooth_lora_sdxl.py as gpu_memory.py sees it: the flags it is given (each one the real
# script declares), a "Steps" bar updated once per optimizer step, and no figures of its own
DIFFUSERS_STAND_IN = """
import argparse, time
from tqdm.auto import tqdm
p = argparse.ArgumentParser()
for flag in ["--pretrained_model_name_or_path", "--pretrained_vae_model_name_or_path", "--instance_data_dir",
             "--instance_prompt", "--class_data_dir", "--class_prompt", "--num_class_images", "--resolution",
             "--train_batch_size", "--max_train_steps", "--mixed_precision", "--rank", "--seed", "--output_dir"]:
    p.add_argument(flag, required=True)
for flag in ["--with_prior_preservation", "--use_8bit_adam", "--center_crop", "--gradient_checkpointing"]:
    p.add_argument(flag, action="store_true")
args = p.parse_args()
assert args.with_prior_preservation and args.use_8bit_adam
bar = tqdm(range(int(args.max_train_steps)), desc="Steps")
for _ in range(int(args.max_train_steps)):
    time.sleep(0.01)
    bar.update(1)
"""


def test_gpu_benchmark_records_each_trainers_figures_with_machine_settings_and_command(tmp_path):
    # the plumbing of the GPU script on a CPU: the tiny model, our trainer's row and diffusers' beside it
    import json

    script = tmp_path / "train_dreambooth_lora_sdxl.py"
    script.write_text(DIFFUSERS_STAND_IN)
    results = tmp_path / "RESULTS.md"
    result = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_memory.py"), "--tiny", "--bases", "bf16",
                             "--checkpointing", "on", "--diffusers_script", str(script),
                             "--work_dir", str(tmp_path / "work"), "--results", str(results)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = json.loads((tmp_path / "RESULTS-gpu-memory.json").read_text())
    assert sorted((r["trainer"], r["status"]) for r in records) == [("diffusers", "measured"), ("ours", "measured")]
    for record in records:
        assert record["steps"] == 10 and record["ms"] > 0, "steps 4 to 13: the warm-up left out"
        assert record["memory"] == "peak RSS" and record["gib"] > 0, "no GPU: the CPU's figure, said as such"
        assert record["settings"]["resolution"] == "64" and record["settings"]["gradient_checkpointing"]
        assert record["machine"] and record["date"] and record["versions"]["torch"] and record["tflop"] > 0
        assert record["command"].startswith("HF_HUB_OFFLINE=1 python ")
    rows = [line for line in results.read_text().splitlines() if line.startswith("| tiny (plumbing only) |")]
    assert len(rows) == 2 and all("RSS" in row for row in rows), rows

def load_module(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_runner():
    return load_module("run_benchmarks")


def test_gpu_report_is_read_with_both_peaks(monkeypatch, capsys, tiny_model):
    # No GPU here: the trainer's report takes its CUDA branch with fixed figures, and the runner must read them back
    import torch

    runner = load_runner()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 5 * 2**30)

    class Accelerator:
        print, log = staticmethod(print), staticmethod(lambda values: None)

    clock = telemetry.Clock()
    clock.windows = [(1, 10, 1.0), (11, 10, 0.4)]  # the first window holds the warm-up steps and is left out
    clock.peak_before_training = 7 * 2**30
    clock.phases.update({"load": 20.0, "class images": 3.0, "caches": 1.0, "training": 1.4, "saving": 0.5})
    telemetry.report(Accelerator(), clock, 0)

    record = runner.parse_report(capsys.readouterr().out)
    assert (record["ms"], record["steps"]) == (40.0, 10)
    assert (record["gib"], record["run_gib"], record["memory"]) == (5.0, 7.0, "peak GPU memory")
    record.update(size="full", mode="lowmem", machine="NVIDIA H100 80GB HBM3", wall=30.0, ceiling=798.0)
    record = runner.add_flops(record, tiny_model, 64, gradient_checkpointing=False)
    assert record["peak"] == 989
    assert record["mfu"] == pytest.approx(100 * record["tflop"] / 0.040 / 989, rel=1e-6)
    assert runner.target(record) == "≤ 6 GiB in the whole run: missed", "the whole run must fit the card"
    assert "5.00 GiB GPU in training, 7.00 in the whole run" in runner.row(record)


def test_counted_flops_are_the_unets_forward_and_backward_as_a_real_step_runs_them(tiny_model):
    # count_flops.py counts on meta tensors; the same count must come from the tiny UNet run for real
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import train_dreambooth_lora_ssd1b as trainer

    sys.path.insert(0, str(BENCHMARKS))
    from count_flops import step_flop_counts, step_flops

    counted = step_flop_counts(tiny_model, 64, 2, rank=4)
    models = pipeline.load_models(tiny_model, tiny_model / "vae", None, None, torch.float32, "cpu")
    trainer.add_lora(models, 4, 4, 0.0, False)
    unet = models.unet
    inputs = dict(sample=torch.randn(2, 4, 8, 8), timestep=torch.tensor([10, 20]),
                  encoder_hidden_states=torch.randn(2, 77, unet.config.cross_attention_dim),
                  added_cond_kwargs={"text_embeds": torch.randn(2, 32), "time_ids": torch.zeros(2, 6)})
    counter = FlopCounterMode(display=False)
    with counter:
        unet(**inputs).sample.pow(2).mean().backward()
    real = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    # the same convolutions and linear layers, forward and backward; attention is counted as matrix products on
    # meta tensors, where the CPU's fused attention kernel hides its FLOPs from the counter
    assert {op: n for op, n in counted.items() if op != "aten.bmm"} == {op: n for op, n in real.items()
                                                                       if op != "aten.bmm"}
    assert counted["aten.bmm"] > real.get("aten.bmm", 0)
    assert step_flops(tiny_model, 64, 2, rank=4) == sum(counted.values())


def test_profiler_records_the_asked_steps_of_the_real_trainer(tiny_model, photos, tmp_path):
    import gzip
    import json

    flags = tiny_args(tiny_model, photos, tmp_path / "run", "--max_train_steps", 5, "--center_crop")
    result = subprocess.run([sys.executable, str(BENCHMARKS / "profile_step.py"), "--out", str(tmp_path / "profile"),
                             "--skip", "2", "--steps", "2", "--", *map(str, flags)],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    label = next(line for line in (tmp_path / "profile" / "table.txt").read_text().splitlines()
                 if "training_step (forward and loss)" in line)
    assert label.split()[-1] == "2", "steps 3 and 4 recorded, nothing else"
    with gzip.open(tmp_path / "profile" / "trace.json.gz") as trace:
        assert json.load(trace)["traceEvents"]
    assert (tmp_path / "run" / "step4" / "pytorch_lora_weights.safetensors").is_file(), "the run itself completes"


def test_cpu_memory_run_records_the_peak_its_phase_and_the_step_time(tiny_model, tmp_path):
    results = tmp_path / "RESULTS.md"
    result = subprocess.run([sys.executable, str(BENCHMARKS / "cpu_memory.py"), "--tiny", "--model", str(tiny_model),
                             "--mixed_precision", "no", "--gradient_checkpointing", "off", "--cache_latents", "on",
                             "--base", "fp8", "--work_dir", str(tmp_path / "work"), "--results", str(results)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    [record] = json.loads((tmp_path / "RESULTS-cpu-memory.json").read_text())
    assert record["peak_phase"] in record["phase_peaks_gib"], "the peak falls in one of the trainer's phases"
    phases = ["load", "caches", "UNet load", "set-up", "training", "exit"]
    assert list(record["phase_seconds"]) == phases
    # a phase shorter than the 50 ms between samples (the tiny model's caches) has no peak of its own
    assert [p for p in phases if p in record["phase_peaks_gib"]] == list(record["phase_peaks_gib"])
    assert {"load", "training"} <= set(record["phase_peaks_gib"])
    assert 0 < record["training_peak_gib"] <= record["peak_gib"] == max(record["phase_peaks_gib"].values())
    assert record["s_per_step"] > 0 and 0 < record["first_step_s"] < record["wall"]
    table = [line for line in results.read_text().splitlines() if line.startswith("| tiny | 1 | after")]
    assert record["base"] == "fp8" and "--fp8_base" in record["command"] and record["estimate_gib"] > 0
    assert len(table) == 1 and "| fp8 | 64 |" in table[0], "the base the row ran on, and its size"
    assert f"| {record['peak_gib']:.2f} | {record['estimate_gib']:.2f} " in table[0], "the estimate beside the peak"
    assert f"| {record['peak_phase']} |" in table[0]
    assert "OMP_NUM_THREADS=1" in results.read_text(), "the exact command, one thread"


def test_cpu_memory_puts_the_peak_in_the_phase_where_the_high_water_mark_rose():
    runner = load_module("cpu_memory")
    lines = [(1.0, "loaded the models in 0.5 s"), (2.0, "cached: 5 latents (on), 2 prompt embeddings"),
             (3.0, "5 instance photos, 0 class images; ..."), (5.0, "steady-state 500.0 ms/step over 3 steps")]
    bounds = runner.phase_bounds(lines, 6.0)
    assert list(bounds) == ["load", "caches", "set-up", "training", "exit"], "no UNet load line: a trainer before it"
    gib = 2**30  # samples: (seconds, VmRSS, VmHWM, RssAnon, CPU seconds)
    samples = [(0.5, 2 * gib, 2 * gib, gib, 0.4), (1.5, gib, 5 * gib, gib, 1.4), (2.5, gib, 5 * gib, gib, 2.4),
               (4.0, 3 * gib, 5 * gib, gib, 3.9), (5.5, 2 * gib, 5 * gib, gib, 5.4)]
    # the high-water mark rose between 0.5 and 1.5 s: a peak no sample saw, in the caches phase
    assert runner.peak_phase(samples, bounds, 5 * gib) == "caches"
    peaks = runner.phase_peaks(samples, bounds)
    assert peaks == {"load": 2 * gib, "caches": 5 * gib, "set-up": gib, "training": 3 * gib, "exit": 2 * gib}


def test_cpu_memory_stamps_a_progress_bar_when_it_is_drawn_not_when_the_next_one_is(tmp_path):
    """tqdm draws "\\r" + the bar, with no newline: the first step's bar is complete text long before the second
    step's "\\r" ends it, and the time to the first step is the former."""
    import os
    import time

    runner = load_module("cpu_memory")
    read, write = os.pipe()
    output = runner.Output(os.fdopen(read, "rb"), tmp_path / "log", time.perf_counter())
    os.write(write, b"\rtraining:   0%|          | 0/6 [00:00<?, ?step/s]")
    time.sleep(0.2)
    os.write(write, b"\rtraining:  17%|#7        | 1/6 [00:02<00:13,  2.61s/step]")
    time.sleep(0.5)
    os.write(write, b"\rtraining:  33%|###3      | 2/6 [00:04<00:09,  2.29s/step]\nsteady-state 1.0 ms/step\n")
    os.close(write)
    output.thread.join(timeout=10)
    first = {}
    for t, line in output.lines:
        if match := runner.BAR.search(line):
            first.setdefault(int(match["step"]), t)
    assert sorted(first) == [0, 1, 2] and first[2] - first[1] >= 0.4, "step 1 stamped when drawn"
    old = runner.BAR.search("steps:  17%|#7        | 1/6 [00:02<00:13,  2.61s/step]")
    assert old and old["step"] == "1", "the bar of the trainer issue 16 was filed against"
