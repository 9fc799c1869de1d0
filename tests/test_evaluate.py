"""evaluate.py: the paper's metrics by hand, prompts from PNG metadata, whole evaluations on the tiny model."""

import csv
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import evaluate
import infer
from dreambooth_kit import rendering
from conftest import ROOT, with_flags
from make_tiny_scorers import make_tiny_scorers
from test_infer import DAMAGES, SETTINGS_DAMAGES, help_by_flag, numeric_flags, other_base, step_copy  # noqa: F401
from dreambooth_kit.artifacts import LORA_FILE
from dreambooth_kit.checks import describe_range
from dreambooth_kit.messages import UserError


@pytest.fixture(scope="module")
def scorer_dirs(tiny_model, tmp_path_factory):
    return make_tiny_scorers(tmp_path_factory.mktemp("scorers"), tiny_model / "tokenizer")


@pytest.fixture(scope="module")
def scorers(scorer_dirs):
    return evaluate.Scorers(str(scorer_dirs[0]), str(scorer_dirs[1]), "cpu")


def scorer_flags(scorer_dirs):
    return ["--dino_model", str(scorer_dirs[0]), "--clip_model", str(scorer_dirs[1])]


@pytest.fixture(scope="module")
def evaluated(trained_run, photos, scorer_dirs, tmp_path_factory):
    """One evaluation of the trained tiny checkpoint with --baseline: 25 live prompts, 1 image each, 2 steps."""
    output_dir = tmp_path_factory.mktemp("eval") / "out"
    report = evaluate.main(["--checkpoint", str(trained_run / "step3"), "--instance_dir", str(photos),
                            "--class_noun", "dog", "--identifier", "sks", "--subject_kind", "live",
                            "--images_per_prompt", "1", "--num_inference_steps", "2", "--height", "64",
                            "--width", "64", "--seed", "3", "--baseline", "--output_dir", str(output_dir),
                            *scorer_flags(scorer_dirs)])
    return report, output_dir


# ---------------------------------------------------------------------------------------------------------
# The metrics, by hand
# ---------------------------------------------------------------------------------------------------------


def test_subject_fidelity_is_the_mean_cosine_over_all_generated_real_pairs():
    generated = torch.tensor([[3.0, 0.0], [0.0, 0.5]])  # lengths differ: only directions count
    real = torch.tensor([[1.0, 0.0], [2.0, 2.0], [0.0, -1.0]])
    # cosines: row 1 with the reals 1, 1/sqrt2, 0; row 2: 0, 1/sqrt2, -1
    expected = (1 + 1 / math.sqrt(2) + 0 + 0 + 1 / math.sqrt(2) - 1) / 6
    assert evaluate.subject_fidelity(generated, real) == pytest.approx(expected, abs=1e-12)


def test_prompt_fidelity_pairs_each_image_with_its_own_prompt_only():
    images = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    texts = torch.tensor([[1.0, 1.0], [0.0, 5.0]])
    assert evaluate.prompt_fidelity(images, texts) == pytest.approx((1 / math.sqrt(2) + 1) / 2, abs=1e-12)


def test_real_images_row_leaves_each_photo_out_of_its_own_pairs():
    real = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    expected = (1 / math.sqrt(2) + 0 + 1 / math.sqrt(2)) / 3  # the 3 distinct pairs, each counted both ways
    assert evaluate.real_pairs(real) == pytest.approx(expected, abs=1e-12)
    assert evaluate.real_pairs(real[:1]) is None


def test_an_image_compared_with_itself_scores_one(scorers, photos):
    image = Image.open(sorted(photos.iterdir())[0]).convert("RGB")
    embeddings = scorers.embed_images([image])
    assert evaluate.subject_fidelity(embeddings["DINO"], embeddings["DINO"]) == pytest.approx(1.0, abs=1e-6)
    assert evaluate.subject_fidelity(embeddings["CLIP-I"], embeddings["CLIP-I"]) == pytest.approx(1.0, abs=1e-6)
    overall, _ = evaluate.score_run(scorers, embeddings, [("a sks dog", [image, image])], "sks")
    assert (overall["DINO"], overall["CLIP-I"]) == (pytest.approx(1.0, abs=1e-6), pytest.approx(1.0, abs=1e-6))


