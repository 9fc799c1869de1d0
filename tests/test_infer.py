"""infer.py: a seed is one picture, exactly the plain diffusers one; PNGs carry their parameters."""

import dataclasses
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import infer
from dreambooth_kit import rendering
from conftest import with_flags
from dreambooth_kit.artifacts import LORA_FILE, SETTINGS_FILE
from dreambooth_kit.checks import describe_range
from dreambooth_kit.messages import UserError

ROOT = infer.Path(infer.__file__).resolve().parent


@pytest.fixture(scope="module")
def rendered(trained_run, tmp_path_factory):
    output = tmp_path_factory.mktemp("renders")
    paths = infer.main(["--checkpoint", str(trained_run / "step3"), "--prompt", "a sks dog in a bucket",
                        "--negative_prompt", "blurry", "--seed", "7", "--num_images", "2",
                        "--num_inference_steps", "3", "--guidance_scale", "4.5", "--output", str(output)])
    return paths


def plain_diffusers_image(tiny_model, step_dir, seed):
    """What a user gets from diffusers alone, with the adapters loaded."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model, vae=AutoencoderKL.from_pretrained(tiny_model / "vae"))
    pipe.load_lora_weights(step_dir)
    return pipe("a sks dog in a bucket", negative_prompt="blurry", num_inference_steps=3, guidance_scale=4.5,
                height=64, width=64, generator=torch.Generator("cpu").manual_seed(seed)).images[0]


def test_seed_gives_exactly_the_plain_diffusers_image(rendered, trained_run, tiny_model):
    assert [p.name for p in rendered] == ["step3_seed7.png", "step3_seed8.png"]
    for path, seed in zip(rendered, [7, 8]):  # image i uses seed + i
        ours = np.asarray(Image.open(path))
        theirs = np.asarray(plain_diffusers_image(tiny_model, trained_run / "step3", seed))
        assert ours.shape == (64, 64, 3), "height and width default to the recorded resolution"
        np.testing.assert_array_equal(ours, theirs)
    assert not np.array_equal(np.asarray(Image.open(rendered[0])), np.asarray(Image.open(rendered[1])))


def test_dora_adapters_render_what_the_trained_model_rendered(dora_run, tmp_path):
    # the run's validation image is the trained model's own render, made with its adapters still in memory
    path = infer.main(["--checkpoint", str(dora_run / "step1"), "--prompt", "a photo of sks dog in a bucket",
                       "--num_inference_steps", "2", "--output", str(tmp_path)])[0]
    np.testing.assert_array_equal(np.asarray(Image.open(path)),
                                  np.asarray(Image.open(dora_run / "validation" / "step1" / "seed0.png")))


def test_png_carries_a1111_parameters(rendered, trained_run):
    text = Image.open(rendered[0]).text["parameters"]
    prompt, negative, settings = text.split("\n")
    assert prompt == "a sks dog in a bucket"
    assert negative == "Negative prompt: blurry"
    for part in ["Steps: 3", "Sampler: EulerDiscreteScheduler", "CFG scale: 4.5", "Seed: 7", "Size: 64x64",
                 f"Lora: {trained_run.name}/step3"]:
        assert part in settings


def test_png_metadata_names_local_folders_without_their_full_paths(rendered, trained_run, tiny_model):
    # a PNG is shared as it is: the model and adapters by their folders' names, not the user's full paths
    settings = Image.open(rendered[0]).text["parameters"].split("\n")[-1]
    assert f"Model: {tiny_model.name}, Lora: {trained_run.name}/step3," in settings
    assert str(trained_run) not in settings and str(tiny_model) not in settings


def test_prompt_defaults_to_the_instance_prompt(trained_run, tmp_path):
    paths = infer.main(["--checkpoint", str(trained_run / "step3"), "--num_inference_steps", "2",
                        "--height", "32", "--width", "48", "--output", str(tmp_path)])
    image = Image.open(paths[0])
    assert image.size == (48, 32)
    assert image.text["parameters"].startswith("a photo of sks dog\n")


def test_not_a_step_dir_is_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--checkpoint", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path} is not a step dir")


def test_lora_scale_zero_renders_the_base_model(trained_run, tiny_model, tmp_path):
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    path = infer.main(["--checkpoint", str(trained_run / "step3"), "--prompt", "a dog", "--lora_scale", "0",
                       "--num_inference_steps", "2", "--output", str(tmp_path)])[0]
    base = StableDiffusionXLPipeline.from_pretrained(tiny_model, vae=AutoencoderKL.from_pretrained(tiny_model / "vae"))
    expected = base("a dog", num_inference_steps=2, height=64, width=64,
                    generator=torch.Generator("cpu").manual_seed(0)).images[0]
    np.testing.assert_allclose(np.asarray(Image.open(path), dtype=float), np.asarray(expected, dtype=float), atol=1)


def resolved(step, *flags):
    """The Render infer.main() would run for these flags, and the args it came from."""
    args = infer.parse_args(["--checkpoint", str(step), *flags])
    return rendering.resolve(args, rendering.read_settings(step), args.prompt, args.num_images), args


def test_flags_override_what_the_checkpoint_recorded(trained_run):
    settings = rendering.read_settings(trained_run / "step3")
    render, _ = resolved(trained_run / "step3")
    assert (render.model, render.vae_model) == (settings["pretrained_model_name_or_path"],
                                                settings["pretrained_vae_model_name_or_path"])
    assert (render.height, render.width, render.device, render.dtype) == (64, 64, "cpu", "fp32")
    assert (render.prompt, render.seeds) == ("a photo of sks dog", range(0, 1))
    render, _ = resolved(trained_run / "step3", "--height", "128", "--pretrained_vae_model_name_or_path", "none",
                         "--dtype", "bf16")
    assert (render.vae_model, render.height, render.width, render.dtype) == (None, 128, 64, "bf16")


def test_resolving_leaves_args_as_typed(trained_run):
    args = infer.parse_args(["--checkpoint", str(trained_run / "step3"), "--seed", "5", "--num_images", "2"])
    typed = dict(vars(args))
    render = rendering.resolve(args, rendering.read_settings(trained_run / "step3"), args.prompt, args.num_images)
    assert vars(args) == typed
    assert render.seeds == range(5, 7)
    with pytest.raises(dataclasses.FrozenInstanceError):
        render.height = 128


def test_the_derived_section_of_run_settings_is_read_over_the_flags_as_typed(trained_run, tiny_model, tmp_path):
    # the trainer records each flag as typed, and under "derived" what it came to: a relative model path made
    # absolute, the VAE as null where it is the model's own; the typed path would not resolve from here
    step = step_copy(trained_run, tmp_path)
    settings = json.loads((step / SETTINGS_FILE).read_text())
    derived = {"pretrained_model_name_or_path": str(tiny_model), "pretrained_vae_model_name_or_path": None}
    settings.update(pretrained_model_name_or_path="moved/ssd1b", pretrained_vae_model_name_or_path="moved/vae",
                    derived=derived)
    (step / SETTINGS_FILE).write_text(json.dumps(settings))
    render, _ = resolved(step)
    assert (render.model, render.vae_model) == (str(tiny_model), None)


# ---------------------------------------------------------------------------------------------------------
# Mistakes: one line, before any model loads
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_model_loads(monkeypatch):
    """Loading the base model fails the test: every check of the user's input must come before it."""
    monkeypatch.setattr(rendering, "load_models", lambda *a, **k: pytest.fail("the base model loaded first"))


