"""The memory a run will need, said before any model loads: the parts of its peak (weights at their storage
precision, LoRA, gradients, optimizer state, activations), the phase the peak falls in, and, where the device holds
less, the options that would fit. Parameters are counted on the model's own configs, built on the meta device;
what memory a step's activations and the process itself take was measured (the constants below say where)."""

import dataclasses
import json
import re
import resource
from pathlib import Path

import huggingface_hub
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .checks import uses_class_images
from .imaging import list_images
from .messages import warn
from .pipeline import unbuildable_config_named
from .quantized_base import NF4_BLOCKSIZE, base_storage, cast_layers_to_fp8, nf4_quantizes

GIB = 2**30
STORAGE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
# bitsandbytes NF4 with double quantisation: 4 bits a weight, an 8-bit absmax per block of 64, and an fp32
# absmax of those per 256 blocks
NF4_BYTES = 0.5 + 1 / NF4_BLOCKSIZE + 4 / (NF4_BLOCKSIZE * 256)  # NF4_BLOCKSIZE weights a block
# 8-bit AdamW keeps two 8-bit states and an fp32 absmax per block of 256 for each; tensors under 4096 values keep
# 32-bit states (bitsandbytes' min_8bit_size)
ADAMW8BIT_BYTES, ADAMW8BIT_MIN_SIZE = 2 + 2 * 4 / 256, 4096
OPTIMIZER_BYTES = {"adamw": 8, "prodigy": 16}  # fp32 exp_avg, exp_avg_sq; Prodigy adds s and its copy p0

# Measured: see benchmarks/RESULTS.md, "Memory estimate", for the runs and the fit. Full-size random SSD-1B
# (benchmarks/make_full_ssd1b.py, fp16 files), AMD EPYC 2 cores 24 GiB, torch 2.13.0+cpu, diffusers 0.42.1,
# transformers 5.25.0, 2026-12-08, 128 px, bf16, rank 8, 8-bit AdamW, latents cached, one thread:
#   MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/memory_estimate.py --model /tmp/full-ssd1b --calibrate
# which runs the trainer at batch 1 and 2, gradient checkpointing off and on, and once making a class image, and
# reads peak RSS by phase as benchmarks/cpu_memory.py does (VmHWM between the trainer's lines, ru_maxrss).
# Activations of one training sample, per latent pixel ((resolution / 8) ** 2), in a 2-byte compute dtype
# (fp32 doubles them), fitted from batch 1 and batch 2 (the slope), gradient checkpointing off and on:
ACTIVATION_BYTES = {False: 355_000, True: 56_000}
# What the process holds in training beyond its RSS before any model loaded, the weights, LoRA, its gradients
# and optimizer state, and the activations' slope: the batch-independent part of the same fit (the libraries
# imported later, autograd's and the allocator's fixed share):
TRAINING_OVERHEAD = 166_000_000  # 172 MB fitted without gradient checkpointing, 162 MB with: their mean
# Loading the text encoders without a quantised base peaks above their weights and the VAE's, as a share of the
# text encoders' weights (measured again after they came to stream in: the same 3.25 GiB load phase). It is
# glibc's heap again: under --fp8_base or --nf4_base the trainer fixes malloc's mmap threshold before the first
# load (quantized_base.keep_freed_copies_off_the_heap), and the load phase is 0.15 GiB above them (both, 128 px).
TEXT_ENCODER_LOAD_SHARE = 0.75
# Rendering (class images, validation): per image of a batch and latent pixel, in a 2-byte compute dtype (each
# image's latents go through the UNet twice: classifier-free guidance), and a part that does not scale: the
# slope and the rest of what making one class image peaks at above the weights then held, at 128 and 256 px
# (rows class_image and class_image_256, with glibc's default malloc)
RENDER_BYTES, RENDER_FIXED = 101_500, 128_000_000


