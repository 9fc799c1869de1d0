"""A stop in any phase ends cleanly, and a job rescheduled on another host can go on: the output dir's lock, its
heartbeat, and SIGINT / SIGTERM before, during and after training."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import train_dreambooth_lora_ssd1b as trainer
from dreambooth_kit import artifacts, graceful, messages, ownership
from conftest import ROOT, run_trainer, tiny_args

SCRIPT = ROOT / "train_dreambooth_lora_ssd1b.py"
# The trainer run as a script, with the UNet's load held up for a minute after saying so: a phase of its own that a
# test's signal reliably lands in (the UNet loads after the caches when no class images are made)
SLOW_UNET = """
import runpy, sys, time
from dreambooth_kit import pipeline
real = pipeline.load_unet
def slow(*args, **kwargs):  # the trainer's UNet load, whichever stage calls it
    print("loading the UNet", flush=True)
    time.sleep(60)
    return real(*args, **kwargs)
pipeline.load_unet = slow
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def write_lock(folder, age=0, **holder):
    """A lock as another trainer left it, last renewed `age` seconds ago."""
    lock = folder / artifacts.LOCK_FILE
    lock.write_text(json.dumps({"started": "2026-12-01 10:00:00", **holder}))
    os.utime(lock, (time.time() - age, time.time() - age))
    return lock


def test_a_lock_from_another_host_that_stopped_renewing_is_taken_over_saying_so(tmp_path, capsys):
    write_lock(tmp_path, age=ownership.LOCK_STALE_S + 60, pid=4242, host="node-17")
    with ownership.hold_output_dir(tmp_path):
        mine = json.loads((tmp_path / artifacts.LOCK_FILE).read_text())
        assert (mine["pid"], mine["host"]) == (os.getpid(), socket.gethostname())
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and "by PID 4242 on node-17" in said[0] and "taking it over" in said[0]
    assert f"stale after {ownership.LOCK_STALE_S} s" in said[0]
    assert not (tmp_path / artifacts.LOCK_FILE).exists()


def test_a_lock_from_another_host_renewed_lately_is_refused_with_when_it_goes_stale(tmp_path):
    lock = write_lock(tmp_path, age=ownership.LOCK_HEARTBEAT_S, pid=4242, host="node-17")
    with pytest.raises(messages.UserError, match=rf"in use by the trainer with PID 4242 on node-17 .*renewed "
                                                rf"{ownership.LOCK_HEARTBEAT_S} s ago.*not renewed for "
                                                rf"{ownership.LOCK_STALE_S} s is taken over"):
        with ownership.hold_output_dir(tmp_path):
            pass
    assert json.loads(lock.read_text())["host"] == "node-17", "the other host's lock stays"


def test_a_lock_whose_pid_is_now_another_process_is_not_reported_as_a_trainer(tmp_path, capsys):
    # PID 1 lives as long as the machine, but started long before any trainer that wrote this lock
    write_lock(tmp_path, pid=1, host=socket.gethostname(), pid_started=ownership.process_start(1) + 1)
    with ownership.hold_output_dir(tmp_path):
        pass
    said = capsys.readouterr().err
    assert "PID 1 is now another process, not the trainer that held it; taking it over" in said
    assert "in use by the trainer" not in said


def test_a_live_trainer_on_this_host_keeps_its_lock_however_old_its_heartbeat(tmp_path):
    # a trainer suspended with Ctrl-Z renews nothing, but its process is checked here: it is still the holder
    write_lock(tmp_path, age=ownership.LOCK_STALE_S * 10, pid=os.getpid(), host=socket.gethostname(),
               pid_started=ownership.process_start(os.getpid()))
    with pytest.raises(messages.UserError, match=f"in use by the trainer with PID {os.getpid()}"):
        with ownership.hold_output_dir(tmp_path):
            pass