BAD_NUMBERS = [("--height", "-64"), ("--height", "0"), ("--height", "12"), ("--width", "0"), ("--width", "1000000"),
               ("--height", "4104"),
               ("--num_inference_steps", "0"), ("--num_inference_steps", "-1"), ("--num_images", "0"),
               ("--guidance_scale", "nan"), ("--guidance_scale", "inf"), ("--guidance_scale", "-1"),
               ("--lora_scale", "nan"), ("--lora_scale", "inf"), ("--lora_scale", "-inf"),
               ("--seed", "-1"), ("--seed", str(2**64))]


def numeric_flags(parser):
    """The flags an argparse parser reads as int or float."""
    return {action.option_strings[0] for action in parser._actions if action.type in (int, float)}


@pytest.mark.parametrize("flag, value", BAD_NUMBERS)
def test_number_out_of_range_is_refused_before_any_model_loads(flag, value, trained_run, tmp_path, no_model_loads):
    with pytest.raises(UserError, match=f"^{flag} must be .* \\(got "):
        infer.main(["--checkpoint", str(trained_run / "step3"), f"{flag}={value}", "--output", str(tmp_path)])


@pytest.mark.parametrize("device, message", [
    ("tpu", "--device tpu is not a device: pass cpu, cuda or cuda:N"),
    ("meta", "--device meta is not supported here"),
    *([("cuda", "--device cuda: this torch has no usable CUDA device")] if not torch.cuda.is_available() else [])])
