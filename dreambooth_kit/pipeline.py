"""The base model: reaching it (local folder or Hub), loading it part by part, building the SDXL pipeline, applying
adapters, rendering. Shared by training, infer.py and evaluate.py."""

import contextlib
import dataclasses
import functools
import json
import logging
import math
from importlib.metadata import version as installed_version
from pathlib import Path

import huggingface_hub
import safetensors.torch
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.utils import make_image_grid
from packaging.version import Version
from PIL import Image
from safetensors import SafetensorError, safe_open
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .artifacts import LORA_FILE, looks_like_hub_id
from .imaging import refuse_file_as_folder
from .messages import UserError, agree, counted, one_line, warn
from .quantized_base import (keep_freed_copies_off_the_heap, load_quantized, nf4_config, prepare_storage,
                             quantized_slot)

# transformers 4.56 renamed from_pretrained's torch_dtype to dtype; the old name warns from 5 on
TRANSFORMERS_DTYPE = "dtype" if Version(installed_version("transformers")) >= Version("4.56") else "torch_dtype"


# diffusers 0.40 did the same (0.42 warns at torch_dtype); 0.35.2, the lowest this supports, knows only torch_dtype
DIFFUSERS_DTYPE = "dtype" if Version(installed_version("diffusers")) >= Version("0.40") else "torch_dtype"


def shared_name(name):
    """A model or folder as what leaves this machine names it (the model card, a PNG's metadata): a Hub id as it
    is, a local folder by its base name, since its full path would publish the user's own folders."""
    return name if looks_like_hub_id(name) else Path(name).resolve().name


def resolve_instance_dir(name, revision=None):
    """A local folder as it is; a hub dataset id (e.g. diffusers/dog-example) is fetched with huggingface_hub."""
    if Path(name).is_dir():
        return Path(name)
    refuse_file_as_folder(name, "--instance_dir", "pass the folder that holds the photos")
    if not looks_like_hub_id(name):
        raise UserError(f"instance folder {name} does not exist: pass --instance_dir a folder of 3-20 photos")
    fetch = functools.partial(huggingface_hub.snapshot_download, name, repo_type="dataset", revision=revision)
    return Path(from_hub(fetch, f"--instance_dir {name}", name, "dataset", "pass a local folder of photos"))


HUB_PROBE_SECONDS = 5  # a Hub that does not answer in this long is taken as unreachable


def hub_unreachable():
    """Why the Hub cannot be reached ('ConnectError'), or None when it answers: one request, no retries, asked
    before huggingface_hub's own, which retry for about 25 s and log each try."""
    # huggingface_hub 0.x fixes offline mode into a thread's session as it makes it: one made while HF_HUB_OFFLINE
    # was set (the model card is made offline) would refuse this probe and the downloads after it. 1.x asks per request
    if hasattr(huggingface_hub.utils, "reset_sessions"):
        huggingface_hub.utils.reset_sessions()
    try:
        huggingface_hub.utils.get_session().head(huggingface_hub.constants.ENDPOINT, timeout=HUB_PROBE_SECONDS)
    except Exception as e:  # DNS, refused, timed out, a proxy's error: whatever the HTTP library names it
        return type(e).__name__
    return None