def test_clip_t_scores_the_prompt_without_the_identifier(scorers, photos):
    image = Image.open(sorted(photos.iterdir())[0]).convert("RGB")
    overall, per_prompt = evaluate.score_run(scorers, scorers.embed_images([image]),
                                             [("a sks dog in the snow", [image])], "sks")
    assert per_prompt[0]["scored_prompt"] == "a dog in the snow"
    by_hand = evaluate.prompt_fidelity(scorers.embed_images([image])["CLIP-I"],
                                       scorers.embed_texts(["a dog in the snow"]))
    assert overall["CLIP-T"] == pytest.approx(by_hand, abs=1e-9)


@pytest.mark.parametrize("prompt, identifier, scored", [
    ("a sks dog in the snow", "sks", "a dog in the snow"),
    ("a red sks dog", "sks", "a red dog"),
    ("a  sks   dog", "sks", "a dog"),
    ("a sksy dog", "sks", "a sksy dog"),  # a word that merely contains the identifier stays
    ("a olis ohwx dog on the beach", "olis ohwx", "a dog on the beach"),
])
def test_identifier_is_removed_and_whitespace_collapsed(prompt, identifier, scored):
    assert evaluate.scored_prompt(prompt, identifier) == scored


def test_dreambench_prompts_fill_identifier_and_class_noun():
    live = evaluate.dreambench_prompts("live", "sks", "dog")
    objects = evaluate.dreambench_prompts("object", "sks", "backpack")
    assert len(live) == len(objects) == 25
    assert live[1] == "a sks dog in the snow" and "a sks dog wearing a santa hat" in live
    assert "a sks backpack with the Eiffel Tower in the background" in objects
    assert all("{" not in p for p in live + objects)


# ---------------------------------------------------------------------------------------------------------
# Prompts from PNG metadata
# ---------------------------------------------------------------------------------------------------------


def test_prompt_is_read_from_an_infer_py_render(trained_run, tmp_path):
    path = infer.main(["--checkpoint", str(trained_run / "step3"), "--prompt", "a sks dog in the jungle",
                       "--negative_prompt", "blurry", "--num_inference_steps", "2", "--output", str(tmp_path)])[0]
    assert evaluate.prompt_of(path) == "a sks dog in the jungle"
    assert evaluate.prompted_images(tmp_path) == {"a sks dog in the jungle": [path]}


def test_png_without_parameters_is_skipped_and_a_folder_of_them_refused(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "bare.png")
    with pytest.raises(UserError, match="no PNG in .* carries a `parameters` chunk"):
        evaluate.prompted_images(tmp_path)
    info = PngInfo()
    info.add_text("parameters", "a sks dog\nSteps: 2, Sampler: Euler, Seed: 0")
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png", pnginfo=info)
    assert evaluate.prompted_images(tmp_path) == {"a sks dog": [tmp_path / "good.png"]}
    err = capsys.readouterr().err
    assert "1 image in" in err and "carries no prompt and is not scored" in err and "bare.png" in err


# ---------------------------------------------------------------------------------------------------------
# Whole evaluations on the tiny checkpoint
# ---------------------------------------------------------------------------------------------------------


