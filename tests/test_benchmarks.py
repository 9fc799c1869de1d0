"""benchmarks/: the full-size configs build SSD-1B exactly, and the runner records the trainer's own report."""

import subprocess
import sys

from conftest import ROOT

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
