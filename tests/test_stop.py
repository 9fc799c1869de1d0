"""A stop in any phase ends cleanly, and a job rescheduled on another host can go on: the output dir's lock, its
heartbeat, and SIGINT / SIGTERM before, during and after training."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

import train_dreambooth_lora_ssd1b as trainer


def write_lock(folder, age=0, **holder):
    """A lock as another trainer left it, last renewed `age` seconds ago."""
    lock = folder / trainer.LOCK_FILE
    lock.write_text(json.dumps({"started": "2026-12-01 10:00:00", **holder}))
    os.utime(lock, (time.time() - age, time.time() - age))
    return lock


def test_a_lock_from_another_host_that_stopped_renewing_is_taken_over_saying_so(tmp_path, capsys):
    write_lock(tmp_path, age=trainer.LOCK_STALE_S + 60, pid=4242, host="node-17")
    with trainer.hold_output_dir(tmp_path):
        mine = json.loads((tmp_path / trainer.LOCK_FILE).read_text())
        assert (mine["pid"], mine["host"]) == (os.getpid(), socket.gethostname())
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and "by PID 4242 on node-17" in said[0] and "taking it over" in said[0]
    assert f"stale after {trainer.LOCK_STALE_S} s" in said[0]
    assert not (tmp_path / trainer.LOCK_FILE).exists()


def test_a_lock_from_another_host_renewed_lately_is_refused_with_when_it_goes_stale(tmp_path):
    lock = write_lock(tmp_path, age=trainer.LOCK_HEARTBEAT_S, pid=4242, host="node-17")
    with pytest.raises(trainer.UserError, match=rf"in use by the trainer with PID 4242 on node-17 .*renewed "
                                                rf"{trainer.LOCK_HEARTBEAT_S} s ago.*not renewed for "
                                                rf"{trainer.LOCK_STALE_S} s is taken over"):
        with trainer.hold_output_dir(tmp_path):
            pass
    assert json.loads(lock.read_text())["host"] == "node-17", "the other host's lock stays"


def test_a_lock_whose_pid_is_now_another_process_is_not_reported_as_a_trainer(tmp_path, capsys):
    # PID 1 lives as long as the machine, but started long before any trainer that wrote this lock
    write_lock(tmp_path, pid=1, host=socket.gethostname(), pid_started=trainer.process_start(1) + 1)
    with trainer.hold_output_dir(tmp_path):
        pass
    said = capsys.readouterr().err
    assert "PID 1 is now another process, not the trainer that held it; taking it over" in said
    assert "in use by the trainer" not in said


def test_a_lock_without_a_start_time_whose_pid_runs_another_program_is_taken_over(tmp_path, capsys):
    # a lock written before start times were recorded: the PID's command line tells a trainer from another program
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path, pid=sleeper.pid, host=socket.gethostname())
        with trainer.hold_output_dir(tmp_path):
            pass
    finally:
        sleeper.kill()
        sleeper.wait()
    assert f"PID {sleeper.pid} is now another program, not the trainer that held it" in capsys.readouterr().err


def test_a_live_trainer_on_this_host_keeps_its_lock_however_old_its_heartbeat(tmp_path):
    # a trainer suspended with Ctrl-Z renews nothing, but its process is checked here: it is still the holder
    write_lock(tmp_path, age=trainer.LOCK_STALE_S * 10, pid=os.getpid(), host=socket.gethostname(),
               pid_started=trainer.process_start(os.getpid()))
    with pytest.raises(trainer.UserError, match=f"in use by the trainer with PID {os.getpid()}"):
        with trainer.hold_output_dir(tmp_path):
            pass


def test_the_holder_renews_its_lock_and_never_removes_one_another_trainer_took_over(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "LOCK_HEARTBEAT_S", 0.05)
    lock = tmp_path / trainer.LOCK_FILE
    with trainer.hold_output_dir(tmp_path):
        os.utime(lock, (time.time() - 1000, time.time() - 1000))
        deadline = time.time() + 10
        while trainer.lock_age(lock) > 100 and time.time() < deadline:
            time.sleep(0.02)
        assert trainer.lock_age(lock) < 100, "renewed by the heartbeat"
        lock.write_text(json.dumps({"pid": 4242, "host": "node-17"}))  # another trainer judged it stale
    assert json.loads(lock.read_text())["host"] == "node-17", "its lock stays"