def from_hub(fetch, what, name, kind, local_fix):
    """fetch(local_files_only=...)'s result: a Hub file or snapshot, from the cache when HF_HUB_OFFLINE is set or
    the Hub is unreachable. A refusal says what fits: not cached (offline mode, or no network), no such repo or no
    rights to it (spelling, login), or whatever else the Hub answered. `what` names the flag and value."""
    repo_type = "" if kind == "model" else f" --repo-type {kind}"
    download = (f"`hf download {name}{repo_type}` where the Hub is reachable (and copy its cache to "
                f"{huggingface_hub.constants.HF_HUB_CACHE})")
    offline = huggingface_hub.constants.HF_HUB_OFFLINE
    down = None if offline else hub_unreachable()
    quiet = lambda record: not record.getMessage().startswith(("Retrying in", "HTTP Error", "'"))  # noqa: E731
    retries = logging.getLogger("huggingface_hub.utils._http")  # a line per retry, and one per failed try
    retries.addFilter(quiet)
    try:
        found = fetch(local_files_only=bool(offline or down))
    except huggingface_hub.errors.LocalEntryNotFoundError as e:
        if offline:
            raise UserError(f"{what}: this {kind} is not in the local Hub cache, and HF_HUB_OFFLINE is set: run "
                            f"{download}, or unset HF_HUB_OFFLINE, or {local_fix}") from None
        # the Hub answered the probe, then failed the download (a proxy's or the server's error): its own words
        failed = (f"cannot be reached ({down})" if down else
                  f"failed ({type(e.__cause__).__name__}: {one_line(e.__cause__)})" if e.__cause__ else "failed")
        raise UserError(f"{what}: the Hub ({huggingface_hub.constants.ENDPOINT}) {failed} and this {kind} is not in "
                        f"the local Hub cache: connect to the network, or run {download}, or {local_fix}") from None
    except huggingface_hub.errors.GatedRepoError:
        raise UserError(f"{what}: this {kind} is gated: accept its terms on huggingface.co/{name} and log in with "
                        f"`hf auth login`, or {local_fix}") from None
    except huggingface_hub.errors.RepositoryNotFoundError:  # the Hub answers 401 for private and missing alike
        raise UserError(f"{what}: no such {kind} on the Hub, or it is private: check the id's spelling, or log in "
                        f"with `hf auth login` if it is yours, or {local_fix}") from None
    except huggingface_hub.errors.RevisionNotFoundError:
        raise UserError(f"{what}: the Hub has no such --revision of this {kind}: pass one it has (a branch, tag or "
                        "commit), or leave --revision out") from None
    except Exception as e:  # a file missing from the repo, a server error, a full disk: the Hub's own words
        raise UserError(f"{what}: the Hub's answer was {type(e).__name__}: {one_line(e)}; or {local_fix}") from None
    finally:
        retries.removeFilter(quiet)
    if down:
        warn(f"the Hub cannot be reached ({down}): {what} comes from the local Hub cache; set HF_HUB_OFFLINE=1 so "
             "that loading does not wait on the Hub's retries")
    return found


TOKENIZERS = {"tokenizer": "CLIP-L", "tokenizer_2": "CLIP-G"}


def long_prompts(prompts, tokenizers):
    """'where (CLIP-L n, CLIP-G m tokens)' for each (where, prompt) longer than a tokenizer reads: encode_prompt
    cuts it there, so its end never trains. `tokenizers`: {name: tokenizer}. Counts include the start and end
    tokens, which model_max_length (77) includes too."""
    found = []
    for where, prompt in prompts:
        counts = {name: len(tokenizer(prompt, verbose=False).input_ids) for name, tokenizer in tokenizers.items()}
        if any(count > tokenizers[name].model_max_length for name, count in counts.items()):
            found.append(f"{where} ({', '.join(f'{name} {count}' for name, count in counts.items())} tokens)")
    return found


def warn_long_prompts(model, revision, prompts):
    """Warn, in one line before training, about prompts (captions, --instance_prompt, --class_prompt,
    --validation_prompt) that CLIP would cut, as the pipeline warns at inference. Only the tokenizers load, and
    only for a prompt of more UTF-8 bytes than the limit: a CLIP token holds at least one byte."""
    prompts = [(where, prompt) for where, prompt in prompts if prompt and len(prompt.encode()) + 2 > 77]
    if not prompts:
        return
    try:
        tokenizers = {name: CLIPTokenizer.from_pretrained(model, subfolder=sub, revision=revision)
                      for sub, name in TOKENIZERS.items()}
    except Exception:  # load_models names what is wrong with the model, in its own words
        return
    found = long_prompts(prompts, tokenizers)
    if found:
        limit = min(tokenizer.model_max_length for tokenizer in tokenizers.values())
        warn(f"{counted(len(found), 'prompt')} {agree(len(found), 'is', 'are')} longer than the {limit} tokens "
             f"CLIP reads (start and end tokens included), and "
             f"{agree(len(found), 'is cut there, so its', 'are cut there, so their')} end never trains: {'; '.join(found)}; shorten them")


# The folders of an SDXL-layout model that load_models reads weights from, and the others it reads, each with
# the files of which it needs one (a tokenizer's vocabulary comes as vocab.json or within tokenizer.json)
MODEL_WEIGHTS = ["unet", "text_encoder", "text_encoder_2"]


MODEL_FILES = {"tokenizer": ["vocab.json", "tokenizer.json"], "tokenizer_2": ["vocab.json", "tokenizer.json"],
               "scheduler": ["scheduler_config.json"]}


