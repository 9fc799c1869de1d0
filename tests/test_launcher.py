"""What the user sees under the documented launches: one line for a mistake, and a resume command that repeats the
launch as typed (launcher and its flags, script, flags) from any folder."""

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from dreambooth_kit import artifacts, graceful
from conftest import ROOT, tiny_args

SCRIPT = "train_dreambooth_lora_ssd1b.py"
FLAGS = ["--instance_dir", "my photos", "--output_dir", "out", "--resume_from_checkpoint", "state-step3"]
RESUMED = "--instance_dir 'my photos' --output_dir out --resume_from_checkpoint latest"


def launched(monkeypatch, folder, parent, own):
    """This process as if started in `folder` by the command lines `parent` (its parent's) and `own`."""
    folder.mkdir(exist_ok=True)
    monkeypatch.chdir(folder)
    monkeypatch.setattr(graceful, "parent_command_line", lambda: tuple(parent))
    monkeypatch.setattr(sys, "orig_argv", list(own))
    return shlex.quote(str(folder))


@pytest.mark.parametrize("parent, own, launch", [
    # console scripts show in /proc as `python /venv/bin/NAME ...`
    (["/venv/bin/python3", "/venv/bin/accelerate", "launch", "--config_file", "examples/accelerate/multi_gpu.yaml",
      "--num_processes", "2", SCRIPT, *FLAGS], ["/venv/bin/python3", SCRIPT, *FLAGS],
     f"accelerate launch --config_file examples/accelerate/multi_gpu.yaml --num_processes 2 {SCRIPT}"),
    (["/venv/bin/python", "/venv/bin/torchrun", "--nproc_per_node", "2", f"../code/{SCRIPT}", *FLAGS],
     ["/venv/bin/python", "-u", f"../code/{SCRIPT}", *FLAGS], f"torchrun --nproc_per_node 2 ../code/{SCRIPT}"),
    (["python", "-m", "accelerate.commands.launch", "-q", SCRIPT, *FLAGS], ["/venv/bin/python", SCRIPT, *FLAGS],
     f"python -m accelerate.commands.launch -q {SCRIPT}"),
    (["srun", "--gpus", "1", "python", SCRIPT, *FLAGS], ["python", SCRIPT, *FLAGS], f"srun --gpus 1 python {SCRIPT}"),
    # started from a shell: the interpreter as typed
    (["-bash"], ["python3", SCRIPT, *FLAGS], f"python3 {SCRIPT}"),
    (["/bin/zsh", "-i"], ["python", "-X", "dev", f"src/{SCRIPT}", *FLAGS], f"python -X dev src/{SCRIPT}"),
    # no /proc (macOS), and a parent whose flags differ: still what this interpreter ran
    ([], ["/usr/bin/python3", SCRIPT, *FLAGS], f"/usr/bin/python3 {SCRIPT}"),
    (["/venv/bin/python", "/venv/bin/accelerate", "launch", SCRIPT, "--other"], ["python", SCRIPT, *FLAGS],
     f"python {SCRIPT}"),
    # called from Python (main(argv)): the plain launch of this file
    ([], ["/venv/bin/python", "-m", "pytest"], f"python {ROOT / SCRIPT}"),
])
def test_resume_command_repeats_the_launch_as_typed_from_its_folder(parent, own, launch, monkeypatch, tmp_path):
    cd = launched(monkeypatch, tmp_path / "dog runs", parent, own)
    assert graceful.resume_command(FLAGS) == f"cd {cd} && {launch} {RESUMED}"


def test_resume_command_without_flags_and_with_the_equals_form(monkeypatch, tmp_path):
    cd = launched(monkeypatch, tmp_path, ["-bash"], ["python", SCRIPT])
    assert graceful.resume_command([]) == f"cd {cd} && python {SCRIPT} --resume_from_checkpoint latest"
    argv = ["--resume_from_checkpoint=latest", "--rank", "4"]
    launched(monkeypatch, tmp_path, ["python", SCRIPT, *argv], [])
    assert graceful.resume_command(argv) == f"cd {cd} && python {SCRIPT} --rank 4 --resume_from_checkpoint latest"


