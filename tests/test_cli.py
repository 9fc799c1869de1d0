"""Bad input: one line that names the problem and the fix, before any model loads; never a traceback."""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import train_dreambooth_lora_ssd1b as trainer
from dreambooth_kit import artifacts, checkpoints, checks, messages, model_card, ownership, pipeline
from conftest import ROOT, check_inputs, run_trainer, tiny_args, with_flags


def check(argv):
    """Parse and check as main() does, up to the point where models would load."""
    return check_inputs(argv)


@pytest.fixture
def args_for(tiny_model, photos, tmp_path):
    def make(*extra, instance_dir=photos):
        argv = tiny_args(tiny_model, photos, tmp_path / "out")
        argv[argv.index("--instance_dir") + 1] = instance_dir
        return with_flags(argv, *extra)
    return make


@pytest.mark.parametrize("extra, message", [
    (["--with_prior_preservation"], "--with_prior_preservation needs --class_prompt"),
    (["--resolution", "1020"], "--resolution 1020 must be a positive multiple of 8"),
    (["--rank", "0"], "--rank must be in [1, 1024]"),
    (["--learning_rate", "0"], "--learning_rate must be above 0"),
    (["--max_train_steps", "0"], "--max_train_steps must be in [1, 1000000000]"),
    (["--lora_dropout", "1.5"], "--lora_dropout must be in [0, 1)"),
    (["--use_dora", "--output_kohya_format"],
     "--output_kohya_format cannot carry --use_dora: diffusers drops a kohya file's DoRA magnitudes (dora_scale) and "
     "loads it as plain LoRA, so that file could not be checked against the trained model; drop "
     "--output_kohya_format (pytorch_lora_weights.safetensors carries DoRA), or drop --use_dora"),
])
def test_contradictory_or_invalid_flags_are_refused(args_for, extra, message):
    with pytest.raises(messages.UserError, match=re.escape(message)):
        check(args_for(*extra))


def test_missing_instance_folder_is_refused(args_for, tmp_path):
    with pytest.raises(messages.UserError, match="instance folder .*nope does not exist"):
        check(args_for(instance_dir=tmp_path / "nope"))


