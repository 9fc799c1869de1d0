"""examples/: the offline demo runs as written, evaluate.py tries it offline as docs/evaluation.md shows, the dog
recipe's command is what docs/training.md promises, and the tiny-model examples pick their own thread count."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from PIL import Image

import train_dreambooth_lora_ssd1b as trainer
from dreambooth_kit import checks, messages
from conftest import ROOT, offline_demo


def test_offline_demo_runs_as_written():
    # started by conftest.py as collection ended, beside the tests before this one
    returncode, stdout, stderr, demo = offline_demo()
    assert returncode == 0, stderr[-3000:]
    run = demo / "run"
    assert sorted(p.name for p in run.glob("step*")) == ["step199", "step99"]
    assert not (run / "class_images").exists(), "the base model's prediction needs no class images"
    assert len(list((run / "validation" / "step199").glob("seed*.png"))) == 4
    assert Image.open(run / "validation" / "step199" / "seed0.png").size == (64, 64), "at training resolution"
    assert Image.open(demo / "renders" / "step199_seed0.png").size == (64, 64)
    # the before/after sheet, in DreamBooth's terms (measured 2026-12-06, locked versions: instance prompt 1.00 ->
    # 0.74, class prompt 1.00 -> 1.00; benchmarks/RESULTS.md, "The offline demo"): the trained instance prompt comes
    # nearer the subject by a margin, and with the text encoders trained and the base model's prior the class prompt
    # does not follow
    def distances(prompt):
        found = [float(line.split("distance to the subject ")[1]) for line in stdout.splitlines()
                 if f"{prompt!r}: distance" in line]
        assert len(found) == 2, stdout
        return found

    base, trained = distances("a photo of sks star")
    assert trained <= 0.85 * base, stdout
    base, trained = distances("a photo of a star")
    assert trained >= base - 0.05, stdout
    assert Image.open(demo / "before_after.png").width > 64



def documented_offline_evaluation():
    """The commands of docs/evaluation.md's block that makes the tiny scorers and scores the demo's run with them."""
    docs = (ROOT / "docs" / "evaluation.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", docs, flags=re.S)
    return next(block for block in blocks if "make_tiny_scorers.py" in block)


def test_evaluate_py_scores_the_offline_demo_run_offline_as_documented(tmp_path):
    returncode, _, stderr, demo = offline_demo()
    assert returncode == 0, stderr[-3000:]
    block = documented_offline_evaluation()
    # the block starts from the demo, which the suite runs once, beside it: its run is copied where the block reads it
    first, rest = block.split("\n", 1)
    assert first.split("#")[0].split() == ["bash", "examples/offline_demo.sh"], block
    shutil.copytree(demo / "run", tmp_path / "offline_demo" / "run")
    commands = rest.replace("work_dirs/", f"{tmp_path}/")
    env = {**os.environ, "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", commands], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    evaluation = tmp_path / "offline_demo" / "run" / "eval"
    report = json.loads((evaluation / "report.json").read_text())
    assert [row["step"] for row in report["steps"]] == [99, 199] and "DINO" in report["base_model"]
    assert (evaluation / "curve.png").exists() and (evaluation / "contact_sheet.png").exists()
    assert "recommended:" in done.stdout


def dog_recipe_argv(tmp_path, *extra):
    """The trainer's argv as examples/train_dog.sh passes it, with a LAUNCH that prints it instead of training."""
    printer = tmp_path / "print_argv.py"
    printer.write_text("import json, sys\nprint(json.dumps(sys.argv[2:]))\n")
    env = {**os.environ, "LAUNCH": f"{sys.executable} {printer}"}
    done = subprocess.run(["bash", ROOT / "examples" / "train_dog.sh", *extra], env=env, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout)


def test_dog_recipe_is_the_reference_recipe(monkeypatch, tmp_path):
    monkeypatch.setattr(checks, "has_accelerator", lambda: True)  # the recipe's fp16 is for a GPU, which CI lacks
    argv = dog_recipe_argv(tmp_path)
    args = trainer.parse_args(argv)
    assert (args.instance_dir, args.instance_prompt) == ("diffusers/dog-example", "a photo of sks dog")
    assert (args.resolution, args.rank, args.learning_rate, args.max_train_steps) == (1024, 8, 1e-4, 500)
    assert (args.validation_prompt, args.num_validation_images, args.validation_steps) == (
        "A photo of sks dog in a bucket", 4, 100)
    assert args.mixed_precision == "fp16"
    assert trainer.derive_settings(args, argv).output_dir == "work_dirs/ssd_1b_dreambooth_lora_dog-example"