def test_a_device_this_machine_lacks_is_refused_before_any_model_loads(device, message, trained_run,
                                                                       no_model_loads):
    with pytest.raises(UserError, match=re.escape(message)):
        infer.main(["--checkpoint", str(trained_run / "step3"), "--device", device])


def test_an_output_that_is_a_file_is_refused_before_any_model_loads(trained_run, tmp_path, no_model_loads):
    (tmp_path / "renders").write_text("")
    with pytest.raises(UserError, match="--output .*renders is a file, not a folder"):
        infer.main(["--checkpoint", str(trained_run / "step3"), "--output", str(tmp_path / "renders")])


def test_seeds_past_the_generators_range_are_refused(trained_run, no_model_loads):
    with pytest.raises(UserError, match=f"--seed {2**64 - 1} leaves no room for 2 images.*--seed {2**64 - 2} or less"):
        infer.main(["--checkpoint", str(trained_run / "step3"), "--seed", str(2**64 - 1), "--num_images", "2"])


def test_every_numeric_flag_has_a_range_and_a_refusal_test():
    numeric = numeric_flags(infer.parser())  # the parser refuses a numeric flag declared without a range
    for action in infer.parser()._actions:
        if action.option_strings and action.option_strings[0] in numeric:
            assert describe_range(*action.range[:3]) in action.help, "--help states each flag's range"
    assert {flag for flag, _ in BAD_NUMBERS} == numeric, "give a new flag a case in BAD_NUMBERS"


def step_copy(trained_run, tmp_path):
    """A copy of the trained run's step3, to damage without touching the session's run."""
    return shutil.copytree(trained_run / "step3", tmp_path / "step3")


