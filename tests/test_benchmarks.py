"""benchmarks/: the full-size configs build SSD-1B exactly, the runner records the trainer's own report, and the
profiler records the steps asked for."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_args

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


def test_gpu_report_is_read_with_both_peaks(monkeypatch, capsys):
    # No GPU here: the trainer's report takes its CUDA branch with fixed figures, and the runner must read them back
    import importlib.util

    import torch

    import train_dreambooth_lora_ssd1b as trainer

    spec = importlib.util.spec_from_file_location("run_benchmarks", BENCHMARKS / "run_benchmarks.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 5 * 2**30)

    class Accelerator:
        print, log = staticmethod(print), staticmethod(lambda values: None)

    clock = trainer.RunClock()
    clock.windows = [(1, 10, 1.0), (11, 10, 0.4)]  # the first window holds the warm-up steps and is left out
    clock.flops_per_step, clock.peak_before_training = 17.5e12, 7 * 2**30
    clock.phases.update({"load": 20.0, "class images": 3.0, "caches": 1.0, "training": 1.4, "saving": 0.5})
    trainer.report(Accelerator(), clock, type("Args", (), {"peak_tflops": None})(), 0)

    record = runner.parse_report(capsys.readouterr().out)
    assert (record["ms"], record["steps"], record["tflop"], record["peak"]) == (40.0, 10, 17.5, 989)
    assert record["mfu"] == pytest.approx(100 * 17.5 / 0.040 / 989, rel=1e-2)
    assert (record["gib"], record["run_gib"], record["memory"]) == (5.0, 7.0, "peak GPU memory")
    record.update(size="full", mode="lowmem", machine="NVIDIA H100 80GB HBM3", wall=30.0, ceiling=798.0)
    assert runner.target(record) == "≤ 6 GiB in the whole run: missed", "the whole run must fit the card"
    assert "5.00 GiB GPU in training, 7.00 in the whole run" in runner.row(record)


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
