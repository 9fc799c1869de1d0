"""Outputs a user can hand on: the model card, the kohya file, and the validation grid; and the output dir that
one trainer holds at a time."""

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import train_dreambooth_lora_ssd1b as trainer
from dreambooth_kit import artifacts, checkpoints, exporters, graceful, messages, model_card, ownership, pipeline
from conftest import ROOT, check_inputs, dora_args, reset_accelerate, run_trainer, tiny_args
from test_adapters import outputs


@pytest.fixture(scope="module")
def shared_run(tiny_model, photos, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("shared") / "out"
    run_trainer(*tiny_args(tiny_model, photos, output_dir, "--max_train_steps", 3, "--checkpointing_steps", 2,
                           "--validation_prompt", "a photo of sks dog in a bucket", "--validation_steps", 2,
                           "--num_validation_images", 3, "--validation_inference_steps", 2,
                           "--train_text_encoder", "--rank", 4, "--lora_alpha", 8, "--learning_rate", 1e-2,
                           "--text_encoder_lr", 1e-2, "--optimizer", "adamw",  # the kohya file is a default
                           "--with_prior_preservation", "--class_prompt", "a photo of dog", "--num_class_images", 1))
    return output_dir


def test_model_card_describes_the_run_and_how_to_load_it(shared_run, tiny_model):
    card = (shared_run / "README.md").read_text()
    for fact in [f"| base model | `{tiny_model.name}` |", "| VAE | `vae` |",
                 "| instance prompt | `a photo of sks dog` |", "| identifier | `sks` |",
                 "`a photo of dog`, 1 class image,", "| steps | 3 of 3 |", "| resolution | 64 |",
                 "rank 4, alpha 8, on the UNet and both text encoders", "Latest adapters: `step2/`"]:
        assert fact in card, fact
    assert "![validation](validation/step2/grid.png)" in card, "the grid of the last round, which ran at the end"
    assert (shared_run / "validation" / "step2" / "grid.png").is_file()
    command = "python infer.py --checkpoint step2 --prompt '"  # the run lies outside the project: infer.py by name
    for way in [command, 'pipe.load_lora_weights("step2")',
                'PeftModel.from_pretrained(pipe.text_encoder_2, ckpt / "text_encoder_two")',
                artifacts.KOHYA_FILE]:
        assert way in card, way


def test_the_card_and_the_files_it_publishes_name_no_local_path(shared_run, tiny_model):
    # the card and the diffusers file go to the Hub: local folders by their names, never the user's full paths
    card = (shared_run / "README.md").read_text()
    from safetensors import safe_open

    with safe_open(shared_run / "step2" / artifacts.LORA_FILE, "pt") as lora:
        metadata = json.dumps(lora.metadata())
    for published in [card, metadata]:
        for local in [str(tiny_model), str(shared_run.resolve()), str(ROOT), str(Path.home())]:
            assert local not in published, local
    assert f'StableDiffusionXLPipeline.from_pretrained("{tiny_model.name}", vae=vae' in card
    assert "the base model own" not in card


def test_a_card_in_the_projects_work_dirs_gives_infer_py_relative_to_the_run():
    run = ROOT / "work_dirs" / "my-run"
    assert model_card.card_infer_command(run, "step9", "a sks dog") == (
        "python ../../infer.py --checkpoint step9 --prompt 'a sks dog'")


def test_the_cards_diffusers_snippet_uses_the_dtype_keyword_the_installed_diffusers_reads(shared_run):
    from diffusers import __version__ as diffusers_version
    from packaging.version import Version

    card = (shared_run / "README.md").read_text()
    keyword = "dtype=" if Version(diffusers_version) >= Version("0.40") else "torch_dtype="
    assert f"{keyword}torch.float16).to(\"cuda\")" in card
    assert ("torch_dtype=" in card) == (keyword == "torch_dtype="), "0.40 renamed it; 0.42 warns at the old name"
    assert "in fp16 on a CUDA GPU" in card, "the snippet says what it assumes"


def test_counts_take_the_noun_in_the_number_they_need():
    assert [messages.counted(n, "image") for n in (0, 1, 2)] == ["0 images", "1 image", "2 images"]
    assert messages.counted(1, "process", "processes") == "1 process"


def test_validation_grid_holds_every_image(shared_run):
    grid = Image.open(shared_run / "validation" / "step1" / "grid.png")
    assert grid.size == (2 * 64, 2 * 64), "3 images in rows of 2"
    first = Image.open(shared_run / "validation" / "step1" / "seed0.png")
    assert grid.crop((0, 0, 64, 64)).tobytes() == first.tobytes()


def test_kohya_file_uses_kohya_names_with_alpha(shared_run):
    kohya = load_file(shared_run / "step2" / artifacts.KOHYA_FILE)
    assert {k.split("_")[1] for k in kohya} == {"unet", "te1", "te2"}
    assert all(k.startswith(("lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_te1_text_model_",
                             "lora_te2_text_model_")) for k in kohya), "SGM block names, as WebUI and ComfyUI read"
    assert {v.item() for k, v in kohya.items() if k.endswith(".alpha")} == {8.0}
    peft = load_file(shared_run / "step2" / "unet" / "adapter_model.safetensors")
    assert len([k for k in kohya if k.startswith("lora_unet")]) == len(peft) * 3 // 2, "down, up and alpha each"


def lora_modules(state, prefix):
    """The module names a LoRA state dict adapts: one per (down, up) pair."""
    return {k.rsplit(".lora", 1)[0] for k in state if k.startswith(prefix) and ".lora" in k}


def test_default_kohya_file_covers_every_trained_module_of_all_three_models(shared_run):
    # ComfyUI rejects every UNet tensor of the diffusers file, so this file must hold the whole adapter
    kohya = load_file(shared_run / "step2" / artifacts.KOHYA_FILE)
    for peft_dir, prefix in [("unet", "lora_unet_"), ("text_encoder_one", "lora_te1_"),
                             ("text_encoder_two", "lora_te2_")]:
        peft = load_file(shared_run / "step2" / peft_dir / "adapter_model.safetensors")
        assert len(lora_modules(kohya, prefix)) == len(lora_modules(peft, "")) > 0, peft_dir
        alphas = {v.item() for k, v in kohya.items() if k.startswith(prefix) and k.endswith(".alpha")}
        assert alphas == {8.0}, "alpha as trained"
    card = (shared_run / "README.md").read_text()
    assert f"| ComfyUI | `step2/{artifacts.KOHYA_FILE}` |" in card and "| A1111 / Forge |" in card


def test_no_output_kohya_format_leaves_the_kohya_file_out(tiny_model, photos, tmp_path):
    out = tmp_path / "out"
    run_trainer(*tiny_args(tiny_model, photos, out, "--max_train_steps", 1, "--optimizer", "adamw",
                           "--no-output_kohya_format", "--center_crop"))
    assert (out / "step0" / artifacts.LORA_FILE).is_file() and not (out / "step0" / artifacts.KOHYA_FILE).exists()
    assert "ComfyUI" not in (out / "README.md").read_text()


def test_kohya_file_loads_back_to_the_same_weights(shared_run, tiny_model):
    from diffusers import StableDiffusionXLPipeline

    via_diffusers_file = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    via_diffusers_file.load_lora_weights(shared_run / "step2")
    via_kohya_file = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    via_kohya_file.load_lora_weights(shared_run / "step2", weight_name=artifacts.KOHYA_FILE)
    base = outputs(StableDiffusionXLPipeline.from_pretrained(tiny_model))
    for b, d, k in zip(base, outputs(via_diffusers_file), outputs(via_kohya_file)):
        torch.testing.assert_close(k, d, rtol=1e-5, atol=1e-6)
        assert (k - b).abs().max() > 1e-4


def test_use_dora_writes_no_kohya_file_and_says_why_in_one_line(dora_run, tiny_model, photos, tmp_path, capsys):
    step = dora_run / "step1"
    assert (step / artifacts.LORA_FILE).is_file() and not (step / artifacts.KOHYA_FILE).exists()
    settings = json.loads((step / artifacts.SETTINGS_FILE).read_text())
    assert settings["output_kohya_format"] and not settings["derived"]["output_kohya_format"], "as typed; as it ran"
    card = (dora_run / "README.md").read_text()
    assert "| LoRA | DoRA, rank 4, alpha 8, on the UNet and both text encoders |" in card and "ComfyUI" not in card
    capsys.readouterr()
    check_inputs(dora_args(tiny_model, photos, tmp_path / "out"))  # the note comes before any model loads
    assert f"note: --use_dora writes no {artifacts.KOHYA_FILE}: diffusers drops a kohya file's DoRA magnitudes " \
           "(dora_scale) and loads it as plain LoRA, so that file could not be checked against the trained model\n" \
           in capsys.readouterr().err
    check_inputs(dora_args(tiny_model, photos, tmp_path / "out", "--no-output_kohya_format"))
    assert "note: --use_dora" not in capsys.readouterr().err, "no file was asked for: nothing to explain"


def test_diffusers_still_loads_a_kohya_files_dora_scale_as_plain_lora():
    # why --use_dora writes no kohya file: diffusers' SDXL loader deletes dora_scale keys, with only a warning, before
    # its kohya converter runs. Once this fails, write peft's magnitude as <module>.dora_scale, shaped (out, 1) for
    # ComfyUI (it takes a first axis of the weight's length as the output axis), and test that file like the others.
    from diffusers import StableDiffusionXLPipeline

    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    kohya = {f"{name}.lora_down.weight": torch.zeros(4, 8), f"{name}.lora_up.weight": torch.zeros(8, 4),
             f"{name}.alpha": torch.tensor(4.0), f"{name}.dora_scale": torch.ones(8, 1)}
    state, _ = StableDiffusionXLPipeline.lora_state_dict(kohya)
    assert len(state) == 2 and not any("magnitude" in k or "dora" in k for k in state), list(state)


SDXL_UNET = {"layers_per_block": 2, "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}


def test_kohya_names_follow_sgm_blocks():
    assert exporters.kohya_module_name("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", SDXL_UNET) == \
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert exporters.kohya_module_name("down_blocks.2.attentions.1.proj_in", SDXL_UNET) == "input_blocks.8.1.proj_in"
    assert exporters.kohya_module_name("up_blocks.1.attentions.2.x", SDXL_UNET) == "output_blocks.5.1.x"
    assert exporters.kohya_module_name("mid_block.attentions.0.x", SDXL_UNET) == "middle_block.1.x"


def test_rerun_into_a_finished_output_dir_offers_resume_or_overwrite(shared_run, tiny_model, photos):
    with pytest.raises(messages.UserError, match=r"already holds adapters \(step2\); continue that run with "
                                                r"--resume_from_checkpoint latest.*--overwrite_output_dir"):
        run_trainer(*tiny_args(tiny_model, photos, shared_run))


def test_a_second_trainer_on_the_same_output_dir_is_refused_naming_the_holder(tiny_model, photos, tmp_path):
    out = tmp_path / "out"
    with ownership.hold_output_dir(out):
        lock = json.loads((out / artifacts.LOCK_FILE).read_text())
        assert lock["pid"] == os.getpid() and lock["host"] == socket.gethostname()
        with pytest.raises(messages.UserError, match=rf"{out} is in use by the trainer with PID {os.getpid()} on "
                                                    rf"{socket.gethostname()} .*delete {out / artifacts.LOCK_FILE} if"):
            run_trainer(*tiny_args(tiny_model, photos, out, "--max_train_steps", 1, "--optimizer", "adamw"))
        assert not list(out.glob("step*")), "the refused trainer wrote nothing"
    assert not (out / artifacts.LOCK_FILE).exists(), "released at exit"


def test_a_lock_left_by_a_dead_trainer_is_taken_over_and_released(tiny_model, photos, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    out.mkdir()
    (out / artifacts.LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    run_trainer(*tiny_args(tiny_model, photos, out, "--max_train_steps", 1, "--optimizer", "adamw"))
    assert f"the trainer that held it (PID {dead.pid}) is gone; taking it over" in capsys.readouterr().err
    assert (out / "step0" / artifacts.LORA_FILE).is_file() and not (out / artifacts.LOCK_FILE).exists()


def test_a_lock_held_on_another_host_is_not_taken_over_while_it_is_renewed(tmp_path):
    (tmp_path / artifacts.LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "today"}))
    with pytest.raises(messages.UserError, match="in use by the trainer with PID 1 on elsewhere"):
        with ownership.hold_output_dir(tmp_path):
            pass
    assert (tmp_path / artifacts.LOCK_FILE).exists(), "another machine's renewed lock stays"


def test_a_refused_run_leaves_no_empty_output_dir(tmp_path):
    with pytest.raises(messages.UserError, match="no images in"):
        (tmp_path / "empty").mkdir()
        trainer.main(["--instance_dir", str(tmp_path / "empty"), "--instance_prompt", "a photo of sks dog",
                      "--output_dir", str(tmp_path / "out"), "--optimizer", "adamw"])
    assert not (tmp_path / "out").exists()


def test_an_overwritten_output_dir_holds_one_run_and_the_users_own_files(tiny_model, photos, tmp_path, capsys):
    out = tmp_path / "out"
    run_trainer(*tiny_args(tiny_model, photos, out, "--max_train_steps", 3, "--checkpointing_steps", 1,
                           "--optimizer", "adamw", "--report_to", "tensorboard", "--validation_prompt", "a sks dog",
                           "--validation_steps", 3, "--num_validation_images", 1, "--validation_inference_steps", 1))
    assert (out / "validation" / "step2").is_dir() and (out / "logs" / "dreambooth-lora-ssd1b").is_dir()
    (out / "notes.txt").write_text("mine")
    (out / "validation" / "reference.png").write_bytes(b"mine")
    (out / "eval-old").mkdir()
    capsys.readouterr()
    run_trainer(*tiny_args(tiny_model, photos, out, "--max_train_steps", 1, "--optimizer", "adamw",
                           "--overwrite_output_dir"))
    assert [p.name for p in artifacts.finished_adapters(out)] == ["step0"], "evaluate.py sees only this run's steps"
    assert checkpoints.find_resume_state(out, "latest") == out / "state-step0"
    assert [p.name for p in checkpoints.complete_states(out)] == ["state-step0"]
    card = (out / "README.md").read_text()
    assert "step0" in card and "step2" not in card and "validation/step2" not in card
    assert not (out / "validation" / "step2").exists() and not (out / "logs").exists()
    assert (out / "notes.txt").read_text() == "mine" and (out / "eval-old").is_dir()
    assert (out / "validation" / "reference.png").read_bytes() == b"mine"
    assert not list(out.glob(".*.partial")) and not list(out.glob("validation/.*"))
    said = capsys.readouterr().out
    assert "--overwrite_output_dir: removed the earlier run's state-step0, state-step1, state-step2, step0, step1, " \
           "step2, validation/step2, README.md, validation/base" not in said  # no base round was rendered
    assert "removed the earlier run's state-step0, state-step1, state-step2, step0, step1, step2, validation/step2, " \
           f"README.md, logs/dreambooth-lora-ssd1b from {out}" in said


def earlier_run(out):
    """An earlier run's steps 1-4 as the trainer leaves them, with a card, validation rounds and a user's file."""
    for step in range(4):
        (out / f"step{step}").mkdir(parents=True)
        (out / f"step{step}" / artifacts.LORA_FILE).write_bytes(b"weights")
        (out / f"state-step{step}").mkdir()
        (out / f"state-step{step}" / artifacts.TRAINER_STATE).write_text(json.dumps({"step": step + 1}))
        (out / "validation" / f"step{step}").mkdir(parents=True)
    (out / "README.md").write_text("---\ntags:\n- dreambooth\n- ssd-1b\n---\nlatest: step3\n")
    (out / "notes.txt").write_text("mine")


def test_overwrite_while_resuming_removes_only_what_lies_beyond_the_resumed_step(tmp_path):
    out = tmp_path / "out"
    earlier_run(out)
    removed = ownership.remove_earlier_run(out, out / "state-step1")
    assert removed == ["state-step2", "state-step3", "step2", "step3", "validation/step2", "validation/step3",
                       "README.md"], "the card named step3, which is gone: the next save writes it anew"
    assert [p.name for p in checkpoints.complete_states(out)] == ["state-step0", "state-step1"]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "state-step0", "state-step1", "step0", "step1",
                                                     "validation"]


def test_overwrite_removes_only_the_trainers_names_and_the_folders_it_wrote(tmp_path):
    out = tmp_path / "out"
    earlier_run(out)
    (out / "hub").mkdir()  # the user's, not a staged upload: no card of this trainer in it
    (out / "hub" / "notes.txt").write_text("mine")
    (out / "logs" / "dreambooth-lora-ssd1b").mkdir(parents=True)
    (out / "logs" / "mine.txt").write_text("mine")
    (out / "stepfinal").mkdir()
    assert ownership.remove_earlier_run(out, None) == [
        "state-step0", "state-step1", "state-step2", "state-step3", "step0", "step1", "step2", "step3",
        "validation/step0", "validation/step1", "validation/step2", "validation/step3", "README.md",
        "logs/dreambooth-lora-ssd1b"]
    assert sorted(p.name for p in out.iterdir()) == ["hub", "logs", "notes.txt", "stepfinal"]
    assert (out / "hub" / "notes.txt").is_file() and (out / "logs" / "mine.txt").is_file()


def test_a_users_folder_in_validation_is_neither_a_round_nor_removed(tmp_path):
    out = tmp_path / "out"
    for name in ["step1", "step_best"]:  # step_best: the user's pick, copied beside the rounds
        (out / "validation" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(out / "validation" / name / "grid.png")
    assert model_card.last_validation_grid(out) == out / "validation" / "step1" / "grid.png"
    assert ownership.remove_earlier_run(out, None) == ["validation/step1"]
    assert (out / "validation" / "step_best" / "grid.png").is_file()


def test_a_crash_while_overwriting_leaves_no_earlier_state_for_latest(tmp_path, monkeypatch):
    out = tmp_path / "out"
    earlier_run(out)
    real_rmtree = shutil.rmtree

    def crash(path, ignore_errors=False, **kwargs):
        if not ignore_errors:
            raise KeyboardInterrupt  # killed in the first slow delete
        real_rmtree(path, ignore_errors=ignore_errors, **kwargs)
    monkeypatch.setattr(ownership.shutil, "rmtree", crash)
    with pytest.raises(KeyboardInterrupt):
        ownership.remove_earlier_run(out, None)
    monkeypatch.setattr(ownership.shutil, "rmtree", real_rmtree)
    assert checkpoints.complete_states(out) == [] and artifacts.finished_adapters(out) == []
    assert checkpoints.find_resume_state(out, "latest") is None
    artifacts.remove_partial_dirs(out)  # as the next start does
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "validation"]
    assert not any((out / "validation").iterdir())


def card_metadata(path):
    """The card's YAML front matter, read as the Hub reads it."""
    from huggingface_hub import ModelCard

    return ModelCard.load(path).data.to_dict()


def test_model_card_carries_hub_metadata(shared_run):
    data = card_metadata(shared_run / "README.md")
    assert data["library_name"] == "diffusers" and data["instance_prompt"] == "a photo of sks dog"
    assert {"lora", "dreambooth", "text-to-image", "template:sd-lora"} <= set(data["tags"])
    assert "base_model" not in data, "a local base model folder is no Hub link"
    assert data["license"] == "other"
    assert data["widget"] == [{"text": "a photo of sks dog in a bucket",
                               "output": {"url": "validation/step2/grid.png"}}]
    assert (shared_run / data["widget"][0]["output"]["url"]).is_file()
    assert "TODO" not in (shared_run / "README.md").read_text(), "no template placeholder is left in the card"


def test_model_card_links_a_hub_base_model(tmp_path):
    argv = ["--instance_dir", "dog", "--instance_prompt", "a photo of sks dog", "--output_dir", str(tmp_path)]
    args = trainer.parse_args(argv)
    model_card.write_model_card(tmp_path, args, trainer.derive_settings(args, argv), 500, 1)
    data = card_metadata(tmp_path / "README.md")
    assert (data["base_model"], data["license"]) == ("segmind/SSD-1B", "apache-2.0")
    assert "[segmind/SSD-1B](https://huggingface.co/segmind/SSD-1B)" in (tmp_path / "README.md").read_text()


def test_model_card_gives_no_text_encoder_lr_that_prodigy_did_not_use():
    argv = ["--instance_dir", "dog", "--instance_prompt", "a photo of sks dog", "--optimizer", "prodigy",
            "--learning_rate", "1.0", "--train_text_encoder"]
    args = trainer.parse_args(argv)
    lines = model_card.card_settings(args, trainer.derive_settings(args, argv), 500, 1, None, None)
    assert "| learning rate | 1.0 (constant) |" in lines, "the text encoders train at --learning_rate too"
    assert "| optimizer, precision | prodigy, as accelerate is configured |" in lines


@pytest.fixture
def hub_calls(monkeypatch):
    """huggingface_hub's upload calls, recorded instead of made: the Hub cannot be reached from here."""
    import huggingface_hub

    calls = []

    def upload_folder(repo_id, folder_path, token=None, commit_message=None):
        files = sorted(p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file())
        calls.append(("upload", repo_id, files, token))

    monkeypatch.setattr(huggingface_hub, "create_repo",
                        lambda repo_id, token=None, exist_ok=False: calls.append(("create", repo_id)) or
                        type("RepoUrl", (), {"repo_id": repo_id})())
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_uploads_the_final_adapters_card_and_grid(hub_calls, tiny_model, photos, tmp_path):
    out = tmp_path / "out"
    run_trainer(*tiny_args(tiny_model, photos, out, "--max_train_steps", 2, "--optimizer", "adamw",
                           "--validation_prompt", "a photo of sks dog in a bucket", "--validation_inference_steps", 1,
                           "--num_validation_images", 1, "--push_to_hub", "--hub_model_id", "you/sks-dog",
                           "--hub_token", "hf_test"))
    assert hub_calls == [("create", "you/sks-dog"),
                         ("upload", "you/sks-dog", ["README.md", artifacts.KOHYA_FILE, artifacts.LORA_FILE,
                                                    "validation/step1/grid.png"],
                          "hf_test")]
    assert (out / "hub" / artifacts.LORA_FILE).read_bytes() == (out / "step1" / artifacts.LORA_FILE).read_bytes()
    card = (out / "hub" / "README.md").read_text()
    assert 'pipe.load_lora_weights("you/sks-dog")' in card and "infer.py" not in card, "the Hub card loads from it"
    leaked = [p for p in out.rglob("*") if p.is_file() and b"hf_test" in p.read_bytes()]
    assert not leaked, "the token is in no file the run writes"
    assert "hf_test" not in graceful.resume_command(["--hub_token", "hf_test", "--push_to_hub"])


def test_an_unreachable_hub_is_one_line_and_keeps_the_run(hub_calls, monkeypatch, tiny_model, photos, tmp_path):
    import huggingface_hub

    def offline(*a, **k):
        raise ConnectionError("Max retries exceeded with url: /api/repos/create\nmore detail")
    monkeypatch.setattr(huggingface_hub, "create_repo", offline)
    out = tmp_path / "out"
    with pytest.raises(messages.UserError) as refused:
        run_trainer(*tiny_args(tiny_model, photos, out, "--max_train_steps", 1, "--optimizer", "adamw",
                               "--push_to_hub", "--hub_model_id", "you/sks-dog", "--hub_token", "hf_test"))
    message = str(refused.value)
    assert "\n" not in message and "could not push to the Hub repo you/sks-dog (ConnectionError" in message
    assert f"the run is saved in {out}" in message and f"hf upload you/sks-dog {out / 'hub'} ." in message
    assert (out / "step0" / artifacts.LORA_FILE).is_file() and (out / "hub" / artifacts.LORA_FILE).is_file()


@pytest.mark.parametrize("extra, message", [
    (["--hub_model_id", "a/b/c"], "--hub_model_id a/b/c is not a Hub repo id"),
    (["--hub_model_id", "you/x"], "--push_to_hub needs a Hub token: log in with `hf auth login`, or pass --hub_token"),
])
def test_push_to_hub_is_checked_before_any_model_loads(monkeypatch, extra, message, tiny_model, photos, tmp_path):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(trainer, "load_models", lambda *a: pytest.fail("a model loaded"))
    with pytest.raises(messages.UserError, match=re.escape(message)):
        run_trainer(*tiny_args(tiny_model, photos, tmp_path / "out", "--push_to_hub", *extra))


def test_the_printed_infer_command_works_from_another_folder(tiny_model, photos, tmp_path, monkeypatch, capsys):
    import infer

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(tiny_model, work / "model")
    monkeypatch.chdir(work)  # the model as a relative path, as a user in that folder types it
    run_trainer("--pretrained_model_name_or_path", "model", "--pretrained_vae_model_name_or_path", "model/vae",
                "--instance_dir", photos, "--instance_prompt", "a photo of sks dog", "--output_dir", "out",
                "--resolution", 64, "--max_train_steps", 1, "--optimizer", "adamw", "--report_to", "none",
                "--center_crop")
    command = capsys.readouterr().out.split("render with:\n")[1].splitlines()[0]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    python, script, *flags = shlex.split(command)
    assert Path(script) == ROOT / "infer.py"
    rendered = infer.main([*flags, "--num_inference_steps", "1", "--output", "renders"])
    assert rendered[0].resolve().parent == elsewhere / "renders" and rendered[0].is_file()


def test_validation_compare_base_puts_the_base_model_beside_each_round_rendered_once(tiny_model, photos, tmp_path,
                                                                                     monkeypatch):
    import numpy as np

    import infer

    calls, real = [], pipeline.generate_images
    monkeypatch.setattr(trainer, "generate_images", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = tmp_path / "out"
    run_trainer(*tiny_args(tiny_model, photos, out, "--max_train_steps", 2, "--optimizer", "adamw",
                           "--learning_rate", 3e-2, "--train_text_encoder", "--text_encoder_lr", 3e-2,
                           "--validation_prompt", "a sks dog", "--validation_steps", 1, "--num_validation_images", 1,
                           "--validation_inference_steps", 2, "--validation_compare_base"))
    assert len(calls) == 3, "each of the two rounds renders the trained model; the base model renders once"
    grid = Image.open(out / "validation" / "step1" / "grid.png")
    assert grid.size == (64 + 4 + 64, 64), "trained | gap | base"
    trained, base = Image.open(out / "validation" / "step1" / "seed0.png"), Image.open(out / "validation" / "base"
                                                                                      / "seed0.png")
    assert grid.crop((0, 0, 64, 64)).tobytes() == trained.tobytes()
    assert grid.crop((68, 0, 132, 64)).tobytes() == base.tobytes()
    # the base column is the base model, text encoders' adapters off too: infer.py at --lora_scale 0
    rendered = infer.main(["--checkpoint", str(out / "step1"), "--prompt", "a sks dog", "--num_inference_steps", "2",
                           "--lora_scale", "0", "--output", str(tmp_path / "renders")])[0]
    np.testing.assert_allclose(np.asarray(base, dtype=float), np.asarray(Image.open(rendered), dtype=float), atol=2)
    assert np.abs(np.asarray(base, dtype=float) - np.asarray(trained, dtype=float)).max() > 10


def test_model_card_section_comes_from_the_newest_run_evaluation_only(tmp_path):
    def evaluation(name, report, mtime):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(report if isinstance(report, str) else json.dumps(report))
        Image.new("RGB", (8, 8)).save(tmp_path / name / "curve.png")
        os.utime(tmp_path / name / "report.json", (mtime, mtime))

    run = {"kind": "run", "recommended_step": 299, "rule": "the rule", "clip_t_tolerance": 0.02,
           "settings": {"prompts": 25, "images_per_prompt": 4}}
    evaluation("eval-old", {**run, "recommended_step": 99}, 1000)
    evaluation("eval", run, 2000)
    evaluation("broken", "{not json", 3000)
    evaluation("one-step", {"DINO": 0.5}, 4000)  # a single step's evaluation draws no curve
    lines = "\n".join(model_card.card_evaluation(tmp_path))
    assert "![curve](eval/curve.png)" in lines and "Recommended: `step299`" in lines
    assert "25 prompts x 4 images" in lines
    assert model_card.card_evaluation(tmp_path / "eval") == [], "no evaluation in its own folders"


@pytest.mark.parametrize("precision, noted", [("no", True), ("bf16", False)])
def test_a_cpu_run_in_fp32_names_bf16_in_one_line(tiny_model, photos, tmp_path, capsys, precision, noted):
    """Issue 16: on a CPU, bf16 is the faster and smaller choice; an fp32 run says so once, at start-up."""
    argv = [str(a) for a in tiny_args(tiny_model, photos, tmp_path / "out", "--mixed_precision", precision)]
    args = trainer.parse_args(argv)
    reset_accelerate()
    capsys.readouterr()
    trainer.make_accelerator(args, trainer.derive_settings(args, argv))
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert notes == (["note: on a CPU that supports bf16, --mixed_precision bf16 trains about 1.7x faster in under "
                      "60% of fp32's memory (full-size SSD-1B at 128 px, benchmarks/RESULTS.md: 3.4 vs 6.0 GiB at "
                      "peak)"] if noted else [])