@dataclasses.dataclass(frozen=True)
class Part:
    """One model's parameters, by how each storage precision treats them."""
    parameters: int
    fp8: int = 0  # stored in float8 by diffusers' layerwise casting (Linear, Conv, Embedding; not norms)
    linear_weights: int = 0  # what NF4 quantises: nn.Linear weights
    lora_layers: tuple = ()  # (in_features, out_features) of each layer LoRA targets

    def weight_bytes(self, precision, compute):
        """Bytes at `precision` ("fp32", "fp16", "bf16", or "fp8"/"nf4" with the rest at `compute`)."""
        rest = STORAGE_BYTES[compute]
        if precision == "fp8":
            return self.fp8 + (self.parameters - self.fp8) * rest
        if precision == "nf4":
            return self.linear_weights * NF4_BYTES + (self.parameters - self.linear_weights) * rest
        return self.parameters * STORAGE_BYTES[precision]

    def lora_tensors(self, rank, dora=False):
        """The numel of each trained tensor: lora_A, lora_B (and DoRA's magnitude) of each targeted layer."""
        return [n for i, o in self.lora_layers for n in (rank * i, o * rank, *([o] if dora else []))]


@dataclasses.dataclass(frozen=True)
class Counts:
    unet: Part
    text_encoders: tuple  # (CLIP-L, CLIP-G)
    vae: Part
    vae_decoder: Part  # what stays once the latents are cached (the encoder is let go)
    vae_upcast: bool  # force_upcast: the VAE runs in fp32 whatever the run's precision


@dataclasses.dataclass(frozen=True)
class Setting:
    """What the estimate depends on, as flags say it; options that might fit are this with one thing changed."""
    precision: str  # the base's storage: "fp32", "fp16", "bf16", "fp8" or "nf4"
    compute: str  # the mixed-precision dtype: "fp32", "fp16" or "bf16"
    resolution: int
    batch_size: int
    prior: bool  # prior preservation: instance + class in every step
    gradient_checkpointing: bool
    latents_cached: bool
    train_text_encoder: bool
    rank: int
    optimizer: str
    dora: bool = False
    class_images_batch: int = 0  # images rendered at once where class images are still to be made, else 0
    validation_images: int = 0  # images rendered at once by each validation, 0 without validation
    validation_resolution: int = 0
    overhead: int = 0  # what the process holds before any model loads (its RSS on a CPU)
    on_cpu: bool = True


@dataclasses.dataclass(frozen=True)
class Estimate:
    parts: dict  # name -> bytes
    phases: dict  # phase -> bytes at its peak
    setting: Setting

    @property
    def peak(self):
        return max(self.phases.values())

    @property
    def peak_phase(self):
        return max(self.phases, key=self.phases.get)


# ----------------------------------------------------------------------------------------------------------
# Counting, on the meta device
# ----------------------------------------------------------------------------------------------------------


def config_file(model, subfolder, revision=None):
    """A part's config.json: in a local folder, or in the local Hub cache (never fetched: an estimate waits on
    no download). None where it is not at hand."""
    if Path(model).is_dir():
        path = Path(model) / subfolder / "config.json"
        return path if path.is_file() else None
    try:
        return Path(huggingface_hub.hf_hub_download(model, "config.json", subfolder=subfolder or None,
                                                    revision=revision, local_files_only=True))
    except Exception:  # not cached, not a repo id, a damaged cache: the run's own load says which
        return None


def count_part(module, lora_targets=(), lora_excluded=None):
    """A meta-device module's Part. Its float8 share is what diffusers' layerwise casting stores in float8, found
    by applying it (on meta tensors it casts nothing real): the default skip patterns, and a model's own."""
    linear = [(name, m) for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)]
    lora = tuple((m.in_features, m.out_features) for name, m in linear
                 if any(name == t or name.endswith("." + t) for t in lora_targets)
                 and not (lora_excluded and re.fullmatch(lora_excluded, name)))
    parameters = sum(p.numel() for p in module.parameters())
    linear_weights = sum(m.weight.numel() for _, m in linear if nf4_quantizes(m))
    cast_layers_to_fp8(module, torch.bfloat16)  # the trainer's own choice of layers
    fp8 = sum(p.numel() for p in module.parameters() if p.dtype == torch.float8_e4m3fn)
    return Part(parameters, fp8, linear_weights, lora)


