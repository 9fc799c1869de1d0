#!/usr/bin/env python
"""Score a DreamBooth checkpoint with the paper's protocol: DINO, CLIP-I and CLIP-T on DreamBench's prompts.

    python evaluate.py --checkpoint work_dirs/<run>/step499 --instance_dir dog/ --class_noun dog \
        --identifier sks --subject_kind live --output_dir work_dirs/<run>/eval-step499

Reads as the protocol does (Ruiz et al., "DreamBooth", CVPR 2023):
  dreambench_prompts  the 25 object or 25 live-subject prompts, filled with the identifier and class noun
  load_scorers        DINO ViT-S/16 and CLIP, loaded (and so checked) before the much larger SSD-1B
  render_prompts      --images_per_prompt images per prompt through infer.py's code; image j uses seed --seed + j
  score_run           DINO and CLIP-I: the mean cosine over every (generated, real photo) pair;
                      CLIP-T: each image against its prompt with the identifier removed
  write               report.json, per_prompt.csv, contact_sheet.png; a table beside the paper's Table 1

--images DIR scores existing PNGs instead, each under the prompt in its `parameters` chunk (which infer.py and
this script write). --baseline also renders the base model (the adapter at scale 0, as `infer.py --lora_scale 0`)
on the same prompts and seeds, so the gain from training is visible.

Which step to keep: --checkpoint work_dirs/<run> (the run folder) scores every stepN in it (or --steps 199,299)
and the base model, on the same prompts and seeds, and writes curve.csv, curve.png, a contact sheet of prompts
across steps, and a recommended step (RECOMMENDATION_RULE). Each step's renders are kept with what they were made
with: rerun it as training goes on, and only new steps render. --prompts K renders a fixed subset of K prompts.
"""

import argparse
import csv
import dataclasses
import io
import json
import sys
from pathlib import Path

from dreambooth_kit.checks import (CURVE_PACKAGES, INF, ArgumentParser, add_render_flags, answer_before_libraries,
                                   check_render_numbers, check_versions, refuse_empty)
from dreambooth_kit.artifacts import (LORA_FILE, file_sha256, finished_adapters, looks_like_hub_id, save_png_atomic,
                                      step_of, write_text_atomic)
from dreambooth_kit.messages import UserError, agree, counted, quiet_library_notices, warn
from dreambooth_kit.imaging import check_images, list_images, load_image

DREAMBENCH = Path(__file__).resolve().parent / "dreambench_prompts.json"
METRICS = ["DINO", "CLIP-I", "CLIP-T"]
PROMPT_LISTS = {"object": "object_prompts", "live": "live_subject_prompts"}  # --subject_kind -> DreamBench's list
PAPER_COLUMNS = ["DreamBooth (Stable Diffusion)", "Real Images"]  # the rows of Table 1 a reader compares with
# the image processor's settings: preprocessor_config.json on the hub, processor_config.json when a whole
# processor was saved with transformers 5
PROCESSOR_FILES = ["preprocessor_config.json", "processor_config.json"]
EMBED_BATCH = 16  # images per scorer forward pass: small enough for any GPU, and for CPU memory
CELL = 256  # side of one image on the contact sheet
LABEL_HEIGHT = 14  # the strip above each row of the contact sheet that names its prompt
# DreamBench's prompts by kind, as its lists are ordered. --prompts K takes one of each kind in turn, each kind in
# list order, so that any K spreads over the kinds: K = 3 (live) is the jungle, the red hat and "a red ...".
PROMPT_KINDS = {"object": [("recontextualization", range(0, 20)), ("property modification", range(20, 25))],
                "live": [("recontextualization", range(0, 10)), ("accessorization", range(10, 20)),
                         ("property modification", range(20, 25))]}
RECOMMENDATION_RULE = ("the step with the highest DINO among those whose CLIP-T is at least the base model's minus "
                       "--clip_t_tolerance; the earliest of equals; none when no step keeps CLIP-T that high")
RENDER_FILE = "render.json"  # in each column's folder of a run evaluation: what its images were made with
SHEET_PROMPTS = 4  # rows of a run's contact sheet: the first prompts of the subset, so they spread over the kinds
# --clip_t_tolerance's default, a judgement: under half the CLIP-T gap between DreamBooth and Textual Inversion in
# the paper's Table 1 (0.305 against 0.255), the gap between a method that follows prompts and one that does less
CLIP_T_TOLERANCE = 0.02