def check_model_source(name, filename, flag, revision=None, parts=None, weights=(), variant=None, vae=False):
    """A local folder must hold `filename` as JSON, one of the files `parts` names in each of its subfolders, and
    weights in each of its `weights` subfolders ("." for itself) of `variant` if given; vae=True asks for an
    AutoencoderKL. A hub id must answer (or be cached).
    What from_pretrained would otherwise find only after minutes of loading is refused now."""
    folder = Path(name)
    if folder.is_dir():
        config = read_json_config(folder / filename, flag, name)
        if vae and config.get("_class_name") != "AutoencoderKL":
            kind = config.get("_class_name") or (config.get("architectures") or ["not a diffusers model"])[0]
            raise UserError(f"{flag} {name} is not a VAE folder (its {filename} is for {kind}): pass an "
                            "AutoencoderKL folder such as madebyollin/sdxl-vae-fp16-fix, or 'none'")
        for sub, names in (parts or {}).items():
            if not any((folder / sub / file).is_file() for file in names):
                raise UserError(f"{flag} {name} has no {sub}/{' or '.join(names)}: download the model again")
        for sub in weights:  # a damaged config fails only once the weights before it have loaded
            if sub != ".":
                read_json_config(folder / sub / "config.json", flag, name)
        missing = [sub for sub in weights if not weight_files(folder / sub, variant)]
        if missing:
            what = f"{variant} weights (--variant {variant})" if variant else "weights"
            fix = "drop --variant, or download that variant" if variant else "download the model again"
            raise UserError(f"{flag} {name} has no {what} in {', '.join(missing)}: {fix}")
        return
    if folder.exists():
        raise UserError(f"{flag} {name} is a file, not a model folder: pass a local diffusers folder or a hub id")
    if not looks_like_hub_id(name):
        raise UserError(f"{flag} {name} does not exist: pass a local diffusers folder or a hub id")
    fetch = functools.partial(huggingface_hub.hf_hub_download, name, filename, revision=revision)
    from_hub(fetch, f"{flag} {name}", name, "model", "pass a local folder")


def check_models(model, vae_model, revision, variant):
    """What load_models will read: the model's folders (its VAE too, unless vae_model replaces it), and the VAE."""
    check_model_source(model, "model_index.json", "--pretrained_model_name_or_path", revision, parts=MODEL_FILES,
                       weights=MODEL_WEIGHTS + ([] if vae_model else ["vae"]), variant=variant)
    if vae_model:
        check_model_source(vae_model, "config.json", "--pretrained_vae_model_name_or_path", weights=["."], vae=True)


def check_hub(hub_model_id, output_name, token):
    """--push_to_hub's repo id (--hub_model_id, else the output dir's name) is one the Hub takes, and a token is
    at hand: both fail only after training otherwise. Whether the Hub answers is found at the upload, which keeps
    the local run if it does not."""
    try:
        huggingface_hub.utils.validate_repo_id(hub_model_id or output_name)
    except huggingface_hub.utils.HFValidationError as e:  # in .utils from huggingface_hub 0.2x to 1.x
        what = f"--hub_model_id {hub_model_id}" if hub_model_id else f"the output dir's name {output_name!r}"
        raise UserError(f"{what} is not a Hub repo id ({one_line(e)}): pass --hub_model_id like "
                        "you/sks-dog-lora") from None
    if not (token or huggingface_hub.get_token()):
        raise UserError("--push_to_hub needs a Hub token: log in with `hf auth login`, or pass --hub_token")


def read_json_config(file, flag, name):
    """A model folder's config or index: a JSON object, or a UserError naming it."""
    shown = file.relative_to(name).as_posix()
    if not file.is_file():
        raise UserError(f"{flag} {name} is not a diffusers folder (no {shown} in it)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {name}: {shown} is unreadable ({type(e).__name__}): download the model "
                        "again") from None
    if not isinstance(config, dict):
        raise UserError(f"{flag} {name}: {shown} is not a JSON object: download the model again")
    return config


def weight_files(folder, variant):
    """The weight files from_pretrained picks in a folder: model.safetensors, diffusion_pytorch_model.bin, their
    shards model-00001-of-00002.safetensors, and with a variant model.fp16.safetensors and its shards."""
    if not folder.is_dir():
        return []
    names = [p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file()]
    return [n for n in names if (f".{variant}" in Path(n).stem if variant else "." not in Path(n).stem)]


