"""The model card (diffusers' model-card helpers) and the push to the Hub."""

import json
import os
import shlex
import shutil
from pathlib import Path
from unittest import mock

import huggingface_hub
from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card

from .artifacts import INFER_SCRIPT, KOHYA_FILE, LORA_FILE, looks_like_hub_id, step_of, write_text_atomic
from .checks import effective_learning_rates, uses_class_images
from .messages import UserError, counted, one_line
from .pipeline import DIFFUSERS_DTYPE, shared_name
from .quantized_base import base_storage


# how the frozen base was held (--fp8_base, --nf4_base); the adapters themselves load on any base
BASE_ON_CARD = {"fp8": ", frozen base held in float8_e4m3fn", "nf4": ", frozen base UNet held in 4-bit NF4"}


def identifier(instance_prompt, class_prompt):
    """The rare token(s) naming the subject: words of the instance prompt that the class prompt lacks."""
    words = instance_prompt.split()
    if class_prompt:
        rare = [w for w in words if w not in class_prompt.split()]
    else:  # no class prompt: the word just before the class noun, as in "a photo of sks dog"
        rare = words[-2:-1]
    return " ".join(rare) or instance_prompt


BASE_MODEL_LICENSES = {"segmind/SSD-1B": "apache-2.0"}  # the card's license: the base model's, where known


CARD_TAGS = ["text-to-image", "diffusers", "diffusers-training", "lora", "dreambooth", "ssd-1b", "template:sd-lora"]


def write_model_card(output_dir, args, settings, step, num_processes, hub_model_id=None):
    """output_dir/README.md, made with diffusers' model-card helpers: Hub metadata (base model, instance prompt,
    license, tags, a widget with the last validation grid), the settings, and how to load the adapters. With
    hub_model_id, the loading lines name the Hub repo that push_to_hub fills, else the local step dir."""
    output_dir = Path(output_dir)
    grid = last_validation_grid(output_dir)
    base = args.pretrained_model_name_or_path
    base_id = base if looks_like_hub_id(base) else None  # a local folder is no link on the Hub
    widget = ([{"text": args.validation_prompt, "output": {"url": grid.relative_to(output_dir).as_posix()}}]
              if grid else None)
    shown = [f"Validation, `{args.validation_prompt}`, {grid.parent.name}:", "",
             f"![validation]({widget[0]['output']['url']})", ""] if grid else []
    description = "\n".join([*card_settings(args, settings, step, num_processes, base_id, hub_model_id), *shown,
                             *card_evaluation(output_dir), *card_usage(args, settings, step, hub_model_id)])
    with mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True):  # made here, from the template
        card = load_or_create_model_card(hub_model_id or "local/dreambooth-lora", from_training=True,
                                         base_model=base_id, prompt=args.instance_prompt, widget=widget,
                                         license=BASE_MODEL_LICENSES.get(base_id, "other"), inference=True,
                                         model_description=description)
    card = populate_model_card(card, tags=CARD_TAGS)
    card.text = description  # the template's TODO sections would only be placeholders here
    write_text_atomic(output_dir / "README.md", str(card))


def last_validation_grid(output_dir):
    """The grid of the last validation round in output_dir, or None."""
    grids = sorted((p for p in Path(output_dir).glob("validation/step*/grid.png") if step_of(p.parent)),
                   key=lambda p: step_of(p.parent))  # validation/step_best/ is the user's: not a round
    return grids[-1] if grids else None


# evaluate.py rewrites what lies between these in the card, so a newer evaluation replaces the older one's
EVALUATION_SECTION = ("<!-- evaluate.py's section: the newest run evaluation in this folder -->",
                      "<!-- end of evaluate.py's section -->")