def parser():
    p = ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_argument_group("what to score")
    g.add_argument("--checkpoint", default=None, help="a step dir, e.g. work_dirs/<run>/step499: render and score "
                   "it; or a run folder, e.g. work_dirs/<run>: score every stepN and the base model, draw the curve "
                   "and recommend a step")
    g.add_argument("--steps", default=None, help="with a run folder: only these steps, e.g. 199,299; default: every "
                   "stepN in it")
    g.add_argument("--images", default=None, help="a folder of PNGs with `parameters` chunks: score them as they are "
                   "(instead of --checkpoint)")
    g.add_argument("--instance_dir", required=True, help="the subject's real photos: a folder or a hub dataset id")
    g.add_argument("--class_noun", default=None, help="e.g. dog; fills {1} of the prompts (needed to render)")
    g.add_argument("--identifier", default="sks", help="fills {0} of the prompts; removed before CLIP-T")
    g.add_argument("--subject_kind", choices=["object", "live"], default=None,
                   help="which DreamBench prompt list: 'live' for pets, 'object' for everything else (needed to "
                        "render)")
    g.add_argument("--baseline", action="store_true", help="also render and score the base model, adapter off")
    g.add_argument("--output_dir", required=True, help="report.json, per_prompt.csv, contact_sheet.png, images/")
    g.add_argument("--overwrite_output_dir", action="store_true", help="replace an earlier evaluation there")

    g = p.add_argument_group("rendering (as infer.py; --device is the scorers' too)")
    g.add_argument("--images_per_prompt", type=int, default=4, help="image j of every prompt uses seed + j",
                   range=(1, INF, "[)", 4))
    g.add_argument("--prompts", type=int, default=None, help="render only K of the 25 DreamBench prompts, a fixed "
                   "subset spread over the kinds of prompt (docs/evaluation.md); default: all 25",
                   range=(1, 25, "[]", 5))  # DreamBench has 25 prompts per kind of subject
    g.add_argument("--clip_t_tolerance", type=float, default=None, help="with a run folder: how far below the base "
                   f"model's CLIP-T the recommended step may be; default: {CLIP_T_TOLERANCE}",
                   range=(0, INF, "[)", CLIP_T_TOLERANCE))
    add_render_flags(g)

    g = p.add_argument_group("scorers (hub ids or local folders)")
    g.add_argument("--dino_model", default="facebook/dino-vits16", help="DINO ViT-S/16, as in the paper")
    g.add_argument("--clip_model", default="openai/clip-vit-base-patch32",
                   help="the paper names no CLIP variant; ViT-B/32 is what DreamBench re-evaluations use")
    return p


# Text flags where an empty value is a mistake (an empty path is the current folder) -> what to pass instead
EMPTY_FIXES = {"checkpoint": "a step dir, e.g. work_dirs/<run>/step499", "images": "a folder of rendered PNGs",
               "instance_dir": "the folder of the subject's photos", "output_dir": "a folder for the report",
               "identifier": "the rare token of the instance prompt, e.g. sks", "class_noun": "the class, e.g. dog"}


def parse_args(argv=None):
    args = parser().parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    """Every check of the flags on their own, in one place; raises UserError naming the fix."""
    refuse_empty(args, EMPTY_FIXES)
    if bool(args.checkpoint) == bool(args.images):
        raise UserError("pass either --checkpoint STEP_DIR (render and score) or --images DIR (score existing PNGs)")
    if args.images and args.baseline:
        raise UserError("--baseline renders the base model, so it needs --checkpoint; to score an earlier "
                        "baseline, pass --images OUTPUT_DIR/baseline_images")
    if args.checkpoint and not (args.class_noun and args.subject_kind):
        raise UserError("rendering needs --class_noun (e.g. dog) and --subject_kind (live for pets, else object)")
    check_render_numbers(args, "images_per_prompt")  # as infer.py's, so the two scripts refuse alike
    for flag in ("steps", "prompts", "clip_t_tolerance"):
        if args.images and getattr(args, flag) is not None:
            raise UserError(f"--{flag} says what to render, and --images renders nothing: pass --checkpoint instead")
    step_numbers(args.steps)


def step_numbers(text):
    """--steps '199,299' -> [199, 299]; None -> None."""
    if text is None:
        return None
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in parts):
        raise UserError(f"--steps must be step numbers separated by commas, e.g. 199,299 (got {text!r})")
    numbers = [int(part) for part in parts]
    if len(set(numbers)) < len(numbers):
        raise UserError(f"--steps names a step twice ({text}): name each once")
    return sorted(numbers)


# ----------------------------------------------------------------------------------------------------------
# The libraries: imported below the flags, so that a script run answers --help and a mistyped flag at once, not
# after the seconds torch, diffusers and transformers take to import
# ----------------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    answer_before_libraries(parse_args)

import huggingface_hub  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageDraw, ImageOps  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from dreambooth_kit.rendering import (base_layer_shapes, check_adapters_fit, load_pipeline, pick_device,  # noqa: E402
                                   read_settings, render_images, resolve, same_model, trained_base)
from dreambooth_kit.model_card import infer_command, set_card_evaluation  # noqa: E402
from dreambooth_kit.pipeline import (apply_adapters, check_model_source, read_json_config,  # noqa: E402
                                     resolve_instance_dir, set_lora_scale)


# ----------------------------------------------------------------------------------------------------------
# Inputs: checked before any model loads
# ----------------------------------------------------------------------------------------------------------


def dreambench_prompts(subject_kind, identifier, class_noun):
    """DreamBench's 25 prompts for this kind of subject, with {0} the identifier and {1} the class noun."""
    bench = json.loads(DREAMBENCH.read_text())
    return [p.format(identifier, class_noun) for p in bench[PROMPT_LISTS[subject_kind]]]


def prompt_subset(subject_kind, count):
    """The DreamBench indices --prompts K renders: one of each kind in turn (PROMPT_KINDS), each kind in list
    order; every prompt, in list order, when no K is given."""
    if count is None:
        return list(range(25))
    queues = [list(indices) for _, indices in PROMPT_KINDS[subject_kind]]
    order = []
    while len(order) < count:
        order += [queue.pop(0) for queue in queues if queue][:count - len(order)]
    return order


def chosen_prompts(args):
    """[(DreamBench index, prompt)] to render: --prompts K of them, or all 25."""
    prompts = dreambench_prompts(args.subject_kind, args.identifier, args.class_noun)
    return [(i, prompts[i]) for i in prompt_subset(args.subject_kind, args.prompts)]