def test_the_holder_renews_its_lock_and_never_removes_one_another_trainer_took_over(tmp_path, monkeypatch):
    monkeypatch.setattr(ownership, "LOCK_HEARTBEAT_S", 0.05)
    lock = tmp_path / artifacts.LOCK_FILE
    with ownership.hold_output_dir(tmp_path):
        os.utime(lock, (time.time() - 1000, time.time() - 1000))
        deadline = time.time() + 10
        while ownership.lock_age(lock) > 100 and time.time() < deadline:
            time.sleep(0.02)
        assert ownership.lock_age(lock) < 100, "renewed by the heartbeat"
        lock.write_text(json.dumps({"pid": 4242, "host": "node-17"}))  # another trainer judged it stale
    assert json.loads(lock.read_text())["host"] == "node-17", "its lock stays"


def test_a_stale_lock_another_trainer_replaced_meanwhile_is_put_back_not_removed(tmp_path):
    # two trainers judge the same stale lock; the slower one must not remove the lock the faster one made
    lock = write_lock(tmp_path, pid=4242, host="node-18")
    ownership.take_away(lock, {"started": "2026-12-01 10:00:00", "pid": 77, "host": "node-17"})
    assert json.loads(lock.read_text())["host"] == "node-18"
    assert [p.name for p in tmp_path.iterdir()] == [artifacts.LOCK_FILE], "nothing left aside"