@dataclasses.dataclass
class Models:
    tokenizers: list
    text_encoders: list
    unet: torch.nn.Module
    vae: torch.nn.Module
    noise_scheduler: object
    latent_cache: dict = None  # (image path, flipped, size) -> (VAE posterior moments, time ids, mask or None)
    prompt_cache: dict = None  # prompt -> (prompt embeddings, pooled embedding), when the encoders are frozen
    # the pipeline's unconditional (classifier-free guidance's other half) is zeros, not the embedded "": SDXL's
    # force_zeros_for_empty_prompt, which SSD-1B keeps; --caption_dropout trains that same unconditional
    empty_prompt_is_zeros: bool = True
    held_as: str = ""  # how a quantised base is held (quantized_base.storage_note), for the lines that render


def load_models(model, vae_model, revision, variant, dtype, device, with_unet=True, storage=None):
    """SSD-1B's parts, frozen, in `dtype` on `device`. vae_model=None means the model's own VAE. with_unet=False
    leaves models.unet None, for load_unet once the text encoders have gone. storage "fp8" holds the text encoders'
    layers (and the UNet's) in float8, "nf4" the UNet's linear layers in 4 bits (quantized_base)."""
    if storage:
        keep_freed_copies_off_the_heap()
    common = dict(revision=revision, variant=variant)
    # each loaded straight in its run dtype: no full-precision copy first (and diffusers warns at a later cast)
    diffusers_common = dict(common, **{DIFFUSERS_DTYPE: dtype})
    with load_errors_named(model, vae_model):
        tokenizers = [CLIPTokenizer.from_pretrained(model, subfolder=sub, revision=revision)
                      for sub in ("tokenizer", "tokenizer_2")]
        text_encoders = [load_text_encoder(cls, model, sub, revision, variant, dtype, device, storage)
                         for cls, sub in [(CLIPTextModel, "text_encoder"), (CLIPTextModelWithProjection,
                                                                            "text_encoder_2")]]
        unet = load_unet(model, revision, variant, dtype, device, storage) if with_unet else None
        if vae_model:
            vae = AutoencoderKL.from_pretrained(vae_model, **{DIFFUSERS_DTYPE: dtype})
        else:
            vae = AutoencoderKL.from_pretrained(model, subfolder="vae", **diffusers_common)
        noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler", revision=revision)
        pipeline_config = StableDiffusionXLPipeline.load_config(model, revision=revision)
    for module in [*text_encoders, vae]:
        module.requires_grad_(False)
        module.to(device)
    if vae.config.force_upcast:  # SDXL's original VAE overflows in fp16; the fp16-fix VAE does not
        vae.to(dtype=torch.float32)
    return Models(tokenizers, text_encoders, unet, vae, noise_scheduler,
                  empty_prompt_is_zeros=pipeline_config.get("force_zeros_for_empty_prompt", True))


def load_text_encoder(cls, model, subfolder, revision, variant, dtype, device, storage):
    """One CLIP text encoder, frozen, in `dtype` on `device`, its layers in float8 under storage "fp8" (nf4 is the
    UNet's alone). Under either it streams in like the UNet (load_unet), so the pair is never whole in bf16 (1.5
    GiB for SSD-1B's) beside the file mapped to make it, and the load is no longer the run's peak."""
    files = safetensors_files(model, subfolder, "model", revision, variant) if storage else []
    storage = "fp8" if storage == "fp8" else None
    if not files:
        encoder = cls.from_pretrained(model, subfolder=subfolder, revision=revision, variant=variant,
                                      **{TRANSFORMERS_DTYPE: dtype})
        if storage:  # a .bin or sharded hub model: cast once whole
            prepare_storage(encoder, storage, dtype)
        return encoder.requires_grad_(False).to(device)
    config = cls.config_class.from_pretrained(model, subfolder=subfolder, revision=revision)
    with init_empty_weights():
        encoder = cls._from_config(config, **{TRANSFORMERS_DTYPE: dtype})
    stream_into(encoder, files, dtype, device, storage, model, subfolder)
    return encoder.eval().requires_grad_(False).to(device)


