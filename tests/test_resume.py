"""Runs that are never lost: exact resume, interruption, atomic saves, retention."""

import json
import os
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import train_dreambooth_lora_ssd1b as trainer
from dreambooth_kit import artifacts, checkpoints, graceful, messages
from conftest import ROOT, check_inputs, dora_args, run_trainer, tiny_args

# random crop and flip, LoRA dropout (global RNG), 8-bit AdamW states, text encoders, prior preservation
FLAGS = ["--random_flip", "--lora_dropout", 0.1, "--train_text_encoder", "--text_encoder_lr", 1e-3,
         "--learning_rate", 1e-3, "--with_prior_preservation", "--class_prompt", "a photo of dog",
         "--num_class_images", 2, "--checkpointing_steps", 100]


def adapters(step_dir):
    return {part: load_file(step_dir / part / "adapter_model.safetensors")
            for part in ["unet", "text_encoder_one", "text_encoder_two"]}


def assert_same_adapters(a, b):
    for part in a:
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            torch.testing.assert_close(a[part][key], b[part][key], rtol=0, atol=1e-5, msg=f"{part} {key}")


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, photos, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "out"
    run_trainer(*tiny_args(tiny_model, photos, output_dir, "--max_train_steps", 4, *FLAGS))
    return adapters(output_dir / "step3")


def sigterm_on_call(monkeypatch, n):
    """Send this process a real SIGTERM during the n-th training step, as a cluster preemption would."""
    calls = []
    real = trainer.training_step

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            signal.raise_signal(signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "training_step", step)