def test_folder_without_images_is_refused(args_for, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a photo")
    with pytest.raises(messages.UserError, match="no images in .*empty: add 3-20 photos"):
        check(args_for(instance_dir=tmp_path / "empty"))


def test_every_unreadable_image_is_listed(args_for, photos, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("RGB", (64, 64)).save(folder / "good.png")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("this is not a png")
    truncated = (photos / "dog_0.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(truncated[: len(truncated) // 2])
    with pytest.raises(messages.UserError) as error:
        check(args_for(instance_dir=folder))
    message = str(error.value)
    assert message.startswith("3 unreadable instance images")
    assert all(name in message for name in ["empty.jpg", "text.png", "cut.jpg"]) and "good.png" not in message


HEIC_BYTES = b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(64)  # an iPhone photo's first bytes


def warnings_about(capsys, word):
    return [line for line in capsys.readouterr().err.splitlines() if word in line]


def test_every_file_left_out_of_the_photos_is_named_with_its_fix_in_one_line(args_for, photos, tmp_path, capsys):
    folder = shutil.copytree(photos, tmp_path / "mixed")
    (folder / "IMG_0001.HEIC").write_bytes(HEIC_BYTES)
    (folder / "IMG_0001.MOV").write_bytes(bytes(100))  # a Live Photo's motion half
    shutil.copy(photos / "dog_0.jpg", folder / "dog_copy")  # a JPEG that lost its extension
    shutil.copy(photos / "dog_0.jpg", folder / "dog_web.jpg.download")  # a browser's unfinished download's name
    (folder / "scan.pdf").write_bytes(b"%PDF-1.4")
    (folder / "dog_0.xmp").write_text("<x:xmpmeta/>")  # an editor's sidecar: no photo, no mention
    (folder / "dog_0.txt").write_text("a photo of sks dog")  # a caption
    images, _, _ = check(args_for(instance_dir=folder))
    assert [p.name for p in images] == sorted(p.name for p in photos.iterdir())
    warnings = warnings_about(capsys, "not trained on")
    assert len(warnings) == 1, warnings
    assert f"5 files of the instance folder {folder} are not trained on: " in warnings[0]
    assert ("IMG_0001.HEIC (HEIC, which this Pillow cannot read: convert it to JPEG (macOS: sips -s format jpeg "
            "IMG_0001.HEIC --out IMG_0001.jpg) or pip install pillow-heif" in warnings[0])
    assert "IMG_0001.MOV (a video, such as a Live Photo's motion half" in warnings[0]
    assert "dog_copy (a JPEG image named without an extension: rename it dog_copy.jpg)" in warnings[0]
    assert "dog_web.jpg.download (a JPEG image named .download: rename it dog_web.jpg)" in warnings[0]
    assert "scan.pdf (not an image Pillow reads: convert it to PNG or JPEG" in warnings[0]
    assert "xmp" not in warnings[0] and "dog_0.txt" not in warnings[0]


def test_captions_under_another_extension_than_caption_extension_are_named(args_for, photos, tmp_path, capsys):
    folder = shutil.copytree(photos, tmp_path / "kohya")
    (folder / "dog_0.caption").write_text("a photo of sks dog on grass")
    check(args_for(instance_dir=folder))
    assert ("dog_0.caption (a caption, but --caption_extension is .txt: pass --caption_extension .caption to use it)"
            in warnings_about(capsys, "not trained on")[0])


def test_class_images_beyond_num_class_images_are_said_to_be_unused(args_for, photos, tmp_path, capsys):
    classes = shutil.copytree(photos, tmp_path / "classes")
    check(args_for("--with_prior_preservation", "--class_prompt", "a photo of dog", "--class_dir", classes,
                   "--num_class_images", 3))
    assert warnings_about(capsys, "--num_class_images") == [
        f"note: the class folder {classes} holds 5 images; --num_class_images 3 trains on the first by name, through "
        "dog_2.jpg: the 2 after it are not used"]


def test_a_folder_where_no_file_can_be_read_is_refused_naming_each(args_for, tmp_path):
    folder = tmp_path / "iphone"
    folder.mkdir()
    for name in ["IMG_0001.HEIC", "IMG_0002.heif"]:
        (folder / name).write_bytes(HEIC_BYTES)
    with pytest.raises(messages.UserError) as refused:
        check(args_for(instance_dir=folder))
    message = str(refused.value)
    assert message.startswith(f"no photo in the instance folder {folder} can be read: IMG_0001.HEIC (HEIC, ")
    assert "; IMG_0002.heif (HEIC, " in message and "\n" not in message


def test_a_heic_photo_named_jpg_is_named_as_heic(args_for, photos, tmp_path):
    folder = shutil.copytree(photos, tmp_path / "renamed")
    (folder / "IMG_0001.jpg").write_bytes(HEIC_BYTES)
    with pytest.raises(messages.UserError, match=re.escape("1 unreadable instance image in ")) as refused:
        check(args_for(instance_dir=folder))
    assert "IMG_0001.jpg (HEIC, which this Pillow cannot read: convert it to JPEG" in str(refused.value)


def test_an_animated_photo_trains_on_its_first_frame_with_a_note_naming_it(args_for, photos, tmp_path, capsys):
    folder = shutil.copytree(photos, tmp_path / "animated")
    frames = [Image.new("RGB", (64, 64), colour) for colour in ("red", "blue", "green")]
    frames[0].save(folder / "wag.webp", save_all=True, append_images=frames[1:])
    assert "wag.webp" in [p.name for p in check(args_for(instance_dir=folder))[0]]
    assert warnings_about(capsys, "wag.webp") == [
        "note: 1 instance image holds several frames and trains on its first only: wag.webp (3 frames); save "
        "each frame you want as a photo of its own"]


@pytest.mark.parametrize("mode, values, problem", [
    ("F", [0.0, 255.0], "float pixels from 0 to 255, outside 0-1: re-export it as 8- or 16-bit"),
    ("I", [0, 255], "32-bit signed pixels from 0 to 255, all under 1/255 of 0-2147483647: it would train black; "
                    "re-export it as 8- or 16-bit"),
])
def test_a_deep_tiff_with_no_faithful_8_bit_reading_is_refused_in_one_line(args_for, photos, tmp_path, mode,
                                                                           values, problem):
    import numpy as np

    folder = shutil.copytree(photos, tmp_path / "deep")
    Image.fromarray(np.array([values * 32] * 64, dtype=np.float32 if mode == "F" else np.int32)).save(
        folder / "scan.tif")
    with pytest.raises(messages.UserError) as refused:
        check(args_for(instance_dir=folder))
    assert str(refused.value) == (f"1 unreadable instance image in {folder}: scan.tif ({problem}); remove or "
                                  "re-export it")


def test_an_unreadable_colour_profile_is_refused_before_any_model_loads(args_for, photos, tmp_path):
    folder = shutil.copytree(photos, tmp_path / "profiled")
    Image.new("RGB", (64, 64), "red").save(folder / "broken.png", icc_profile=b"not a profile" * 20)
    with pytest.raises(messages.UserError, match=re.escape("broken.png (its colour profile cannot be applied")):
        check(args_for(instance_dir=folder))


def masked_folder(photos, folder, mask):
    folder = shutil.copytree(photos, folder)
    with Image.open(folder / "dog_0.jpg") as photo:
        size = photo.size
    mask(size).save(folder / "dog_0.mask.png")
    return folder


def test_a_coloured_mask_is_refused_not_weighed_by_its_luminance(args_for, photos, tmp_path):
    def red_subject(size):  # what the refusal of an RGB mask once let through: red weighed 0.30
        image = Image.new("RGB", size, "black")
        image.paste((255, 0, 0), (0, 0, size[0] // 2, size[1]))
        return image
    folder = masked_folder(photos, tmp_path / "red", red_subject)
    with pytest.raises(messages.UserError, match=re.escape("dog_0.mask.png (has colours, not only grey: paint the "
                                                          "subject white and the rest black")):
        check(args_for("--masked_loss", instance_dir=folder))


@pytest.mark.parametrize("mode", ["RGB", "P"])
def test_a_grey_mask_saved_in_colour_mode_weighs_as_its_grey(args_for, photos, tmp_path, mode):
    def grey_subject(size):
        image = Image.new("L", size, 0)
        image.paste(200, (0, 0, size[0] // 2, size[1]))
        return image.convert(mode)
    folder = masked_folder(photos, tmp_path / "grey", grey_subject)
    images, _, _ = check(args_for("--masked_loss", instance_dir=folder))
    photo = folder / "dog_0.jpg"
    with Image.open(photo) as image:
        mask = trainer.load_mask(photo, image.size)
    assert mask.mode == "L" and set(__import__("numpy").unique(mask).tolist()) == {0, 200}


@pytest.mark.parametrize("flags", [[], ["--masked_loss"]])
def test_a_mask_saved_as_jpeg_is_refused_not_trained_on_as_a_photo(args_for, photos, tmp_path, flags):
    folder = masked_folder(photos, tmp_path / "jpeg", lambda size: Image.new("L", size, 255))
    (folder / "dog_0.mask.png").rename(folder / "dog_0.mask.jpg")
    with pytest.raises(messages.UserError, match=re.escape(f"dog_0.mask.jpg in {folder}: a loss mask must be a PNG "
                                                          "named photo.mask.png")):
        check(args_for(*flags, instance_dir=folder))


def test_a_caption_saved_with_a_byte_order_mark_is_read_without_it(args_for, photos, tmp_path):
    folder = shutil.copytree(photos, tmp_path / "bom")
    (folder / "dog_0.txt").write_bytes("\ufeffa photo of sks dog on grass".encode("utf-8"))
    images, prompts, _ = check(args_for(instance_dir=folder))
    assert prompts[[p.name for p in images].index("dog_0.jpg")] == "a photo of sks dog on grass"


@pytest.mark.parametrize("text", ["\u200b\u200b", "\u200d \u2060\u00ad", "\u3164", "\ufeff\u200c\n"])
def test_a_caption_of_only_invisible_characters_is_refused_like_an_empty_one(args_for, photos, tmp_path, text):
    folder = shutil.copytree(photos, tmp_path / "invisible")
    (folder / "dog_0.txt").write_text(text, encoding="utf-8")
    with pytest.raises(messages.UserError, match=re.escape("1 caption file empty: dog_0.txt (only invisible "
                                                          "characters: U+")):
        check(args_for(instance_dir=folder))


@pytest.mark.parametrize("data, reason", [
    ("a photo of sks dog in the café".encode("latin-1"), "not UTF-8: byte 0xe9 at 29"),
    ("a photo of sks dog".encode("utf-16"), "UTF-16, not UTF-8"),
])
def test_a_caption_that_is_not_utf8_is_named_with_what_it_is(args_for, photos, tmp_path, data, reason):
    folder = shutil.copytree(photos, tmp_path / "encodings")
    (folder / "dog_0.txt").write_bytes(data)
    with pytest.raises(messages.UserError, match=re.escape(f"1 caption file unreadable or not UTF-8: dog_0.txt "
                                                          f"({reason}); re-save it as UTF-8 text")):
        check(args_for(instance_dir=folder))


def test_prompts_clip_would_cut_are_named_with_each_tokenizers_count_before_training(args_for, photos, tiny_model,
                                                                                    tmp_path, capsys):
    from transformers import CLIPTokenizer

    folder = shutil.copytree(photos, tmp_path / "long")
    caption = "a photo of sks dog " + "sitting on a green lawn in the bright summer sun " * 8
    (folder / "dog_0.txt").write_text(caption)
    prompt = "a photo of sks dog " * 20
    check(args_for("--instance_prompt", prompt, "--validation_prompt", "a photo of sks dog in a bucket",
                   instance_dir=folder))
    counts = [[len(CLIPTokenizer.from_pretrained(tiny_model, subfolder=sub)(text).input_ids)
               for sub in ("tokenizer", "tokenizer_2")] for text in (caption, prompt)]
    assert all(count > 77 for pair in counts for count in pair)
    warnings = warnings_about(capsys, "tokens")
    assert warnings == [
        "warning: 2 prompts are longer than the 77 tokens CLIP reads (start and end tokens included), and are cut "
        f"there, so their end never trains: dog_0.txt (CLIP-L {counts[0][0]}, CLIP-G {counts[0][1]} tokens); "
        f"--instance_prompt (CLIP-L {counts[1][0]}, CLIP-G {counts[1][1]} tokens); shorten them"]


def test_missing_model_folder_is_refused(args_for, tmp_path):
    with pytest.raises(messages.UserError, match="--pretrained_model_name_or_path .*missing does not exist"):
        check(args_for("--pretrained_model_name_or_path", tmp_path / "missing"))


def test_a_hub_model_missing_from_the_cache_in_offline_mode_says_how_to_get_it_there(photos, tmp_path):
    # a subprocess: huggingface_hub reads HF_HUB_OFFLINE once, at import
    result = subprocess.run([sys.executable, str(ROOT / "train_dreambooth_lora_ssd1b.py"),
                             "--pretrained_model_name_or_path", "nobody/no-such-model", "--instance_dir", str(photos),
                             "--instance_prompt", "a photo of sks dog", "--output_dir", str(tmp_path / "out"),
                             "--resolution", "64"],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: --pretrained_model_name_or_path nobody/no-such-model: this model is not "
                                    "in the local Hub cache, and HF_HUB_OFFLINE is set: run `hf download "
                                    "nobody/no-such-model` where the Hub is reachable")
    assert "set HF_HUB_OFFLINE=1" not in result.stderr and "hf auth login" not in result.stderr, \
        "neither helps a machine that is offline on purpose"


@pytest.fixture
def hub_answering(monkeypatch):
    """A Hub on this machine that answers every request with the status and X-Error-Code given, and the Hub
    client pointed at it, online."""
    import http.server
    import threading

    import huggingface_hub

    answer = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(answer["status"])
            self.send_header("X-Error-Code", answer["code"])
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_port}"  # as HF_ENDPOINT sets them at import
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    for module in (huggingface_hub.constants, huggingface_hub.file_download):  # 0.x's file_download keeps its own
        monkeypatch.setattr(module, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}",
                            raising=module is huggingface_hub.constants)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    yield lambda status, code: answer.update(status=status, code=code)
    server.shutdown()


@pytest.mark.parametrize("status, code, message", [
    (401, "RepoNotFound", "no such model on the Hub, or it is private: check the id's spelling, or log in with "
                          "`hf auth login` if it is yours"),
    (403, "GatedRepo", "this model is gated: accept its terms on huggingface.co/nobody/no-such-model"),
])
def test_a_hub_id_the_hub_refuses_gets_the_spelling_and_login_advice(hub_answering, status, code, message):
    hub_answering(status, code)
    with pytest.raises(messages.UserError) as refused:
        pipeline.check_models("nobody/no-such-model", None, None, None)
    assert str(refused.value).startswith(f"--pretrained_model_name_or_path nobody/no-such-model: {message}")
    assert "HF_HUB_OFFLINE" not in str(refused.value)


def test_an_unreachable_hub_fails_fast_and_says_the_network_is_down(monkeypatch, capfd):
    import time

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    started = time.perf_counter()
    with pytest.raises(messages.UserError) as refused:
        pipeline.check_models("nobody/no-such-model", None, None, None)
    assert time.perf_counter() - started < 5, "no retries: huggingface_hub's own take about 25 s"
    assert "the Hub (http://127.0.0.1:9) cannot be reached (" in str(refused.value)
    assert "connect to the network" in str(refused.value) and "hf auth login" not in str(refused.value)
    assert "Retrying" not in capfd.readouterr().err


def test_finished_adapters_are_not_overwritten_silently(args_for, tmp_path):
    (tmp_path / "out" / "step499").mkdir(parents=True)
    (tmp_path / "out" / "step499" / artifacts.LORA_FILE).write_bytes(b"weights")
    with pytest.raises(messages.UserError, match="already holds adapters \\(step499\\).*--overwrite_output_dir"):
        check(args_for())
    check(args_for("--overwrite_output_dir"))  # asked for explicitly: allowed
    assert (tmp_path / "out" / "step499" / artifacts.LORA_FILE).read_bytes() == b"weights"


def derived(argv):
    return trainer.derive_settings(trainer.parse_args(argv), argv)


def test_defaults_reproduce_the_reference_recipe():
    argv = ["--instance_dir", "data/dog", "--instance_prompt", "a photo of sks dog"]
    args, settings = trainer.parse_args(argv), derived(argv)
    assert settings.pretrained_model_name_or_path == "segmind/SSD-1B", "a hub id stays an id"
    assert settings.pretrained_vae_model_name_or_path == "madebyollin/sdxl-vae-fp16-fix"
    assert (args.resolution, args.rank, settings.lora_alpha, args.learning_rate) == (1024, 8, 8, 1e-4)
    assert (args.max_train_steps, args.checkpointing_steps, args.validation_steps) == (500, 100, 100)
    assert (args.num_validation_images, args.optimizer, args.train_batch_size) == (4, "adamw8bit", 1)
    assert settings.output_dir == "work_dirs/ssd_1b_dreambooth_lora_dog"
    assert Path(settings.class_dir) == Path("work_dirs/ssd_1b_dreambooth_lora_dog/class_images")
    hub = derived(["--instance_data_dir", "diffusers/dog-example", "--instance_prompt", "x"])
    assert hub.output_dir == "work_dirs/ssd_1b_dreambooth_lora_dog-example", "diffusers' flag name is accepted"
    assert derived(["--instance_dir", "d", "--instance_prompt", "x", "--pretrained_vae_model_name_or_path",
                    "none"]).pretrained_vae_model_name_or_path is None


def test_flags_stay_as_typed_and_what_they_came_to_is_derived_beside_them(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    monkeypatch.chdir(tmp_path)
    argv = ["--instance_dir", "d", "--instance_prompt", "x", "--pretrained_model_name_or_path", "model",
            "--caption_extension", "txt"]
    args = trainer.parse_args(argv)
    assert (args.output_dir, args.lora_alpha, args.caption_extension) == (None, None, "txt"), "as typed"
    with pytest.raises(AttributeError, match="frozen"):
        args.lora_alpha = 8
    settings = trainer.derive_settings(args, argv)
    assert settings.pretrained_model_name_or_path == str(tmp_path / "model"), "a local folder, made absolute"
    assert (settings.lora_alpha, settings.caption_extension) == (8, ".txt")
    record = checkpoints.run_settings(args, settings)
    assert record["lora_alpha"] is None and record["derived"]["lora_alpha"] == 8
    assert record["pretrained_model_name_or_path"] == "model"
    assert record["derived"]["pretrained_model_name_or_path"] == str(tmp_path / "model")


def test_user_mistake_exits_nonzero_with_one_line_and_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train_dreambooth_lora_ssd1b.py"),
                             "--instance_dir", str(tmp_path / "nope"), "--instance_prompt", "a photo of sks dog"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: instance folder {tmp_path / 'nope'} does not exist: pass --instance_dir a folder of 3-20 photos")
    assert not (tmp_path / "work_dirs").exists(), "nothing is written for a refused run"


def fake_versions(monkeypatch, **versions):
    """Installed versions as the version check reads them: the real ones, except those given (None: missing)."""
    real = checks.installed_version

    def version(name):
        value = versions[name] if name in versions else real(name)
        if value is None:
            raise checks.PackageNotFoundError(name)
        return value
    monkeypatch.setattr(checks, "installed_version", version)


def test_installed_packages_pass_the_version_check():
    assert set(checks.check_versions(list(checks.MINIMUM_VERSIONS))) == set(checks.MINIMUM_VERSIONS)


@pytest.mark.parametrize("versions, message", [
    ({"transformers": "5.0.0", "diffusers": "0.34.0"},  # fails at import: diffusers' bound is where it stops
     "diffusers 0.34.0 is older than the 0.35.2 this needs: run pip install -U 'diffusers>=0.35.2'"),
    ({"accelerate": "1.1.1"}, "accelerate 1.1.1 is older than the 1.2 this needs: run pip install -U 'accelerate>=1.2'"),
    ({"bitsandbytes": None}, "bitsandbytes is not installed: run pip install -r requirements.txt"),
])
def test_known_broken_installs_are_refused_before_any_model_loads(monkeypatch, tmp_path, versions, message):
    fake_versions(monkeypatch, **versions)
    argv = ["--pretrained_model_name_or_path", tmp_path / "no-model", "--instance_dir", tmp_path / "no-photos",
            "--instance_prompt", "a photo of sks dog", "--output_dir", tmp_path / "out"]
    with pytest.raises(messages.UserError) as refused:
        run_trainer(*argv)  # the model and photos don't exist: the version check speaks first
    assert str(refused.value) == message
    assert not (tmp_path / "out").exists()


def test_a_known_clash_is_refused_with_the_pip_command_that_fixes_it(monkeypatch):
    monkeypatch.setattr(checks, "KNOWN_CLASHES", [("torch", "2.4", "accelerate", "99", "pip install -U accelerate")])
    with pytest.raises(messages.UserError, match=r"^torch \S+ does not work with accelerate \S+ \(it needs accelerate "
                                                r">= 99\): run pip install -U accelerate$"):
        checks.check_versions(["torch", "accelerate"])


@pytest.mark.parametrize("transformers", ["5.24.0", "5.25.0"])
def test_the_newest_transformers_is_accepted_with_a_peft_before_0_22(monkeypatch, transformers):
    # transformers 5.24 on refuses its own add_adapter with peft < 0.22; the trainer puts LoRA on the text encoders
    # with peft's functions (tests/test_adapters.py trains so with those methods refusing), so nothing clashes
    fake_versions(monkeypatch, transformers=transformers, peft="0.21.2")
    found = checks.check_versions(["transformers", "peft"])
    assert {name: str(version) for name, version in found.items()} == {"transformers": transformers, "peft": "0.21.2"}


def test_bitsandbytes_is_needed_only_for_8bit_adamw(monkeypatch, tiny_model, photos, tmp_path):
    fake_versions(monkeypatch, bitsandbytes=None)
    run_trainer(*tiny_args(tiny_model, photos, tmp_path / "out", "--max_train_steps", 1, "--optimizer", "adamw"))
    assert (tmp_path / "out" / "step0" / artifacts.LORA_FILE).is_file()


@pytest.mark.parametrize("script", ["infer", "evaluate"])
def test_infer_and_evaluate_refuse_a_broken_install_first(monkeypatch, tmp_path, script):
    import importlib

    fake_versions(monkeypatch, diffusers="0.34.0")
    argv = {"infer": ["--checkpoint", str(tmp_path / "none")],
            "evaluate": ["--checkpoint", str(tmp_path / "none"), "--instance_dir", str(tmp_path / "none"),
                         "--class_noun", "dog", "--subject_kind", "live", "--output_dir", str(tmp_path / "eval")]}[script]
    with pytest.raises(messages.UserError, match=re.escape("run pip install -U 'diffusers>=0.35.2'")):
        importlib.import_module(script).main(argv)


# ----------------------------------------------------------------------------------------------------------
# Numeric flags: each has a stated range, checked before any model loads
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--resolution", "-8"], "--resolution must be in [8, 4096] (got -8)"),
    (["--resolution", "8192"], "--resolution must be in [8, 4096] (got 8192)"),
    (["--train_batch_size", "0"], "--train_batch_size must be at least 1 (got 0)"),
    (["--dataloader_num_workers", "-1"], "--dataloader_num_workers must be at least 0 (got -1)"),
    (["--num_class_images", "0"], "--num_class_images must be at least 1 (got 0)"),
    (["--prior_loss_weight", "-1"], "--prior_loss_weight must be above 0 (got -1.0)"),
    (["--prior_loss_weight", "nan"], "--prior_loss_weight must be finite and above 0 (got nan)"),
    (["--sample_batch_size", "0"], "--sample_batch_size must be at least 1 (got 0)"),
    (["--rank", "-1"], "--rank must be in [1, 1024] (got -1)"),
    (["--lora_alpha", "0"], "--lora_alpha must be in [1, 65536] (got 0)"),
    (["--lora_dropout", "nan"], "--lora_dropout must be finite and in [0, 1) (got nan)"),
    (["--text_encoder_lr", "nan"], "--text_encoder_lr must be finite and above 0 (got nan)"),
    (["--learning_rate", "nan"], "--learning_rate must be finite and above 0 (got nan)"),
    (["--learning_rate", "inf"], "--learning_rate must be finite and above 0 (got inf)"),
    (["--learning_rate", "1e400"], "--learning_rate must be finite and above 0 (got inf)"),
    (["--adam_beta1", "2"], "--adam_beta1 must be in [0, 1) (got 2.0)"),
    (["--adam_beta1", "-0.1"], "--adam_beta1 must be in [0, 1) (got -0.1)"),
    (["--adam_beta2", "1"], "--adam_beta2 must be in [0, 1) (got 1.0)"),
    (["--adam_weight_decay", "-0.01"], "--adam_weight_decay must be at least 0 (got -0.01)"),
    (["--adam_weight_decay", "inf"], "--adam_weight_decay must be finite and at least 0 (got inf)"),
    (["--adam_epsilon", "0"], "--adam_epsilon must be above 0 (got 0.0)"),
    (["--adam_epsilon=-1e-8"], "--adam_epsilon must be above 0 (got -1e-08)"),
    (["--optimizer", "prodigy", "--prodigy_beta3", "1"], "--prodigy_beta3 must be in [0, 1) (got 1.0)"),
    (["--max_grad_norm", "0"], "--max_grad_norm must be above 0 (got 0.0)"),
    (["--max_grad_norm", "-1"], "--max_grad_norm must be above 0 (got -1.0)"),
    (["--max_grad_norm", "nan"], "--max_grad_norm must be finite and above 0 (got nan)"),
    (["--lr_warmup_steps", "-1"], "--lr_warmup_steps must be at least 0 (got -1)"),
    (["--max_train_steps", "-5"], "--max_train_steps must be in [1, 1000000000] (got -5)"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be at least 1 (got 0)"),
    (["--snr_gamma", "0"], "--snr_gamma must be above 0 (got 0.0)"),
    (["--snr_gamma", "-5"], "--snr_gamma must be above 0 (got -5.0)"),
    (["--snr_gamma", "inf"], "--snr_gamma must be finite and above 0 (got inf)"),
    (["--noise_offset", "-0.1"], "--noise_offset must be in [0, 1] (got -0.1)"),
    (["--noise_offset", "nan"], "--noise_offset must be finite and in [0, 1] (got nan)"),
    (["--seed", "-1"], "--seed must be in [0, 4294967295] (got -1)"),
    (["--seed", str(2**32)], "--seed must be in [0, 4294967295] (got 4294967296)"),
    (["--validation_inference_steps", "0"], "--validation_inference_steps must be at least 1 (got 0)"),
    (["--logging_steps", "0"], "--logging_steps must be at least 1 (got 0)"),
    (["--checkpointing_steps", "0"], "--checkpointing_steps must be at least 1 (got 0)"),
    (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit must be at least 1 (got 0)"),
    (["--lr_warmup_steps", "600", "--max_train_steps", "500"],
     "--lr_warmup_steps 600 is more than --max_train_steps 500"),
])
def test_numbers_out_of_range_are_refused(args_for, extra, message):
    with pytest.raises(messages.UserError, match=re.escape(message)) as refused:
        check(args_for(*extra))
    assert "\n" not in str(refused.value), "one line"
    assert re.search(r"(e\.g\.|pass) --", str(refused.value)), "naming a valid value"


def declared_ranges(parser):
    """{flag: its declared range} of every numeric flag of a parser, with the flag's action."""
    return {action.dest: action for action in parser._actions if action.type in (int, float)}


def test_every_numeric_flag_has_a_range_and_says_it_in_help():
    for name, action in declared_ranges(trainer.make_parser()).items():
        assert checks.describe_range(*action.range[:3]) in action.help, name
        checks.check_range(name, action.type(action.range[3]), action.range)  # the example each refusal offers


def test_a_numeric_flag_without_a_range_fails_as_it_is_declared():
    parser = checks.ArgumentParser()
    group = parser.add_argument_group("a user's own flags")
    for declare in (parser.add_argument, group.add_argument):
        with pytest.raises(messages.UserError, match=re.escape("--strength is a number: declare its valid values, "
                                                      "add_argument(..., range=(low, high, ends, example))")):
            declare("--strength", type=float, default=0.5)


def test_a_range_declared_in_a_group_is_checked_as_the_flags_parse():
    parser = checks.ArgumentParser()
    parser.add_argument_group("a user's own flags").add_argument("--strength", type=float, range=(0, 1, "[]", 0.5))
    assert parser.parse_args(["--strength", "1"]).strength == 1.0
    with pytest.raises(messages.UserError, match=re.escape("--strength must be in [0, 1] (got 1.5), e.g. "
                                                           "--strength 0.5")):
        parser.parse_args(["--strength", "1.5"])
    assert parser.within("strength", 0.25) and not parser.within("strength", 2) and not parser.within("strength", True)


def test_the_edges_of_each_range_are_accepted(args_for):
    check(args_for("--adam_beta1", "0", "--noise_offset", "1", "--lr_warmup_steps",
                   "500", "--max_train_steps", "500", "--lr_scheduler", "constant_with_warmup",
                   "--with_prior_preservation", "--class_prompt", "a photo of dog", "--dataloader_num_workers", "0", "--seed", str(2**32 - 1),
                   "--resolution", "8", "--adam_weight_decay", "0", "--lora_alpha", "1"))


@pytest.mark.parametrize("flag", ["--validation_steps", "--num_validation_images"])
def test_zero_validation_counts_are_refused_not_replaced_by_the_default(args_for, flag):
    with pytest.raises(messages.UserError, match=re.escape(f"{flag} must be at least 1 (got 0)")):
        check(args_for("--validation_prompt", "a photo of sks dog in a bucket", flag, "0"))


@pytest.mark.parametrize("extension", ["", ".", "/x", ".a/b"])
def test_caption_extension_that_is_no_suffix_is_refused(args_for, extension):
    with pytest.raises(messages.UserError, match=re.escape(f"--caption_extension {extension!r} is not a file name "
                                                          "suffix: pass one like .txt")):
        check(args_for("--caption_extension", extension))


def test_a_file_where_a_folder_belongs_is_named_as_a_file(args_for, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(messages.UserError, match="--instance_dir .*a-file is a file, not a folder: pass"):
        check(args_for(instance_dir=tmp_path / "a-file"))
    with pytest.raises(messages.UserError, match="--class_dir .*a-file is a file, not a folder: pass"):
        check(args_for("--with_prior_preservation", "--class_prompt", "a photo of dog", "--class_dir",
                       tmp_path / "a-file"))
    with pytest.raises(messages.UserError, match="--output_dir .*a-file is a file, not a folder: choose"):
        check(args_for("--output_dir", tmp_path / "a-file"))
    assert (tmp_path / "a-file").read_text() == "not a folder"


def folder_with_broken_links(folder, photos):
    """A copy of the demo photos plus a dangling symlink and a symlink loop, both named like photos."""
    shutil.copytree(photos, folder)
    (folder / "gone.jpg").symlink_to(folder / "deleted.jpg")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    return folder


@pytest.mark.parametrize("is_file_raises", [False, True])
def test_broken_symlinks_among_the_photos_are_named_not_dropped_silently(args_for, photos, tmp_path, capsys,
                                                                         monkeypatch, is_file_raises):
    if is_file_raises:  # as Path.is_file() does on a symlink loop on some Pythons
        real_is_file = Path.is_file

        def is_file(path):
            if path.name == "loop.jpg":
                raise OSError(errno.ELOOP, "Too many levels of symbolic links", str(path))
            return real_is_file(path)
        monkeypatch.setattr(Path, "is_file", is_file)
    instance = folder_with_broken_links(tmp_path / "instance", photos)
    classes = folder_with_broken_links(tmp_path / "classes", photos)
    images, _, _ = check(args_for("--with_prior_preservation", "--class_prompt", "a photo of dog", "--class_dir",
                               classes, instance_dir=instance))
    assert [p.name for p in images] == sorted(p.name for p in photos.iterdir())
    warnings = [line for line in capsys.readouterr().err.splitlines() if "symlink" in line]
    assert len(warnings) == 2 and all("gone.jpg" in line and "loop.jpg" in line for line in warnings), warnings
    assert str(instance) in warnings[0] and str(classes) in warnings[1]


def test_a_photo_too_long_to_resize_is_refused_before_any_model_loads(args_for, photos, tmp_path):
    folder = tmp_path / "strip"
    shutil.copytree(photos, folder)
    Image.new("RGB", (2, 60000), "white").save(folder / "strip.png")  # a few hundred bytes on disk
    Image.new("RGB", (800, 100), "white").save(folder / "banner.png")  # 8:1 is the limit: kept
    with pytest.raises(messages.UserError) as refused:  # resized to cover 1024 it would be 1024 x 30.7M pixels: 94 GB
        check(args_for("--resolution", 1024, instance_dir=folder))
    assert str(refused.value) == (f"1 instance image in {folder} would need too much memory to train on: strip.png "
                                  "(2x60000: one side over 8 times the other); crop each to at most 8:1 and "
                                  f"downscale it below {2 * Image.MAX_IMAGE_PIXELS} pixels")


def test_photos_over_pils_decompression_bomb_limit_are_refused_in_one_line(args_for, photos, tmp_path,
                                                                           monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30000)  # PIL's own limit, lowered so the test images are small
    folder = tmp_path / "bombs"
    shutil.copytree(photos, folder)
    Image.new("RGB", (200, 200)).save(folder / "large.png")  # PIL only warns above its limit: a big camera photo
    Image.new("RGB", (300, 300)).save(folder / "refused.png")  # and refuses above twice the limit
    with pytest.raises(messages.UserError) as refused:
        check(args_for(instance_dir=folder))
    assert str(refused.value) == (f"1 instance image in {folder} would need too much memory to train on: "
                                  "refused.png (over PIL's limit of 60000 pixels); crop each to at most 8:1 and "
                                  "downscale it below 60000 pixels")
    (folder / "refused.png").unlink()
    assert len(check(args_for(instance_dir=folder))[0]) == 6, "a photo between once and twice the limit trains"


# ----------------------------------------------------------------------------------------------------------
# What an earlier run left in the output dir
# ----------------------------------------------------------------------------------------------------------

def test_folders_not_named_by_the_trainer_are_left_alone(args_for, tmp_path):
    out = tmp_path / "out"
    (out / "stepfinal").mkdir(parents=True)
    (out / "stepfinal" / artifacts.LORA_FILE).write_bytes(b"weights")  # e.g. a copy the user made and named
    (out / "state-stepX").mkdir()
    (out / "state-stepX" / artifacts.TRAINER_STATE).write_text(json.dumps({"step": 3, "settings": {}}))
    check(args_for())  # neither is the trainer's: a fresh run starts
    check(args_for("--resume_from_checkpoint", "latest"))  # and 'latest' is neither of them
    assert artifacts.finished_adapters(out) == [] and checkpoints.complete_states(out) == []
    with pytest.raises(messages.UserError, match=re.escape(f"{out / 'state-stepX'} is not named state-stepN")):
        check(args_for("--resume_from_checkpoint", out / "state-stepX"))
    assert (out / "stepfinal" / artifacts.LORA_FILE).read_bytes() == b"weights"


@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe", b"[]", json.dumps({"step": 4}).encode(),
                                     json.dumps({"settings": {}}).encode(),
                                     json.dumps({"step": "4", "settings": {}}).encode()])
def test_a_damaged_trainer_state_is_refused_in_one_line(args_for, tmp_path, content):
    out = tmp_path / "out"
    (out / "state-step1").mkdir(parents=True)
    (out / "state-step1" / artifacts.TRAINER_STATE).write_text(json.dumps({"step": 2, "settings": {}}))
    (out / "state-step3").mkdir()
    (out / "state-step3" / artifacts.TRAINER_STATE).write_bytes(content)  # the newest: what 'latest' picks
    for resume in ["latest", out / "state-step3"]:
        with pytest.raises(messages.UserError) as refused:
            check(args_for("--resume_from_checkpoint", resume))
        assert str(refused.value) == (
            f"{out / 'state-step3' / artifacts.TRAINER_STATE} is damaged (not the JSON with step and settings that "
            f"this trainer writes): delete {out / 'state-step3'}, or resume from another state-stepN folder")


@pytest.mark.parametrize("extra, message", [
    (["--rank", "99999999999999999999"], "--rank must be in [1, 1024]"),
    (["--max_train_steps", "99999999999999999999"], "--max_train_steps must be in [1, 1000000000]"),
    (["--accept_changed_settings"], "--accept_changed_settings acts only with --resume_from_checkpoint: add "
                                    "--resume_from_checkpoint latest, or drop --accept_changed_settings"),
])
def test_numbers_past_what_can_run_and_lone_resume_flags_are_refused(args_for, extra, message):
    with pytest.raises(messages.UserError, match=re.escape(message)):
        check(args_for(*extra))


def test_unknown_report_to_is_refused_by_the_parser_before_anything_loads(args_for):
    with pytest.raises(messages.UserError, match="^argument --report_to: invalid choice: 'bogus'"):
        trainer.parse_args([str(a) for a in args_for("--report_to", "bogus")])


EVALUATE_ARGV = ["--checkpoint", "x", "--instance_dir", "d", "--output_dir", "o"]


@pytest.mark.parametrize("script, argv, message", [
    ("train_dreambooth_lora_ssd1b.py", ["--instance_dir", "d", "--instance_prompt", "x", "--resolution", "abc"],
     "argument --resolution: invalid int value: 'abc'"),
    ("train_dreambooth_lora_ssd1b.py", ["--instance_prompt", "x"], "the following arguments are required: "
                                                                   "--instance_dir/--instance_data_dir"),
    ("infer.py", ["--checkpoint", "x", "--num_images", "2.5"], "argument --num_images: invalid int value: '2.5'"),
    ("infer.py", ["--checkpoint", "x", "--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    ("evaluate.py", [*EVALUATE_ARGV, "--seed", "abc"], "argument --seed: invalid int value: 'abc'"),
])
def test_what_argparse_refuses_is_one_line_not_usage_text(script, argv, message, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / script), *argv], capture_output=True, text=True,
                            cwd=tmp_path)
    assert (result.returncode, result.stderr.strip()) == (1, f"error: {message} (see --help)")


@pytest.mark.parametrize("value, shown", [("-1e-4", "-0.0001"), ("-.5", "-0.5"), ("-inf", "-inf"), ("-2E3", "-2000.0")])
def test_a_negative_number_in_any_notation_reaches_the_range_check(args_for, value, shown):
    with pytest.raises(messages.UserError, match=re.escape(f"--learning_rate must be {'finite and ' * (value == '-inf')}"
                                                          f"above 0 (got {shown})")):
        check(args_for("--learning_rate", value))


@pytest.mark.parametrize("content", ["{not json", None])
def test_an_unreadable_lock_is_named_and_never_taken_over(tmp_path, content):
    lock = tmp_path / artifacts.LOCK_FILE
    if content is None:
        lock.mkdir()
    else:
        lock.write_text(content)
    with pytest.raises(messages.UserError, match=f"{lock} is unreadable.*delete it if no trainer is running there"):
        with ownership.hold_output_dir(tmp_path):
            pass
    assert lock.exists()


def test_a_fresh_run_never_replaces_resumable_states_silently(args_for, tmp_path):
    state = tmp_path / "out" / "state-step0"
    state.mkdir(parents=True)
    (state / artifacts.TRAINER_STATE).write_text(json.dumps({"step": 1, "settings": {}}))
    with pytest.raises(messages.UserError, match="already holds a resumable state \\(state-step0\\); continue that run"):
        check(args_for())


def test_a_users_readme_in_the_output_dir_is_never_replaced(args_for, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("# My dog project\n\nNotes I keep beside the run.\n")
    for extra in [[], ["--overwrite_output_dir"]]:  # the flag replaces an earlier run, never the user's own file
        with pytest.raises(messages.UserError) as refused:
            check(args_for(*extra))
        assert str(refused.value) == (f"{out / 'README.md'} is not a model card this trainer wrote, and this run "
                                      f"writes the model card at each save: move it out of {out}, or choose "
                                      "another --output_dir")
    assert (out / "README.md").read_text().startswith("# My dog project")
    argv = [str(a) for a in args_for()]
    args = trainer.parse_args(argv)
    model_card.write_model_card(out, args, trainer.derive_settings(args, argv), 500, 1)
    check(args_for())  # the card this trainer wrote is its own to replace
    assert ownership.CARD_MARKS <= set(model_card.CARD_TAGS)


def users_own(out, name):
    """What a user might keep in the output dir under a name the trainer writes."""
    path = out / name
    if name in ("step3", "hub"):
        path.mkdir(parents=True)
        (path / "notes.txt").write_text("mine")
    elif name == "README.md":
        (out / "my-readme.md").write_text("# mine")
        path.symlink_to(out / "my-readme.md")
    else:
        path.write_text("mine")


@pytest.mark.parametrize("name, extra, message", [
    ("step3", [], "step3 is a folder without pytorch_lora_weights.safetensors or run_settings.json, and this run "
                  "writes the adapters of that step there"),
    ("state-step1", [], "state-step1 is not a folder this trainer wrote, and this run writes a checkpoint under "
                        "that name"),
    ("validation", ["--validation_prompt", "a photo of sks dog"], "validation is a file, not a folder, and this "
                                                                  "run writes validation/ there"),
    ("logs", ["--report_to", "tensorboard"], "logs is a file, not a folder, and this run writes logs/ there"),
    ("hub", ["--push_to_hub", "--hub_token", "hf_x"], "hub is not the Hub upload this trainer staged"),
    ("README.md", [], "README.md is not a model card this trainer wrote"),
])
def test_a_users_file_or_folder_at_a_name_the_trainer_writes_is_refused(args_for, tmp_path, name, extra, message):
    out = tmp_path / "out"
    out.mkdir()
    users_own(out, name)
    for overwrite in [[], ["--overwrite_output_dir"]]:
        with pytest.raises(messages.UserError, match=re.escape(f"{out / message}") + ".*: move it out of .*, or "
                                                    "choose another --output_dir$"):
            check(args_for(*extra, *overwrite))
    assert sorted(p.name for p in out.iterdir()) == sorted({name, *(["my-readme.md"] * (name == "README.md"))})


@pytest.fixture
def folders(tmp_path, photos):
    """A copy of the demo photos, and a copy of them inside a model-like folder, for flags to overlap."""
    shutil.copytree(photos, tmp_path / "photos")
    return tmp_path


PRIOR = ["--with_prior_preservation", "--class_prompt", "a photo of dog"]


@pytest.mark.parametrize("extra, message", [
    (["--output_dir", "{photos}"], "--output_dir {photos} is the same folder as --instance_dir {photos}: the run "
                                   "writes its steps, states, card and validation there; choose an --output_dir "
                                   "apart from every input folder"),
    (["--output_dir", "{photos}/out"], "--output_dir {photos}/out is inside --instance_dir {photos}: "),
    (["--output_dir", "{tmp}", "--instance_dir", "{photos}"], "--output_dir {tmp} holds --instance_dir {photos}: "),
    (["--output_dir", "{tmp}/link"], "--output_dir {tmp}/link is the same folder as --instance_dir {photos} "
                                     "(through a link: {photos} and {photos}): "),
    (["--output_dir", "{model}/out"], "--output_dir {model}/out is inside --pretrained_model_name_or_path {model}: "),
    (["--output_dir", "{model}/.."], "--output_dir {model}/.. holds --pretrained_model_name_or_path {model}: "),
    ([*PRIOR, "--class_dir", "{photos}"], "--class_dir {photos} is the same folder as --instance_dir {photos}: the "
                                          "subject's own photos would serve as the class prior, which defeats prior "
                                          "preservation; pass a --class_dir apart from the photos"),
    ([*PRIOR, "--class_dir", "{photos}/classes"], "--class_dir {photos}/classes is inside --instance_dir {photos}: the "
                                                  "subject's own photos"),
    ([*PRIOR, "--class_dir", "{tmp}/link"], "--class_dir {tmp}/link is the same folder as --instance_dir {photos} "
                                            "(through a link"),
    ([*PRIOR, "--class_dir", "{model}/vae/classes"], "--class_dir {model}/vae/classes is inside "
                                                     "--pretrained_model_name_or_path {model}: the run writes class "
                                                     "images there"),
    ([*PRIOR, "--class_dir", "{tmp}/out"], "--class_dir {tmp}/out is the same folder as --output_dir {tmp}/out: "),
    ([*PRIOR, "--class_dir", "{tmp}/out/validation"], "--class_dir {tmp}/out/validation is inside --output_dir "
                                                      "{tmp}/out: the run writes and replaces its steps"),
    ([*PRIOR, "--class_dir", "{tmp}/out/step2/classes"], "--class_dir {tmp}/out/step2/classes is inside "
                                                         "--output_dir {tmp}/out: "),
    ([*PRIOR, "--class_dir", "{tmp}/out/.step2.partial"], "--class_dir {tmp}/out/.step2.partial is inside "
                                                          "--output_dir {tmp}/out: "),
    ([*PRIOR, "--class_dir", "{tmp}/classes", "--output_dir", "{tmp}/classes/out"],
     "--class_dir {tmp}/classes holds --output_dir {tmp}/classes/out: "),
])
def test_every_folder_flag_that_overlaps_another_is_refused_before_any_model_loads(args_for, folders, tiny_model,
                                                                                   monkeypatch, extra, message):
    (folders / "link").symlink_to(folders / "photos")
    names = {"tmp": folders, "photos": folders / "photos", "model": tiny_model}
    monkeypatch.setattr(trainer, "load_models", None)  # nothing may load
    with pytest.raises(messages.UserError) as refused:
        check(args_for(*[a.format(**names) for a in extra], instance_dir=names["photos"]))
    assert str(refused.value).startswith(message.format(**names))
    assert sorted(p.name for p in folders.iterdir()) == ["link", "photos"], "nothing was written"


def test_read_only_inputs_may_overlap_and_the_class_images_default_inside_the_output_dir(args_for, folders,
                                                                                         tiny_model):
    model = folders / "model"
    shutil.copytree(tiny_model, model)
    shutil.copytree(folders / "photos", model / "photos")  # odd, but the photos and the model are only read
    check(args_for(*PRIOR, "--pretrained_model_name_or_path", model, "--pretrained_vae_model_name_or_path",
                   model / "vae", "--output_dir", folders / "out", instance_dir=model / "photos"))
    check(args_for(*PRIOR, "--class_dir", folders / "out" / "my_classes", "--output_dir", folders / "out"))


# ----------------------------------------------------------------------------------------------------------
# Flags that would be ignored, and empty text: refused, never dropped or replaced
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--class_prompt", "a photo of dog"], "--class_prompt acts only with --with_prior_preservation: add "
                                           "--with_prior_preservation, or drop --class_prompt"),
    (["--num_class_images", "50"], "--num_class_images acts only with --with_prior_preservation"),
    (["--prior_loss_weight", "0.5"], "--prior_loss_weight acts only with --with_prior_preservation"),
    (["--class_dir", "classes"], "--class_dir acts only with --with_prior_preservation"),
    (["--text_encoder_lr", "1e-5"], "--text_encoder_lr acts only with --train_text_encoder"),
    (["--validation_steps", "5"], "--validation_steps acts only with --validation_prompt"),
    (["--num_validation_images", "2"], "--num_validation_images acts only with --validation_prompt"),
    (["--validation_inference_steps", "20"], "--validation_inference_steps acts only with --validation_prompt"),
    (["--lr_warmup_steps", "10"], "--lr_warmup_steps 10 has no effect with --lr_scheduler constant: pass "
                                  "--lr_scheduler constant_with_warmup"),
    (["--instance_prompt", ""], "--instance_prompt is empty: pass a prompt, e.g. --instance_prompt 'a photo of sks "
                                "dog'"),
    (["--validation_prompt", "  "], "--validation_prompt is empty"),
    (["--with_prior_preservation", "--class_prompt", " "], "--class_prompt is empty"),
    (["--hub_model_id", "you/x"], "--hub_model_id acts only with --push_to_hub: add --push_to_hub, or drop "
                                  "--hub_model_id"),
    (["--hub_token", "hf_x"], "--hub_token acts only with --push_to_hub"),
    (["--push_to_hub", "--hub_model_id", ""], "--hub_model_id is empty: pass a repo id"),
    (["--push_to_hub", "--hub_token", " "], "--hub_token is empty: pass a token"),
    (["--prodigy_beta3", "0.99"], "--prodigy_beta3 acts only with --optimizer prodigy: add --optimizer prodigy, or "
                                  "drop --prodigy_beta3"),
    (["--optimizer", "adamw", "--no-prodigy_safeguard_warmup"], "--no-prodigy_safeguard_warmup acts only with "
                                                                 "--optimizer prodigy: add --optimizer prodigy, or "
                                                                 "drop --no-prodigy_safeguard_warmup"),
    (["--optimizer", "adamw", "--prodigy_decouple"], "--prodigy_decouple acts only with --optimizer prodigy"),
    (["--optimizer", "prodigy", "--train_text_encoder", "--text_encoder_lr", "5e-6"],
     "--text_encoder_lr 5e-06 would be ignored: Prodigy takes one learning rate for every parameter group, so the "
     "text encoders train at --learning_rate; drop --text_encoder_lr"),
])
def test_a_flag_that_would_be_ignored_or_an_empty_prompt_is_refused(args_for, extra, message):
    with pytest.raises(messages.UserError, match=re.escape(message)):
        check(args_for(*extra))


def test_flags_at_their_default_value_are_not_refused_when_typed_in_context(args_for):
    check(args_for("--with_prior_preservation", "--class_prompt", "a photo of dog", "--num_class_images", "100",
                   "--train_text_encoder", "--text_encoder_lr", "5e-6", "--validation_prompt", "a sks dog",
                   "--validation_steps", "100", "--lr_scheduler", "cosine", "--lr_warmup_steps", "10"))
    check(args_for("--optimizer", "prodigy", "--learning_rate", "1.0", "--train_text_encoder", "--text_encoder_lr",
                   "1.0", "--prodigy_decouple", "--prodigy_beta3", "0"))  # the lr Prodigy gives them anyway


def test_prodigy_with_an_adamw_sized_learning_rate_warns_once_before_loading_and_keeps_it(args_for, capsys):
    argv = [str(a) for a in args_for("--optimizer", "prodigy")]
    args = trainer.parse_args(argv)
    assert capsys.readouterr().err == "", "not in check_args: a script run parses its flags twice"
    trainer.check_inputs(args, trainer.derive_settings(args, argv))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "prodigy" in line]
    assert warnings == ["warning: --learning_rate 0.0001 (the default, sized for AdamW) with --optimizer prodigy: "
                        "Prodigy finds the step size itself and multiplies it by the learning rate, which is usually "
                        "1.0; pass --learning_rate 1.0"]
    assert args.learning_rate == 1e-4, "the flag stays as typed"
    check(args_for("--optimizer", "prodigy", "--learning_rate", "0.01"))
    assert "warning: --learning_rate 0.01 with --optimizer prodigy: Prodigy" in capsys.readouterr().err
    check(args_for("--optimizer", "prodigy", "--learning_rate", "1.0"))
    assert "prodigy" not in capsys.readouterr().err


def test_an_empty_caption_file_is_named_not_replaced_by_the_instance_prompt(args_for, photos, tmp_path):
    folder = tmp_path / "captions"
    shutil.copytree(photos, folder)
    (folder / "dog_0.txt").write_text("")
    (folder / "dog_1.txt").write_text("  \n")
    (folder / "dog_2.txt").write_text("a photo of sks dog on grass")
    with pytest.raises(messages.UserError, match=re.escape("2 caption files empty: dog_0.txt, dog_1.txt; write each "
                                                          "photo's prompt in it, or delete it")):
        check(args_for(instance_dir=folder))


def test_caching_latents_on_request_is_refused_where_it_would_freeze_a_random_crop(args_for, tmp_path):
    folder = tmp_path / "wide"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (96, 64), (i * 80, 0, 0)).save(folder / f"wide_{i}.png")
    with pytest.raises(messages.UserError, match=re.escape("--cache_latents on would fix one random crop of each "
                                                          "image that does not fit its training size")):
        check(args_for("--cache_latents", "on", instance_dir=folder))
    check(args_for("--cache_latents", "on", "--center_crop", instance_dir=folder))  # one crop is all there is
    square = tmp_path / "square"
    square.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (i * 80, 0, 0)).save(square / f"square_{i}.png")
    check(args_for("--cache_latents", "on", instance_dir=square))  # square photos: no crop to lose