def load_unet(model, revision, variant, dtype, device, storage=None):
    """The UNet, frozen, in `dtype` on `device` (its layers stored as `storage` says: quantized_base). The trainer
    loads it last, once the prompt cache has let the text encoders go, and from a safetensors file a few tensors at
    a time (stream_weights), so the file is never mapped whole beside the weights cast from it: from_pretrained
    keeps all of SSD-1B's fp16 file (2.5 GiB) mapped until the bf16 weights made from it (2.5 GiB more) are
    complete. Other weights (.bin, a hub model's shards) load with from_pretrained."""
    if storage:
        keep_freed_copies_off_the_heap()
    with load_errors_named(model):
        files = safetensors_files(model, "unet", "diffusion_pytorch_model", revision, variant)
        if not files:
            return unet_from_pretrained(model, revision, variant, dtype, device, storage)
        config = UNet2DConditionModel.load_config(model, subfolder="unet", revision=revision)
    with init_empty_weights():  # parameters on the meta device: no memory until the weights come
        unet = UNet2DConditionModel.from_config(config)
    stream_into(unet, files, dtype, device, storage, model, "UNet")
    unet.register_to_config(_name_or_path=model)  # as from_pretrained does
    return unet.eval().requires_grad_(False).to(device)  # from_pretrained's eval mode; buffers to the device


def unet_from_pretrained(model, revision, variant, dtype, device, storage):
    """A UNet of .bin weights or hub shards: loaded whole in `dtype`, then cast to float8 (a higher peak than the
    streamed load); under nf4, diffusers' own bitsandbytes loader, which refuses a machine without a GPU."""
    quantization = dict(quantization_config=nf4_config(dtype)) if storage == "nf4" else {}
    try:
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", revision=revision, variant=variant,
                                                    torch_dtype=dtype, **quantization)
    except RuntimeError as e:  # diffusers' "No GPU found. A GPU is needed for quantization."
        raise UserError(f"--nf4_base: {one_line(e)} (this model's UNet has no safetensors file, which this trainer "
                        "quantises itself on any device); pass --fp8_base instead") from None
    if storage == "fp8":
        prepare_storage(unet, storage, dtype)
    return unet.requires_grad_(False).to(device) if storage != "nf4" else unet.requires_grad_(False)