def count_models(model, vae_model, revision, lora_targets):
    """The model's Counts from its configs, or None where a config is not at hand. lora_targets: the trainer's
    (UNet targets, text encoder targets)."""
    files = [config_file(model, sub, revision) for sub in ("unet", "text_encoder", "text_encoder_2")]
    files.append(config_file(vae_model, "") if vae_model else config_file(model, "vae", revision))
    if None in files:
        return None
    unet_targets, text_encoder_targets = lora_targets
    vae_config = json.loads(files[3].read_text())
    # torch.device, not accelerate's init_empty_weights: that makes each parameter on the CPU before moving it,
    # and glibc, having freed those blocks, raises its mmap threshold; the UNet's streamed load then leaves
    # 1.2 GiB of heap holes in RSS (benchmarks/RESULTS.md, "Memory estimate")
    with torch.device("meta"), unbuildable_config_named(model):
        unet = UNet2DConditionModel.from_config(json.loads(files[0].read_text()))
        clip_l = CLIPTextModel(CLIPTextConfig.from_json_file(files[1]))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig.from_json_file(files[2]))
        vae = AutoencoderKL.from_config(vae_config)
    # CLIP-L's last layer gets no LoRA: SDXL never reads its output (the trainer's add_lora)
    last = rf"(text_model\.)?encoder\.layers\.{clip_l.config.num_hidden_layers - 1}\..+"
    decoder = sum(p.numel() for m in (vae.decoder, vae.post_quant_conv) if m is not None for p in m.parameters())
    return Counts(unet=count_part(unet, unet_targets),
                  text_encoders=(count_part(clip_l, text_encoder_targets, last),
                                 count_part(clip_g, text_encoder_targets)),
                  vae=Part(sum(p.numel() for p in vae.parameters())), vae_decoder=Part(decoder),
                  vae_upcast=bool(vae_config.get("force_upcast", True)))


# ----------------------------------------------------------------------------------------------------------
# The estimate
# ----------------------------------------------------------------------------------------------------------