def test_end_to_end_writes_report_csv_and_contact_sheet(evaluated, photos, capsys):
    report, output_dir = evaluated
    on_disk = json.loads((output_dir / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert (report["num_images"], report["num_prompts"]) == (25, 25)
    for metric in evaluate.METRICS:
        assert -1 <= report[metric] <= 1
    assert report["instance_photos"]["num_images"] == len(evaluate.list_images(photos))
    assert report["paper_table_1"]["DreamBooth (Stable Diffusion)"]["DINO"] == 0.668
    assert report["settings"]["seeds"] == "image j of every prompt uses seed 3 + j"

    with open(output_dir / "per_prompt.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 25
    assert rows[1]["prompt"] == "a sks dog in the snow" and rows[1]["scored_prompt"] == "a dog in the snow"
    assert np.mean([float(r["DINO"]) for r in rows]) == pytest.approx(report["DINO"], abs=1e-5)

    sheet = Image.open(output_dir / "contact_sheet.png")
    assert sheet.height == 25 * (64 + evaluate.LABEL_HEIGHT)  # one row per prompt
    assert len(list((output_dir / "images").glob("prompt*_seed3.png"))) == 25


def test_each_image_is_the_picture_infer_py_gives_for_its_prompt_and_seed(evaluated, trained_run, tmp_path):
    _, output_dir = evaluated
    ours = output_dir / "images" / "prompt01_seed3.png"
    assert evaluate.prompt_of(ours) == "a sks dog in the snow"
    theirs = infer.main(["--checkpoint", str(trained_run / "step3"), "--prompt", "a sks dog in the snow",
                         "--seed", "3", "--num_inference_steps", "2", "--output", str(tmp_path)])[0]
    np.testing.assert_array_equal(np.asarray(Image.open(ours)), np.asarray(Image.open(theirs)))


def test_baseline_scores_the_base_model_on_the_same_prompts_and_seeds(evaluated):
    report, output_dir = evaluated
    assert report["baseline"]["num_images"] == 25
    assert report["baseline"] != {k: report[k] for k in report["baseline"]}, "the adapter changes the images"
    with open(output_dir / "per_prompt.csv", newline="") as f:
        assert {"baseline_DINO", "baseline_CLIP-I", "baseline_CLIP-T"} <= set(next(csv.DictReader(f)))
    base = output_dir / "baseline_images" / "prompt00_seed3.png"
    assert "Lora scale: 0.0" in Image.open(base).text["parameters"]
    assert Image.open(output_dir / "contact_sheet.png").width > 2 * 64  # trained and base model side by side


def test_images_mode_rescores_rendered_pngs_to_the_same_numbers(evaluated, photos, scorer_dirs, tmp_path):
    report, output_dir = evaluated
    rescored = evaluate.main(["--images", str(output_dir / "images"), "--instance_dir", str(photos),
                              "--output_dir", str(tmp_path), *scorer_flags(scorer_dirs)])
    for metric in evaluate.METRICS:
        assert rescored[metric] == pytest.approx(report[metric], abs=1e-9)
    assert (rescored["num_images"], rescored["num_prompts"], "baseline" in rescored) == (25, 25, False)
    assert rescored["settings"]["mode"] == "images"
    assert {p.name for p in tmp_path.iterdir()} == {"report.json", "per_prompt.csv", "contact_sheet.png"}


# ---------------------------------------------------------------------------------------------------------
# Mistakes: one line, before any model loads
# ---------------------------------------------------------------------------------------------------------


def test_bad_dino_model_is_one_line_error_before_anything_loads(trained_run, photos, scorer_dirs, tmp_path):
    output_dir = tmp_path / "out"
    result = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--checkpoint", str(trained_run / "step3"),
                             "--instance_dir", str(photos), "--class_noun", "dog", "--subject_kind", "live",
                             "--output_dir", str(output_dir), "--dino_model", str(tmp_path / "no-dino"),
                             "--clip_model", str(scorer_dirs[1])], capture_output=True, text=True)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: --dino_model {tmp_path / 'no-dino'} does not exist: "
                                                  "pass a local model folder or a hub id"]
    assert not output_dir.exists()


@pytest.mark.parametrize("case, message", [
    ("no_checkpoint", "is not a step dir"),
    ("empty_photos", "no images in"),
    ("both_modes", "pass either --checkpoint"),
    ("images_with_baseline", "--baseline renders the base model"),
    ("no_class_noun", "rendering needs --class_noun"),
    ("scorer_without_processor", "has no image processor (no preprocessor_config.json or processor_config.json"),
    ("images_without_prompts", "carries a `parameters` chunk"),
    ("scorer_is_a_file", "--clip_model {tmp}/afile is a file, not a model folder: pass a local model folder"),
    ("earlier_report", "{tmp}/out already holds an evaluation (report.json): choose another --output_dir, or pass "
                       "--overwrite_output_dir"),
])
def test_mistakes_are_refused_in_one_line(case, message, trained_run, photos, scorer_dirs, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bare").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "bare" / "x.png")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text(json.dumps({"model_type": "vit"}))  # a DINO without processor
    render = ["--checkpoint", str(trained_run / "step3"), "--class_noun", "dog", "--subject_kind", "live"]
    argv = {"no_checkpoint": ["--checkpoint", str(tmp_path / "nope"), "--class_noun", "dog", "--subject_kind", "live"],
            "empty_photos": render,
            "both_modes": [*render, "--images", str(tmp_path)],
            "images_with_baseline": ["--images", str(tmp_path), "--baseline"],
            "no_class_noun": ["--checkpoint", str(trained_run / "step3"), "--subject_kind", "live"],
            "scorer_without_processor": [*render, "--dino_model", str(tmp_path / "half")],
            "images_without_prompts": ["--images", str(tmp_path / "bare")],
            "scorer_is_a_file": [*render, "--clip_model", str(tmp_path / "afile")],
            "earlier_report": render}[case]
    (tmp_path / "afile").write_text("not a model")
    if case == "earlier_report":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "report.json").write_text("{}")
    photos_dir = tmp_path / "empty" if case == "empty_photos" else photos
    with pytest.raises(UserError, match=re.escape(message.format(tmp=tmp_path))):
        evaluate.main(with_flags(scorer_flags(scorer_dirs), *argv, "--instance_dir", str(photos_dir),
                                 "--output_dir", str(tmp_path / "out")))
    assert case == "earlier_report" or not (tmp_path / "out").exists()
    assert case != "earlier_report" or (tmp_path / "out" / "report.json").read_text() == "{}"