def stream_into(model, files, dtype, device, storage, name, part):
    """`files` streamed into `model`, made on the meta device, each weight into its slot (storage's dtype, or a
    4-bit parameter); refused in one line where the weights do not fit the model's config."""
    prepare_storage(model, storage, dtype)
    unexpected = [key for file in files for key in stream_weights(model, file, device, name, part)]
    unexpected = [key for key in unexpected if not key.endswith("position_ids")]  # old CLIP files hold this buffer
    missing = [key for key, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if missing or unexpected:
        raise UserError(f"cannot load {name}: its {part} weights do not fit its config "
                        f"({counted(len(missing), 'tensor')} missing, {len(unexpected)} unknown, e.g. "
                        f"{(missing + unexpected)[0]}); download the model again")


def safetensors_files(model, subfolder, stem, revision, variant):
    """A part's safetensors files (stem: "diffusion_pytorch_model" or "model"), as from_pretrained would pick
    them: a local folder's single file or its shards, or a hub model's single file (fetched, or found in the cache).
    [] when there are none, or the hub does not give one: from_pretrained then loads what there is, or names what
    is wrong."""
    name = f"{stem}{'.' + variant if variant else ''}.safetensors"
    folder = Path(model) / subfolder
    if folder.is_dir():
        index = folder / f"{name}.index.json"
        if (folder / name).is_file():
            return [folder / name]
        if index.is_file():
            shards = read_json_config(index, "--pretrained_model_name_or_path", model).get("weight_map")
            if not isinstance(shards, dict) or not shards:
                raise UserError(f"--pretrained_model_name_or_path {model}: {subfolder}/{index.name} lists no shards: "
                                "download the model again")
            return [folder / shard for shard in sorted(set(shards.values()))]
        return []
    try:
        return [Path(huggingface_hub.hf_hub_download(model, name, subfolder=subfolder, revision=revision))]
    except Exception:  # not there (a model of shards or .bin), offline and not cached, unreachable
        return []


def stream_weights(model, file, device, name, part, tensors_at_once=32, scratch_size=2**18):
    """One safetensors file into `model` (made on the meta device, its slots given their dtypes), each tensor cast
    to its slot's dtype on `device`. safe_open maps the whole file, and the tensors it hands out are views of that
    mapping; opening it again for every few tensors lets the pages read so far go. Returns the names the model has
    no place for."""
    with unreadable_named(file, name), safe_open(file, "pt") as weights:
        keys = list(weights.keys())
    slots = {key: tensor.dtype for key, tensor in [*model.named_parameters(), *model.named_buffers()]}
    unexpected, scratch = [], torch.empty(scratch_size, dtype=torch.float32)
    for start in range(0, len(keys), tensors_at_once):
        with unreadable_named(file, name), safe_open(file, "pt") as weights:
            tensors = {}
            for key in keys[start:start + tensors_at_once]:
                tensor, name_in_model = weights.get_tensor(key), model_key(key, slots)
                if (slot := quantized_slot(model, name_in_model)) is not None:
                    load_quantized(model, name_in_model, cast(tensor, slot.dtype, "cpu", scratch), slot, device)
                else:
                    tensors[name_in_model] = cast(tensor, slots.get(name_in_model, tensor.dtype), device, scratch)
        try:
            unexpected += model.load_state_dict(tensors, strict=False, assign=True).unexpected_keys
        except RuntimeError as e:  # a tensor of another shape than the config's
            raise UserError(f"cannot load {name}: its {part} weights do not fit its config ({one_line(e)}); "
                            "download the model again") from None
    return unexpected


def model_key(key, slots):
    """A weight's name in the model: SDXL's CLIP files name every weight under "text_model.", which transformers
    5's CLIPTextModel has no longer (its from_pretrained renames them as it loads)."""
    return next((name for name in (key, key.removeprefix("text_model."), f"text_model.{key}") if name in slots), key)


def cast(tensor, dtype, device, scratch):
    """`tensor` as `dtype` on `device`. Between fp16 and bf16 on a CPU, through fp32 a piece the size of `scratch`
    at a time: torch's direct copy between the two is about 4x slower there than both copies through fp32 (so the
    fp16 file of SSD-1B's UNet loads in bf16 in about 2 s instead of 4, on one thread: benchmarks/RESULTS.md)."""
    if torch.device(device).type != "cpu" or {tensor.dtype, dtype} != {torch.float16, torch.bfloat16}:
        return tensor.to(device=device, dtype=dtype)
    out = torch.empty(tensor.shape, dtype=dtype)
    for piece, target in zip(tensor.reshape(-1).split(len(scratch)), out.view(-1).split(len(scratch))):
        target.copy_(scratch[:len(piece)].copy_(piece))
    return out


@contextlib.contextmanager
def unreadable_named(file, model):
    """A damaged or missing safetensors file of a model part as one line naming it (its folder/file)."""
    try:
        yield
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot load {model}: {Path(file).parent.name}/{Path(file).name} is unreadable "
                        f"({one_line(e)}); download the model again") from None


@contextlib.contextmanager
def unbuildable_config_named(model):
    """A config that parses as JSON but describes no model the libraries can build (a value of the wrong kind, a
    list of the wrong length), met where an empty model is built from it before any weights load: one line."""
    try:
        yield
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise UserError(f"--pretrained_model_name_or_path {model}: its configs describe no SSD-1B the libraries can "
                        f"build ({one_line(e)[:200]}); download the model again") from None


@contextlib.contextmanager
def load_errors_named(model, vae_model=None):
    """from_pretrained's OSError (a file missing from a hub snapshot, an unreachable hub, a damaged download) as
    one line naming the models; check_models has refused what a local folder can show before loading."""
    try:
        yield
    except OSError as e:
        names = f"{model}" + (f" (VAE {vae_model})" if vae_model else "")
        raise UserError(f"cannot load {names}: {one_line(e)}; check --pretrained_model_name_or_path, --revision "
                        "and --variant, or download the model again") from None


def build_pipeline(models, model, revision, variant, progress=True):
    """An SDXL pipeline over the given parts; the sampling scheduler comes from the model's folder. `progress`:
    the pipeline's own bar over denoising steps (a 1024 px render takes minutes on a small GPU)."""
    with load_errors_named(model):
        pipe = StableDiffusionXLPipeline.from_pretrained(
            model, revision=revision, variant=variant, vae=models.vae, unet=models.unet,
            text_encoder=models.text_encoders[0], text_encoder_2=models.text_encoders[1],
            tokenizer=models.tokenizers[0], tokenizer_2=models.tokenizers[1])
    pipe.set_progress_bar_config(disable=not progress, leave=False)
    return pipe