def scored_prompt(prompt, identifier):
    """The prompt CLIP-T sees: the identifier's words taken out, so 'a sks dog' is scored as 'a dog'."""
    words, rare = prompt.split(), identifier.split()
    kept, i = [], 0
    while i < len(words):
        if rare and words[i:i + len(rare)] == rare:
            i += len(rare)
        else:
            kept.append(words[i])
            i += 1
    return " ".join(kept)


def instance_photos(instance_dir):
    """The subject's real photos, every one readable, or a UserError that names the bad ones."""
    folder = resolve_instance_dir(instance_dir)
    photos = list_images(folder)
    if not photos:
        raise UserError(f"no images in {folder}: pass --instance_dir the subject's photos the run was trained on")
    check_images(photos, "instance", 0)
    return photos


def prompt_of(path):
    """The prompt in a PNG's A1111 `parameters` chunk: the lines before 'Negative prompt:' or 'Steps:'."""
    with Image.open(path) as image:
        text = getattr(image, "text", {}).get("parameters")
    if not text:
        return None
    lines = []
    for line in text.split("\n"):
        if line.startswith(("Negative prompt:", "Steps: ")):
            break
        lines.append(line)
    return "\n".join(lines).strip() or None


def prompted_images(folder):
    """{prompt: [PNG paths]} of a folder, prompts in file-name order; PNGs without a prompt are skipped."""
    if not Path(folder).is_dir():
        raise UserError(f"--images {folder} is not a folder")
    pngs = [path for path in list_images(folder) if path.suffix.lower() == ".png"]
    if pngs:
        check_images(pngs, "PNG", 0)  # name every unreadable one now, not one traceback after the scorers load
    groups, skipped = {}, []
    for path in list_images(folder):
        prompt = prompt_of(path) if path.suffix.lower() == ".png" else None
        if prompt is None:
            skipped.append(path.name)
        else:
            groups.setdefault(prompt, []).append(path)
    if not groups:
        raise UserError(f"no PNG in {folder} carries a `parameters` chunk with its prompt: render with infer.py "
                        "or evaluate.py, which write it")
    if skipped:
        warn(f"{counted(len(skipped), 'image')} in {folder} {agree(len(skipped), 'carries', 'carry')} no prompt and "
             f"{agree(len(skipped), 'is', 'are')} not scored: {', '.join(skipped)}")
    return groups


# What each scorer flag loads, by the model_type of its config.json: DINO's metric is a ViT's CLS token (DINO v1
# is model_type vit; v2 and v3 have their own), CLIP's needs CLIPModel's image and text towers together
SCORER_TYPES = {"--dino_model": ({"vit", "dinov2", "dinov2_with_registers", "dinov3_vit"},
                                 "a DINO ViT such as facebook/dino-vits16"),
                "--clip_model": ({"clip"}, "a CLIP model with its text tower, such as openai/clip-vit-base-patch32")}


def check_scorer(name, flag):
    """A scorer is a transformers model folder (config and image processor) or a hub id that answers, of the
    kind its flag needs."""
    folder = Path(name)
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise UserError(f"{flag} {name} is not a transformers model folder (no config.json in it)")
        check_scorer_type(name, flag, read_json_config(folder / "config.json", flag, name))
        if not any((folder / f).is_file() for f in PROCESSOR_FILES):
            raise UserError(f"{flag} {name} has no image processor (no {' or '.join(PROCESSOR_FILES)} in it): "
                            "save the model's processor into it too")
    elif folder.exists():
        raise UserError(f"{flag} {name} is a file, not a model folder: pass a local model folder or a hub id")
    elif not looks_like_hub_id(name):
        raise UserError(f"{flag} {name} does not exist: pass a local model folder or a hub id")
    else:
        check_model_source(name, "config.json", flag)
        config_file = Path(huggingface_hub.hf_hub_download(name, "config.json"))  # fetched just now, or cached
        check_scorer_type(name, flag, read_json_config(config_file, flag, config_file.parent))


def check_scorer_type(name, flag, config):
    """The model its config.json describes is the kind the flag needs: another kind loads, then fails in its first
    forward pass, or scores with a tower it lacks."""
    kinds, needs = SCORER_TYPES[flag]
    kind = config.get("model_type") if isinstance(config.get("model_type"), str) else None
    if kind in kinds:
        return
    holds = (f"a {kind} model (model_type {kind!r} in its config.json)" if kind else
             f"no transformers model (its config.json names no model_type"
             + (f"; it is for {config['_class_name']}" if isinstance(config.get("_class_name"), str) else "") + ")")
    other = next(other for other in SCORER_TYPES if other != flag)
    swapped = f"; it is what {other} takes: did you swap the two?" if kind in SCORER_TYPES[other][0] else ""
    raise UserError(f"{flag} {name} holds {holds}, and {flag} needs {needs}: pass one{swapped}")


def make_output_dir(output_dir, overwrite):
    """The folder for the report, made if missing; one that holds an earlier evaluation is not replaced silently."""
    if (Path(output_dir) / "report.json").is_file() and not overwrite:
        raise UserError(f"{output_dir} already holds an evaluation (report.json): choose another --output_dir, or "
                        "pass --overwrite_output_dir to replace it")
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --output_dir {output_dir} ({e.strerror}): pass a writable folder") from None
    return Path(output_dir)


# ----------------------------------------------------------------------------------------------------------
# Scorers: DINO and CLIP embeddings
# ----------------------------------------------------------------------------------------------------------


