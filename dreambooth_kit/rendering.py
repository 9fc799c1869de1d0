"""Rendering with a run's adapters, shared by infer.py and evaluate.py: a step dir's settings read and checked
(resolve: the flags with the checkpoint's settings filling the rest, frozen in a Render), the adapter file checked
against the base model before it loads, the pipeline built (load_pipeline) and the images written with their
settings (render_images)."""

import dataclasses
import json
import os
import re
from pathlib import Path

import torch
from peft import LoraConfig
from PIL.PngImagePlugin import PngInfo
from safetensors import SafetensorError, safe_open

from .artifacts import LORA_FILE, SETTINGS_FILE, ran, save_png_new
from .checks import IMAGE_SIDE, describe_range, range_refusal
from .messages import UserError, agree, counted, one_line
from .pipeline import (
    apply_adapters,
    build_pipeline,
    check_models,
    generate_images,
    load_errors_named,
    load_models,
    shared_name,
)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}  # --dtype's choices


def non_empty(value):
    return isinstance(value, str) and value.strip() != ""


def image_side(value):
    """A side that --height takes typed (the trainer's --resolution takes the same IMAGE_SIDE): a multiple of 8."""
    return type(value) is int and range_refusal("height", value, IMAGE_SIDE) is None and value % 8 == 0


SIDE = f"a multiple of 8 {describe_range(*IMAGE_SIDE[:3])}"
LORA_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.")  # the components of a diffusers-format adapter file
# what run_settings.json may hold, where infer.py reads it: (what a valid value is, its test, the flags that replace
# it or None where only the file records it)
RECORDED = {
    "resolution": (f"{SIDE}, as the trainer's --resolution", image_side, "--height and --width"),
    # (height, width) the run validated at: the photos' most common training size, which aspect-ratio buckets
    # can make other than a square; held to --height's and --width's own range, as if typed
    "validation_size": (f"null or a [height, width] pair, each {SIDE}",
                        lambda v: v is None or (isinstance(v, list) and len(v) == 2 and all(map(image_side, v))),
                        "--height and --width"),
    "instance_prompt": ("a string", lambda v: isinstance(v, str), "--prompt"),
    "pretrained_model_name_or_path": ("a non-empty string", lambda v: isinstance(v, str) and v.strip() != "",
                                      "--pretrained_model_name_or_path"),
    # an empty string would mean the model's own VAE, the main branch or no variant without a word
    "pretrained_vae_model_name_or_path": ("a non-empty string or null", lambda v: v is None or non_empty(v),
                                          "--pretrained_vae_model_name_or_path"),
    "revision": ("a non-empty string or null", lambda v: v is None or non_empty(v), None),
    "variant": ("a non-empty string or null", lambda v: v is None or non_empty(v), None),
}
SETTINGS_FLAGS = "--pretrained_model_name_or_path, --pretrained_vae_model_name_or_path, --height, --width, --prompt"


@dataclasses.dataclass(frozen=True)
class Render:
    """What a render runs with: the flags, with the checkpoint's settings where they were left out. args stay as
    typed; evaluate.py makes a variant per prompt with dataclasses.replace."""
    checkpoint: str
    prompt: str
    negative_prompt: str | None
    seeds: range  # image i uses seeds[i]
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    lora_scale: float
    model: str
    vae_model: str | None  # None: the model's own VAE
    revision: str | None
    variant: str | None
    device: str
    dtype: str  # a key of DTYPES