EVALUATE_BAD_NUMBERS = [("--images_per_prompt", "0"), ("--images_per_prompt", "-4"), ("--seed", "-1"),
                        ("--seed", str(2**64)), ("--num_inference_steps", "0"), ("--num_inference_steps", "-1"),
                        ("--guidance_scale", "nan"), ("--guidance_scale", "-inf"), ("--guidance_scale", "-1"),
                        ("--height", "-64"), ("--height", "12"), ("--width", "0"), ("--lora_scale", "nan"),
                        ("--prompts", "0"), ("--prompts", "26"), ("--clip_t_tolerance", "-0.01"),
                        ("--clip_t_tolerance", "inf")]


@pytest.mark.parametrize("flag, value", EVALUATE_BAD_NUMBERS)
def test_number_out_of_range_is_refused_with_the_flags(flag, value, tmp_path):
    with pytest.raises(UserError, match=f"^{flag} must be .* \\(got "):
        evaluate.parse_args(["--images", str(tmp_path), "--instance_dir", str(tmp_path), "--output_dir",
                             str(tmp_path / "out"), f"{flag}={value}"])


def test_help_shows_the_defaults(monkeypatch):
    shown = help_by_flag(evaluate.parser(), monkeypatch)
    for flag, default in [("--num_inference_steps", "50"), ("--guidance_scale", "5.0"), ("--images_per_prompt", "4"),
                          ("--seed", "0"), ("--identifier", "sks"), ("--dino_model", "facebook/dino-vits16")]:
        assert f"(default: {default})" in shown[flag]
    assert shown["--height"].endswith("default: the size the run validated at (its photos' most common), else 1024")


def test_every_numeric_flag_has_a_range_and_a_refusal_test():
    numeric = numeric_flags(evaluate.parser())  # the parser refuses a numeric flag declared without a range
    for action in evaluate.parser()._actions:
        if action.option_strings and action.option_strings[0] in numeric:
            assert describe_range(*action.range[:3]) in action.help, "--help states each flag's range"
    assert {flag for flag, _ in EVALUATE_BAD_NUMBERS} == numeric, "give a new flag a case in EVALUATE_BAD_NUMBERS"


@pytest.fixture
def no_model_loads(monkeypatch):
    """Loading the scorers or the base model fails the test: every check must come before them."""
    monkeypatch.setattr(evaluate, "Scorers", lambda *a, **k: pytest.fail("the scorers loaded first"))
    monkeypatch.setattr(rendering, "load_models", lambda *a, **k: pytest.fail("the base model loaded first"))


def render_argv(step, photos, scorer_dirs, output_dir):
    return ["--checkpoint", str(step), "--instance_dir", str(photos), "--class_noun", "dog", "--subject_kind", "live",
            "--output_dir", str(output_dir), *scorer_flags(scorer_dirs)]


