"""examples/: the offline demo runs as written, and the dog recipe's command is what the README promises."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from PIL import Image

import train_dreambooth_lora_ssd1b as trainer
from conftest import ROOT


def test_offline_demo_runs_as_written(tmp_path):
    # the script calls `python` and `accelerate` from PATH: make them this interpreter's, not whatever is first
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    result = subprocess.run(["bash", str(ROOT / "examples" / "offline_demo.sh"), str(tmp_path / "demo")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "demo" / "run"
    assert sorted(p.name for p in run.glob("step*")) == ["step199", "step99"]
    assert not (run / "class_images").exists(), "the base model's prediction needs no class images"
    assert len(list((run / "validation" / "step199").glob("seed*.png"))) == 4
    assert Image.open(run / "validation" / "step199" / "seed0.png").size == (64, 64), "at training resolution"
    assert Image.open(tmp_path / "demo" / "renders" / "step199_seed0.png").size == (64, 64)
    # the before/after sheet: the trained instance prompt is nearer the subject than the base model's
    distances = [float(line.split("distance to the subject ")[1]) for line in result.stdout.splitlines()
                 if "'a photo of sks star'" in line]
    assert len(distances) == 2 and distances[1] < distances[0], result.stdout
    assert Image.open(tmp_path / "demo" / "before_after.png").width > 64


def test_dog_recipe_is_the_reference_recipe(monkeypatch):
    monkeypatch.setattr(trainer, "has_accelerator", lambda: True)  # the recipe's fp16 is for a GPU, which CI lacks
    script = (ROOT / "examples" / "train_dog.sh").read_text().replace("\\\n", " ")
    command = re.search(r"train_dreambooth_lora_ssd1b\.py(.*)", script).group(1)
    argv = [a for a in shlex.split(command) if a != "$@"]
    args = trainer.parse_args(argv)
    assert (args.instance_dir, args.instance_prompt) == ("diffusers/dog-example", "a photo of sks dog")
    assert (args.resolution, args.rank, args.learning_rate, args.max_train_steps) == (1024, 8, 1e-4, 500)
    assert (args.validation_prompt, args.num_validation_images, args.validation_steps) == (
        "A photo of sks dog in a bucket", 4, 100)
    assert trainer.derive_settings(args, argv).output_dir == "work_dirs/ssd_1b_dreambooth_lora_dog-example"