def with_nan(path, every=True):
    """Every value nan (a run that diverged), or a single inf in one tensor; the file's metadata kept."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    if every:
        tensors = {k: torch.full_like(v, float("nan")) for k, v in tensors.items()}
    else:
        next(iter(tensors.values())).view(-1)[0] = float("inf")
    save_file(tensors, path, metadata=metadata)


DAMAGES = {  # how a step dir's adapter file gets damaged -> what the refusal says
    "truncated": (lambda f: f.write_bytes(f.read_bytes()[:f.stat().st_size // 2]), "is not a readable safetensors"),
    "pickle": (lambda f: torch.save({"unet.a.lora_A.weight": torch.ones(2)}, f), "is not a readable safetensors"),
    "random bytes": (lambda f: f.write_bytes(np.random.default_rng(0).bytes(4096)), "is not a readable safetensors"),
    "empty": (lambda f: f.write_bytes(b""), "is empty"),
    "not lora": (lambda f: save_file({"down_blocks.0.weight": torch.ones(2)}, f), "holds no LoRA tensors"),
    "all nan": (with_nan, "the adapter holds nan/inf"),
    "one inf": (lambda f: with_nan(f, every=False), "the adapter holds nan/inf"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_adapter_file_is_refused_before_any_model_loads(damage, trained_run, tmp_path, no_model_loads):
    step = step_copy(trained_run, tmp_path)
    apply_damage, message = DAMAGES[damage]
    apply_damage(step / LORA_FILE)
    with pytest.raises(UserError, match=message) as refused:
        infer.main(["--checkpoint", str(step), "--output", str(tmp_path / "out")])
    assert str(refused.value).startswith(str(step / LORA_FILE)) and "\n" not in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_nan_adapter_exits_1_in_one_line_instead_of_a_black_image(trained_run, tmp_path):
    step = step_copy(trained_run, tmp_path)
    with_nan(step / LORA_FILE)
    result = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--checkpoint", str(step), "--output",
                             str(tmp_path / "out"), "--num_inference_steps", "1"], capture_output=True, text=True)
    assert (result.returncode, result.stdout, "Traceback" in result.stderr) == (1, "", False)
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {step / LORA_FILE}: the adapter holds nan/inf (")
    assert line.endswith("; it would render black images: use an earlier stepN")
    assert not (tmp_path / "out").exists()


def edit_settings(step, **fields):
    """Change fields of a step dir's run_settings.json where infer.py reads them: at top level, and in the
    "derived" section too where the trainer recorded them there (what they came to is read over what was typed)."""
    settings = json.loads((step / SETTINGS_FILE).read_text())
    derived = settings.get("derived", {})
    derived.update({name: value for name, value in fields.items() if name in derived})
    (step / SETTINGS_FILE).write_text(json.dumps({**settings, **fields}))


SETTINGS_DAMAGES = {  # how run_settings.json gets damaged -> what the refusal says
    "not json": (lambda s: (s / SETTINGS_FILE).write_text('{"resolution": 64,'), r"\(JSONDecodeError: .*: restore it "
                 "from the run, or delete it and pass --pretrained_model_name_or_path, "),
    "not utf-8": (lambda s: (s / SETTINGS_FILE).write_bytes(b"\xff\xfe{}"), r"\(UnicodeDecodeError: "),
    "not an object": (lambda s: (s / SETTINGS_FILE).write_text("[64]"), "holds a JSON list, not an object"),
    "resolution abc": (lambda s: edit_settings(s, resolution="abc"), 'records resolution "abc", which is not a '
                       r"multiple of 8 in \[8, 4096\], as the trainer's --resolution: pass --height and --width "
                       "explicitly, or restore the file"),
    "resolution -64": (lambda s: edit_settings(s, resolution=-64), "records resolution -64"),
    "model a number": (lambda s: edit_settings(s, pretrained_model_name_or_path=5),
                       "records pretrained_model_name_or_path 5, which is not a non-empty string: pass "
                       "--pretrained_model_name_or_path explicitly"),
    "prompt a list": (lambda s: edit_settings(s, instance_prompt=["a", "b"]), "pass --prompt explicitly"),
    "revision a list": (lambda s: edit_settings(s, revision=["main"]),
                        r'records revision \["main"\], which is not a non-empty string or null: restore it from the '
                        "run$"),
    "derived a list": (lambda s: edit_settings(s, derived=[1]), "records derived as a JSON list, not an object"),
    "derived missing": (lambda s: (s / SETTINGS_FILE).write_text(json.dumps(
        {key: value for key, value in json.loads((s / SETTINGS_FILE).read_text()).items() if key != "derived"})),
        "records no derived section: restore it from the run"),
    "validation size odd": (lambda s: edit_settings(s, validation_size=[64, 60]), r"records validation_size \[64, "
                            r"60\], which is not null or a \[height, width\] pair, each a multiple of 8 in \[8, "
                            r"4096\]: pass --height and --width explicitly"),
    # what the file records is held to the flags' own ranges: past 4096 a render runs for minutes, or hours
    "validation size past the cap": (lambda s: edit_settings(s, validation_size=[8192, 64]),
                                     r"records validation_size \[8192, 64\], which is not null or a \[height, "
                                     r"width\] pair, each a multiple of 8 in \[8, 4096\]"),
    "resolution past the cap": (lambda s: edit_settings(s, resolution=8192, validation_size=None),
                                "records resolution 8192, which is not a multiple of 8 in"),
    "resolution a bool": (lambda s: edit_settings(s, resolution=True, validation_size=None),
                          "records resolution true"),
    "vae an empty string": (lambda s: edit_settings(s, pretrained_vae_model_name_or_path=""),
                            'records pretrained_vae_model_name_or_path "", which is not a non-empty string or null'),
    "derived model a number": (lambda s: edit_settings(s, derived={"pretrained_model_name_or_path": 5}),
                               "records pretrained_model_name_or_path 5, which is not a non-empty string"),
}


@pytest.mark.parametrize("damage", list(SETTINGS_DAMAGES))
def test_damaged_run_settings_are_refused_before_any_model_loads(damage, trained_run, tmp_path, no_model_loads):
    step = step_copy(trained_run, tmp_path)
    apply_damage, message = SETTINGS_DAMAGES[damage]
    apply_damage(step)
    with pytest.raises(UserError, match=message) as refused:
        infer.main(["--checkpoint", str(step), "--output", str(tmp_path / "out")])
    assert str(step / SETTINGS_FILE) in str(refused.value) and "\n" not in str(refused.value)


def test_flags_named_in_the_refusal_replace_the_damaged_fields(trained_run, tiny_model, tmp_path):
    step = step_copy(trained_run, tmp_path)
    edit_settings(step, resolution="abc", pretrained_model_name_or_path=5, instance_prompt=None)
    argv = ["--checkpoint", str(step), "--height", "32", "--width", "48", "--prompt", "a dog",
            "--pretrained_model_name_or_path", str(tiny_model)]
    args = infer.parse_args(argv)
    render = rendering.resolve(args, rendering.read_settings(step), args.prompt, args.num_images)
    assert (render.height, render.width, render.prompt, render.model) == (32, 48, "a dog", str(tiny_model))


def test_a_bucketed_run_renders_at_the_size_it_validated_at(trained_run, tmp_path):
    step = step_copy(trained_run, tmp_path)
    edit_settings(step, validation_size=[64, 96])  # (height, width): most of the photos were landscape
    [path] = infer.main(["--checkpoint", str(step), "--num_inference_steps", "1", "--output", str(tmp_path / "out")])
    assert Image.open(path).size == (96, 64)
    [path] = infer.main(["--checkpoint", str(step), "--num_inference_steps", "1", "--height", "32", "--width", "32",
                         "--output", str(tmp_path / "out")])
    assert Image.open(path).size == (32, 32), "the flags still decide"


def test_a_second_render_never_replaces_the_first(trained_run, tmp_path):
    argv = ["--checkpoint", str(trained_run / "step3"), "--num_inference_steps", "1", "--output", str(tmp_path)]
    [first] = infer.main([*argv, "--prompt", "a sks dog"])
    before = first.read_bytes()
    [second] = infer.main([*argv, "--prompt", "a sks dog on the moon"])  # the same step and seed: the same name
    assert (first.name, second.name) == ("step3_seed0.png", "step3_seed0_2.png")
    assert first.read_bytes() == before
    assert "on the moon" in Image.open(second).text["parameters"]
    assert not list(tmp_path.glob(".*tmp*")), "no temporary file is left behind"


def test_an_empty_prompt_is_refused_not_replaced_by_the_runs_prompt(trained_run, tmp_path, no_model_loads):
    with pytest.raises(UserError, match="^--prompt is empty: pass a prompt, or leave --prompt out"):
        infer.main(["--checkpoint", str(trained_run / "step3"), "--prompt", " ", "--output", str(tmp_path)])


@pytest.mark.parametrize("output, message", [("afile/renders", "is under {tmp}/afile, which is a file, not a folder"),
                                             ("", "--output is empty: pass a folder")])
def test_an_output_that_cannot_be_a_folder_is_refused_before_any_model_loads(output, message, trained_run, tmp_path,
                                                                             no_model_loads, monkeypatch):
    (tmp_path / "afile").write_text("not a folder")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=re.escape(message.format(tmp=tmp_path)) if output else re.escape(message)):
        infer.main(["--checkpoint", str(trained_run / "step3"), "--output", str(tmp_path / output) if output else ""])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("flag, message", [("--checkpoint", "a step dir, e.g. work_dirs/<run>/step499"),
                                           ("--prompt", "a prompt, or leave --prompt out"),
                                           ("--output", "a folder for the PNGs")])
def test_an_empty_value_is_refused_with_what_to_pass(flag, message):
    argv = with_flags(["--checkpoint", "work_dirs/run/step3"], flag, " ")
    with pytest.raises(UserError, match=re.escape(f"{flag} is empty: pass {message}")):
        infer.parse_args(argv)


def help_by_flag(parser, monkeypatch):
    """--help as {flag: its help text on one line}."""
    monkeypatch.setenv("COLUMNS", "120")
    entries = re.split(r"\n  (?=-)", parser.format_help())
    return {entry.split()[0].rstrip(","): " ".join(entry.split()) for entry in entries[1:]}


def test_help_shows_every_default(monkeypatch):
    shown = help_by_flag(infer.parser(), monkeypatch)
    for flag, default in [("--num_inference_steps", "50"), ("--guidance_scale", "5.0"), ("--num_images", "1"),
                          ("--seed", "0"), ("--lora_scale", "1.0"), ("--output", "outputs")]:
        assert f"(default: {default})" in shown[flag]
    for action in infer.parser()._actions:
        if action.dest != "help" and not action.required:
            assert "default: " in shown[action.option_strings[0]], f"{action.option_strings[0]} says no default"
    assert shown["--prompt"].endswith("default: the run's instance prompt"), "None is not shown as a default"


# ---------------------------------------------------------------------------------------------------------
# Adapters and the base model they render on: a mismatch named before any weight loads
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def other_base(tmp_path_factory):
    """A second tiny SSD-1B-shaped model whose UNet is twice as wide: adapters of one do not fit the other."""
    from make_tiny_ssd1b import make_text_encoders, make_tokenizers, make_unet, make_vae, save_pipeline

    tokenizers = make_tokenizers()
    return save_pipeline(tmp_path_factory.mktemp("other") / "wide", make_vae(0),
                         make_text_encoders(len(tokenizers[0]), 0), tokenizers, make_unet(0, widths=(32, 64, 64)))


def test_adapters_of_another_base_model_are_refused_naming_the_base_they_were_trained_on(
        trained_run, tiny_model, other_base, tmp_path, no_model_loads):
    with pytest.raises(UserError) as refused:
        infer.main(["--checkpoint", str(trained_run / "step3"), "--pretrained_model_name_or_path", str(other_base),
                    "--output", str(tmp_path / "out")])
    message = str(refused.value)
    assert message.startswith(f"the adapters in {trained_run / 'step3'} were trained on {tiny_model} (recorded in "
                              f"{trained_run / 'step3' / SETTINGS_FILE}), and do not fit {other_base} (")
    assert message.endswith(f"): pass --pretrained_model_name_or_path {tiny_model}, or leave it out")
    assert "\n" not in message and not (tmp_path / "out").exists()


def reshaped(path, change):
    """The adapter file with change(tensors) applied, its metadata kept."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata=metadata)