def stop_when_said(command, said, *signals):
    """Start the trainer, send it `signals` (0.5 s apart) once it prints `said` (at once for None), and return
    (exit status, stderr)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    try:
        for line in process.stdout if said else []:
            if said in line:
                break
        for signum in signals:
            time.sleep(0.5)  # into the phase's work, past the line that announced it
            process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    return process.returncode, stderr


@pytest.mark.parametrize("signals", [[signal.SIGINT], [signal.SIGTERM, signal.SIGTERM]],
                         ids=["sigint", "sigterm and a launcher's echo"])
def test_a_stop_while_class_images_are_made_says_so_releases_the_lock_and_keeps_the_images(tiny_model, photos,
                                                                                          tmp_path, signals):
    # a cluster's preemption (SIGTERM) in the phase that takes minutes at full size, answered as Ctrl-C is; a
    # launcher passes the same stop on again, which must neither kill the exit nor add a message
    out, class_dir, signum = tmp_path / "out", tmp_path / "class", signals[0]
    flags = [str(f) for f in tiny_args(tiny_model, photos, out, "--with_prior_preservation", "--class_prompt",
                                       "a photo of a dog", "--class_dir", class_dir, "--num_class_images", 500,
                                       "--max_train_steps", 1, "--optimizer", "adamw")]
    status, stderr = stop_when_said([sys.executable, str(SCRIPT), *flags], "class images of", *signals)
    assert status == 128 + signum, stderr[-2000:]
    assert "Traceback" not in stderr
    assert sum(line.startswith(("SIGTERM", "SIGINT")) for line in stderr.splitlines()) == 1, stderr[-2000:]
    said, command = [line.strip() for line in stderr.strip().splitlines()[-2:]]
    assert said.startswith(f"{signal.Signals(signum).name} while making class images, before training started: "
                           "nothing to resume; ") and said.endswith("start again with:")
    assert command.endswith("--optimizer adamw") and "--resume_from_checkpoint" not in command
    assert not (out / artifacts.LOCK_FILE).exists(), "the lock is released"
    assert not [p.name for p in class_dir.iterdir() if p.name.startswith(".")], "no half-written image"


def test_ctrl_c_while_the_libraries_import_is_one_line_not_a_traceback(tiny_model, photos, tmp_path):
    flags = [str(f) for f in tiny_args(tiny_model, photos, tmp_path / "out", "--max_train_steps", 1)]
    status, stderr = stop_when_said([sys.executable, str(SCRIPT), *flags], None, signal.SIGINT)
    assert status == 128 + signal.SIGINT and "Traceback" not in stderr, stderr[-2000:]
    said = [line for line in stderr.splitlines() if line.startswith("SIGINT")]
    assert len(said) == 1 and "before training started" in said[0], stderr[-2000:]  # in the imports, or just after


def test_sigterm_while_the_unet_loads_says_so_and_releases_the_lock(tiny_model, photos, tmp_path):
    out = tmp_path / "out"
    flags = [str(f) for f in tiny_args(tiny_model, photos, out, "--max_train_steps", 1, "--optimizer", "adamw")]
    wrapper = tmp_path / "slow_unet.py"
    wrapper.write_text(SLOW_UNET)
    status, stderr = stop_when_said([sys.executable, str(wrapper), str(SCRIPT), *flags], "loading the UNet",
                                    signal.SIGTERM)
    assert status == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-2].strip() == ("SIGTERM while loading the models, before training started: "
                                                       "nothing to resume; start again with:")
    assert not out.exists(), "the folder made only for the lock goes with it"


def stop_in(monkeypatch, name, signum):
    """Send this process a real `signum` when the trainer calls its function `name`."""
    real = getattr(trainer, name)

    def stopped(*args, **kwargs):
        signal.raise_signal(signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, name, stopped)


def test_a_resumed_run_stopped_while_loading_says_how_to_resume(tiny_model, photos, tmp_path, monkeypatch):
    argv = tiny_args(tiny_model, photos, tmp_path / "out", "--max_train_steps", 1, "--optimizer", "adamw")
    run_trainer(*argv)
    stop_in(monkeypatch, "load_models", signal.SIGINT)
    before = signal.getsignal(signal.SIGINT)  # Python's own, or ignored where a test runner's worker ignores it
    with pytest.raises(graceful.Interrupted) as stopped:
        run_trainer(*argv, "--max_train_steps", 2, "--resume_from_checkpoint", "latest")
    assert stopped.value.exit_code == 128 + signal.SIGINT
    said, command = str(stopped.value).splitlines()
    assert said == "SIGINT while loading the models, before training resumed from state-step0; resume with:"
    assert command.strip().endswith("--max_train_steps 2 --optimizer adamw --resume_from_checkpoint latest")
    assert not (tmp_path / "out" / artifacts.LOCK_FILE).exists()
    assert signal.getsignal(signal.SIGINT) is before, "the handlers are given back"


def test_a_stop_after_the_last_step_was_saved_says_the_adapters_are_complete(tiny_model, photos, tmp_path,
                                                                            monkeypatch):
    out = tmp_path / "out"
    stop_in(monkeypatch, "report", signal.SIGTERM)
    with pytest.raises(graceful.Interrupted) as stopped:
        run_trainer(*tiny_args(tiny_model, photos, out, "--max_train_steps", 1, "--optimizer", "adamw"))
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert str(stopped.value) == f"SIGTERM after training ended: the adapters in {out / 'step0'} are complete"
    assert (out / "step0" / artifacts.LORA_FILE).is_file() and not (out / artifacts.LOCK_FILE).exists()


def test_a_stop_during_validation_ends_it_at_once_and_saves_the_step(tiny_model, photos, tmp_path, monkeypatch):
    # validation takes minutes at full size: the stop does not wait for it, nor train a step more
    out = tmp_path / "out"
    stop_in(monkeypatch, "generate_images", signal.SIGTERM)
    with pytest.raises(graceful.Interrupted) as stopped:
        run_trainer(*tiny_args(tiny_model, photos, out, "--max_train_steps", 3, "--checkpointing_steps", 3,
                               "--validation_prompt", "a sks dog", "--validation_steps", 1,
                               "--num_validation_images", 2, "--validation_inference_steps", 2,
                               "--optimizer", "adamw"))
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert str(stopped.value).startswith("stopped at step 1 of 3; resume with:")
    assert (out / "step0" / artifacts.LORA_FILE).is_file() and (out / "state-step0" / artifacts.TRAINER_STATE).is_file()
    assert not (out / "validation" / "step0").exists(), "the unfinished round is not left as if it were one"
    assert not (out / artifacts.LOCK_FILE).exists()