def read_settings(checkpoint):
    """The run's settings, recorded by the trainer in every step dir, once the step dir's adapter file is known
    to be sound: both are read before any model loads, so a damaged one costs no minutes of loading. Returns the
    flags as typed with what they came to (the "derived" section) over them."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / LORA_FILE).is_file():
        raise UserError(f"{checkpoint} is not a step dir (no {LORA_FILE}): pass e.g. work_dirs/<run>/step499")
    check_adapter_file(checkpoint / LORA_FILE)
    settings_file = checkpoint / SETTINGS_FILE
    if not settings_file.is_file():
        return {}
    fix = f"restore it from the run, or delete it and pass {SETTINGS_FLAGS} explicitly"
    try:
        settings = json.loads(settings_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {settings_file} ({type(e).__name__}: {one_line(e)}): {fix}") from None
    if not isinstance(settings, dict):
        raise UserError(f"{settings_file} holds a JSON {type(settings).__name__}, not an object: {fix}")
    derived = settings.get("derived")
    if not isinstance(derived, dict):  # the trainer always records what its flags came to
        what = "no derived section" if derived is None else f"derived as a JSON {type(derived).__name__}, not an object"
        raise UserError(f"{settings_file} records {what}: {fix}")
    return ran(settings)


def check_adapter_file(lora_file):
    """A safetensors file of LoRA tensors, every one finite. A truncated or mislabelled file would otherwise fail
    only once the base model has loaded, and a nan one renders all-black images with exit 0."""
    if lora_file.stat().st_size == 0:
        raise UserError(f"{lora_file} is empty: copy it again from the run, or use another stepN")
    try:
        with safe_open(str(lora_file), framework="pt") as f:
            keys = list(f.keys())
            broken = [k for k in keys if not torch.isfinite(f.get_tensor(k)).all()]
    except (SafetensorError, OSError) as e:
        raise UserError(f"{lora_file} is not a readable safetensors file ({one_line(e)}): it is truncated or not "
                        "the trainer's; copy it again from the run, or use another stepN") from None
    if not any(k.startswith(LORA_PREFIXES) and "lora" in k.lower() for k in keys):
        raise UserError(f"{lora_file} holds no LoRA tensors (no {', '.join(LORA_PREFIXES)} keys): pass a step dir "
                        "the trainer wrote")
    if broken:
        raise UserError(f"{lora_file}: the adapter holds nan/inf ({len(broken)} of {len(keys)} tensors, e.g. "
                        f"{broken[0]}); it would render black images: use an earlier stepN")


# A tensor of a diffusers-format adapter file: component, module path, and which part of the LoRA it is, in each
# naming that diffusers loads (peft's lora_A/B, diffusers' lora.down/up, the text encoders' lora_linear_layer, kohya's
# lora_down/up within a diffusers prefix); DoRA's magnitude and an alpha belong to the module as well
ADAPTER_KEY = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+?)\.(lora_A|lora_B|lora\.down|lora\.up|"
                         r"lora_linear_layer\.down|lora_linear_layer\.up|lora_down|lora_up|lora_magnitude_vector|"
                         r"alpha)(\.weight)?$")
DOWN_PARTS = {"lora_A", "lora.down", "lora_linear_layer.down", "lora_down"}  # (rank, in_features, ...)
UP_PARTS = {"lora_B", "lora.up", "lora_linear_layer.up", "lora_up"}  # (out_features, rank, ...)


def adapter_shapes(lora_file):
    """{(component, module): {part: shape}} of an adapter file, read from its header alone, and the names that
    are no LoRA tensor of a diffusers component."""
    modules, unknown = {}, []
    with safe_open(str(lora_file), framework="pt") as f:
        for key in f.keys():
            match = ADAPTER_KEY.match(key)
            if match is None:
                unknown.append(key)
                continue
            modules.setdefault((match[1], match[2]), {})[match[3]] = tuple(f.get_slice(key).get_shape())
    return modules, unknown


def base_layer_shapes(model, revision):
    """{component: {module path: weight shape}} of the base model's layers, built from its configs on the meta
    device: what its weights will be, with no weight read. A text encoder's `text_model.` level, which
    transformers 5 dropped, is left out of the names on both sides."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    built = {}
    with load_errors_named(model), init_empty_weights():
        try:
            built["unet"] = UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(model, subfolder="unet", revision=revision))
            for component, cls in [("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)]:
                built[component] = cls(CLIPTextConfig.from_pretrained(model, subfolder=component, revision=revision))
        except (ValueError, TypeError, KeyError) as e:
            raise UserError(f"cannot build {model}'s models from their configs ({type(e).__name__}: "
                            f"{one_line(e)}): download the model again") from None
    return {component: {short_name(name): tuple(module.weight.shape) for name, module in net.named_modules()
                        if isinstance(getattr(module, "weight", None), torch.Tensor)}
            for component, net in built.items()}


def short_name(module):
    return module.removeprefix("text_model.")


def misfits(modules, layers):
    """What of the adapter does not fit the base model's layers: [(tensor description, what the model has)]."""
    found = []
    for (component, module), parts in modules.items():
        weight = layers[component].get(short_name(module))
        if weight is None:
            found.append((f"{component}.{module}", f"{component} has no such layer"))
            continue
        out_features, in_features = weight[0], weight[1] if len(weight) > 1 else None
        for part, shape in parts.items():
            expected = (in_features if part in DOWN_PARTS else out_features if part in UP_PARTS
                        else out_features if part == "lora_magnitude_vector" else None)
            axis = 1 if part in DOWN_PARTS else 0
            if expected is not None and (len(shape) <= axis or shape[axis] != expected):
                side = "input" if part in DOWN_PARTS else "output"
                found.append((f"{component}.{module}.{part} {list(shape)}", f"the layer's {side} is {expected} wide"))
        ranks = {shape[0] for part, shape in parts.items() if part in DOWN_PARTS and shape}
        ranks |= {shape[1] for part, shape in parts.items() if part in UP_PARTS and len(shape) > 1}
        if len(ranks) > 1:
            found.append((f"{component}.{module}", f"its down and up tensors disagree on the rank ({sorted(ranks)})"))
    return found


def trained_base(step_dir, settings):
    """The base model a step dir's adapters were trained on, and where that is recorded; (None, None) if nowhere."""
    base = ran(settings).get("pretrained_model_name_or_path")
    if isinstance(base, str) and base.strip():
        return base, Path(step_dir) / SETTINGS_FILE
    try:
        with safe_open(str(Path(step_dir) / LORA_FILE), framework="pt") as f:
            metadata = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
        base = metadata.get("unet.base_model_name_or_path")
    except (SafetensorError, OSError, ValueError, AttributeError):
        base = None
    return (base, Path(step_dir) / LORA_FILE) if isinstance(base, str) and base.strip() else (None, None)


def same_model(a, b):
    """Two --pretrained_model_name_or_path values name the same model: equal, or the same local folder."""
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


def check_adapters_fit(step_dir, settings, model, revision, layers=None):
    """Every tensor of the step dir's adapter file fits a layer of `model`, compared by shape from the file's
    header and the model's configs, before any weight loads: adapters of another base model otherwise fail deep
    inside diffusers once the base has loaded. layers: base_layer_shapes(model, revision), when already known."""
    lora_file = Path(step_dir) / LORA_FILE
    modules, unknown = adapter_shapes(lora_file)
    if unknown:
        raise UserError(f"{lora_file} holds {counted(len(unknown), 'tensor')} that {agree(len(unknown), 'is', 'are')} "
                        "no LoRA layer of unet, text_encoder "
                        f"or text_encoder_2, e.g. {unknown[0]!r}: it is not the trainer's file; use a step dir the "
                        "trainer wrote")
    found = misfits(modules, layers or base_layer_shapes(model, revision))
    if found:
        refuse_misfit(step_dir, settings, model, found)
    check_adapter_metadata(lora_file, modules)


def refuse_misfit(step_dir, settings, model, found):
    """The refusal for adapters that do not fit `model`: the base they were trained on and the flag, where known."""
    what, why = found[0]
    detail = f"{what}: {why}; {counted(len(found), 'misfit')} in all"
    base, source = trained_base(step_dir, settings)
    if base and not same_model(base, model):
        raise UserError(f"the adapters in {step_dir} were trained on {base} (recorded in {source}), and do not fit "
                        f"{model} ({detail}): pass --pretrained_model_name_or_path {base}, or leave it out")
    raise UserError(f"{Path(step_dir) / LORA_FILE} does not fit {model} ({detail}): the adapters were not trained on "
                    "this model, or the file was edited; pass --pretrained_model_name_or_path with the base they were "
                    "trained on, or use a step dir the trainer wrote")


def check_adapter_metadata(lora_file, modules):
    """The LoRA settings the file carries (diffusers' lora_adapter_metadata, which it turns into each component's
    LoraConfig) are a LoraConfig's, of the rank the tensors have: diffusers otherwise fails on them once the base
    has loaded, with a JSON error or a size mismatch per layer."""
    with safe_open(str(lora_file), framework="pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    if raw is None:  # diffusers then reads the ranks from the tensors
        return
    fix = "the file was edited or damaged: copy it again from the run, or use another stepN"
    try:
        metadata = json.loads(raw)
    except ValueError:
        metadata = None
    if not isinstance(metadata, dict):
        raise UserError(f"{lora_file}: its lora_adapter_metadata is not a JSON object; {fix}")
    for component in ("unet", "text_encoder", "text_encoder_2"):
        fields = {key.split(".", 1)[1]: value for key, value in metadata.items() if key.startswith(f"{component}.")}
        if not fields:
            continue
        try:
            rank = LoraConfig(**fields).r  # as diffusers builds it, defaults and all
        except (TypeError, ValueError) as e:
            raise UserError(f"{lora_file}: its {component} settings in lora_adapter_metadata are no LoraConfig "
                            f"({type(e).__name__}: {one_line(e)}); {fix}") from None
        if fields.get("rank_pattern"):  # ranks per layer, by peft's own matching: left to peft
            continue
        ranks = {module: parts[down][0] for (owner, module), parts in modules.items() if owner == component
                 for down in parts if down in DOWN_PARTS and parts[down]}
        wrong = next(((module, held) for module, held in ranks.items() if held != rank), None)
        if wrong:
            raise UserError(f"{lora_file}: its lora_adapter_metadata gives {component} rank {rank}, and its tensors "
                            f"have rank {wrong[1]} (e.g. {component}.{wrong[0]}); {fix}")


def recorded(settings, name, checkpoint, default=None):
    """A field of run_settings.json, read only where no flag replaces it, refused unless it is what the
    trainer writes there (a hand-edited file can hold anything)."""
    if name not in settings:
        return default
    valid, within, flags = RECORDED[name]
    value = settings[name]
    if not within(value):
        fix = f"pass {flags} explicitly, or restore the file from the run" if flags else "restore it from the run"
        raise UserError(f"{Path(checkpoint) / SETTINGS_FILE} records {name} {json.dumps(value)[:60]}, which is not "
                        f"{valid}: {fix}")
    return value


def refuse_moved_models(args, settings):
    """A model folder that run_settings.json records (the trainer writes local folders as absolute paths) and that
    is gone: named as the file's, with the flag that replaces it, not as though the user had typed it."""
    for flag in ["pretrained_model_name_or_path", "pretrained_vae_model_name_or_path"]:
        name = settings.get(flag)
        if getattr(args, flag) is None and isinstance(name, str) and os.path.isabs(name) and not os.path.exists(name):
            raise UserError(f"{Path(args.checkpoint) / SETTINGS_FILE} records --{flag} {name}, which does not exist "
                            f"(moved or deleted): pass --{flag} with where that model is now")


def resolve(args, settings, prompt, num_images):
    """The Render these flags ask for: what they leave out comes from the checkpoint's settings, and the models
    are checked before any loads. prompt None: the run's instance prompt; num_images: how many seeds."""
    refuse_moved_models(args, settings)
    size = [None, None]
    if args.height is None or args.width is None:  # the size the run validated at, else its square
        resolution = recorded(settings, "resolution", args.checkpoint, 1024)
        size = recorded(settings, "validation_size", args.checkpoint) or [resolution] * 2
    prompt = prompt or recorded(settings, "instance_prompt", args.checkpoint)
    if not prompt:
        raise UserError("no --prompt given and the checkpoint records none: pass --prompt 'a photo of sks dog'")
    model = args.pretrained_model_name_or_path or recorded(settings, "pretrained_model_name_or_path",
                                                           args.checkpoint, "segmind/SSD-1B")
    vae_model = args.pretrained_vae_model_name_or_path
    if vae_model is None:
        vae_model = recorded(settings, "pretrained_vae_model_name_or_path", args.checkpoint)
    elif vae_model.lower() == "none":
        vae_model = None
    device = pick_device(args.device)
    render = Render(checkpoint=args.checkpoint, prompt=prompt, negative_prompt=args.negative_prompt,
                    seeds=range(args.seed, args.seed + num_images), num_inference_steps=args.num_inference_steps,
                    guidance_scale=args.guidance_scale, height=args.height or size[0],
                    width=args.width or size[1], lora_scale=args.lora_scale, model=model, vae_model=vae_model,
                    revision=recorded(settings, "revision", args.checkpoint),
                    variant=recorded(settings, "variant", args.checkpoint), device=device,
                    dtype=args.dtype or ("fp32" if device == "cpu" else "fp16"))
    check_models(render.model, render.vae_model, render.revision, render.variant)
    return render


def pick_device(device):
    """--device, or cuda where this machine has it; a device torch knows and this machine has, named before any
    model loads."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UserError(f"--device {device} is not a device: pass cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: this torch has no usable CUDA device; pass --device cpu, or install "
                        "torch's CUDA build on a GPU machine")
    if kind not in ("cpu", "cuda"):
        raise UserError(f"--device {device} is not supported here: pass cpu, cuda or cuda:N")
    return device


def load_pipeline(render, progress=True):
    """SSD-1B with the checkpoint's adapters at render.lora_scale, built by the trainer's own functions, so a
    step dir renders here as it did in validation. progress: the pipeline's bar over denoising steps."""
    models = load_models(render.model, render.vae_model, render.revision, render.variant, DTYPES[render.dtype],
                         render.device)
    pipe = build_pipeline(models, render.model, render.revision, render.variant, progress=progress)
    return apply_adapters(pipe, render.checkpoint, render.lora_scale)


def render_images(pipe, render, folder, name):
    """Yield (path, image) for each seed of render.seeds, each saved as folder/{name}_seed{seed}.png (never over
    an earlier file) with its `parameters` chunk, as soon as it is made."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for seed in render.seeds:
        # one image per call: batching would change the arithmetic, and a seed must mean one picture
        image = generate_images(pipe, render.prompt, [seed], render.height, render.width,
                                render.num_inference_steps, negative_prompt=render.negative_prompt,
                                guidance_scale=render.guidance_scale)[0]
        info = PngInfo()
        info.add_text("parameters", parameters_text(render, seed, type(pipe.scheduler).__name__))
        yield save_png_new(image, folder / f"{name}_seed{seed}.png", pnginfo=info), image


def checkpoint_name(checkpoint):
    """A step dir as its run folder's name and its own, e.g. dog-run/step499, from where it resolves: the path as
    typed may be `.` or `..`, which names nothing once the PNG is elsewhere."""
    step_dir = Path(checkpoint).resolve()
    return "/".join(part for part in (step_dir.parent.name, step_dir.name) if part) or str(step_dir)


def parameters_text(render, seed, sampler):
    """The A1111 `parameters` chunk: prompt, negative prompt, then one line of settings."""
    lines = [render.prompt]
    if render.negative_prompt:
        lines.append(f"Negative prompt: {render.negative_prompt}")
    lines.append(f"Steps: {render.num_inference_steps}, Sampler: {sampler}, CFG scale: {render.guidance_scale}, "
                 f"Seed: {seed}, Size: {render.width}x{render.height}, Model: {shared_name(render.model)}, "
                 f"Lora: {checkpoint_name(render.checkpoint)}, Lora scale: {render.lora_scale}")  # shared: no full paths
    return "\n".join(lines)