def first_key(tensors, part):
    return next(k for k in sorted(tensors) if k.startswith("unet.") and part in k)


MISFITS = {  # how an adapter file stops fitting the model it was trained on -> what the refusal says
    "a wider down tensor": (lambda t: t.update({(k := first_key(t, "lora.down")): torch.zeros(t[k].shape[0], 48)}),
                            r"lora\.down \[4, 48\]: the layer's input is 32 wide; 1 misfit in all"),
    "a narrower up tensor": (lambda t: t.update({(k := first_key(t, "lora.up")): torch.zeros(8, t[k].shape[1])}),
                             r"lora\.up \[8, 4\]: the layer's output is 32 wide"),
    "ranks that disagree": (lambda t: t.update({(k := first_key(t, "lora.up")): torch.zeros(t[k].shape[0], 2)}),
                            r"its down and up tensors disagree on the rank \(\[2, 4\]\)"),
    "a layer the model lacks": (lambda t: t.update({k.replace("down_blocks.1", "down_blocks.7"): t.pop(k) for k in
                                                    [first_key(t, "down_blocks.1")]}),
                                r"unet\.down_blocks\.7\..*: unet has no such layer"),
    "a tensor of no LoRA layer": (lambda t: t.update({"unet.conv_in.weight": torch.zeros(1)}),
                                  r"holds 1 tensor that is no LoRA layer of unet, text_encoder or "
                                  r"text_encoder_2, e\.g\. 'unet\.conv_in\.weight'"),
}