class Scorers:
    """DINO ViT (CLS token) and CLIP (projected image and text embeddings), frozen, in fp32 on one device."""

    def __init__(self, dino_model, clip_model, device):
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel

        self.device = device
        try:
            # DINO's checkpoints hold no pooler: without add_pooling_layer=False, ViTModel adds a random one
            vit = {"add_pooling_layer": False} if AutoConfig.from_pretrained(dino_model).model_type == "vit" else {}
            self.dino = AutoModel.from_pretrained(dino_model, **vit).to(device).eval()
            self.dino_processor = AutoImageProcessor.from_pretrained(dino_model)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"cannot load --dino_model {dino_model} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]})") from None
        try:
            self.clip = CLIPModel.from_pretrained(clip_model).to(device).eval()
            self.clip_processor = AutoImageProcessor.from_pretrained(clip_model)
            self.clip_tokenizer = AutoTokenizer.from_pretrained(clip_model)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"cannot load --clip_model {clip_model} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]})") from None

    @torch.no_grad()
    def embed_images(self, images, desc="embedding"):
        """{"DINO": (n, d), "CLIP-I": (n, e)} for a list of PIL images, on the CPU."""
        dino, clip = [], []
        with tqdm(total=len(images), desc=desc, unit="image", leave=False) as bar:
            for start in range(0, len(images), EMBED_BATCH):
                batch = [image.convert("RGB") for image in images[start:start + EMBED_BATCH]]
                pixels = self.dino_processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
                dino.append(self.dino(pixel_values=pixels).last_hidden_state[:, 0].float().cpu())  # the CLS token
                pixels = self.clip_processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
                clip.append(projected(self.clip.get_image_features(pixel_values=pixels)).float().cpu())
                bar.update(len(batch))
        return {"DINO": torch.cat(dino), "CLIP-I": torch.cat(clip)}

    @torch.no_grad()
    def embed_texts(self, texts):
        """(n, e) CLIP text embeddings, in the same space as the CLIP-I image embeddings."""
        tokens = self.clip_tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        return projected(self.clip.get_text_features(input_ids=tokens["input_ids"],
                                                     attention_mask=tokens["attention_mask"])).float().cpu()


def projected(output):
    """transformers 4 returns the projected embedding itself; 5 returns an output that holds it as pooler_output."""
    return output if torch.is_tensor(output) else output.pooler_output


# ----------------------------------------------------------------------------------------------------------
# The metrics
# ----------------------------------------------------------------------------------------------------------


def cosine_matrix(a, b):
    """Cosine similarity of every row of a with every row of b."""
    return F.normalize(a.double(), dim=-1) @ F.normalize(b.double(), dim=-1).T


def subject_fidelity(generated, real):
    """DINO or CLIP-I: the mean cosine over every (generated, real) pair."""
    return cosine_matrix(generated, real).mean().item()


def prompt_fidelity(image_embeddings, text_embeddings):
    """CLIP-T: the mean cosine of each image with its own prompt's text embedding (row i with row i)."""
    return F.cosine_similarity(image_embeddings.double(), text_embeddings.double(), dim=-1).mean().item()


def real_pairs(real):
    """The paper's 'Real Images' row for these photos: the mean cosine over pairs of different photos."""
    n = len(real)
    if n < 2:
        return None
    similarity = cosine_matrix(real, real)
    return ((similarity.sum() - similarity.diagonal().sum()) / (n * (n - 1))).item()


def score_run(scorers, real, rows, identifier, name="images"):
    """Per-prompt and overall scores of rows [(prompt, images)] against the real photos' embeddings."""
    images = [image for _, group in rows for image in group]
    generated = scorers.embed_images(images, f"scoring {name}")
    texts = scorers.embed_texts([scored_prompt(prompt, identifier) for prompt, _ in rows])
    text_of_image = torch.cat([texts[i].expand(len(group), -1) for i, (_, group) in enumerate(rows)])
    per_prompt, start = [], 0
    for i, (prompt, group) in enumerate(rows):
        own = slice(start, start + len(group))
        start += len(group)
        per_prompt.append({"prompt": prompt, "scored_prompt": scored_prompt(prompt, identifier),
                           "num_images": len(group),
                           "DINO": subject_fidelity(generated["DINO"][own], real["DINO"]),
                           "CLIP-I": subject_fidelity(generated["CLIP-I"][own], real["CLIP-I"]),
                           "CLIP-T": prompt_fidelity(generated["CLIP-I"][own], text_of_image[own])})
    overall = {"DINO": subject_fidelity(generated["DINO"], real["DINO"]),
               "CLIP-I": subject_fidelity(generated["CLIP-I"], real["CLIP-I"]),
               "CLIP-T": prompt_fidelity(generated["CLIP-I"], text_of_image), "num_images": len(images)}
    return overall, per_prompt


# ----------------------------------------------------------------------------------------------------------
# Rendering, through infer.py's code
# ----------------------------------------------------------------------------------------------------------