@pytest.mark.parametrize("extra, flag, value", [
    (["--mixed_precision", "bf16"], "mixed_precision", "bf16"),
    (["--resolution=512"], "resolution", 512),
    (["--rank", "16", "--with_prior_preservation", "--class_prompt", "a photo of dog"], "rank", 16),
    (["--instance_data_dir", "my_dog"], "instance_dir", "my_dog"),  # the flag's other name
    (["--max_train", "100"], "max_train_steps", 100),  # an abbreviation argparse accepts
])
def test_a_flag_passed_to_the_dog_recipe_replaces_the_recipes_own(monkeypatch, tmp_path, extra, flag, value):
    monkeypatch.setattr(checks, "has_accelerator", lambda: True)
    args = trainer.parse_args(dog_recipe_argv(tmp_path, *extra))
    assert getattr(args, flag) == value
    assert (args.instance_prompt, args.learning_rate) == ("a photo of sks dog", 1e-4), "the rest of the recipe stays"


def test_a_flag_the_user_passes_twice_to_the_dog_recipe_is_still_refused(tmp_path):
    argv = dog_recipe_argv(tmp_path, "--rank", "4", "--rank", "16")
    with pytest.raises(messages.UserError, match="--rank is given twice"):
        trainer.parse_args(argv)


# A tiny model gains nothing from a second thread, and on a shared machine OpenMP's extra threads spin waiting for a
# core: the demo and the tiny world's examples pick one thread themselves, so they are quick wherever they run, and
# leave a count the user set alone.
def threads_the_demo_runs_with(tmp_path, env):
    """OMP_NUM_THREADS as each `python` command of examples/offline_demo.sh sees it (a stand-in python reports it)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text('#!/bin/sh\necho "threads=${OMP_NUM_THREADS-unset}"\n')
    (bin_dir / "python").chmod(0o755)
    env = {**env, "PATH": os.pathsep.join([str(bin_dir), os.environ["PATH"]])}
    done = subprocess.run(["bash", ROOT / "examples" / "offline_demo.sh", str(tmp_path / "demo")], env=env,
                          capture_output=True, text=True, check=True)
    return [line for line in done.stdout.splitlines() if line.startswith("threads=")]


def test_the_offline_demo_runs_on_one_thread_unless_the_user_set_a_count(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    assert threads_the_demo_runs_with(tmp_path, env) == ["threads=1"] * 3, "training, infer.py and the sheet"
    assert threads_the_demo_runs_with(tmp_path / "set", {**env, "OMP_NUM_THREADS": "3"}) == ["threads=3"] * 3


class Stop(Exception):
    """Raised where an example would start its real work, once its thread count is set."""


def stop(*args, **kwargs):
    raise Stop


def start_before_after(monkeypatch, tmp_path):
    import before_after

    monkeypatch.setattr(before_after.world, "world_pipeline", stop)
    before_after.main(["--checkpoint", str(tmp_path / "step1"), "--output", str(tmp_path / "sheet.png")])


def start_train_tiny_world(monkeypatch, tmp_path):
    import train_tiny_world

    monkeypatch.setattr(train_tiny_world.tiny_world, "world_vocabulary", stop)
    train_tiny_world.main([str(tmp_path / "model")])


@pytest.mark.parametrize("start", [start_before_after, start_train_tiny_world],
                         ids=["before_after", "train_tiny_world"])
@pytest.mark.parametrize("user_count", [None, "3"])
def test_tiny_world_examples_run_on_one_thread_unless_the_user_set_a_count(start, user_count, monkeypatch, tmp_path):
    import torch

    if user_count is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", user_count)
    counts = []
    monkeypatch.setattr(torch, "set_num_threads", counts.append)
    with pytest.raises(Stop):
        start(monkeypatch, tmp_path)
    assert counts == ([1] if user_count is None else []), "torch reads a count the user set by itself"