def latest_evaluation(output_dir):
    """(folder, report) of the newest whole-run evaluation in a folder of output_dir, as `evaluate.py --checkpoint
    OUTPUT_DIR --output_dir OUTPUT_DIR/eval` writes it, or None. An unreadable report is passed over: evaluate.py
    names it when it runs, and a card is no place to fail a training run."""
    found = []
    for report_file in Path(output_dir).glob("*/report.json"):
        try:
            report = json.loads(report_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(report, dict) and report.get("kind") == "run" and (report_file.parent / "curve.png").is_file():
            found.append((report_file.stat().st_mtime, report_file.parent, report))
    return max(found, key=lambda f: f[0])[1:] if found else None


def card_evaluation(output_dir):
    """The card's section on the newest run evaluation: its curve and the step it recommends; [] if none."""
    evaluation = latest_evaluation(output_dir)
    if evaluation is None:
        return []
    folder, report = evaluation
    settings, step = report.get("settings") or {}, report.get("recommended_step")
    verdict = (f"Recommended: `step{step}`: {report.get('rule')} (tolerance {report.get('clip_t_tolerance')})."
               if step is not None
               else f"No step recommended: {report.get('recommendation')}")
    return [EVALUATION_SECTION[0], "## Which step to keep", "",
            f"DreamBench's DINO, CLIP-I and CLIP-T of each step beside the base model, by `evaluate.py` "
            f"({settings.get('prompts')} prompts x {settings.get('images_per_prompt')} images; "
            f"`{folder.name}/report.json`):", "",
            f"![curve]({(folder / 'curve.png').relative_to(output_dir).as_posix()})", "", verdict, "",
            EVALUATION_SECTION[1], ""]


def set_card_evaluation(output_dir, evaluation_dir):
    """Put the evaluation section into output_dir's model card, when the card exists and the evaluation lies in
    a folder of output_dir. Returns whether it did."""
    card = Path(output_dir) / "README.md"
    if not card.is_file() or Path(evaluation_dir).resolve().parent != Path(output_dir).resolve():
        return False
    text = card.read_text(encoding="utf-8")
    start, end = EVALUATION_SECTION
    if start in text and end in text.split(start, 1)[1]:
        before, rest = text.split(start, 1)
        text = before + rest.split(end, 1)[1].lstrip("\n")
    section = "\n".join(card_evaluation(output_dir)) + "\n"
    at = text.find("## Use it")
    write_text_atomic(card, text[:at] + section + text[at:] if at >= 0 else text + "\n" + section)
    return True


def card_settings(args, settings, step, num_processes, base_id, hub_model_id):
    """The card's title and table of settings; local folders by their base names (shared_name)."""
    te, vae = args.train_text_encoder, settings.pretrained_vae_model_name_or_path
    vae = f"`{shared_name(vae)}`" if vae else "the base model's own"
    unet_lr, text_encoder_lr = effective_learning_rates(args, num_processes)
    scaled = (f" (--scale_lr: {unet_lr:g}{f', text encoders {text_encoder_lr:g}' if te else ''})"
              if args.scale_lr else "")
    base = (f"[{base_id}](https://huggingface.co/{base_id})" if base_id
            else f"`{shared_name(args.pretrained_model_name_or_path)}`")
    source = (counted(args.num_class_images, "class image") if uses_class_images(args)
              else "the base model's own prediction as target")
    prior = (f"`{args.class_prompt}`, {source}, weight {args.prior_loss_weight}"
             if args.with_prior_preservation else "off")
    return [
        f"# DreamBooth LoRA: `{args.instance_prompt}`", "",
        f"LoRA adapters for {base}, trained with DreamBooth (Ruiz et al., CVPR 2023) by "
        "`train_dreambooth_lora_ssd1b.py`. "
        + (f"The adapters of step {step}: `{LORA_FILE}`." if hub_model_id else f"Latest adapters: `step{step - 1}/`."),
        "",
        "| setting | value |", "|---|---|",
        f"| base model | `{shared_name(args.pretrained_model_name_or_path)}` |",
        f"| VAE | {vae} |",
        f"| instance prompt | `{args.instance_prompt}` |",
        f"| identifier | `{identifier(args.instance_prompt, args.class_prompt)}` |",
        f"| prior preservation | {prior} |",
        f"| steps | {step} of {args.max_train_steps} |",
        f"| resolution | {args.resolution} |",
        f"| LoRA | {'DoRA, ' if args.use_dora else ''}rank {args.rank}, alpha {settings.lora_alpha}, on the UNet"
        f"{' and both text encoders' if te else ''} |",
        f"| learning rate | {args.learning_rate} ({args.lr_scheduler})"
        f"{f', text encoders {args.text_encoder_lr}' if te and args.optimizer != 'prodigy' else ''}{scaled} |",
        f"| batch | {args.train_batch_size} x {args.gradient_accumulation_steps} accumulation |",
        f"| optimizer, precision | {args.optimizer}, {args.mixed_precision or 'as accelerate is configured'}"
        f"{BASE_ON_CARD.get(base_storage(args), '')} |",
        f"| seed | {args.seed} |", "",
    ]


def card_usage(args, settings, step, hub_model_id):
    """How to load the adapters: from the Hub repo, or from the step dir (paths as seen from the output dir)."""
    step_dir = f"step{step - 1}"
    where = hub_model_id or step_dir
    base = shared_name(args.pretrained_model_name_or_path)  # local folders by name: the card may go to the Hub
    vae = settings.pretrained_vae_model_name_or_path
    lines = ["## Use it", ""]
    if not hub_model_id:
        lines += ["With this project's `infer.py`, in this folder:", "", "```bash",
                  card_infer_command(settings.output_dir, step_dir, args.validation_prompt or args.instance_prompt),
                  "```", ""]
    dtype = f"{DIFFUSERS_DTYPE}=torch.float16"
    lines += [
        "With diffusers, in fp16 on a CUDA GPU (on a CPU: torch.float32 and `.to(\"cpu\")`):", "", "```python",
        "import torch", "from diffusers import AutoencoderKL, StableDiffusionXLPipeline", "",
        f'vae = AutoencoderKL.from_pretrained("{shared_name(vae)}", {dtype})'
        if vae else "vae = None  # the base model's own VAE",
        f'pipe = StableDiffusionXLPipeline.from_pretrained("{base}", ' + ("vae=vae, " if vae else "")
        + f'{dtype}).to("cuda")',
        f'pipe.load_lora_weights("{where}")', "```", ""]
    if not hub_model_id:
        te_lines = ['pipe.text_encoder = PeftModel.from_pretrained(pipe.text_encoder, ckpt / "text_encoder_one")',
                    'pipe.text_encoder_2 = PeftModel.from_pretrained(pipe.text_encoder_2, ckpt / "text_encoder_two")']
        lines += ["With PEFT, per model:", "", "```python", "from pathlib import Path",
                  "from peft import PeftModel", "",
                  f'ckpt = Path("{step_dir}")', 'pipe.unet = PeftModel.from_pretrained(pipe.unet, ckpt / "unet")',
                  *(te_lines if args.train_text_encoder else []), "```", ""]
    return lines + card_file_table(args, step_dir, hub_model_id, settings.output_kohya_format)


def card_file_table(args, step_dir, hub_model_id, kohya):
    """Which file each tool loads, with the one line it needs. ComfyUI and A1111 skip every UNet tensor of the
    diffusers file without an error, so the kohya-named file is the one for them."""
    where = "" if hub_model_id else f"{step_dir}/"
    rows = [f"| diffusers | `{where}{LORA_FILE}` | `pipe.load_lora_weights(\"{hub_model_id or step_dir}\")` |"]
    if not hub_model_id:
        rows += [f"| PEFT | `{step_dir}/unet/`" + (", `text_encoder_one/`, `text_encoder_two/`"
                                                    if args.train_text_encoder else "")
                 + f" | `PeftModel.from_pretrained(pipe.unet, \"{step_dir}/unet\")` |",
                 f"| this project's `infer.py` | `{step_dir}/` | "
                 f"`python infer.py --checkpoint {step_dir} --prompt ...` |"]
    if kohya:
        name = Path(KOHYA_FILE).stem
        rows += [f"| ComfyUI | `{where}{KOHYA_FILE}` | copy it to `ComfyUI/models/loras/`, then a LoraLoader node |",
                 f"| A1111 / Forge | `{where}{KOHYA_FILE}` | copy it to `models/Lora/`, then `<lora:{name}:1>` in the "
                 "prompt |",
                 f"| kohya's sd-scripts | `{where}{KOHYA_FILE}` | `--network_weights {where}{KOHYA_FILE}` |"]
    return ["## Which file for which tool", "", "| tool | file | what it needs |", "|---|---|---|", *rows, ""]


def card_infer_command(output_dir, step_dir, prompt):
    """The card's infer.py command, run in the run's folder: the step dir by its name, and infer.py by its path
    from there when it lies above (the project's work_dirs/), else by its name, never by a full path."""
    infer = INFER_SCRIPT
    relative = Path(os.path.relpath(infer, Path(output_dir).resolve()))
    script = relative.as_posix() if set(relative.parent.parts) <= {".."} else "infer.py"
    return shlex.join(["python", script, "--checkpoint", step_dir, "--prompt", prompt])


def infer_command(step_dir, prompt):
    """The infer.py command for a step dir, with absolute paths: it works from whichever folder it is run in."""
    infer = INFER_SCRIPT
    return shlex.join(["python", str(infer), "--checkpoint", str(Path(step_dir).resolve()), "--prompt", prompt])


def push_to_hub(output_dir, args, settings, step, num_processes):
    """Upload the final adapters, the model card, the last validation grid and the newest run evaluation's curve
    to --hub_model_id, as one commit. The files are first gathered in output_dir/hub/, so a failed upload can be
    repeated by hand."""
    output_dir, step_dir = Path(output_dir), Path(output_dir) / f"step{step - 1}"
    repo_id = args.hub_model_id or Path(settings.output_dir).name
    staging = output_dir / "hub"
    tmp = output_dir / f".hub.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    grid, evaluation = last_validation_grid(output_dir), latest_evaluation(output_dir)
    shown = [grid, *([evaluation[0] / "curve.png", evaluation[0] / "report.json"] if evaluation else [])]
    for source in [f for f in [step_dir / LORA_FILE, step_dir / KOHYA_FILE, *shown] if f and f.is_file()]:
        target = tmp / (source.relative_to(output_dir).as_posix() if source in shown else source.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    write_model_card(tmp, args, settings, step, num_processes, hub_model_id=repo_id)
    shutil.rmtree(staging, ignore_errors=True)
    os.replace(tmp, staging)
    try:
        url = huggingface_hub.create_repo(repo_id, token=args.hub_token, exist_ok=True).repo_id
        huggingface_hub.upload_folder(repo_id=url, folder_path=staging, token=args.hub_token,
                                      commit_message=f"DreamBooth LoRA, step {step}")
    except Exception as e:  # offline, no rights, a bad token: the local run is complete either way
        raise UserError(f"could not push to the Hub repo {repo_id} ({type(e).__name__}: {one_line(e)}); the run is "
                        f"saved in {output_dir}. Push it when the Hub is reachable: hf upload {repo_id} {staging} "
                        ".") from None
    return repo_id


def finish(accelerator, args, settings):
    """Say where the adapters are and how to render from them; push them to the Hub if asked."""
    if not accelerator.is_main_process:
        return
    step_dir = Path(settings.output_dir).resolve() / f"step{args.max_train_steps - 1}"
    print(f"adapters in {step_dir}; render with:\n  "
          f"{infer_command(step_dir, args.validation_prompt or args.instance_prompt)}")
    if args.push_to_hub:
        repo_id = push_to_hub(settings.output_dir, args, settings, args.max_train_steps, accelerator.num_processes)
        print(f"pushed to https://huggingface.co/{repo_id}")