def test_fp16_mixed_precision_on_a_cpu_is_refused_before_anything_else(args_for, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train_dreambooth_lora_ssd1b.py"),
                             *map(str, args_for("--mixed_precision", "fp16"))], capture_output=True, text=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 1 and "Traceback" not in result.stderr and "Loading" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, "the flag is refused before the inputs are read"
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: mixed precision fp16 (from --mixed_precision or the accelerate config) needs a GPU; on this CPU pass "
        "--mixed_precision bf16")


@pytest.mark.parametrize("flag", ["--instance_dir", "--output_dir", "--class_dir", "--pretrained_model_name_or_path",
                                  "--resume_from_checkpoint"])
def test_an_empty_path_is_refused_not_read_as_the_current_folder(args_for, flag, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [a for a in args_for("--with_prior_preservation", "--class_prompt", "a photo of dog")]
    if flag in argv:
        argv[argv.index(flag) + 1] = ""
    else:
        argv += [flag, ""]
    with pytest.raises(messages.UserError, match=f"^{flag} is empty: pass "):
        check(argv)
    assert list(tmp_path.iterdir()) == [], "nothing written to the current folder"


@pytest.mark.parametrize("extra, message", [
    (["--rank", "4", "--rank", "8"], "--rank is given twice (then as --rank): keep one"),
    (["--output_dir", "elsewhere"], "--output_dir is given twice (then as --output_dir): keep one"),
    (["--instance_data_dir", "other"], "--instance_dir is given twice (then as --instance_data_dir): keep one"),
    (["--seed=1", "--seed", "2"], "--seed is given twice"),
    (["--mixed_precision", "no", "--mixed", "bf16"],  # --mixed: an abbreviation that argparse accepts
     "--mixed_precision is given twice (then as --mixed): keep one"),
])
def test_a_flag_given_twice_is_refused_not_overridden_by_the_last(args_for, extra, message):
    with pytest.raises(messages.UserError, match=re.escape(message)):
        check([*args_for(), *extra])


def test_an_image_extension_as_caption_extension_is_refused(args_for):
    with pytest.raises(messages.UserError, match=re.escape("--caption_extension .JPG is an image's extension")):
        check(args_for("--caption_extension", ".JPG"))


def test_a_tracker_that_is_not_installed_is_refused_not_dropped(args_for, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(messages.UserError, match=re.escape("--report_to wandb needs wandb: pip install wandb, or pass "
                                                          "--report_to none")):
        check(args_for("--report_to", "wandb"))


def test_prodigy_without_prodigyopt_is_refused_before_anything_loads(args_for, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "prodigyopt" else real(name, *a))
    with pytest.raises(messages.UserError, match=re.escape("--optimizer prodigy needs prodigyopt: pip install "
                                                          "prodigyopt, or pass --optimizer adamw8bit")):
        check(args_for("--optimizer", "prodigy", "--learning_rate", "1.0"))


def test_prodigyopt_version_is_checked_only_for_prodigy(monkeypatch, tmp_path):
    fake_versions(monkeypatch, prodigyopt="1.0")
    argv = ["--pretrained_model_name_or_path", tmp_path / "no-model", "--instance_dir", tmp_path / "no-photos",
            "--instance_prompt", "a photo of sks dog", "--output_dir", tmp_path / "out"]
    with pytest.raises(messages.UserError) as refused:
        run_trainer(*argv, "--optimizer", "prodigy", "--learning_rate", 1.0)
    assert str(refused.value) == "prodigyopt 1.0 is older than the 1.1.2 this needs: run pip install -U " \
                                 "'prodigyopt>=1.1.2'"
    with pytest.raises(messages.UserError, match="instance folder .*no-photos does not exist"):  # past the check
        run_trainer(*argv, "--optimizer", "adamw")


@pytest.mark.parametrize("damage, message", [
    (lambda m: shutil.rmtree(m / "tokenizer_2"), "has no tokenizer_2/vocab.json or tokenizer.json"),
    (lambda m: shutil.rmtree(m / "scheduler"), "has no scheduler/scheduler_config.json"),
    (lambda m: (m / "model_index.json").write_text("{not json"), "model_index.json is unreadable (JSONDecodeError)"),
    (lambda m: [p.unlink() for p in (m / "unet").glob("*.safetensors")], "has no weights in unet: download"),
    (lambda m: (m / "unet" / "config.json").write_text("{"), "unet/config.json is unreadable (JSONDecodeError)"),
])
def test_a_model_folder_missing_a_part_is_refused_before_loading(args_for, tiny_model, tmp_path, damage, message):
    model = shutil.copytree(tiny_model, tmp_path / "model")
    damage(model)
    with pytest.raises(messages.UserError, match=re.escape(message)):
        check(args_for("--pretrained_model_name_or_path", model))


def test_a_folder_where_a_caption_file_belongs_is_named(args_for, photos, tmp_path):
    folder = shutil.copytree(photos, tmp_path / "captions")
    (folder / "dog_0.txt").mkdir()
    with pytest.raises(messages.UserError, match=re.escape("1 caption file unreadable or not UTF-8: dog_0.txt (not a "
                                                          "file)")):
        check(args_for(instance_dir=folder))


def test_a_refusal_is_the_only_line_printed(args_for, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train_dreambooth_lora_ssd1b.py"),
                             *map(str, args_for("--cache_latents", "on"))], capture_output=True, text=True)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_module_docstring_lists_the_sections_in_file_order():
    source = (ROOT / "train_dreambooth_lora_ssd1b.py").read_text()
    body = source.split('"""', 2)[2]
    names = re.findall(r"^  (\w[\w ]*?)  +\S", trainer.__doc__, re.MULTILINE)
    assert len(names) >= 10, names
    positions = []
    for name in names:
        found = (re.search(rf"^(?:def|class) {name}\b", body, re.MULTILINE)  # a function, else a section header
                 or re.search(rf"^# [^\n]*\b{name}\b[^\n]*\n# -+$", body, re.MULTILINE | re.IGNORECASE))
        assert found, f"{name} is in the table of contents but not in the file"
        positions.append(found.start())
    assert positions == sorted(positions), [n for n, _ in sorted(zip(names, positions), key=lambda x: x[1])]


def test_help_states_every_default(capsys):
    with pytest.raises(SystemExit):
        trainer.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for flag, default in [("resolution", "1024"), ("rank", "8"), ("learning_rate", "0.0001"), ("seed", "0"),
                          ("max_train_steps", "500"), ("optimizer", "adamw8bit"), ("lora_dropout", "0.0")]:
        assert re.search(rf"--{flag} \S+ [^-]*?\(?default: {re.escape(default)}\b", text), flag
    assert "(default: None)" not in text and "(default: False)" not in text


HIDE_MATPLOTLIB = """
import importlib.metadata, runpy, sys
real = importlib.metadata.version
def version(name):
    if name == "matplotlib":
        raise importlib.metadata.PackageNotFoundError(name)
    return real(name)
importlib.metadata.version = version
sys.modules["matplotlib"] = None  # import matplotlib raises ImportError, as when it is not installed
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_fresh_trainer_without_matplotlib_runs_up_to_its_own_checks(tmp_path):
    # in a fresh interpreter, since the version check at import has long run in this one
    argv = ["--pretrained_model_name_or_path", tmp_path / "no-model", "--instance_dir", tmp_path / "no-photos",
            "--instance_prompt", "a photo of sks dog", "--output_dir", tmp_path / "out"]
    done = subprocess.run([sys.executable, "-c", HIDE_MATPLOTLIB, ROOT / "train_dreambooth_lora_ssd1b.py", *argv],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 1 and "matplotlib" not in done.stderr and "no-photos" in done.stderr, done.stderr


def test_the_trainer_does_not_need_matplotlib(monkeypatch, tmp_path):
    fake_versions(monkeypatch, matplotlib=None)  # only evaluate.py's curve draws with it
    argv = ["--pretrained_model_name_or_path", tmp_path / "no-model", "--instance_dir", tmp_path / "no-photos",
            "--instance_prompt", "a photo of sks dog", "--output_dir", tmp_path / "out"]
    with pytest.raises(messages.UserError) as refused:
        run_trainer(*argv)
    assert "matplotlib" not in str(refused.value) and "no-photos" in str(refused.value)


@pytest.mark.parametrize("script", ["train_dreambooth_lora_ssd1b.py", "infer.py", "evaluate.py"])
@pytest.mark.parametrize("argv, exit_code", [(["--help"], 0), (["--no_such_flag"], 1)])
def test_help_and_a_mistyped_flag_are_answered_before_any_library_imports(script, argv, exit_code, tmp_path):
    done = subprocess.run([sys.executable, "-X", "importtime", ROOT / script, *argv], capture_output=True,
                          text=True, cwd=tmp_path)
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in done.stderr.splitlines()
                if line.startswith("import time:")}
    assert done.returncode == exit_code, done.stderr[-2000:]
    assert not imported & {"torch", "diffusers", "transformers", "peft", "accelerate", "safetensors"}