@pytest.mark.parametrize("damage", ["truncated", "all nan"])
def test_damaged_adapter_file_is_refused_as_infer_py_refuses_it(damage, trained_run, photos, scorer_dirs, tmp_path,
                                                                 no_model_loads):
    step = step_copy(trained_run, tmp_path)
    apply_damage, message = DAMAGES[damage]
    apply_damage(step / LORA_FILE)
    with pytest.raises(UserError, match=message):
        evaluate.main(render_argv(step, photos, scorer_dirs, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["not json", "resolution abc"])
def test_damaged_run_settings_are_refused_as_infer_py_refuses_them(damage, trained_run, photos, scorer_dirs, tmp_path,
                                                                    no_model_loads):
    step = step_copy(trained_run, tmp_path)
    apply_damage, message = SETTINGS_DAMAGES[damage]
    apply_damage(step)
    with pytest.raises(UserError, match=message):
        evaluate.main(render_argv(step, photos, scorer_dirs, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_unreadable_pngs_are_named_in_one_line_before_the_scorers_load(photos, scorer_dirs, tmp_path, no_model_loads):
    info = PngInfo()
    info.add_text("parameters", "a sks dog\nSteps: 2, Sampler: Euler, Seed: 0")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    noise.save(tmp_path / "good.png", pnginfo=info)
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
    (tmp_path / "garbage.png").write_bytes(b"not a png at all")
    with pytest.raises(UserError) as refused:
        evaluate.main(["--images", str(tmp_path), "--instance_dir", str(photos), "--output_dir",
                       str(tmp_path / "out"), *scorer_flags(scorer_dirs)])
    assert str(refused.value) == (f"2 unreadable PNG images in {tmp_path}: cut.png (OSError), garbage.png "
                                  "(UnidentifiedImageError); remove or re-export them")


@pytest.mark.parametrize("flag", ["--output_dir", "--identifier", "--instance_dir"])
def test_an_empty_value_is_refused_not_read_as_the_current_folder(flag, tmp_path):
    argv = with_flags(["--images", str(tmp_path), "--instance_dir", str(tmp_path), "--output_dir", str(tmp_path)],
                      flag, "")
    with pytest.raises(UserError, match=f"^{flag} is empty: pass "):
        evaluate.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------
# A whole run: every step beside the base model, the curve, the recommended step
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_step_run(tiny_model, photos, tmp_path_factory):
    """A run with three checkpoints, step0 to step2, at a learning rate high enough to move the renders."""
    from conftest import run_trainer, tiny_args

    output_dir = tmp_path_factory.mktemp("run3") / "out"
    run_trainer(*tiny_args(tiny_model, photos, output_dir, "--max_train_steps", 3, "--checkpointing_steps", 1,
                           "--optimizer", "adamw", "--learning_rate", 3e-2))
    return output_dir


def run_argv(run, photos, scorer_dirs, output_dir, *extra):
    """A quick run evaluation: 3 prompts, one image each, 2 denoising steps."""
    return with_flags(["--checkpoint", str(run), "--instance_dir", str(photos), "--class_noun", "dog", "--identifier",
                       "sks", "--subject_kind", "live", "--prompts", "3", "--images_per_prompt", "1",
                       "--num_inference_steps", "2", "--output_dir", str(output_dir), *scorer_flags(scorer_dirs)],
                      *extra)


def copy_run(run, folder, steps):
    """A copy of the run's step dirs named in steps (and its model card), as a run part-way through would hold."""
    import shutil

    folder.mkdir(parents=True)
    shutil.copyfile(run / "README.md", folder / "README.md")
    for step in steps:
        shutil.copytree(run / step, folder / step)
    return folder


def rendered_columns(monkeypatch):
    """The names of the columns evaluate.py renders from here on."""
    names, real = [], evaluate.render_prompts

    def render_prompts(pipe, render, prompts, folder, name):
        names.append(name)
        return real(pipe, render, prompts, folder, name)
    monkeypatch.setattr(evaluate, "render_prompts", render_prompts)
    return names


@pytest.fixture(scope="module")
def run_evaluated(three_step_run, photos, scorer_dirs, tmp_path_factory):
    """The three-step run evaluated into a folder of its own copy, as `--output_dir RUN/eval` would be."""
    run = copy_run(three_step_run, tmp_path_factory.mktemp("run3eval") / "run", ["step0", "step1", "step2"])
    report = evaluate.main(run_argv(run, photos, scorer_dirs, run / "eval"))
    return report, run


def test_a_run_gives_a_curve_row_per_step_plus_the_base_model(run_evaluated):
    report, run = run_evaluated
    with open(run / "eval" / "curve.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["base", "0", "1", "2"]
    assert [float(r["DINO"]) for r in rows] == pytest.approx(
        [report["base_model"]["DINO"], *(s["DINO"] for s in report["steps"])], abs=1e-6)
    assert all(r["num_images"] == "3" for r in rows), "3 prompts x 1 image in every row"
    assert len({r["CLIP-T"] for r in rows}) > 1, "the steps render differently from the base model"
    with Image.open(run / "eval" / "curve.png") as curve:
        assert curve.format == "PNG" and curve.width > 600
    sheet = Image.open(run / "eval" / "contact_sheet.png")  # 3 prompts (rows) x base + 3 steps (columns)
    assert sheet.height == 3 * (64 + evaluate.LABEL_HEIGHT) and sheet.width >= 4 * 64
    assert report["settings"]["dreambench_indices"] == [0, 10, 20]
    assert report["settings"]["prompt_subset"].startswith("--prompts 3: one of each kind in turn")


def test_the_recommended_step_follows_the_stated_rule(run_evaluated, capsys):
    report, run = run_evaluated
    assert report["recommended_step"] == evaluate.recommend(report["steps"], report["base_model"], 0.02)
    assert report["rule"] == evaluate.RECOMMENDATION_RULE and report["clip_t_tolerance"] == 0.02
    if report["recommended_step"] is not None:
        assert f"infer.py --checkpoint {run.resolve()}/step{report['recommended_step']} --prompt" in \
            report["recommendation"]


def test_each_column_is_what_infer_py_renders_for_that_step(run_evaluated, tmp_path):
    """The adapters are swapped between steps, and the base column is the adapters at scale 0."""
    _, run = run_evaluated
    for column, step, scale in [("step1", "step1", "1"), ("step2", "step2", "1"), ("base", "step0", "0")]:
        theirs = infer.main(["--checkpoint", str(run / step), "--prompt", "a sks dog wearing a red hat",
                             "--num_inference_steps", "2", "--lora_scale", scale,
                             "--output", str(tmp_path / column)])[0]
        ours = run / "eval" / column / "prompt10_seed0.png"
        np.testing.assert_array_equal(np.asarray(Image.open(ours)), np.asarray(Image.open(theirs)))


def test_the_model_card_shows_the_curve_and_the_recommended_step_once(run_evaluated, photos, scorer_dirs):
    report, run = run_evaluated
    evaluate.main(run_argv(run, photos, scorer_dirs, run / "eval"))  # again: the section is replaced, not added
    card = (run / "README.md").read_text()
    assert card.count("## Which step to keep") == 1 and "![curve](eval/curve.png)" in card
    step = report["recommended_step"]
    assert (f"Recommended: `step{step}`" if step is not None else "No step recommended") in card
    assert card.index("## Which step to keep") < card.index("## Use it")


def test_rerunning_after_one_more_checkpoint_renders_only_the_new_step(three_step_run, photos, scorer_dirs, tmp_path,
                                                                       monkeypatch):
    import shutil

    run = copy_run(three_step_run, tmp_path / "run", ["step0", "step1"])
    rendered = rendered_columns(monkeypatch)
    first = evaluate.main(run_argv(run, photos, scorer_dirs, tmp_path / "eval", "--prompts", "2"))
    assert rendered == ["base", "step0", "step1"]
    shutil.copytree(three_step_run / "step2", run / "step2")  # training went on
    rendered.clear()
    second = evaluate.main(run_argv(run, photos, scorer_dirs, tmp_path / "eval", "--prompts", "2"))
    assert rendered == ["step2"]
    assert second["steps"][:2] == first["steps"] and second["base_model"] == first["base_model"]
    assert [s["step"] for s in second["steps"]] == [0, 1, 2]


def test_renders_made_with_other_settings_are_not_replaced_silently(three_step_run, photos, scorer_dirs, tmp_path,
                                                                    no_model_loads):
    run = copy_run(three_step_run, tmp_path / "run", ["step0"])
    (tmp_path / "eval" / "base").mkdir(parents=True)
    earlier = {"num_inference_steps": 50, "prompts": [[0, "a sks dog in the jungle"]]}
    (tmp_path / "eval" / "base" / evaluate.RENDER_FILE).write_text(json.dumps(earlier))
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'eval' / 'base'} holds renders made with another ")):
        evaluate.main(run_argv(run, photos, scorer_dirs, tmp_path / "eval"))
    assert json.loads((tmp_path / "eval" / "base" / evaluate.RENDER_FILE).read_text()) == earlier


@pytest.mark.parametrize("extra, message", [
    (["--steps", "1,7"], "--steps: {run} has no step7 with adapters; it has step0, step1, step2"),
    (["--steps", "1,x"], "--steps must be step numbers separated by commas, e.g. 199,299 (got '1,x')"),
    (["--steps", "2,2"], "--steps names a step twice (2,2): name each once"),
])
def test_steps_that_are_not_in_the_run_are_refused_before_anything_loads(extra, message, three_step_run, photos,
                                                                         scorer_dirs, tmp_path, no_model_loads):
    with pytest.raises(UserError, match=re.escape(message.format(run=three_step_run))):
        evaluate.main(run_argv(three_step_run, photos, scorer_dirs, tmp_path / "out", *extra))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [
    (["--steps", "1"], "--steps is for a run folder, and {run}/step1 is one step dir: pass its run folder, {run}"),
    (["--clip_t_tolerance", "0.1"], "--clip_t_tolerance is for a run folder, and {run}/step1 is one step dir"),
])
def test_run_flags_beside_a_step_dir_are_refused(extra, message, three_step_run, photos, scorer_dirs, tmp_path,
                                                 no_model_loads):
    with pytest.raises(UserError, match=re.escape(message.format(run=three_step_run))):
        evaluate.main(run_argv(three_step_run / "step1", photos, scorer_dirs, tmp_path / "out", *extra))


@pytest.mark.parametrize("flag, value", [("--prompts", "3"), ("--steps", "1"), ("--clip_t_tolerance", "0.1")])
def test_render_flags_beside_images_are_refused(flag, value, tmp_path):
    with pytest.raises(UserError, match=f"^{flag} says what to render, and --images renders nothing"):
        evaluate.parse_args(["--images", str(tmp_path), "--instance_dir", str(tmp_path), "--output_dir",
                             str(tmp_path / "out"), flag, value])


@pytest.mark.parametrize("where", ["run", "step"])
def test_the_run_folder_and_its_step_dirs_are_no_output_dir(where, three_step_run, photos, scorer_dirs, tmp_path,
                                                            no_model_loads):
    output_dir = three_step_run if where == "run" else three_step_run / "step1"
    with pytest.raises(UserError, match=f"--output_dir {output_dir} is the run folder or one of its step dirs: pass "
                                        f"a folder of its own, e.g. {three_step_run / 'eval'}"):
        evaluate.main(run_argv(three_step_run, photos, scorer_dirs, output_dir))
    assert sorted(p.name for p in (three_step_run / "step1").iterdir()) == sorted(
        p.name for p in (three_step_run / "step0").iterdir()), "nothing was written into a step dir"


def test_a_folder_without_steps_is_neither_a_step_dir_nor_a_run(photos, scorer_dirs, tmp_path, no_model_loads):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty is not a step dir .* and holds no stepN dirs: pass a step dir"):
        evaluate.main(run_argv(tmp_path / "empty", photos, scorer_dirs, tmp_path / "out"))


def test_a_single_step_evaluation_folder_is_not_mixed_with_a_run_evaluation(three_step_run, photos, scorer_dirs,
                                                                            tmp_path, no_model_loads):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "report.json").write_text(json.dumps({"DINO": 0.5}))
    with pytest.raises(UserError, match="already holds another evaluation"):
        evaluate.main(run_argv(three_step_run, photos, scorer_dirs, tmp_path / "out"))


def scores(step, dino, clip_t):
    return {"step": step, "DINO": dino, "CLIP-I": 0.5, "CLIP-T": clip_t, "num_images": 4}


@pytest.mark.parametrize("table, tolerance, expected", [
    # the highest DINO among steps whose CLIP-T stays within the tolerance of the base model's 0.30
    ([(99, 0.40, 0.30), (199, 0.55, 0.29), (299, 0.70, 0.25)], 0.02, 199),
    # ties: the earliest of the best
    ([(99, 0.60, 0.30), (199, 0.60, 0.29), (299, 0.50, 0.30)], 0.02, 99),
    # exactly at the floor (0.30 - 0.02) counts as within
    ([(99, 0.40, 0.30), (199, 0.65, 0.28)], 0.02, 199),
    # no step within the tolerance: no recommendation
    ([(99, 0.60, 0.20), (199, 0.70, 0.10)], 0.02, None),
    # tolerance 0: only steps at least as prompt-faithful as the base model
    ([(99, 0.60, 0.31), (199, 0.70, 0.2999)], 0.0, 99),
    # a wide tolerance: simply the highest DINO
    ([(99, 0.60, 0.31), (199, 0.70, 0.10)], 1.0, 199),
])
def test_recommendation_rule_on_hand_made_score_tables(table, tolerance, expected):
    steps = [scores(*row) for row in table]
    assert evaluate.recommend(steps, scores(None, 0.3, 0.30), tolerance) == expected


def test_no_recommendation_names_the_closest_step_and_what_to_change(tmp_path):
    steps = [scores(99, 0.6, 0.20), scores(199, 0.7, 0.10)]
    line = evaluate.recommendation_line(None, steps, scores(None, 0.3, 0.30), 0.02, tmp_path, "a sks dog")
    assert line.startswith("no recommended step: every step's CLIP-T is more than 0.02 below the base model's 0.300")
    assert "step99, has 0.200" in line and "train fewer steps or at a lower learning rate" in line


def test_prompt_subsets_spread_over_the_kinds_and_grow_by_one():
    assert evaluate.prompt_subset("live", 3) == [0, 10, 20]  # recontextualization, accessorization, property
    assert evaluate.prompt_subset("object", 4) == [0, 20, 1, 21]
    assert evaluate.prompt_subset("live", None) == list(range(25))
    assert sorted(evaluate.prompt_subset("object", 25)) == list(range(25))
    for kind in ("live", "object"):
        for k in range(1, 25):
            assert evaluate.prompt_subset(kind, k + 1)[:k] == evaluate.prompt_subset(kind, k)


def test_a_run_without_matplotlib_is_refused_in_one_line_before_anything_loads(three_step_run, photos, scorer_dirs,
                                                                              tmp_path, monkeypatch, no_model_loads):
    from test_cli import fake_versions

    fake_versions(monkeypatch, matplotlib=None)
    with pytest.raises(UserError, match="^matplotlib is not installed: run pip install -r requirements.txt$"):
        evaluate.main(run_argv(three_step_run, photos, scorer_dirs, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------
# Mismatches: scorers of the wrong kind, steps of another base model; named before anything loads
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag, folder, message", [
    ("--dino_model", "clip", "--dino_model {folder} holds a clip model (model_type 'clip' in its config.json), and "
                             "--dino_model needs a DINO ViT such as facebook/dino-vits16: pass one; it is what "
                             "--clip_model takes: did you swap the two?"),
    ("--clip_model", "dino", "--clip_model {folder} holds a vit model (model_type 'vit' in its config.json), and "
                             "--clip_model needs a CLIP model with its text tower, such as "
                             "openai/clip-vit-base-patch32: pass one; it is what --dino_model takes"),
    ("--clip_model", "unet", "--clip_model {folder} holds no transformers model (its config.json names no model_type; "
                             "it is for UNet2DConditionModel), and --clip_model needs a CLIP model"),
])
def test_a_scorer_of_the_wrong_kind_is_refused_naming_what_its_folder_holds(flag, folder, message, trained_run, photos,
                                                                            scorer_dirs, tiny_model, tmp_path,
                                                                            no_model_loads):
    folder = {"dino": scorer_dirs[0], "clip": scorer_dirs[1], "unet": tiny_model / "unet"}[folder]
    argv = with_flags(render_argv(trained_run / "step3", photos, scorer_dirs, tmp_path / "out"), flag, str(folder))
    with pytest.raises(UserError, match=re.escape(message.format(folder=folder))):
        evaluate.main(argv)
    assert not (tmp_path / "out").exists()


def test_a_step_evaluated_on_another_base_model_is_refused_naming_its_own(trained_run, tiny_model, other_base, photos,
                                                                         scorer_dirs, tmp_path, no_model_loads):
    argv = [*render_argv(trained_run / "step3", photos, scorer_dirs, tmp_path / "out"),
            "--pretrained_model_name_or_path", str(other_base)]
    with pytest.raises(UserError, match=re.escape(f"were trained on {tiny_model} (recorded in ")
                       + f".*: pass --pretrained_model_name_or_path {re.escape(str(tiny_model))}, or leave it out$"):
        evaluate.main(argv)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def other_base_run(other_base, photos, tmp_path_factory):
    """A one-step run on the other, wider base model."""
    from conftest import run_trainer, tiny_args

    output_dir = tmp_path_factory.mktemp("wide_run") / "out"
    run_trainer(*tiny_args(other_base, photos, output_dir, "--max_train_steps", 1, "--optimizer", "adamw"))
    return output_dir


def test_a_run_whose_steps_come_from_two_base_models_is_refused_before_anything_loads(
        three_step_run, other_base_run, tiny_model, other_base, photos, scorer_dirs, tmp_path, no_model_loads):
    import shutil

    run = copy_run(three_step_run, tmp_path / "run", ["step0", "step1"])
    shutil.copytree(other_base_run / "step0", run / "step2")  # a second run written into the same folder
    with pytest.raises(UserError, match=re.escape(
            f"the steps of {run} come from 2 base models (step0, step1 from {tiny_model}; step2 from {other_base}): "
            "pass --steps 2 (the newest step's base), or evaluate each step dir on its own")):
        evaluate.main(run_argv(run, photos, scorer_dirs, tmp_path / "out"))
    with pytest.raises(UserError, match=re.escape(f"the adapters in {run / 'step2'} were trained on {other_base}")):
        evaluate.main(run_argv(run, photos, scorer_dirs, tmp_path / "out", "--steps", "2",
                               "--pretrained_model_name_or_path", str(tiny_model)))
    assert not (tmp_path / "out").exists()