def apply_adapters(pipe, step_dir, lora_scale=1.0):
    """Load a step dir's diffusers-format file: unet, text_encoder and text_encoder_2 each get their own."""
    pipe.load_lora_weights(str(step_dir), weight_name=LORA_FILE, adapter_name="dreambooth")
    check_adapters_landed(pipe, Path(step_dir) / LORA_FILE, "dreambooth")
    return set_lora_scale(pipe, lora_scale)


def set_lora_scale(pipe, lora_scale):
    """The adapters at lora_scale; 0 switches them off, so it is the base model for DoRA too: peft scales only
    DoRA's low-rank update, and the trained magnitudes act at any other scale."""
    if lora_scale == 0:
        pipe.disable_lora()
    else:
        pipe.enable_lora()
        pipe.set_adapters("dreambooth", adapter_weights=lora_scale)
    return pipe


def check_adapters_landed(pipe, lora_file, adapter_name):
    """Each component's LoRA weights hold what the file holds. A name mismatch (another library version's
    layout, say) leaves them at their initial values, and diffusers only logs a warning. Compared as sorted values,
    which no renaming or reshaping changes: a sum of squares can match by chance (a random lora_A's), or by
    closeness (a DoRA magnitude starts at its base weight's row norms, near where training leaves it)."""
    saved = safetensors.torch.load_file(str(lora_file))
    for component in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component)
        in_file = [v for k, v in saved.items() if k.startswith(f"{component}.") and not k.endswith(".alpha")]
        held = [p for n, p in model.named_parameters() if ".lora_" in n and f".{adapter_name}." in n]
        if in_file and not same_values(in_file, held, model.dtype):
            raise UserError(f"the {component} adapter in {lora_file} did not load: its layer names don't match "
                            "this model; load it with the diffusers and transformers versions that wrote it")


def same_values(tensors, others, dtype):
    """Two lists of tensors hold the same values, in any order and shape, up to rounding to dtype."""
    a, b = (torch.cat([t.detach().float().flatten().cpu() for t in ts] or [torch.zeros(0)]).sort().values
            for ts in (tensors, others))
    return a.shape == b.shape and torch.allclose(a, b, rtol=torch.finfo(dtype).eps, atol=torch.finfo(dtype).tiny)


def generate_images(pipe, prompt, seeds, height, width, num_inference_steps, **kwargs):
    """One image per seed; each seed drives a CPU generator, so a seed is the same picture on any machine."""
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    with torch.no_grad():
        return pipe(prompt, num_images_per_prompt=len(seeds), generator=generators, height=height,
                    width=width, num_inference_steps=num_inference_steps, **kwargs).images


def unwrap(accelerator, model):
    """The model under accelerate's wrappers and torch.compile's, whose weights keep the model's own names
    (a compiled module's start with `_orig_mod.`, which no loader reads)."""
    model = accelerator.unwrap_model(model)
    return getattr(model, "_orig_mod", model)


def image_grid(images):
    """Images in rows of ceil(sqrt(n)), the last row filled with white: make_image_grid takes full grids only."""
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    blank = Image.new("RGB", images[0].size, "white")
    return make_image_grid([*images, *[blank] * (rows * columns - len(images))], rows, columns)


def side_by_side(left, right):
    """Two grids in one picture, a white gap between: the trained model's, then the base model's."""
    gap = max(left.width // 16, 4)
    both = Image.new("RGB", (left.width + gap + right.width, max(left.height, right.height)), "white")
    both.paste(left, (0, 0))
    both.paste(right, (left.width + gap, 0))
    return both


def cached_prompt_kwargs(pipe, models, prompt):
    """The pipeline's prompt arguments from the prompt cache, when the text encoders have left the device."""
    if not models.prompt_cache:
        return {}
    embeds, pooled = models.prompt_cache[prompt]
    kwargs = {"prompt_embeds": embeds[None], "pooled_prompt_embeds": pooled[None]}
    if not pipe.config.force_zeros_for_empty_prompt:  # SDXL's default negative is zeros; else embed ""
        negative, negative_pooled = models.prompt_cache[""]
        kwargs.update(negative_prompt_embeds=negative[None], negative_pooled_prompt_embeds=negative_pooled[None])
    return kwargs