def latent_pixels(resolution):
    return (resolution // 8) ** 2


def activation_bytes(setting, gradient_checkpointing):
    """One training step's activations: per sample and latent pixel, as measured, in the compute dtype."""
    samples = setting.batch_size * (2 if setting.prior else 1)
    scale = STORAGE_BYTES[setting.compute] / 2
    return samples * latent_pixels(setting.resolution) * ACTIVATION_BYTES[gradient_checkpointing] * scale


def render_bytes(images, resolution, compute):
    """A rendering's activations: classifier-free guidance runs each image's latents twice."""
    return RENDER_FIXED + 2 * images * latent_pixels(resolution) * RENDER_BYTES * STORAGE_BYTES[compute] / 2


def optimizer_bytes(tensors, optimizer):
    if optimizer == "adamw8bit":
        return sum(n * (ADAMW8BIT_BYTES if n >= ADAMW8BIT_MIN_SIZE else 8) for n in tensors)
    return sum(tensors) * OPTIMIZER_BYTES[optimizer]


def estimate(counts, setting):
    """The run's peak by phase, as the trainer sequences them: the text encoders and the VAE load first; class
    images (if any are missing) are made with the UNet loaded beside them; the prompt cache lets the text encoders
    go unless they train, the latent cache the VAE's encoder; then the UNet loads and training runs; validation
    renders with the training's weights and optimizer state still held."""
    s = setting
    # under fp8 the text encoders are float8 too (NF4 is the UNet's alone)
    loaded = "fp8" if s.precision == "fp8" else s.compute
    vae_dtype = "fp32" if counts.vae_upcast else s.compute
    parts = {
        "UNet": counts.unet.weight_bytes(s.precision, s.compute),
        "text encoders": sum(t.weight_bytes(loaded, s.compute) for t in counts.text_encoders),
        "VAE": (counts.vae_decoder if s.latents_cached else counts.vae).weight_bytes(vae_dtype, s.compute),
    }
    lora = counts.unet.lora_tensors(s.rank, s.dora)
    if s.train_text_encoder:
        lora += [n for t in counts.text_encoders for n in t.lora_tensors(s.rank, s.dora)]
    parts["LoRA (fp32)"] = parts["gradients"] = 4 * sum(lora)
    parts["optimizer state"] = optimizer_bytes(lora, s.optimizer)
    parts["activations"] = activation_bytes(s, s.gradient_checkpointing)
    parts["process, more in training"] = TRAINING_OVERHEAD if s.on_cpu else 0
    overhead = s.overhead + parts["process, more in training"]
    vae_full = counts.vae.weight_bytes(vae_dtype, s.compute)
    load = (s.overhead + parts["text encoders"] * (1 + (TEXT_ENCODER_LOAD_SHARE if s.precision in STORAGE_BYTES
                                                         else 0)) + vae_full)
    phases = {"load": load}
    if s.class_images_batch:
        phases["class images"] = (s.overhead + parts["text encoders"] + vae_full + parts["UNet"]
                                  + render_bytes(s.class_images_batch, s.resolution, s.compute))
    held = (parts["UNet"] + parts["VAE"] + (parts["text encoders"] if s.train_text_encoder else 0)
            + parts["LoRA (fp32)"] + parts["optimizer state"])
    phases["training"] = overhead + held + parts["gradients"] + parts["activations"]
    if s.validation_images:  # the gradients were let go (zero_grad(set_to_none=True)) before it renders
        phases["validation"] = overhead + held + render_bytes(s.validation_images, s.validation_resolution, s.compute)
    parts["process"] = s.overhead
    return Estimate(parts, phases, setting)


# ----------------------------------------------------------------------------------------------------------
# The run's setting, the device, the message
# ----------------------------------------------------------------------------------------------------------


def process_rss():
    """This process's resident memory now (torch and the libraries it has imported), from /proc."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)[1]) * 1024
    except (OSError, TypeError):  # no /proc (macOS): the peak so far is the nearest figure
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def base_precision(args, compute):
    """The frozen base's storage: --fp8_base or --nf4_base where given, else the compute dtype."""
    return base_storage(args) or compute


def setting_from_args(args, settings, device, mixed_precision, missing_class_images=0):
    """The Setting that args, settings and the accelerator's device and mixed precision come to."""
    compute = mixed_precision if mixed_precision in ("fp16", "bf16") else "fp32"
    validation_size = getattr(settings, "validation_size", None) or [args.resolution] * 2
    return Setting(
        precision=base_precision(args, compute), compute=compute, resolution=args.resolution,
        batch_size=args.train_batch_size, prior=args.with_prior_preservation,
        gradient_checkpointing=args.gradient_checkpointing,
        # auto caches where no random crop is lost: with --center_crop always (square photos too, taken as not)
        latents_cached=args.cache_latents == "on" or (args.cache_latents == "auto" and args.center_crop),
        train_text_encoder=args.train_text_encoder, rank=args.rank, optimizer=args.optimizer, dora=args.use_dora,
        class_images_batch=min(args.sample_batch_size, missing_class_images),
        validation_images=args.num_validation_images if args.validation_prompt else 0,
        validation_resolution=int((validation_size[0] * validation_size[1]) ** 0.5),
        overhead=process_rss() if device.type == "cpu" else 0, on_cpu=device.type == "cpu")


def device_memory(device):
    """(bytes this run may use, what they are): a GPU's total, or on a CPU what /proc/meminfo says is available
    plus what this process already holds (the estimate counts that too)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1], "the GPU's total (torch.cuda.mem_get_info)"
    try:
        meminfo = Path("/proc/meminfo").read_text()
        available = int(re.search(r"^MemAvailable:\s+(\d+) kB", meminfo, re.M)[1]) * 1024
    except (OSError, TypeError):
        return None, "unknown"
    return available + process_rss(), "MemAvailable of /proc/meminfo, plus this process's RSS"


def gib(n):
    return f"{n / GIB:.2f} GiB"


def describe(estimate, other):
    """The estimate, itemised, in a few lines; `other` is the same run with gradient checkpointing switched."""
    s, p = estimate.setting, estimate.parts
    checkpointing = {s.gradient_checkpointing: "this run", not s.gradient_checkpointing: gib(other.peak)}
    phases = ", ".join(f"{name} {gib(value)}" for name, value in estimate.phases.items())
    encoders = "trained" if s.train_text_encoder else "let go after the prompt cache"
    samples = f"{s.batch_size} x 2 (instance + class)" if s.prior else f"{s.batch_size}"
    return (f"memory estimate: peak {gib(estimate.peak)} in {estimate.peak_phase} "
            f"(gradient checkpointing on: {checkpointing[True]}; off: {checkpointing[False]})\n"
            f"  weights: UNet {gib(p['UNet'])} ({s.precision}), text encoders {gib(p['text encoders'])} ({encoders}), "
            f"VAE {gib(p['VAE'])}\n"
            f"  LoRA {gib(p['LoRA (fp32)'])} (fp32), gradients {gib(p['gradients'])}, optimizer state "
            f"{gib(p['optimizer state'])} ({s.optimizer}), activations {gib(p['activations'])} at {s.resolution} px, "
            f"batch {samples}\n"
            f"  process {gib(p['process'])} before any model loads, {gib(p['process, more in training'])} more in "
            f"training (libraries, the allocator); by phase: {phases}")


OPTION_RESOLUTIONS = [1024, 768, 512, 384, 256, 128]


def options(setting, has_flag):
    """(flag as a user types it, the fields it changes) for each option this run does not already use."""
    found = []
    if setting.compute == "fp32":
        found.append(("--mixed_precision bf16", {"compute": "bf16", "precision": "bf16" if setting.precision == "fp32"
                                                 else setting.precision}))
    if not setting.gradient_checkpointing:
        found.append(("--gradient_checkpointing", {"gradient_checkpointing": True}))
    for flag, precision in (("--fp8_base", "fp8"), ("--nf4_base", "nf4")):
        if has_flag(flag) and setting.precision not in ("fp8", "nf4"):
            found.append((flag, {"precision": precision}))
    if setting.optimizer != "adamw8bit":
        found.append(("--optimizer adamw8bit", {"optimizer": "adamw8bit"}))
    if not setting.latents_cached:
        found.append(("--cache_latents on", {"latents_cached": True}))
    found += [(f"--train_batch_size {b}", {"batch_size": b}) for b in range(setting.batch_size - 1, 0, -1)]
    found += [(f"--sample_batch_size {b}", {"class_images_batch": b})
              for b in range(setting.class_images_batch - 1, 0, -1)]
    found += [(f"--resolution {r}", {"resolution": r}) for r in OPTION_RESOLUTIONS if r < setting.resolution]
    return found


def options_that_fit(counts, setting, limit, has_flag):
    """Each option that brings the peak under `limit`, with its estimate (of a smaller batch or resolution, the
    largest that fits). Where none fits alone: those that leave the batch and resolution as they are, together."""
    fits, seen = [], set()
    for flag, changes in options(setting, has_flag):
        peak = estimate(counts, dataclasses.replace(setting, **changes)).peak
        if peak <= limit and flag.split()[0] not in seen:
            fits.append(f"{flag} ({gib(peak)})")
            seen.add(flag.split()[0])
    apart = ("--train_batch_size", "--sample_batch_size", "--resolution", "--nf4_base")  # fp8 or nf4, not both
    together = [(flag, changes) for flag, changes in options(setting, has_flag) if not flag.startswith(apart)]
    if fits or len(together) < 2:
        return fits
    peak = estimate(counts, dataclasses.replace(setting, **{k: v for _, c in together for k, v in c.items()})).peak
    return [f"{' '.join(flag for flag, _ in together)} together ({gib(peak)})"] if peak <= limit else []


def missing_class_images(args, settings):
    """How many class images the run will make first (the UNet renders them beside the text encoders)."""
    if not uses_class_images(args):
        return 0
    class_dir = Path(settings.class_dir)
    return max(0, args.num_class_images - (len(list_images(class_dir)) if class_dir.is_dir() else 0))


def announce_memory(accelerator, args, settings, lora_targets):
    """Print the run's memory estimate before any model loads, and warn (never refuse) where it exceeds the
    device's memory, naming the options that would fit. Returns the estimated peak in bytes, for the closing
    report, or None where the model's configs are not at hand."""
    counts = count_models(settings.pretrained_model_name_or_path, settings.pretrained_vae_model_name_or_path,
                          args.revision, lora_targets)
    if counts is None:
        accelerator.print(f"memory estimate unavailable: the configs of {settings.pretrained_model_name_or_path} "
                          "are in no local folder and not in the local Hub cache")
        return None
    setting = setting_from_args(args, settings, accelerator.device, accelerator.mixed_precision,
                                missing_class_images(args, settings))
    ours = estimate(counts, setting)
    other = estimate(counts, dataclasses.replace(setting, gradient_checkpointing=not setting.gradient_checkpointing))
    limit, what = device_memory(accelerator.device)
    accelerator.print(describe(ours, other) + (f"\n  device: {gib(limit)} ({what})" if limit else ""))
    if limit and ours.peak > limit and accelerator.is_main_process:
        fits = options_that_fit(counts, setting, limit, lambda flag: hasattr(args, flag.lstrip("-")))
        warn(f"the estimated peak, {gib(ours.peak)}, exceeds this device's {gib(limit)} ({what}): "
             + (f"options that fit: {', '.join(fits)}" if fits else "no option of the trainer's brings it under "
                "on its own; the run may run out of memory"))
    return ours.peak