def render_prompts(pipe, render, prompts, folder, name):
    """Every prompt's images, through infer.py's render_images, so each PNG carries its `parameters` chunk:
    `--images` can score them again and `infer.py --prompt P --seed S` redraws any one. prompts: [(DreamBench
    index, prompt)]; image j of prompt i is promptII_seedS.png. Returns [(prompt, images)]."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("prompt*_seed*.png"):  # an earlier evaluation's: --images would score them too
        stale.unlink()
    rows = []
    for i, prompt in tqdm(prompts, desc=f"rendering {name}", unit="prompt"):
        images = render_images(pipe, dataclasses.replace(render, prompt=prompt), folder, f"prompt{i:02d}")
        rows.append((prompt, [image for _, image in images]))
    print(f"{name}: {counted(len(prompts) * len(render.seeds), 'image')} in {folder}")
    return rows


# ----------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------


def write_json_atomic(path, data):
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def write_per_prompt_csv(path, per_prompt, baseline=None):
    """One row per prompt: what was rendered, what CLIP-T read, how many images, the three scores."""
    columns = ["prompt", "scored_prompt", "num_images", *METRICS]
    if baseline:
        columns += [f"baseline_{m}" for m in METRICS]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for i, row in enumerate(per_prompt):
        values = [row["prompt"], row["scored_prompt"], row["num_images"], *(f"{row[m]:.6f}" for m in METRICS)]
        if baseline:
            values += [f"{baseline[i][m]:.6f}" for m in METRICS]
        writer.writerow(values)
    write_text_atomic(path, out.getvalue())


def contact_sheet(rows):
    """One row per prompt: its prompt above, then its images side by side (the base model's after a gap).
    rows: [(label, [group of images, ...])]."""
    cell = min(CELL, max(max(image.size) for _, groups in rows for group in groups for image in group))
    gap = cell // 8
    width = max(max(sum(len(g) for g in groups) * cell + (len(groups) - 1) * gap for _, groups in rows), 480)
    sheet = Image.new("RGB", (width, len(rows) * (cell + LABEL_HEIGHT)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, groups) in enumerate(rows):
        top = r * (cell + LABEL_HEIGHT)
        # Pillow's fallback bitmap font only knows Latin-1: a prompt from --images may hold anything else
        draw.text((2, top + 1), label.encode("latin-1", "replace").decode("latin-1"), fill="black")
        left = 0
        for group in groups:
            for image in group:
                sheet.paste(ImageOps.pad(image.convert("RGB"), (cell, cell), color="white"), (left, top + LABEL_HEIGHT))
                left += cell
            left += gap
    return sheet


def table_text(overall, baseline, real, paper):
    """The report's numbers beside Table 1 of the paper: this run, the base model, these photos, the paper."""
    columns = [("this run", overall)]
    if baseline:
        columns.append(("base model", baseline))
    columns += [("your photos", real), ("paper: DreamBooth (SD)", paper[PAPER_COLUMNS[0]]),
                ("paper: real images", paper[PAPER_COLUMNS[1]])]
    widths = [max(len(name), 5) + 2 for name, _ in columns]
    lines = ["metric" + "".join(f"{name:>{w}}" for (name, _), w in zip(columns, widths))]
    for metric in METRICS:
        cells = [values.get(metric) for _, values in columns]
        lines.append(f"{metric:<6}" + "".join(f"{c:>{w}.3f}" if c is not None else f"{'-':>{w}}"
                                              for c, w in zip(cells, widths)))
    return "\n".join(lines)


def report_settings(args, device, render):
    """What a reader needs to reproduce or compare the numbers."""
    settings = {"mode": "images" if args.images else "render", "instance_dir": args.instance_dir,
                "identifier": args.identifier, "dino_model": args.dino_model, "clip_model": args.clip_model,
                "device": device}
    if args.images:
        return {**settings, "images": args.images}
    return {**settings, "checkpoint": args.checkpoint, "class_noun": args.class_noun,
            "subject_kind": args.subject_kind, "baseline": args.baseline,
            "images_per_prompt": args.images_per_prompt, "seeds": f"image j of every prompt uses seed {args.seed} + j",
            "seed": args.seed, "negative_prompt": render.negative_prompt,
            "num_inference_steps": render.num_inference_steps, "guidance_scale": render.guidance_scale,
            "height": render.height, "width": render.width, "lora_scale": render.lora_scale,
            "pretrained_model_name_or_path": render.model, "pretrained_vae_model_name_or_path": render.vae_model,
            "dtype": render.dtype, "prompts": len(prompt_subset(args.subject_kind, args.prompts)),
            "dreambench_indices": prompt_subset(args.subject_kind, args.prompts),
            "prompt_subset": subset_text(args.subject_kind, args.prompts)}


def subset_text(subject_kind, count):
    """How the report names the prompts it used."""
    if count is None:
        return "all 25"
    kinds = ", ".join(kind for kind, _ in PROMPT_KINDS[subject_kind])
    return f"--prompts {count}: one of each kind in turn ({kinds}); numbers from other subsets are not comparable"


def write_outputs(output_dir, runs, scores, real_scores, settings):
    """report.json, per_prompt.csv and contact_sheet.png, each written atomically; returns the report."""
    paper = json.loads(DREAMBENCH.read_text())["paper_table_1"]
    overall, per_prompt = scores["this run"]
    baseline, baseline_per_prompt = scores.get("base model", (None, None))
    report = {**overall, "num_prompts": len(per_prompt)}
    if baseline:
        report["baseline"] = baseline
    report.update(instance_photos=real_scores, settings=settings, paper_table_1=paper)
    write_json_atomic(output_dir / "report.json", report)
    write_per_prompt_csv(output_dir / "per_prompt.csv", per_prompt, baseline_per_prompt)
    rows = [(prompt, [images] + ([runs["base model"][i][1]] if baseline else []))
            for i, (prompt, images) in enumerate(runs["this run"])]
    if baseline:
        rows[0] = (f"{rows[0][0]}    [left: this run; right: base model]", rows[0][1])
    save_png_atomic(contact_sheet(rows), output_dir / "contact_sheet.png")
    print(table_text(overall, baseline, real_scores, paper))
    print(f"{counted(overall['num_images'], 'image')} over {counted(len(per_prompt), 'prompt')}; wrote "
          f"{output_dir / 'report.json'}, per_prompt.csv and contact_sheet.png")
    return report


def write_curve_csv(path, base, steps):
    """One row for the base model, then one per step: the three scores and how many images they average."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["step", *METRICS, "num_images"])
    for name, scores in [("base", base), *((s["step"], s) for s in steps)]:
        writer.writerow([name, *(f"{scores[m]:.6f}" for m in METRICS), scores["num_images"]])
    write_text_atomic(path, out.getvalue())


def draw_curve(path, base, steps, real, recommended, tolerance):
    """curve.png: each score against the step, the base model and the instance photos as reference lines, and
    the CLIP-T floor of the recommendation."""
    import matplotlib
    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.4), constrained_layout=True)
    for ax, metric in zip(axes, METRICS):
        ax.plot([s["step"] for s in steps], [s[metric] for s in steps], marker="o", label="this run")
        ax.axhline(base[metric], color="grey", linestyle="--", label="base model")
        if real.get(metric) is not None:  # CLIP-T has no value for photos: they carry no prompt
            ax.axhline(real[metric], color="green", linestyle=":", label="instance photos")
        if metric == "CLIP-T":
            ax.axhline(base[metric] - tolerance, color="grey", linestyle=":", label="the recommendation's floor")
        if recommended is not None:
            ax.axvline(recommended, color="red", alpha=0.4, label=f"recommended: step{recommended}")
        ax.set(title=metric, xlabel="step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    save_png_atomic(Image.open(buffer), path)


def run_contact_sheet(columns, runs):
    """A few prompts (rows) across the base model and the steps (columns), each prompt's first seed."""
    rows = [(prompt, [[runs[name][r][1][0]] for name, _ in columns])
            for r, (prompt, _) in enumerate(runs["base"][:SHEET_PROMPTS])]
    rows[0] = (f"{rows[0][0]}    [columns: {', '.join(name for name, _ in columns)}]", rows[0][1])
    return contact_sheet(rows)


def write_run_per_prompt_csv(path, scores):
    """One row per (column, prompt): which step, what was rendered, what CLIP-T read, the three scores."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["column", "prompt", "scored_prompt", "num_images", *METRICS])
    for name, (_, per_prompt) in scores.items():
        for row in per_prompt:
            writer.writerow([name, row["prompt"], row["scored_prompt"], row["num_images"],
                             *(f"{row[m]:.6f}" for m in METRICS)])
    write_text_atomic(path, out.getvalue())


def recommendation_line(recommended, steps, base, tolerance, run_dir, prompt):
    """The one line that answers the question, with the command that renders from the answer."""
    if recommended is None:
        closest = max(steps, key=lambda s: s["CLIP-T"])
        return (f"no recommended step: every step's CLIP-T is more than {tolerance:g} below the base model's "
                f"{base['CLIP-T']:.3f} (the highest, step{closest['step']}, has {closest['CLIP-T']:.3f}); the "
                "subject crowds out the prompts: train fewer steps or at a lower learning rate")
    chosen = next(s for s in steps if s["step"] == recommended)
    return (f"recommended: step{recommended} (DINO {chosen['DINO']:.3f}, CLIP-T {chosen['CLIP-T']:.3f}, base model "
            f"{base['DINO']:.3f} and {base['CLIP-T']:.3f}); render from it: "
            f"{infer_command(Path(run_dir) / f'step{recommended}', prompt)}")


def write_run_outputs(output_dir, args, columns, runs, scores, real_scores, tolerance, settings):
    """curve.csv, curve.png, contact_sheet.png, per_prompt.csv and report.json, each written atomically; the
    run's model card gains the curve when this evaluation lies in the run folder. Returns the report."""
    base = scores["base"][0]
    steps = [{"step": step_of(step_dir) - 1, **scores[name][0]} for name, step_dir in columns[1:]]
    recommended = recommend(steps, base, tolerance)
    line = recommendation_line(recommended, steps, base, tolerance, args.checkpoint, runs["base"][0][0])
    write_curve_csv(output_dir / "curve.csv", base, steps)
    draw_curve(output_dir / "curve.png", base, steps, real_scores, recommended, tolerance)
    save_png_atomic(run_contact_sheet(columns, runs), output_dir / "contact_sheet.png")
    write_run_per_prompt_csv(output_dir / "per_prompt.csv", scores)
    report = {"kind": "run", "run": str(Path(args.checkpoint).resolve()), "base_model": base, "steps": steps,
              "recommended_step": recommended, "recommendation": line, "rule": RECOMMENDATION_RULE,
              "clip_t_tolerance": tolerance, "instance_photos": real_scores, "settings": settings,
              "paper_table_1": json.loads(DREAMBENCH.read_text())["paper_table_1"]}
    write_json_atomic(output_dir / "report.json", report)
    set_card_evaluation(args.checkpoint, output_dir)
    print("step    " + "".join(f"{m:>9}" for m in METRICS))
    for name, values in [("base", base), *((f"step{s['step']}", s) for s in steps)]:
        print(f"{name:<8}" + "".join(f"{values[m]:>9.3f}" for m in METRICS))
    print(f"wrote curve.csv, curve.png, contact_sheet.png, per_prompt.csv and report.json in {output_dir}\n{line}")
    return report


# ----------------------------------------------------------------------------------------------------------
# A whole run: every step beside the base model, the curve, and the step to keep
# ----------------------------------------------------------------------------------------------------------


def is_run_folder(checkpoint):
    """A run folder holds stepN dirs with adapters; a step dir holds the adapter file itself."""
    return not (Path(checkpoint) / LORA_FILE).is_file() and bool(finished_adapters(checkpoint))


def check_step_dir(args):
    """--checkpoint, when it is no run folder: a step dir, without the flags that only a run folder takes."""
    if not args.checkpoint:
        return
    if Path(args.checkpoint).is_dir() and not (Path(args.checkpoint) / LORA_FILE).exists():
        raise UserError(f"{args.checkpoint} is not a step dir (no {LORA_FILE}) and holds no stepN dirs: pass a step "
                        "dir, e.g. work_dirs/<run>/step499, or a run folder, e.g. work_dirs/<run>")
    for flag in ("steps", "clip_t_tolerance"):
        if getattr(args, flag) is not None:
            raise UserError(f"--{flag} is for a run folder, and {args.checkpoint} is one step dir: pass its run "
                            f"folder, {Path(args.checkpoint).parent}")


def run_columns(run_dir, numbers):
    """[(name, step dir)] to score: the base model (step dir None), then every stepN or those of --steps, each
    step's adapter file and settings checked as infer.py checks them."""
    steps = {step_of(p) - 1: p for p in finished_adapters(run_dir)}
    missing = [n for n in numbers or [] if n not in steps]
    if missing:
        raise UserError(f"--steps: {run_dir} has no step{missing[0]} with adapters; it has "
                        f"{', '.join(p.name for p in steps.values())}")
    chosen = [steps[n] for n in numbers] if numbers else list(steps.values())
    for step_dir in chosen:
        read_settings(step_dir)
    return [("base", None)] + [(step_dir.name, step_dir) for step_dir in chosen]


def check_one_base(run_dir, steps, render):
    """Every step's adapters were trained on one base model, and fit the model they render on: a curve across
    two bases compares nothing, and adapters of another base fail deep in diffusers once the base has loaded."""
    bases = {}  # base model -> the numbers of its steps
    for _, step_dir in steps:
        base, _ = trained_base(step_dir, read_settings(step_dir))
        if base:
            same = next((other for other in bases if same_model(base, other)), base)
            bases.setdefault(same, []).append(step_of(step_dir) - 1)
    if len(bases) > 1:
        last = step_of(steps[-1][1]) - 1
        newest = next((base for base, numbers in bases.items() if last in numbers), list(bases)[-1])
        described = "; ".join(f"step{', step'.join(map(str, numbers))} from {base}" for base, numbers in bases.items())
        raise UserError(f"the steps of {run_dir} come from {len(bases)} base models ({described}): pass --steps "
                        f"{','.join(map(str, bases[newest]))} (the newest step's base), or evaluate each step dir on "
                        "its own")
    layers = base_layer_shapes(render.model, render.revision)
    for _, step_dir in steps:
        check_adapters_fit(step_dir, read_settings(step_dir), render.model, render.revision, layers)


def column_record(render, prompts, step_dir):
    """What a column's images depend on: every rendering setting, the prompts, and the adapters' own bytes."""
    record = {k: v for k, v in dataclasses.asdict(render).items() if k not in ("checkpoint", "prompt", "seeds")}
    record.update(seeds=list(render.seeds), prompts=[list(p) for p in prompts],
                  lora_scale=render.lora_scale if step_dir else 0.0,
                  adapters_sha256=file_sha256(step_dir / LORA_FILE) if step_dir else None)
    return record


def read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def columns_to_render(output_dir, columns, records, overwrite):
    """The columns whose images are missing or stale. One rendered with other settings is not replaced silently;
    one whose adapters changed since (a retrained step) is rendered again."""
    todo = []
    for (name, _), record in zip(columns, records):
        saved = read_json(output_dir / name / RENDER_FILE)
        if saved == record and all((output_dir / name / png).is_file() for png in column_files(record)):
            continue
        changed = [k for k in record if isinstance(saved, dict) and k != "adapters_sha256"
                   and saved.get(k) != record[k]]
        if changed and not overwrite:
            raise UserError(f"{output_dir / name} holds renders made with another {changed[0]}: choose another "
                            "--output_dir, or pass --overwrite_output_dir to render them again")
        if isinstance(saved, dict) and not changed:
            print(f"{name}: its adapters changed since it was rendered; rendering it again")
        todo.append(name)
    return todo


def column_files(record):
    """The PNG names of a column, in prompt-then-seed order."""
    return [f"prompt{i:02d}_seed{seed}.png" for i, _ in record["prompts"] for seed in record["seeds"]]


def make_run_output_dir(output_dir, run_dir):
    """The run evaluation's folder, made if missing; not the run folder or a step dir, whose names its columns
    would take, and not one that holds a single step's evaluation."""
    if Path(output_dir).resolve() == Path(run_dir).resolve() or (Path(output_dir) / LORA_FILE).exists():
        raise UserError(f"--output_dir {output_dir} is the run folder or one of its step dirs: pass a folder of "
                        f"its own, e.g. {Path(run_dir) / 'eval'}")
    report = read_json(Path(output_dir) / "report.json")
    if (Path(output_dir) / "report.json").exists() and not (isinstance(report, dict) and report.get("kind") == "run"):
        raise UserError(f"{output_dir} already holds another evaluation (report.json): choose another --output_dir")
    return make_output_dir(output_dir, overwrite=True)


def render_columns(render, columns, todo, prompts, output_dir, records):
    """Render the columns in todo with one pipeline: the adapters are swapped between steps, and the base model
    is the adapters at scale 0. Each column's render.json is written last, so a cut-short column renders again."""
    pipe = None
    for (name, step_dir), record in zip(columns, records):
        if name not in todo:
            continue
        (output_dir / name / RENDER_FILE).unlink(missing_ok=True)
        adapters = step_dir or columns[-1][1]
        if pipe is None:
            pipe = load_pipeline(dataclasses.replace(render, checkpoint=str(adapters)), progress=False)
        elif step_dir:
            pipe.unload_lora_weights()
            apply_adapters(pipe, step_dir, render.lora_scale)
        set_lora_scale(pipe, record["lora_scale"])
        column = dataclasses.replace(render, checkpoint=str(adapters), lora_scale=record["lora_scale"])
        render_prompts(pipe, column, prompts, output_dir / name, name)
        write_json_atomic(output_dir / name / RENDER_FILE, record)


def load_column(folder, record):
    """[(prompt, images)] of a rendered column, read back from its PNGs."""
    return [(prompt, [load_image(folder / f"prompt{i:02d}_seed{seed}.png")[0] for seed in record["seeds"]])
            for i, prompt in record["prompts"]]


def recommend(steps, base, tolerance):
    """The step to keep, by RECOMMENDATION_RULE; steps: [{"step", "DINO", "CLIP-T", ...}]. None if no step
    qualifies. The small slack keeps a CLIP-T printed equal to the floor on the right side of it."""
    kept = [s for s in steps if s["CLIP-T"] >= base["CLIP-T"] - tolerance - 1e-9]
    if not kept:
        return None
    best = max(s["DINO"] for s in kept)
    return min(s["step"] for s in kept if s["DINO"] == best)


def evaluate_run(args, photos, device):
    """Score every step of a run and the base model on the same prompts and seeds, reusing what was rendered."""
    check_versions(CURVE_PACKAGES)
    columns = run_columns(args.checkpoint, step_numbers(args.steps))  # base first; every adapter file checked
    prompts = chosen_prompts(args)
    step_args = argparse.Namespace(**{**vars(args), "checkpoint": str(columns[-1][1])})  # the newest step's settings
    render = resolve(step_args, read_settings(columns[-1][1]), prompts[0][1], args.images_per_prompt)
    check_one_base(args.checkpoint, columns[1:], render)
    records = [column_record(render, prompts, step_dir) for _, step_dir in columns]
    output_dir = make_run_output_dir(args.output_dir, args.checkpoint)
    todo = columns_to_render(output_dir, columns, records, args.overwrite_output_dir)

    scorers = Scorers(args.dino_model, args.clip_model, device)  # small: loaded first, so a bad one fails fast
    real = scorers.embed_images([load_image(p)[0] for p in photos], "instance photos")
    real_scores = {"DINO": real_pairs(real["DINO"]), "CLIP-I": real_pairs(real["CLIP-I"]), "num_images": len(photos)}
    if todo:
        kept = [name for name, _ in columns if name not in todo]
        print(f"rendering {', '.join(todo)}; already rendered: {', '.join(kept) or 'none'}")
        render_columns(render, columns, todo, prompts, output_dir, records)
    runs = {name: load_column(output_dir / name, record) for (name, _), record in zip(columns, records)}
    scores = {name: score_run(scorers, real, rows, args.identifier, name) for name, rows in runs.items()}
    tolerance = CLIP_T_TOLERANCE if args.clip_t_tolerance is None else args.clip_t_tolerance
    return write_run_outputs(output_dir, args, columns, runs, scores, real_scores, tolerance,
                             report_settings(args, device, render))


def main(argv=None):
    quiet_library_notices()
    args = parse_args(argv)                                      # flags, every check of them in one place
    check_versions(["torch", "diffusers", "transformers", "peft"])  # as a script run does first, for callers too
    photos = instance_photos(args.instance_dir)                  # the real photos, every one readable
    check_scorer(args.dino_model, "--dino_model")
    check_scorer(args.clip_model, "--clip_model")
    device = pick_device(args.device)
    if args.checkpoint and is_run_folder(args.checkpoint):
        return evaluate_run(args, photos, device)                # every step beside the base model: the curve
    check_step_dir(args)                                         # one step, so no run folder's flags
    render = None
    if args.images:
        groups = prompted_images(args.images)                    # {prompt: PNGs}, from their parameters chunks
    else:
        prompts = chosen_prompts(args)
        # infer.py's own checks of checkpoint and models; each prompt's Render is this one with its prompt
        settings = read_settings(args.checkpoint)
        render = resolve(args, settings, prompts[0][1], args.images_per_prompt)
        check_adapters_fit(args.checkpoint, settings, render.model, render.revision)
    output_dir = make_output_dir(args.output_dir, args.overwrite_output_dir)

    scorers = Scorers(args.dino_model, args.clip_model, device)  # small: loaded first, so a bad one fails fast
    real = scorers.embed_images([load_image(p)[0] for p in photos], "instance photos")
    real_scores = {"DINO": real_pairs(real["DINO"]), "CLIP-I": real_pairs(real["CLIP-I"]), "num_images": len(photos)}
    if args.images:
        runs = {"this run": [(prompt, [load_image(p)[0] for p in paths]) for prompt, paths in groups.items()]}
    else:
        pipe = load_pipeline(render, progress=False)  # the bar over prompts is enough; one per image is noise
        runs = {"this run": render_prompts(pipe, render, prompts, output_dir / "images", "this run")}
        if args.baseline:
            set_lora_scale(pipe, 0.0)  # as infer.py --lora_scale 0: the base model
            runs["base model"] = render_prompts(pipe, dataclasses.replace(render, lora_scale=0.0), prompts,
                                                output_dir / "baseline_images", "base model")
    scores = {name: score_run(scorers, real, rows, args.identifier, name) for name, rows in runs.items()}
    return write_outputs(output_dir, runs, scores, real_scores, report_settings(args, device, render))


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        sys.exit(f"error: {error}")