def test_run_stopped_by_sigterm_resumes_to_the_uninterrupted_adapters(uninterrupted, tiny_model, photos, tmp_path,
                                                                      monkeypatch):
    argv = tiny_args(tiny_model, photos, tmp_path / "out", "--max_train_steps", 4, *FLAGS)
    with monkeypatch.context() as patch:
        sigterm_on_call(patch, 2)
        with pytest.raises(graceful.Interrupted) as stopped:
            run_trainer(*argv)
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert "stopped at step 2 of 4" in str(stopped.value)
    assert str(stopped.value).endswith("--resume_from_checkpoint latest")
    assert sorted(p.name for p in (tmp_path / "out").glob("*step*")) == ["state-step1", "step1"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "the handlers are given back"

    run_trainer(*argv, "--resume_from_checkpoint", "latest")
    assert_same_adapters(adapters(tmp_path / "out" / "step3"), uninterrupted)


def test_larger_max_train_steps_extends_a_finished_run(uninterrupted, tiny_model, photos, tmp_path):
    argv = tiny_args(tiny_model, photos, tmp_path / "out", *FLAGS)
    run_trainer(*argv, "--max_train_steps", 2)
    with pytest.raises(messages.UserError, match="already done 2 steps: pass a larger --max_train_steps"):
        run_trainer(*argv, "--max_train_steps", 2, "--resume_from_checkpoint", "latest")
    run_trainer(*argv, "--max_train_steps", 4, "--resume_from_checkpoint", "latest")
    assert_same_adapters(adapters(tmp_path / "out" / "step3"), uninterrupted)
    assert (tmp_path / "out" / "step1").is_dir(), "the earlier adapters stay"


def test_prodigy_under_bf16_resumes_to_the_uninterrupted_adapters_and_step_size(tiny_model, photos, tmp_path):
    # Prodigy keeps its step-size estimate d, its running sums and its step count k in param_groups, not in the
    # per-parameter state; accelerate's save_state must carry them
    argv = tiny_args(tiny_model, photos, tmp_path / "out", "--optimizer", "prodigy", "--learning_rate", 1.0,
                     "--train_text_encoder", "--mixed_precision", "bf16", "--max_train_steps", 4,
                     "--checkpointing_steps", 2)
    run_trainer(*argv)
    after_2, after_4 = adapters(tmp_path / "out" / "step1"), adapters(tmp_path / "out" / "step3")
    for part in after_2:  # LoRA B starts at zero: bf16 autocast over fp32 LoRA weights trains
        b = [t for key, t in after_2[part].items() if "lora_B" in key]
        assert all(torch.isfinite(t).all() for t in b) and all(t.abs().sum() > 0 for t in b), part
    # what a run stopped after 2 of its 4 steps leaves
    shutil.copytree(tmp_path / "out", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "step3")
    shutil.rmtree(tmp_path / "cut" / "state-step3")
    cut = [tmp_path / "cut" if a == tmp_path / "out" else a for a in argv]
    with pytest.raises(messages.UserError, match="was trained with other settings: --prodigy_safeguard_warmup True "
                                                r"\(now False\)"):
        run_trainer(*cut, "--no-prodigy_safeguard_warmup", "--resume_from_checkpoint", "latest")
    with pytest.raises(messages.UserError, match="was trained with --optimizer prodigy, not adamw"):
        run_trainer(*cut, "--optimizer", "adamw", "--resume_from_checkpoint", "latest")

    run_trainer(*cut, "--resume_from_checkpoint", "latest")
    # Prodigy's first steps move LoRA by about 1e-6 (d starts at 1e-6), so 1e-5 would hide a lost state
    resumed = adapters(tmp_path / "cut" / "step3")
    for part in after_4:
        for key in after_4[part]:
            torch.testing.assert_close(resumed[part][key], after_4[part][key], rtol=0, atol=1e-9, msg=f"{part} {key}")
    groups = [torch.load(folder / "state-step3" / "optimizer.bin", weights_only=True)["param_groups"]
              for folder in (tmp_path / "out", tmp_path / "cut")]
    assert [g["k"] for g in groups[1]] == [4, 4, 4] and [g["lr"] for g in groups[1]] == [1.0] * 3
    prodigy_state = ["d", "d_max", "d_numerator", "d_denom", "d_hat", "k"]
    for whole, resumed in zip(*groups):
        assert {k: resumed[k] for k in prodigy_state} == pytest.approx({k: whole[k] for k in prodigy_state}, rel=1e-6)


def test_dora_state_resumes_to_the_uninterrupted_adapters_and_only_with_use_dora(dora_run, tiny_model, photos,
                                                                                 tmp_path):
    shutil.copytree(dora_run, tmp_path / "resumed")  # its state-step1: 2 of the 4 steps done
    argv = dora_args(tiny_model, photos, tmp_path / "resumed", "--max_train_steps", 4, "--resume_from_checkpoint",
                     "latest")
    with pytest.raises(messages.UserError) as refused:
        check_inputs([a for a in argv if a != "--use_dora"])
    assert str(refused.value) == (f"{tmp_path / 'resumed' / 'state-step1'} was trained with --use_dora True, not "
                                  "False: resume with the same flags")
    run_trainer(*argv)
    run_trainer(*dora_args(tiny_model, photos, tmp_path / "whole", "--max_train_steps", 4))
    resumed = adapters(tmp_path / "resumed" / "step3")
    assert all(any(k.endswith(".lora_magnitude_vector") for k in part) for part in resumed.values())
    assert_same_adapters(resumed, adapters(tmp_path / "whole" / "step3"))


@pytest.mark.parametrize("first, then, changed", [
    (["--lr_scheduler", "cosine"], ["--lr_scheduler", "cosine", "--max_train_steps", 3], "--max_train_steps"),
    (["--lr_scheduler", "linear"], ["--lr_scheduler", "linear", "--max_train_steps", 3], "--max_train_steps"),
    ([], ["--lr_scheduler", "constant_with_warmup", "--max_train_steps", 3], "--lr_scheduler"),
    (["--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", 1],
     ["--lr_scheduler", "constant_with_warmup", "--max_train_steps", 3], "--lr_warmup_steps")])
def test_resume_refuses_to_bend_the_learning_rate_curve(tiny_model, photos, tmp_path, first, then, changed):
    argv = tiny_args(tiny_model, photos, tmp_path / "out", "--optimizer", "adamw", "--checkpointing_steps", 1)
    run_trainer(*argv, "--max_train_steps", 2, *first)
    with pytest.raises(messages.UserError, match=f"changing {changed} would bend its learning-rate curve mid-run"):
        run_trainer(*argv, "--max_train_steps", 2, *then, "--resume_from_checkpoint", "latest")
    assert not (tmp_path / "out" / "step2").exists()


def test_constant_with_warmup_run_can_be_extended(tiny_model, photos, tmp_path):
    argv = tiny_args(tiny_model, photos, tmp_path / "out", "--optimizer", "adamw", "--lr_scheduler",
                     "constant_with_warmup", "--lr_warmup_steps", 1)
    run_trainer(*argv, "--max_train_steps", 1)
    run_trainer(*argv, "--max_train_steps", 2, "--resume_from_checkpoint", "latest")
    assert (tmp_path / "out" / "step1" / artifacts.LORA_FILE).is_file()


def test_failure_in_the_middle_of_a_save_leaves_no_complete_looking_folder(tiny_model, photos, tmp_path,
                                                                          monkeypatch):
    argv = tiny_args(tiny_model, photos, tmp_path / "out", "--max_train_steps", 3, "--checkpointing_steps", 1,
                     "--optimizer", "adamw")
    import safetensors.torch

    writes, real = [], safetensors.torch.save_file

    def failing_save_file(tensors, filename, *args, **kwargs):
        writes.append(filename)
        if "step1" in str(filename) and len([w for w in writes if "step1" in str(w)]) == 2:
            raise OSError("simulated crash while writing")  # the first file of step1 is already on disk
        return real(tensors, filename, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(safetensors.torch, "save_file", failing_save_file)
        with pytest.raises(messages.UserError, match="could not save step 2 in .*: simulated crash while writing; "
                                                    "earlier checkpoints are intact.*--resume_from_checkpoint latest"):
            run_trainer(*argv)
    visible = sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith("."))
    assert "step1" not in visible and "state-step1" not in visible, "a half-written step never looks complete"
    assert {"step0", "state-step0"} <= set(visible)
    assert checkpoints.find_resume_state(tmp_path / "out", "latest").name == "state-step0"

    (tmp_path / "out" / ".state-step1.partial").mkdir()  # what a kill -9 mid-save leaves behind
    (tmp_path / "out" / ".state-step1.partial" / "optimizer.bin").write_bytes(b"half")
    assert checkpoints.find_resume_state(tmp_path / "out", "latest").name == "state-step0", "latest skips it"
    run_trainer(*argv, "--resume_from_checkpoint", "latest")
    assert sorted(p.name for p in (tmp_path / "out").glob("step*")) == ["step0", "step1", "step2"]
    assert not list((tmp_path / "out").glob(".*.partial")), "leftovers of the crash are cleaned up"


@pytest.mark.parametrize("where", ["adapters", "state"])
def test_a_full_disk_in_any_file_of_a_save_cleans_up_and_says_how_to_resume(tiny_model, photos, tmp_path,
                                                                              monkeypatch, where):
    # safetensors reports a full disk with its own error type, not OSError
    import safetensors.torch
    from safetensors import SafetensorError

    real = safetensors.torch.save_file

    def full_disk(tensors, filename, *args, **kwargs):
        in_state = "state-step1" in str(filename)
        if "step1" in str(filename) and in_state == (where == "state"):
            raise SafetensorError("No space left on device (os error 28)")
        return real(tensors, filename, *args, **kwargs)

    argv = tiny_args(tiny_model, photos, tmp_path / "out", "--max_train_steps", 3, "--checkpointing_steps", 1,
                     "--optimizer", "adamw")
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(messages.UserError, match=r"could not save step 2 in .*: No space left on device \(os error "
                                                r"28\); earlier checkpoints are intact.*resume_from_checkpoint latest"):
        run_trainer(*argv)
    assert not list((tmp_path / "out").glob(".*.partial")), "the half-written folder is gone from the full disk"
    assert checkpoints.find_resume_state(tmp_path / "out", "latest").name == "state-step0"
    # "state": step1's adapters were published, its state was not (as after a kill between the two)
    assert (tmp_path / "out" / "step1").is_dir() == (where == "state")
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    run_trainer(*argv, "--resume_from_checkpoint", "latest")
    run_trainer(*tiny_args(tiny_model, photos, tmp_path / "plain", "--max_train_steps", 3, "--checkpointing_steps", 1,
                           "--optimizer", "adamw"))
    for name in ["step1", "step2"]:
        resumed, plain = load_file(tmp_path / "out" / name / artifacts.LORA_FILE), load_file(
            tmp_path / "plain" / name / artifacts.LORA_FILE)
        for key in plain:
            torch.testing.assert_close(resumed[key], plain[key], rtol=0, atol=1e-6)


def test_checkpoints_total_limit_keeps_newest_states_and_every_adapter(tiny_model, photos, tmp_path):
    run_trainer(*tiny_args(tiny_model, photos, tmp_path / "out", "--max_train_steps", 4, "--checkpointing_steps", 1,
                           "--checkpoints_total_limit", 2, "--optimizer", "adamw"))
    assert sorted(p.name for p in (tmp_path / "out").glob("state-step*")) == ["state-step2", "state-step3"]
    assert sorted(p.name for p in (tmp_path / "out").glob("step*")) == ["step0", "step1", "step2", "step3"]


def test_resume_refuses_other_flags_and_accepts_a_step_dir(tiny_model, photos, tmp_path):
    argv = tiny_args(tiny_model, photos, tmp_path / "out", "--optimizer", "adamw", "--checkpointing_steps", 1)
    run_trainer(*argv, "--max_train_steps", 1)
    with pytest.raises(messages.UserError, match="trained with --rank 8, not 4: resume with the same flags"):
        run_trainer(*argv, "--max_train_steps", 2, "--rank", 4, "--resume_from_checkpoint", "latest")
    state = checkpoints.find_resume_state(tmp_path / "out", str(tmp_path / "out" / "step0"))
    assert state.name == "state-step0", "a stepN adapter dir points at its resumable state"
    for bare in ["step0", "state-step0"]:  # diffusers' habit: a bare name is looked up in the output dir
        assert checkpoints.find_resume_state(tmp_path / "out", bare) == tmp_path / "out" / "state-step0"
    with pytest.raises(messages.UserError, match="is not a resumable checkpoint"):
        checkpoints.find_resume_state(tmp_path / "out", str(tmp_path))


def test_resume_state_is_kept_out_of_the_adapter_folders(trained_run):
    step = trained_run / "step3"
    state = trained_run / "state-step3"
    assert not any(p.suffix in (".bin", ".pkl") for p in step.rglob("*")), "no optimizer or RNG state in adapters"
    names = {p.name for p in state.iterdir()}
    assert {"optimizer.bin", "scheduler.bin", "random_states_0.pkl", "trainer_state.json"} <= names
    assert not any("model" in n for n in names), "the frozen base model is never copied into the state"
    assert json.loads((state / "trainer_state.json").read_text())["step"] == 4


def test_sigterm_saves_prints_the_resume_command_and_exits_within_seconds(tiny_model, photos, tmp_path):
    out = tmp_path / "out"
    flags = tiny_args(tiny_model, photos, out, "--max_train_steps", 100000, "--checkpointing_steps", 5,
                      "--optimizer", "adamw")
    process = subprocess.Popen([sys.executable, str(ROOT / "train_dreambooth_lora_ssd1b.py"), *map(str, flags)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "state-step4").is_dir() and time.time() < deadline and process.poll() is None:
        time.sleep(0.1)
    sent = time.time()
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    # Responsiveness, not speed: it finishes the step it is in, saves and exits instead of running to 100000.
    # A quiet 2-core machine takes under 10 s; a loaded one has taken 19.5 s, so the bound leaves room for that.
    assert time.time() - sent < 45, "exits within seconds, not after the run"
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Traceback" not in stderr
    command = stderr.strip().splitlines()[-1].strip()
    assert command.startswith(f"cd {shlex.quote(os.getcwd())} && "  # the launch as typed, from any folder
                              f"{shlex.join([sys.executable, str(ROOT / 'train_dreambooth_lora_ssd1b.py')])} ")
    assert command.endswith(f"--output_dir {out} --report_to none --max_train_steps 100000 --checkpointing_steps 5 "
                            "--optimizer adamw --resume_from_checkpoint latest")
    last = checkpoints.complete_states(out)[-1]
    assert (out / last.name.removeprefix("state-") / artifacts.LORA_FILE).is_file(), "adapters of that step too"


def test_second_signal_exits_at_once_but_a_launchers_echo_of_the_first_does_not(monkeypatch):
    # accelerate launch 1.16 passes Ctrl-C or a group's SIGTERM on as its own SIGTERM, milliseconds after the
    # trainer got the first: that must not cut the save short; a person's second Ctrl-C, later, still does
    exits, now = [], [100.0]
    monkeypatch.setattr(graceful.os, "_exit", lambda code: exits.append(code))
    monkeypatch.setattr(graceful.time, "monotonic", lambda: now[0])
    with graceful.GracefulStop() as stop:
        stop.handle(signal.SIGINT, None)
        assert stop.signum == signal.SIGINT and exits == []
        now[0] += 0.01
        stop.handle(signal.SIGTERM, None)  # the launcher's
        assert stop.signum == signal.SIGINT and exits == []
        now[0] += 2.0
        stop.handle(signal.SIGINT, None)
    assert exits == [128 + signal.SIGINT]


@pytest.fixture(scope="module")
def one_step_run(tiny_model, photos, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("one_step") / "out"
    run_trainer(*tiny_args(tiny_model, photos, output_dir, "--max_train_steps", 1, "--optimizer", "adamw"))
    return output_dir


def damaged_copy(one_step_run, tmp_path, damage):
    output_dir = tmp_path / "out"
    shutil.copytree(one_step_run, output_dir)
    damage(output_dir / "state-step0")
    return output_dir


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_step(state):
    record = json.loads((state / artifacts.TRAINER_STATE).read_text())
    (state / artifacts.TRAINER_STATE).write_text(json.dumps({**record, "step": 5}))


@pytest.mark.parametrize("damage, message", [
    (lambda state: flip_a_byte(state / "lora_0.safetensors"), r"lora_0.safetensors is corrupt \(its checksum"),
    (lambda state: (state / "random_states_0.pkl").write_bytes((state / "random_states_0.pkl").read_bytes()[:50]),
     r"random_states_0.pkl is corrupt"),
    (lambda state: (state / "optimizer.bin").unlink(), r"optimizer.bin is missing"),
    (lambda state: (state / "custom_checkpoint_0.pkl").write_bytes(b"x"),
     r"holds custom_checkpoint_0.pkl, which it was not saved with"),
    (edit_step, r"trainer_state.json was changed after it was saved"),
])
def test_a_damaged_state_is_refused_before_any_model_loads(one_step_run, tiny_model, photos, tmp_path, monkeypatch,
                                                           damage, message):
    output_dir = damaged_copy(one_step_run, tmp_path, damage)
    monkeypatch.setattr(trainer, "load_models", lambda *a: pytest.fail("a model loaded"))
    with pytest.raises(messages.UserError, match=message + ".*delete .*state-step0 to resume from the state before"):
        run_trainer(*tiny_args(tiny_model, photos, output_dir, "--max_train_steps", 2, "--optimizer", "adamw",
                               "--resume_from_checkpoint", "latest"))


def test_changed_settings_are_listed_and_refused_unless_accepted(one_step_run, tiny_model, photos, tmp_path,
                                                                 capsys):
    output_dir = damaged_copy(one_step_run, tmp_path, lambda state: None)
    changed = ["--learning_rate", 2e-4, "--instance_prompt", "a photo of zwx dog", "--seed", 7, "--resolution", 32]
    argv = tiny_args(tiny_model, photos, output_dir, "--max_train_steps", 2, "--optimizer", "adamw",
                     "--resume_from_checkpoint", "latest")
    with pytest.raises(messages.UserError) as refused:
        run_trainer(*argv, *changed)
    assert str(refused.value) == (
        f"{output_dir / 'state-step0'} was trained with other settings: --instance_prompt a photo of sks dog (now a "
        "photo of zwx dog), --resolution 64 (now 32), --learning_rate 0.0001 (now 0.0002), --seed 0 (now 7); resume "
        "with the same flags, or pass --accept_changed_settings to go on with the new ones")
    run_trainer(*argv, *changed, "--accept_changed_settings")
    assert "resuming with changed settings, as --accept_changed_settings asks" in capsys.readouterr().err
    assert (output_dir / "step1" / artifacts.LORA_FILE).is_file()


def test_a_photo_changed_in_the_same_folder_is_refused_on_resume(tiny_model, photos, tmp_path):
    folder = tmp_path / "dog"
    shutil.copytree(photos, folder)
    argv = tiny_args(tiny_model, folder, tmp_path / "out", "--optimizer", "adamw")
    run_trainer(*argv, "--max_train_steps", 1)
    Image.new("RGB", (64, 64), "red").save(folder / "dog_0.jpg")  # same folder, same names, same flags
    with pytest.raises(messages.UserError, match=r"was trained with other settings: the instance photos, their "
                                                r"captions or their masks \(put them back as they were\)"):
        run_trainer(*argv, "--max_train_steps", 2, "--resume_from_checkpoint", "latest")


def reseal(state):
    """Rewrite a state's trainer_state.json over its files as they are now: the seal is an unkeyed SHA-256, so
    anyone who edits a state can do this."""
    record = json.loads((state / artifacts.TRAINER_STATE).read_text())
    (state / artifacts.TRAINER_STATE).unlink()
    (state / artifacts.TRAINER_STATE).write_text(json.dumps(checkpoints.state_record(state, record["step"],
                                                                               record["settings"])))


def resume_argv(tiny_model, photos, output_dir, *extra):
    return tiny_args(tiny_model, photos, output_dir, "--max_train_steps", 2, "--optimizer", "adamw",
                     "--resume_from_checkpoint", "latest", *extra)


@pytest.mark.parametrize("older", [True, False])
def test_latest_names_a_newest_state_without_its_trainer_state_and_never_falls_back_silently(
        one_step_run, tiny_model, photos, tmp_path, older):
    def break_newest(state):
        newest = state.parent / "state-step3"
        shutil.copytree(state, newest)
        (newest / artifacts.TRAINER_STATE).unlink()
        if not older:  # the only state is the damaged one
            shutil.rmtree(state)

    output_dir = damaged_copy(one_step_run, tmp_path, break_newest)
    then = "'latest' resumes from state-step0, the state before it" if older else "the run starts anew"
    with pytest.raises(messages.UserError) as refused:
        check_inputs(resume_argv(tiny_model, photos, output_dir))
    assert str(refused.value) == (
        f"--resume_from_checkpoint latest: {output_dir / 'state-step3'} has no trainer_state.json (deleted or "
        f"damaged), so its step and settings are unknown, and 'latest' does not fall back past it without a word: "
        f"delete it (or move it out of {output_dir}), then {then}")


class Foreign:  # any class of the user's: weights_only loading refuses to build it
    pass


def pickled(state, name, content):
    with open(state / name, "wb") as f:
        pickle.dump(content, f)


def torch_saved(state, name, content):
    torch.save(content, state / name)


def rng_of_another_kind(state):
    states = torch.load(state / "random_states_0.pkl", weights_only=False)
    torch.save({**states, "torch_manual_seed": torch.zeros(3)}, state / "random_states_0.pkl")


@pytest.mark.parametrize("damage, message", [
    (lambda state: torch_saved(state, "random_states_0.pkl", Foreign()),
     r"random_states_0.pkl holds a pickled test_resume.Foreign, not only tensors and plain values"),
    (lambda state: pickled(state, "optimizer.bin", {"state": {}, "param_groups": []}),
     r"optimizer.bin is not a torch.save file as accelerate writes it \(it begins b'\\x80"),
    (lambda state: torch_saved(state, "optimizer.bin", [1, 2]), r"optimizer.bin holds a list, not the optimizer"),
    (lambda state: torch_saved(state, "scheduler.bin", torch.zeros(2)), r"scheduler.bin holds a Tensor"),
    (rng_of_another_kind, r"random_states_0.pkl holds RNG states that do not set .*so the resume would not be exact"),
    (lambda state: (state / "random_states_0.pkl").unlink(), r"has no random_states_0.pkl, which resume reads"),
    (lambda state: (state / "lora_0.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}"),
     r"lora_0.safetensors is not a readable safetensors file"),
    (lambda state: save_file({"a.lora_A.weight": torch.zeros(3, 8), "a.lora_B.weight": torch.zeros(8, 3)},
                             state / "lora_0.safetensors"), r"lora_0.safetensors holds LoRA tensors of another rank"),
])
def test_a_foreign_file_in_a_resealed_state_is_named_before_any_model_loads(one_step_run, tiny_model, photos,
                                                                            tmp_path, monkeypatch, damage, message):
    output_dir = damaged_copy(one_step_run, tmp_path, lambda state: (damage(state), reseal(state)))
    monkeypatch.setattr(trainer, "load_models", lambda *a: pytest.fail("a model loaded"))
    with pytest.raises(messages.UserError, match=message + ".*delete .*state-step0 to resume from the state before"):
        run_trainer(*resume_argv(tiny_model, photos, output_dir))


@pytest.fixture(scope="module")
def own_model_run(tiny_model, photos, tmp_path_factory):
    """A one-step run on a copy of the tiny model, which its tests change or move."""
    work = tmp_path_factory.mktemp("own_model")
    shutil.copytree(tiny_model, work / "model")
    run_trainer(*tiny_args(work / "model", photos, work / "out", "--max_train_steps", 1, "--optimizer", "adamw",
                           "--pretrained_vae_model_name_or_path", "none"))
    return work


def copy_of(own_model_run, tmp_path):
    shutil.copytree(own_model_run / "model", tmp_path / "model")
    shutil.copytree(own_model_run / "out", tmp_path / "out")
    for record in [*(tmp_path / "out").glob("*/run_settings.json"), *(tmp_path / "out").glob("*/trainer_state.json")]:
        record.write_text(record.read_text().replace(str(own_model_run), str(tmp_path)))
    reseal(tmp_path / "out" / "state-step0")
    return tmp_path / "model", tmp_path / "out"


def edit_config(file):
    file.write_text(json.dumps({**json.loads(file.read_text()), "note": "edited in place"}))


@pytest.mark.parametrize("change, part", [
    (lambda model: edit_config(model / "unet" / "config.json"), "unet"),
    (lambda model: save_file({**load_file(model / "vae" / "diffusion_pytorch_model.safetensors"),
                              "extra": torch.zeros(1)}, model / "vae" / "diffusion_pytorch_model.safetensors"),
     "vae"),
])
def test_a_base_model_changed_in_place_is_refused_on_resume_unless_accepted(own_model_run, photos, tmp_path,
                                                                            change, part):
    model, output_dir = copy_of(own_model_run, tmp_path)
    argv = resume_argv(model, photos, output_dir, "--pretrained_vae_model_name_or_path", "none")
    assert check_inputs(argv)[2].resume_state == output_dir / "state-step0"  # unchanged: resumes
    change(model)
    with pytest.raises(messages.UserError) as refused:
        check_inputs(argv)
    assert str(refused.value) == (
        f"{output_dir / 'state-step0'} was trained with other settings: the base model's {part} (changed since the "
        "state was saved: its config, tokenizer or weight files differ; put the model back as it was); resume with "
        "the same flags, or pass --accept_changed_settings to go on with the new ones")
    assert check_inputs([*argv, "--accept_changed_settings"])[2].resume_state == output_dir / "state-step0"


def test_a_base_model_moved_with_the_same_files_resumes_with_a_note(own_model_run, photos, tmp_path, capsys):
    model, output_dir = copy_of(own_model_run, tmp_path)
    moved = model.rename(tmp_path / "elsewhere")
    argv = resume_argv(moved, photos, output_dir, "--pretrained_vae_model_name_or_path", "none")
    assert check_inputs(argv)[2].resume_state == output_dir / "state-step0"
    note = f"--pretrained_model_name_or_path {moved} (was {model}) holds the same base model files"
    assert note in capsys.readouterr().err
    edit_config(moved / "text_encoder" / "config.json")
    with pytest.raises(messages.UserError, match=f"was trained with --pretrained_model_name_or_path {model}, not "):
        check_inputs(argv)


def test_infer_names_run_settings_json_as_where_a_moved_base_model_came_from(own_model_run, tmp_path):
    import infer

    model, output_dir = copy_of(own_model_run, tmp_path)
    model.rename(tmp_path / "elsewhere")
    with pytest.raises(messages.UserError) as refused:
        infer.main(["--checkpoint", str(output_dir / "step0"), "--num_inference_steps", "1"])
    assert str(refused.value) == (
        f"{output_dir / 'step0' / 'run_settings.json'} records --pretrained_model_name_or_path {model}, which does "
        "not exist (moved or deleted): pass --pretrained_model_name_or_path with where that model is now")


@pytest.mark.parametrize("change, message", [
    (lambda tensors: {key.replace("attn1.to_k", "attn1.to_z"): value for key, value in tensors.items()},
     "holds tensors the model has no place for"),
    (lambda tensors: {key: value for key, value in tensors.items() if "attn1.to_k" not in key},
     "lacks LoRA tensors of the model"),
])
def test_a_resealed_lora_file_of_other_modules_is_refused_rather_than_loaded_in_part(one_step_run, tiny_model, photos,
                                                                                     tmp_path, change, message):
    def other_modules(state):
        save_file(change(load_file(state / "lora_0.safetensors")), state / "lora_0.safetensors")
        reseal(state)

    output_dir = damaged_copy(one_step_run, tmp_path, other_modules)
    with pytest.raises(messages.UserError, match=f"lora_0.safetensors {message} .*, so it is not this run's: delete"):
        run_trainer(*resume_argv(tiny_model, photos, output_dir))


def test_a_hub_model_whose_revision_resolves_to_another_commit_is_named_with_the_commit_to_pin(tmp_path,
                                                                                              monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--someone--ssd"
    for commit in ["a" * 40, "b" * 40]:  # the cache after two downloads of main: each commit's files
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "model_index.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    trained_on = checkpoints.model_fingerprint("someone/ssd", None, None, None)
    (repo / "refs" / "main").write_text("b" * 40)  # main moved on upstream, and was fetched since
    now = checkpoints.model_fingerprint("someone/ssd", None, None, None)
    assert checkpoints.describe_change("model_fingerprint", trained_on, now) == (
        f"the base model someone/ssd (its revision now resolves to commit {'b' * 12}, not {'a' * 12}; pass "
        f"--revision {'a' * 40} to resume on the files it was trained on)")
    assert checkpoints.fingerprint_changes(trained_on, checkpoints.model_fingerprint("someone/ssd", None, "a" * 40, None)) == []