@pytest.mark.parametrize("misfit", list(MISFITS))
def test_an_adapter_file_that_does_not_fit_its_model_is_refused_before_any_model_loads(misfit, trained_run, tmp_path,
                                                                                       no_model_loads):
    step = step_copy(trained_run, tmp_path)
    change, message = MISFITS[misfit]
    reshaped(step / LORA_FILE, change)
    with pytest.raises(UserError, match=message) as refused:
        infer.main(["--checkpoint", str(step), "--output", str(tmp_path / "out")])
    assert str(step / LORA_FILE) in str(refused.value) and "\n" not in str(refused.value)


def with_metadata(path, change):
    """The adapter file with its lora_adapter_metadata text replaced by change(text)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file(load_file(path), path, metadata={**metadata, "lora_adapter_metadata":
                                               change(metadata["lora_adapter_metadata"])})


METADATA_DAMAGES = {  # how the LoRA settings in the adapter file get damaged -> what the refusal says
    "not json": (lambda text: text[:-2], "its lora_adapter_metadata is not a JSON object; the file was edited or "
                                         "damaged: copy it again from the run, or use another stepN"),
    "another rank": (lambda text: text.replace('"unet.r": 4', '"unet.r": 16'),
                     r"its lora_adapter_metadata gives unet rank 16, and its tensors have rank 4 \(e\.g\. unet\."),
    "a field peft lacks": (lambda text: json.dumps({**json.loads(text), "text_encoder.colour": "red"}),
                           r"its text_encoder settings in lora_adapter_metadata are no LoraConfig \(TypeError: "),
}


@pytest.mark.parametrize("damage", list(METADATA_DAMAGES))
def test_lora_settings_in_the_adapter_file_that_diffusers_cannot_build_are_refused_before_any_model_loads(
        damage, trained_run, tmp_path, no_model_loads):
    step = step_copy(trained_run, tmp_path)
    change, message = METADATA_DAMAGES[damage]
    with_metadata(step / LORA_FILE, change)
    with pytest.raises(UserError, match=message) as refused:
        infer.main(["--checkpoint", str(step), "--output", str(tmp_path / "out")])
    assert str(refused.value).startswith(f"{step / LORA_FILE}: ") and "\n" not in str(refused.value)


def test_the_adapters_of_every_kind_of_run_fit_their_own_base(trained_run, dora_run, tiny_model):
    # UNet and both text encoders, LoRA and DoRA (whose magnitudes are checked too)
    layers = rendering.base_layer_shapes(str(tiny_model), None)
    for step in [trained_run / "step3", dora_run / "step1"]:
        modules, unknown = rendering.adapter_shapes(step / LORA_FILE)
        assert unknown == [] and rendering.misfits(modules, layers) == []
        assert {component for component, _ in modules} == {"unet", "text_encoder", "text_encoder_2"}
    assert any("lora_magnitude_vector" in parts for parts in rendering.adapter_shapes(dora_run / "step1" / LORA_FILE)[0]
               .values())


def test_a_checkpoint_typed_as_dot_names_the_files_and_metadata_after_its_step_dir(trained_run, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.chdir(trained_run / "step3")
    [path] = infer.main(["--checkpoint", ".", "--num_inference_steps", "1", "--output", str(tmp_path)])
    assert path.name == "step3_seed0.png"
    assert f"Lora: {trained_run.name}/step3, " in Image.open(path).text["parameters"]
