"""Real-world photos and mistakes: what must train, what is refused before any model loads, and what happens
when training goes wrong. Every refusal is one line that names the problem and the fix; nothing on disk is lost."""

import errno
import json
import pickle
import subprocess
import sys

import pytest
from PIL import Image

import train_dreambooth_lora_ssd1b as trainer
from dreambooth_kit import artifacts, checkpoints, imaging, messages
from conftest import ROOT, check_inputs, run_trainer, tiny_args


def check(argv):
    return check_inputs(argv)


def make_photo(path, size=(80, 96), color=(200, 120, 40), **save):
    Image.new("RGB", size, color).save(path, **save)
    return path


@pytest.fixture
def messy_folder(tmp_path):
    """What users actually upload: every format, upper-case names, notes, hidden files and a subfolder."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ["a.jpg", "b.PNG", "c.webp", "d.bmp", "e.tiff", "f.JPG"]:
        make_photo(folder / name)
    first, second = Image.new("P", (80, 96), 1), Image.new("P", (80, 96), 2)
    first.putpalette([0, 0, 0, 10, 200, 30, 250, 0, 0] + [0] * 759)
    first.save(folder / "g.gif", save_all=True, append_images=[second])
    (folder / "notes.txt").write_text("not a photo")
    (folder / ".DS_Store").write_bytes(b"\x00\x01")
    make_photo(folder / ".hidden.jpg")
    (folder / "rejects").mkdir()
    make_photo(folder / "rejects" / "blurry.jpg")
    return folder


def test_every_format_trains_and_stray_files_are_ignored(messy_folder, tiny_model, tmp_path, capsys):
    images, prompts, _ = check(tiny_args(tiny_model, messy_folder, tmp_path / "out"))
    assert [p.name for p in images] == ["a.jpg", "b.PNG", "c.webp", "d.bmp", "e.tiff", "f.JPG", "g.gif"]
    assert prompts == ["a photo of sks dog"] * 7
    dataset = trainer.DreamBoothDataset(images, prompts, resolution=64, center_crop=True, random_flip=False,
                                        seed=0, num_samples=7)
    for k in range(7):
        assert dataset[k]["pixel_values"].shape == (3, 64, 64)
    gif, _ = imaging.load_image(messy_folder / "g.gif")
    assert gif.getpixel((0, 0)) == (10, 200, 30), "the first frame of a GIF"


def test_subfolders_are_ignored_with_a_warning(messy_folder, tiny_model, tmp_path, capsys):
    check(tiny_args(tiny_model, messy_folder, tmp_path / "out"))
    assert f"warning: subfolders of {messy_folder} are ignored: rejects" in capsys.readouterr().err


def test_small_images_are_upscaled_with_one_warning_listing_them(tiny_model, tmp_path, capsys):
    folder = tmp_path / "small"
    folder.mkdir()
    make_photo(folder / "big.png", (96, 128))
    make_photo(folder / "tiny.png", (32, 40))
    make_photo(folder / "thin.png", (200, 50))
    check(tiny_args(tiny_model, folder, tmp_path / "out"))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: 2 instance images are smaller than their training size (--resolution 64) and "
                        "will be upscaled: thin.png (200x50), tiny.png (32x40)"]
    image, _ = imaging.load_image(folder / "tiny.png")
    square, _ = trainer.crop_and_flip(image, 64, True, False, None)
    assert square.size == (64, 64)


def test_huge_jpeg_is_decoded_at_reduced_scale_but_keeps_its_true_size(tmp_path):
    path = make_photo(tmp_path / "huge.jpg", (4000, 3000), quality=70)
    image, original_size = imaging.load_image(path, min_side=64)
    assert original_size == (3000, 4000), "the time ids' original size is the photo's real size"
    assert image.size == (500, 375), "decoded at 1/8 scale: never 12 megapixels in memory"
    dataset = trainer.DreamBoothDataset([path], "a photo of sks dog", resolution=64, center_crop=True,
                                        random_flip=False, seed=0, num_samples=1)
    assert dataset[0]["time_ids"][:2].tolist() == [3000, 4000]


def test_captions_replace_the_instance_prompt_per_photo(tiny_model, tmp_path, capsys):
    folder = tmp_path / "captioned"
    folder.mkdir()
    for name in ["one.jpg", "two.jpg", "three.jpg"]:
        make_photo(folder / name)
    (folder / "one.txt").write_text("a photo of sks dog on a sofa, ünïcode\n", encoding="utf-8")
    (folder / "two.caption").write_text("a photo of sks dog at the beach", encoding="utf-8")
    images, prompts, _ = check(tiny_args(tiny_model, folder, tmp_path / "out"))
    assert dict(zip([p.name for p in images], prompts)) == {
        "one.jpg": "a photo of sks dog on a sofa, ünïcode", "three.jpg": "a photo of sks dog",
        "two.jpg": "a photo of sks dog"}
    assert "1 of 3 photos has a .txt caption" in capsys.readouterr().err
    _, prompts, _ = check(tiny_args(tiny_model, folder, tmp_path / "out", "--caption_extension", "caption"))
    assert sorted(prompts) == ["a photo of sks dog", "a photo of sks dog", "a photo of sks dog at the beach"]
    dataset = trainer.DreamBoothDataset(images, prompts, resolution=64, center_crop=True, random_flip=False,
                                        seed=0, num_samples=3)
    assert {dataset[k]["prompt"] for k in range(3)} == set(prompts), "each photo trains with its own prompt"


def test_caption_not_in_utf8_is_refused(tiny_model, tmp_path):
    folder = tmp_path / "latin1"
    folder.mkdir()
    make_photo(folder / "one.jpg")
    (folder / "one.txt").write_bytes("a photo of sks dog, café".encode("latin-1"))
    with pytest.raises(messages.UserError, match=r"1 caption file unreadable or not UTF-8: one.txt \(not UTF-8: byte 0xe9 at 23\); "
                                                  "re-save it as UTF-8 text"):
        check(tiny_args(tiny_model, folder, tmp_path / "out"))


def test_unwritable_output_dir_is_refused(tiny_model, photos, tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(messages.UserError, match=r"cannot write to --output_dir .*a_file/out \(Not a directory\): "
                                                "choose a writable folder"):
        check(tiny_args(tiny_model, photos, tmp_path / "a_file" / "out"))


def test_refusal_from_the_command_line_is_one_line(tiny_model, photos, tmp_path):
    flags = tiny_args(tiny_model, photos, tmp_path / "out", "--validation_steps", 10)
    result = subprocess.run([sys.executable, str(ROOT / "train_dreambooth_lora_ssd1b.py"), *map(str, flags)],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: --validation_steps acts only with --validation_prompt: add --validation_prompt 'a photo of sks dog "
        "in a bucket', or drop --validation_steps"]


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file() and "logs" not in p.parts}


def training_args(tiny_model, photos, output_dir):
    return tiny_args(tiny_model, photos, output_dir, "--max_train_steps", 4, "--checkpointing_steps", 1,
                     "--optimizer", "adamw")


def test_nan_loss_stops_with_the_step_and_cause_and_keeps_the_last_good_step(tiny_model, photos, tmp_path,
                                                                           monkeypatch):
    calls, real = [], trainer.training_step
    monkeypatch.setattr(trainer, "training_step", lambda *a, **k: calls.append(1) or (
        real(*a, **k) * (float("nan") if len(calls) == 3 else 1)))
    with pytest.raises(messages.UserError) as error:
        run_trainer(*training_args(tiny_model, photos, tmp_path / "out"))
    assert str(error.value) == (
        f"the loss became nan at step 3, so training stopped and nothing since was saved; the last good "
        f"adapters are in {tmp_path / 'out' / 'step1'}. Likely fp16 overflow: use --mixed_precision bf16, or a "
        "lower --learning_rate (now 0.0001)")
    assert sorted(p.name for p in (tmp_path / "out").glob("*step*")) == ["state-step0", "state-step1", "step0",
                                                                         "step1"]


def test_nan_weights_are_never_written(tiny_model, photos, tmp_path, monkeypatch):
    calls, real = [], trainer.training_step

    def poisoning_step(batch, models, *args, **kwargs):
        loss = real(batch, models, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # the loss of step 2 is finite, but its update leaves inf in the weights
            next(p for n, p in models.unet.named_parameters() if "lora_B" in n).data.fill_(float("inf"))
        return loss

    monkeypatch.setattr(trainer, "training_step", poisoning_step)
    with pytest.raises(messages.UserError, match=r"the LoRA weights hold nan or inf at step 2, so they were not saved; "
                                                r"the last good adapters are in .*step0\."):
        run_trainer(*training_args(tiny_model, photos, tmp_path / "out"))
    assert sorted(p.name for p in (tmp_path / "out").glob("step*")) == ["step0"]


def test_full_disk_during_a_save_keeps_earlier_checkpoints_intact(tiny_model, photos, tmp_path, monkeypatch):
    import safetensors.torch

    output_dir = tmp_path / "out"
    real, before = safetensors.torch.save_file, {}

    def disk_fills_up(tensors, filename, *args, **kwargs):
        if ".step2.partial" in str(filename):
            before.update(snapshot(output_dir))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_fills_up)
    with pytest.raises(messages.UserError, match=r"could not save step 3 in .*: No space left on device; earlier "
                                                r"checkpoints are intact\. Free some space"):
        run_trainer(*training_args(tiny_model, photos, output_dir))
    after = snapshot(output_dir)
    assert {k: v for k, v in after.items() if k.name != "README.md"} == {
        k: v for k, v in before.items() if ".partial" not in str(k) and k.name not in ("README.md", ".lock")}
    assert not list(output_dir.glob(".*.partial")), "the half-written step is removed"


class RunsCode:
    def __reduce__(self):
        return (eval, ("open(__import__('os').environ['PWNED_MARKER'], 'w')",))


def test_resume_never_unpickles_code(tiny_model, photos, tmp_path, monkeypatch):
    output_dir = tmp_path / "out"
    argv = tiny_args(tiny_model, photos, output_dir, "--optimizer", "adamw", "--checkpointing_steps", 1)
    run_trainer(*argv, "--max_train_steps", 1)
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PWNED_MARKER", str(marker))
    state = output_dir / "state-step0"
    (state / "scheduler.bin").write_bytes(pickle.dumps(RunsCode()))
    with pytest.raises(messages.UserError, match="scheduler.bin is corrupt \\(its checksum does not match"):
        run_trainer(*argv, "--max_train_steps", 2, "--resume_from_checkpoint", "latest")
    # a forger who also rewrites the checksums still gets no code run: state is read with weights_only=True
    record = json.loads((state / artifacts.TRAINER_STATE).read_text())
    (state / artifacts.TRAINER_STATE).unlink()
    (state / artifacts.TRAINER_STATE).write_text(json.dumps(checkpoints.state_record(state, record["step"],
                                                                                 record["settings"])))
    with pytest.raises(messages.UserError, match="state-step0/scheduler.bin is not a torch.save file as accelerate "
                                                "writes it"):
        run_trainer(*argv, "--max_train_steps", 2, "--resume_from_checkpoint", "latest")
    assert not marker.exists(), "nothing in a checkpoint runs"