STUB = f"""import sys
sys.path.insert(0, {str(ROOT)!r})
from dreambooth_kit.graceful import resume_command
print(resume_command(sys.argv[1:]))
"""


def test_torchrun_is_read_from_proc(tmp_path):
    if not os.path.exists(f"/proc/{os.getpid()}/cmdline"):
        pytest.skip("no /proc")
    # --standalone: a free port for the rendezvous, not 29500, which another test worker (-n 2) may hold
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    (tmp_path / SCRIPT).write_text(STUB)  # named like the trainer, so that the launcher's command line matches
    result = subprocess.run([*launcher, SCRIPT, "--output_dir", "my out"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "ACCELERATE_USE_CPU": "true"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == (
        f"cd {shlex.quote(str(tmp_path))} && {shlex.join(launcher)} {SCRIPT} --output_dir 'my out' "
        "--resume_from_checkpoint latest")


def test_a_mistake_under_the_recommended_launch_is_one_line(tiny_model, tmp_path):
    result = subprocess.run([sys.executable, SCRIPT, "--pretrained_model_name_or_path", str(tiny_model),
                             "--instance_dir", str(tmp_path / "missing"), "--instance_prompt", "a photo of sks dog",
                             "--output_dir", str(tmp_path / "out")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"error: instance folder {tmp_path / 'missing'} does not exist: pass "
                                          "--instance_dir a folder of 3-20 photos"]


def test_ctrl_c_under_the_recommended_launch_ends_with_a_resume_command_that_works_from_anywhere(tiny_model,
                                                                                                 tmp_path):
    # started from the repository with relative script and photo paths, resumed from another folder
    out = tmp_path / "out"
    flags = tiny_args(tiny_model, "examples/dog", out, "--max_train_steps", 5, "--checkpointing_steps", 1,
                      "--optimizer", "adamw")
    process = subprocess.Popen(["python", SCRIPT, *map(str, flags)], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True,
                               env={**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}"
                                                          f"{os.environ.get('PATH', '')}"})
    deadline = time.time() + 120
    while not (out / "state-step0").is_dir() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground process group
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGINT, stderr[-2000:]
    assert "Traceback" not in stderr
    said, command = [line.strip() for line in stderr.strip().splitlines()[-2:]]
    assert said.startswith("stopped at step") and said.endswith("of 5; resume with:")
    assert command == (f"cd {shlex.quote(str(ROOT))} && python {SCRIPT} {shlex.join(map(str, flags))} "
                       "--resume_from_checkpoint latest")

    (tmp_path / "elsewhere").mkdir()
    result = subprocess.run(["bash", "-c", command], cwd=tmp_path / "elsewhere", capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}"
                                                                    f"{os.environ.get('PATH', '')}"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "step4" / artifacts.LORA_FILE).is_file()


def test_sigterm_under_accelerate_launch_resumes_with_the_launcher_and_its_flags(tiny_model, photos, tmp_path):
    # the launcher dies of the signal at once, long before the save: its command line is read at start
    if not os.path.exists(f"/proc/{os.getpid()}/cmdline"):
        pytest.skip("no /proc")
    out = tmp_path / "out"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    flags = [*map(str, tiny_args(tiny_model, photos, out, "--max_train_steps", 1000, "--checkpointing_steps", 1,
                                 "--optimizer", "adamw"))]
    process = subprocess.Popen([*launcher, SCRIPT, *flags], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not (out / "state-step0").is_dir() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)  # as a scheduler does: the launcher and the trainer
    _, stderr = process.communicate(timeout=60)  # until the trainer, still saving, closes the pipe
    assert stderr.strip().splitlines()[-1].strip() == (
        f"cd {shlex.quote(str(ROOT))} && {shlex.join([*launcher, SCRIPT, *flags])} --resume_from_checkpoint latest")
