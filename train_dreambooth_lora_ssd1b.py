#!/usr/bin/env python
"""DreamBooth LoRA for Segmind's SSD-1B, with prior preservation (Ruiz et al., "DreamBooth", CVPR 2023).

    accelerate launch train_dreambooth_lora_ssd1b.py --instance_dir dog/ --instance_prompt "a photo of sks dog"

The method, top to bottom; what it leans on (checks, run management, exporters, pipeline, telemetry) is the
dreambooth_kit package beside this file. The sections, in file order:
  flags              grouped argparse; parse_args checks them (dreambooth_kit.checks) and freezes them
  check_inputs       photos, masks, captions, models, output dir, resume state: all before any model loads
  class images       the base model makes the missing ones, split across processes, kept for the next run
  add_lora           peft LoRA on the UNet's attention (and both text encoders if asked); 8-bit AdamW or Prodigy
  DreamBoothDataset  photo -> pixels + SDXL time ids (the crop actually taken), drawn anew per sample; its mask;
                     aspect-ratio buckets, a batch one bucket; caption dropout
  caches             VAE latents and prompt embeddings that are the same every step, computed once
  training_step      noise, UNet, dreambooth_loss: instance MSE + prior_loss_weight * class MSE (the class half's
                     target from class images, or the base model's own prediction)
  log_validation     fixed-seed images of the validation prompt
  train              the loop: step, then log, save and validate where their schedules say
  main               the story, in named stages

Settings reach functions one way: the stages that main() calls take `args` (the flags as typed) and `settings`
(what they came to); the method's own functions take the values they use, by name. Every random choice (which
photo, crop, flip, noise, timesteps, dropout) is derived from (seed, sample or step), so a resumed run ends where
the uninterrupted one would.
"""

import argparse
import collections
import contextlib
import dataclasses
import datetime
import functools
import gc
import hashlib
import itertools
import json
import random
import re
import sys
import time
from pathlib import Path

from dreambooth_kit.artifacts import KOHYA_FILE, absolute_if_local, save_png_atomic, write_text_atomic
from dreambooth_kit.checks import (CURVE_PACKAGES, IMAGE_SIDE, INF, MINIMUM_VERSIONS, OPTIMIZER_PACKAGES, SECRET_FLAGS,
                                   ArgumentParser, Flags, check_args, check_precision, check_versions,
                                   effective_learning_rates, uses_class_images, warn_prodigy_learning_rate)
from dreambooth_kit.graceful import (before_libraries, GracefulStop, Interrupted, resume_command, run_script,
                                     stopped_after_training, stopped_before_training, stopped_while_importing)
from dreambooth_kit.imaging import (bit_depth, caption_suffix, draws_anew, image_size, list_images, load_image,
                                    mask_path, mask_weights, nearest_bucket, parse_buckets)
from dreambooth_kit.messages import counted, quiet_library_notices, UserError

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


# ----------------------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------------------


def make_parser():
    """Every flag; a numeric one declares its valid values beside it (range=), and its --help ends with them."""
    p = ArgumentParser(description=__doc__.split("\n")[0])
    add_data_flags(p)
    add_training_flags(p)
    add_output_flags(p)
    return p


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = make_parser()
    args = parser.parse_args(argv)
    check_args(args, parser.flags_given(argv))
    args.__class__ = Flags
    return args


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the flags came to: the defaults that depend on other flags, and model folders as absolute paths, so a
    step dir's run_settings.json works from any folder. Recorded beside the flags, as "derived"."""

    command: tuple  # the flags as typed: an interrupted run prints the command that resumes it
    output_dir: str
    class_dir: str
    lora_alpha: int
    caption_extension: str
    pretrained_model_name_or_path: str  # a local folder as an absolute path, a hub id as the id
    pretrained_vae_model_name_or_path: str | None  # None: the model's own VAE
    output_kohya_format: bool  # off under --use_dora: diffusers drops a kohya file's DoRA magnitudes (dora_scale)
    instance_data_sha256: str = None  # the photos and their captions, once check_inputs has read them
    model_fingerprint: dict = None  # the base model's parts -> what model_fingerprint found, once checked
    resume_state: Path = None  # the state-stepN folder that --resume_from_checkpoint names, if one exists yet
    buckets: tuple = None  # --aspect_ratio_buckets as (height, width) pairs; None: --resolution's square
    validation_size: tuple = None  # (height, width) validation renders at: the photos' most common training size


def derive_settings(args, argv):
    output_dir = args.output_dir or f"work_dirs/ssd_1b_dreambooth_lora_{Path(args.instance_dir.rstrip('/')).name}"
    vae = args.pretrained_vae_model_name_or_path
    return Settings(command=tuple(argv), output_dir=output_dir, buckets=parse_buckets(args.aspect_ratio_buckets,
                                                                                    args.resolution),
                    class_dir=args.class_dir or str(Path(output_dir) / "class_images"),
                    lora_alpha=args.lora_alpha or args.rank, caption_extension=caption_suffix(args.caption_extension),
                    output_kohya_format=args.output_kohya_format and not args.use_dora,
                    pretrained_model_name_or_path=absolute_if_local(args.pretrained_model_name_or_path),
                    pretrained_vae_model_name_or_path=None if vae.strip().lower() in ("", "none")
                    else absolute_if_local(vae))


def add_data_flags(p):
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", default="segmind/SSD-1B")
    g.add_argument("--pretrained_vae_model_name_or_path", default="madebyollin/sdxl-vae-fp16-fix",
                   help="'none' uses the model's own VAE")
    g.add_argument("--revision", default=None)
    g.add_argument("--variant", default=None, help="e.g. fp16")

    g = p.add_argument_group("data")
    g.add_argument("--instance_dir", "--instance_data_dir", dest="instance_dir", required=True,
                   help="a folder of photos, or a hub dataset id such as diffusers/dog-example")
    g.add_argument("--instance_prompt", required=True, help='e.g. "a photo of sks dog"')
    g.add_argument("--caption_extension", default=".txt",
                   help="photo.txt beside photo.jpg replaces the instance prompt for that photo")
    g.add_argument("--resolution", type=int, default=1024, help="a multiple of 8", range=IMAGE_SIDE)
    g.add_argument("--aspect_ratio_buckets", default=None,
                   help="train each photo at the aspect ratio nearest its own: 'auto' (SDXL's buckets at "
                        "--resolution's area, sides multiples of 64) or 'h,w;h,w;...'; default: squares")
    g.add_argument("--center_crop", action="store_true", help="default: a random crop, drawn anew every time")
    g.add_argument("--random_flip", action="store_true")
    g.add_argument("--caption_dropout", type=float, default=0.0,
                   help="the probability that an instance sample trains with the empty prompt (the unconditional "
                        "that classifier-free guidance renders against), drawn per sample from --seed",
                   range=(0, 1, "[)", 0.1))  # 1 would never show the prompt: nothing would tie it to the subject
    g.add_argument("--masked_loss", action="store_true",
                   help="photo.mask.png beside photo.jpg (grey scale, white = subject) weights the loss per latent "
                        "pixel; a photo without one weighs 1 everywhere")
    g.add_argument("--mask_floor", type=float, default=0.0, help="the loss weight of a mask's black part",
                   range=(0, 1, "[)", 0.1))  # 1 would weigh the black part as the white: the masks would do nothing
    g.add_argument("--train_batch_size", type=int, default=1, range=(1, INF, "[)", 1))
    g.add_argument("--dataloader_num_workers", type=int, default=0, range=(0, INF, "[)", 0))

    g = p.add_argument_group("prior preservation")
    g.add_argument("--with_prior_preservation", action="store_true")
    g.add_argument("--class_prompt", default=None, help='e.g. "a photo of dog"')
    g.add_argument("--class_dir", "--class_data_dir", dest="class_dir", default=None,
                   help="default: OUTPUT_DIR/class_images")
    g.add_argument("--num_class_images", type=int, default=100, range=(1, INF, "[)", 100))
    g.add_argument("--prior_loss_weight", type=float, default=1.0,
                   range=(0, INF, "()", 1.0))  # 0 would switch the prior off, at the cost of computing it
    g.add_argument("--sample_batch_size", type=int, default=4, help="batch size for making class images",
                   range=(1, INF, "[)", 4))
    g.add_argument("--prior_target", choices=["class_images", "base_prediction"], default="class_images",
                   help="class_images: the paper's, the base model's own images of the class prompt; "
                        "base_prediction: the base model's prediction (adapters off) for the class prompt on each "
                        "instance sample's noisy latent, so no class image is made or stored")


def add_training_flags(p):
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=8,
                   range=(1, 1024, "[]", 8))  # beyond 1024, LoRA is no longer low-rank for any layer of SDXL's UNet
    g.add_argument("--lora_alpha", type=int, default=None, help="default: the rank",
                   range=(1, 65536, "[]", 8))  # 0 would switch LoRA off, a negative one flip its sign
    g.add_argument("--lora_dropout", type=float, default=0.0, range=(0, 1, "[)", 0.0))
    g.add_argument("--use_dora", action="store_true",
                   help="DoRA (weight-decomposed LoRA): each adapted layer also trains a magnitude per output row")
    g.add_argument("--train_text_encoder", action="store_true", help="LoRA on both CLIP text encoders too")
    g.add_argument("--text_encoder_lr", type=float, default=5e-6, range=(0, INF, "()", 5e-6))

    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=["adamw8bit", "adamw", "prodigy"], default="adamw8bit",
                   help="prodigy (prodigyopt) finds the step size itself: its learning rate is a multiplier, best 1.0")
    g.add_argument("--learning_rate", type=float, default=1e-4, range=(0, INF, "()", 1e-4))
    g.add_argument("--scale_lr", action="store_true",
                   help="multiply the learning rates by batch size x processes x accumulation")
    g.add_argument("--adam_beta1", type=float, default=0.9,
                   range=(0, 1, "[)", 0.9))  # torch's AdamW refuses betas outside [0, 1)
    g.add_argument("--adam_beta2", type=float, default=0.999, range=(0, 1, "[)", 0.999))
    g.add_argument("--adam_weight_decay", type=float, default=1e-4, range=(0, INF, "[)", 1e-4))
    g.add_argument("--adam_epsilon", type=float, default=1e-8, range=(0, INF, "()", 1e-8))
    # diffusers' flag names and defaults; Prodigy takes the Adam flags above too
    g.add_argument("--prodigy_beta3", type=float, default=None,
                   help="Prodigy's average for its step-size estimate; default: the square root of --adam_beta2",
                   range=(0, 1, "[)", 0.999))  # an average's coefficient, as the Adam betas
    g.add_argument("--prodigy_decouple", action=argparse.BooleanOptionalAction, default=True,
                   help="decoupled (AdamW) weight decay; --no-prodigy_decouple: Adam's L2 penalty")
    g.add_argument("--prodigy_use_bias_correction", action=argparse.BooleanOptionalAction, default=True,
                   help="Adam's bias correction in Prodigy")
    g.add_argument("--prodigy_safeguard_warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the learning rate out of Prodigy's step-size estimate, so a warm-up does not inflate it")
    g.add_argument("--max_grad_norm", type=float, default=1.0, range=(0, INF, "()", 1.0))
    g.add_argument("--lr_scheduler", default="constant",
                   choices=["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                            "polynomial"])
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="at most --max_train_steps",
                   range=(0, INF, "[)", 0))
    g.add_argument("--max_train_steps", type=int, default=500, range=(1, 10**9, "[]", 500))
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, range=(1, INF, "[)", 1))
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--compile", action="store_true", help="torch.compile the UNet (pays off on long runs)")
    g.add_argument("--cache_latents", choices=["auto", "on", "off"], default="auto",
                   help="encode each image (and its flip) once; auto: only where no random crop is lost")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="default: the accelerate config's")
    g.add_argument("--fp8_base", action="store_true", help="hold the frozen UNet and text encoders in float8, "
                   "each layer computed in the mixed-precision dtype (kohya's flag): about half their memory")
    g.add_argument("--nf4_base", action="store_true", help="hold the frozen UNet's linear layers in 4-bit NF4 "
                   "(bitsandbytes, as QLoRA): about a third of its memory")
    g.add_argument("--snr_gamma", type=float, default=None,
                   help="min-SNR weighting, 5.0 is the paper's choice; it weights the class half too (diffusers' "
                        "script: only the instance half), so --prior_loss_weight means the same at every timestep",
                   range=(0, INF, "()", 5.0))
    g.add_argument("--noise_offset", type=float, default=0.0, help="e.g. 0.1",
                   range=(0, 1, "[]", 0.1))  # in noise standard deviations: beyond 1 the offset drowns the noise
    g.add_argument("--seed", type=int, default=0,
                   range=(0, 2**32 - 1, "[]", 0))  # numpy's seed range: accelerate's set_seed seeds numpy too


def add_output_flags(p):
    g = p.add_argument_group("validation")
    g.add_argument("--validation_prompt", default=None, help='e.g. "A photo of sks dog in a bucket"')
    g.add_argument("--num_validation_images", type=int, default=4, range=(1, INF, "[)", 4))
    g.add_argument("--validation_steps", type=int, default=100, range=(1, INF, "[)", 100))
    g.add_argument("--validation_inference_steps", type=int, default=50, range=(1, INF, "[)", 50))
    g.add_argument("--validation_compare_base", action="store_true",
                   help="beside each round's images, the base model's (adapters off, same seeds), rendered once")
    g.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "wandb", "all", "none"])
    g.add_argument("--logging_steps", type=int, default=10,
                   help="read the loss back from the device every N steps (each read waits for the device)",
                   range=(1, INF, "[)", 10))

    g = p.add_argument_group("output")
    g.add_argument("--output_dir", default=None,
                   help="default: work_dirs/ssd_1b_dreambooth_lora_<name of the instance folder>")
    g.add_argument("--checkpointing_steps", type=int, default=100, range=(1, INF, "[)", 100))
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="replace the earlier run in the output dir: its steps, states, validation, card and logs "
                        "are removed before this run writes; files of your own there stay")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="'latest', or a state-stepN folder: restores LoRA, optimizer, scheduler, RNGs, data position")
    g.add_argument("--accept_changed_settings", action="store_true",
                   help="resume although flags that shape training (learning rate, prompts, seed, ...) changed")
    g.add_argument("--checkpoints_total_limit", type=int, default=None,
                   help="keep only the newest N resumable states (adapters are always kept)", range=(1, INF, "[)", 3))
    g.add_argument("--output_kohya_format", action=argparse.BooleanOptionalAction, default=True,
                   help=f"write stepN/{KOHYA_FILE} (kohya names), the file ComfyUI and A1111/Forge load whole: they "
                        "skip every UNet tensor of the diffusers file")

    g = p.add_argument_group("Hugging Face Hub")
    g.add_argument("--push_to_hub", action="store_true",
                   help="at the end, upload the final adapters, the model card and the last validation grid")
    g.add_argument("--hub_model_id", default=None, help="default: the output dir's name, under your account")
    g.add_argument("--hub_token", default=None, help="default: the token of `hf auth login`")


# ----------------------------------------------------------------------------------------------------------
# The libraries: imported below the flags, so that a script run answers --help, a mistyped flag and an install
# known to fail inside these imports at once, not after the ~6 s they take on a CPU. bitsandbytes and prodigyopt
# are imported by make_optimizer(), as only 8-bit AdamW and Prodigy need them.
# ----------------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    before_libraries(parse_args)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed  # noqa: E402
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # noqa: E402
from diffusers.optimization import get_scheduler  # noqa: E402
from diffusers.training_utils import cast_training_params, compute_snr  # noqa: E402
from diffusers.utils import make_image_grid  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from peft import LoraConfig, inject_adapter_in_model  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from dreambooth_kit.checkpoints import refuse_non_finite, save_checkpoint, start_checkpointing  # noqa: E402
from dreambooth_kit.memory import announce_memory  # noqa: E402
from dreambooth_kit.model_card import finish, write_model_card  # noqa: E402
from dreambooth_kit.ownership import check_folders, clear_replaced_run, hold_output_dir  # noqa: E402
from dreambooth_kit.pipeline import (build_pipeline, cached_prompt_kwargs, generate_images, image_grid,  # noqa: E402
                                     load_models, load_unet, side_by_side, unwrap)
from dreambooth_kit.preflight import check_class_folder, check_instance_photos, check_run  # noqa: E402
from dreambooth_kit.quantized_base import (COMPUTE_DTYPES, base_storage, check_base_storage,  # noqa: E402
                                           enable_unet_checkpointing, finish_lora_over_fp8, storage_note)
from dreambooth_kit.telemetry import Clock, WARMUP_STEPS, describe_run, release_memory, report  # noqa: E402


# ----------------------------------------------------------------------------------------------------------
# Inputs: checked before any model loads
# ----------------------------------------------------------------------------------------------------------


def check_inputs(args, settings):
    """Everything that can be checked before a model loads. Returns the instance photos, their prompts, and the
    settings completed with what the inputs decide: the photos' checksum and the state to resume from."""
    warn_prodigy_learning_rate(args.optimizer, args.learning_rate, make_parser().get_default("learning_rate"))
    check_folders(args, settings)
    instance_images, instance_prompts = check_instance_photos(args, settings)
    class_images = check_class_folder(args, settings) if uses_class_images(args) else []
    targets = latent_targets(instance_images, class_images, args.resolution, settings.buckets)
    if args.cache_latents == "on" and not latent_cache_is_exact(targets, args.center_crop):
        raise UserError("--cache_latents on would fix one random crop of each image that does not fit its training "
                        "size for the whole run (kohya refuses this too): add --center_crop, or pass --cache_latents "
                        "auto, which caches only where no crop is lost")
    if args.cache_latents == "on" and augment_draws_anew(targets, args.seed):
        raise UserError("--cache_latents on would keep one draw of augment() per image for the whole run: pass "
                        "--cache_latents auto, which then encodes every step")
    sizes = collections.Counter(training_size(path, args.resolution, settings.buckets) for path in instance_images)
    settings = dataclasses.replace(settings, validation_size=sizes.most_common(1)[0][0])
    return instance_images, instance_prompts, check_run(args, settings, instance_images, instance_prompts,
                                                        lora_targets=(UNET_TARGETS, TEXT_ENCODER_TARGETS))


# ----------------------------------------------------------------------------------------------------------
# Prior preservation: class images made by the base model
# ----------------------------------------------------------------------------------------------------------


def missing_class_images(class_dir, num_class_images):
    """File names still to make so that class_dir holds num_class_images images; existing ones count."""
    have = list_images(class_dir) if class_dir.is_dir() else []
    names = (f"class_{i:05d}.png" for i in range(num_class_images + len(have)))
    missing = [n for n in names if not (class_dir / n).exists()]
    return missing[:max(0, num_class_images - len(have))]


def class_image_sizes(names, num_class_images, instance_sizes):
    """{name: (height, width)} for class images to make: the sizes the instance photos train at, in their
    proportions, fixed by each name's number (class_00007.png), so that with aspect-ratio buckets each class image
    trains at the size it was made at, not cropped and upscaled up to 2x from a square."""
    sizes = sorted(instance_sizes)
    return {name: sizes[int(re.search(r"\d+", name)[0]) % num_class_images * len(sizes) // num_class_images]
            for name in names}


def generate_class_images(pipe, class_dir, class_prompt, names, batch_size, resolution, seed,
                          num_inference_steps=50, disable_progress=False):
    """Make the named class images; each is seeded by (seed, name), so who makes it doesn't matter. `resolution`:
    one side for all (a square), or each name's (height, width) (class_image_sizes)."""
    names = list(names)
    size = resolution if isinstance(resolution, dict) else dict.fromkeys(names, (resolution, resolution))
    progress = tqdm(total=len(names), desc="class images", unit="image", disable=disable_progress or not names)
    for shape in dict.fromkeys(size[name] for name in names):  # a batch renders one size
        alike = [name for name in names if size[name] == shape]
        for batch in [alike[i:i + batch_size] for i in range(0, len(alike), batch_size)]:
            seeds = [derive_seed(seed, "class", name) % 2**63 for name in batch]
            images = generate_images(pipe, class_prompt, seeds, *shape, num_inference_steps)
            for name, image in zip(batch, images):
                save_png_atomic(image, Path(class_dir) / name)
            progress.update(len(batch))
    progress.close()


# ----------------------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------------------


def add_lora(models, rank, alpha, dropout, train_text_encoder, use_dora=False, base=None):
    """Inject LoRA (DoRA with use_dora: its magnitudes start at the base weights' row norms, so the model starts
    unchanged); returns the modules that train. Their parameters are kept fp32 under mixed precision, and drawn
    in fp32 over a float8 base (finish_lora_over_fp8)."""
    def config(targets, exclude=None):
        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                          target_modules=targets, exclude_modules=exclude, use_dora=use_dora)

    models.unet.add_adapter(config(UNET_TARGETS))
    trained = [models.unet]
    if train_text_encoder:
        # CLIP-L's last layer feeds only hidden_states[-1], which SDXL never reads: LoRA there would never train
        last = models.text_encoders[0].config.num_hidden_layers - 1
        excluded = [rf"(text_model\.)?encoder\.layers\.{last}\..+", None]  # the whole layer, whatever is targeted
        for text_encoder, exclude in zip(models.text_encoders, excluded):
            # peft's own injection: transformers' add_adapter refuses peft < 0.22 from transformers 5.24 on
            inject_adapter_in_model(config(TEXT_ENCODER_TARGETS, exclude), text_encoder)
            trained.append(text_encoder)
    # fp32 trainables under fp16/bf16 frozen weights: no "Attempting to unscale FP16 gradients"
    cast_training_params(trained, dtype=torch.float32)
    if base == "fp8":
        finish_lora_over_fp8(trained, "gaussian")
    return trained


def make_optimizer(trained, args, learning_rates):
    """AdamW (8-bit by default) or Prodigy over the LoRA parameters; the text encoders get their own learning
    rate (under Prodigy, the UNet's: see effective_learning_rates)."""
    unet_lr, text_encoder_lr = learning_rates
    groups = [{"params": [p for p in trained[0].parameters() if p.requires_grad], "lr": unet_lr}]
    for text_encoder in trained[1:]:
        groups.append({"params": [p for p in text_encoder.parameters() if p.requires_grad], "lr": text_encoder_lr})
    if args.optimizer == "prodigy":
        import prodigyopt  # imported here: only training with Prodigy needs it

        # diffusers' advanced script's mapping. Prodigy keeps its step size d, its sums and its step count k in
        # param_groups, which accelerate's save_state holds, so a resume is exact. stdout goes nowhere meanwhile:
        # Prodigy prints "Using decoupled weight decay" from every process
        with contextlib.redirect_stdout(None):
            return prodigyopt.Prodigy(groups, lr=unet_lr, betas=(args.adam_beta1, args.adam_beta2),
                                      beta3=args.prodigy_beta3, weight_decay=args.adam_weight_decay,
                                      eps=args.adam_epsilon, decouple=args.prodigy_decouple,
                                      use_bias_correction=args.prodigy_use_bias_correction,
                                      safeguard_warmup=args.prodigy_safeguard_warmup)
    if args.optimizer == "adamw8bit":
        import bitsandbytes as bnb  # imported here: only training with 8-bit AdamW needs it

        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(groups, lr=unet_lr, betas=(args.adam_beta1, args.adam_beta2),
                           weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


def derive_seed(*parts):
    """A 64-bit seed from any parts, e.g. (seed, "noise", step): the same parts give the same seed anywhere."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def height_width(size):
    """A training size as (height, width): --resolution's square, or an aspect-ratio bucket."""
    return (size, size) if isinstance(size, int) else tuple(size)


def cover_size(width, height, size):
    """(width, height) of an image resized, keeping its aspect, to just cover `size`: what crop_and_flip crops."""
    target_height, target_width = height_width(size)
    scale = max(target_height / height, target_width / width)
    return max(target_width, round(width * scale)), max(target_height, round(height * scale))


def crop_and_flip(image, size, center_crop, random_flip, rng):
    """Resize to just cover `size` (--resolution's square, or a bucket's (height, width)), maybe flip, then crop.

    Returns the crop and (top, left) of the crop actually taken: after the flip, in the resized image,
    which is what SDXL's crop time ids mean.
    """
    height, width = height_width(size)
    image = image.resize(cover_size(image.width, image.height, size), Image.Resampling.BILINEAR)
    if random_flip and rng.random() < 0.5:
        image = ImageOps.mirror(image)
    if center_crop:
        top, left = round((image.height - height) / 2), round((image.width - width) / 2)
    else:
        top, left = rng.randint(0, image.height - height), rng.randint(0, image.width - width)
    return image.crop((left, top, left + width, top + height)), (top, left)


def augment(crop, rng):
    """The one place for an augmentation of the pixels (a colour jitter, say): each crop as crop_and_flip took it,
    on the uncached path and into the latent cache alike. Draw from `rng`, seeded per sample, so a resumed run
    redraws the same. One that draws anew per sample cannot be cached: build_caches then encodes every step
    (augment_draws_anew). A change of geometry belongs in crop_and_flip, which the masks and time ids follow."""
    return crop


def augment_draws_anew(targets, seed):
    """Whether augment() changes a crop from one sample to the next, so that a latent cache would freeze one
    draw. Tried on one image of `targets` (latent_targets'), for two samples (imaging.draws_anew)."""
    path = min(targets)
    size = height_width(min(targets[path]))
    crop, _ = crop_and_flip(load_image(path, max(size))[0], size, True, False, random.Random(0))
    return draws_anew(lambda image, rng: to_tensor(augment(image, rng)), crop, seed)


def sdxl_time_ids(original_size, top, left, size):
    """SDXL's added conditions: original (height, width), crop (top, left), target (height, width)."""
    return torch.tensor([*original_size, top, left, *height_width(size)], dtype=torch.float32)


def to_tensor(image):
    """PIL RGB -> float tensor (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def load_mask(photo, size):
    """photo.mask.png in grey scale, oriented like its photo and sized like the photo as decoded (load_image may
    decode a JPEG at 1/2, 1/4 or 1/8): a mask for every pixel of it. None where the photo has no mask."""
    if not mask_path(photo).is_file():
        return None
    with Image.open(mask_path(photo)) as mask:
        mask = mask_weights(ImageOps.exif_transpose(mask), bit_depth(mask))
    return mask if mask.size == size else mask.resize(size, Image.Resampling.BILINEAR)


def crop_mask_alike(mask, size, center_crop, random_flip, rng_state):
    """The mask through exactly its photo's resize, flip and crop: crop_and_flip again, from the random state the
    photo's call started from, on a mask of the photo's size. (1, height, width) weights in [0, 1]; all ones for a
    photo without a mask."""
    if mask is None:
        return torch.ones(1, *height_width(size))
    rng = random.Random()
    rng.setstate(rng_state)
    crop, _ = crop_and_flip(mask, size, center_crop, random_flip, rng)
    return torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0)[None]


def training_size(path, resolution, buckets=None):
    """The (height, width) a photo trains at: --resolution's square, or its nearest bucket."""
    return nearest_bucket(*image_size(path), buckets) if buckets else (resolution, resolution)


def class_pools(class_images, sizes, resolution, buckets=None):
    """{training size: the class images a sample of that size draws from}: with buckets, those of that size's own
    shape (as the trainer makes them, class_image_sizes), so none is cropped from another shape; all of them for a
    size that has none (class images made square by an earlier run, or the user's own)."""
    if not buckets:
        return {size: list(class_images) for size in sizes}
    shapes = {path: training_size(path, resolution, buckets) for path in class_images}
    return {size: [p for p in class_images if shapes[p] == size] or list(class_images) for size in sizes}


def bucket_batches(sizes, batch_size, seed, epoch):
    """One epoch as batches of photo indices, each batch one bucket: every photo once, in an order seeded per
    epoch; a bucket's last batch, when short, is filled from that bucket's own photos. `sizes`: each photo's bucket.
    The count of batches is the same every epoch."""
    rng = random.Random(derive_seed(seed, "buckets", epoch))
    batches = []
    for bucket in sorted(set(sizes)):
        members = [i for i, size in enumerate(sizes) if size == bucket]
        order = rng.sample(members, len(members))
        order += [rng.choice(members) for _ in range(-len(order) % batch_size)]
        batches += [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def pick(items, k, seed, tag):
    """Item for sample k: every epoch (len(items) samples) visits each item once, in an order seeded per epoch."""
    epoch, position = divmod(k, len(items))
    order = list(range(len(items)))
    random.Random(derive_seed(seed, tag, epoch)).shuffle(order)
    return items[order[position]]


class DreamBoothDataset(torch.utils.data.Dataset):
    """Sample k of a run: an instance photo (and a class image), cropped and flipped anew for every k.

    Which photo, the crop, the flip and the caption dropout come from (seed, k), so any sample can be redrawn
    exactly. A class prompt without class images (--prior_target base_prediction) adds the class prompt alone.
    With aspect-ratio buckets, each photo trains at its nearest bucket, and samples come in runs of batch_size
    of one bucket (bucket_batches), the class images cropped to it: a batch of the DataLoader is one bucket.
    """

    def __init__(self, instance_images, instance_prompts, class_images=None, *, class_prompt=None, resolution,
                 center_crop, random_flip, seed, num_samples, cached=False, caption_dropout=0.0, masked=False,
                 buckets=None, batch_size=1):
        # one prompt per photo (its caption, or the instance prompt); a single string means the same for all
        if isinstance(instance_prompts, str):
            instance_prompts = [instance_prompts] * len(instance_images)
        self.instances = list(zip(instance_images, instance_prompts))
        self.class_images, self.class_prompt = list(class_images or []), class_prompt
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.seed, self.num_samples, self.cached = seed, num_samples, cached
        self.caption_dropout, self.masked, self.batch_size = caption_dropout, masked, batch_size
        self.sizes = [training_size(path, resolution, buckets) for path in instance_images]
        self.class_pools = class_pools(self.class_images, set(self.sizes), resolution, buckets)
        self.buckets, self.plan = bool(buckets), (None, None)
        # samples per epoch with buckets: each bucket's photos in whole batches (bucket_batches' count)
        self.epoch_length = batch_size * sum(-(-self.sizes.count(size) // batch_size) for size in set(self.sizes))

    def __len__(self):
        return self.num_samples

    def instance(self, k):
        """Photo index of sample k: without buckets, pick's per-epoch shuffle; with them, bucket_batches'."""
        if not self.buckets:
            return pick(range(len(self.instances)), k, self.seed, "instance")
        epoch, position = divmod(k, self.epoch_length)
        if self.plan[0] != epoch:  # kept: the samples of a batch, and of an epoch, come one after another
            self.plan = (epoch, bucket_batches(self.sizes, self.batch_size, self.seed, epoch))
        return self.plan[1][position // self.batch_size][position % self.batch_size]

    def example(self, path, size, rng, masked=False):
        if self.cached:  # the latent cache holds both flips (and their masks); draw the flip as crop_and_flip would
            return {"latent_key": (str(path), self.random_flip and rng.random() < 0.5, size)}
        image, original_size = load_image(path, max(size))
        state = rng.getstate()  # where the photo's crop and flip start: its mask's start there too
        crop, (top, left) = crop_and_flip(image, size, self.center_crop, self.random_flip, rng)
        example = {"pixel_values": to_tensor(augment(crop, rng)),
                   "time_ids": sdxl_time_ids(original_size, top, left, size)}
        if masked:
            example["mask"] = crop_mask_alike(load_mask(path, image.size), size, self.center_crop, self.random_flip,
                                              state)
        return example

    def __getitem__(self, k):
        rng = random.Random(derive_seed(self.seed, "augment", k))
        index = self.instance(k)
        (path, prompt), size = self.instances[index], self.sizes[index]
        if self.caption_dropout and random.Random(derive_seed(self.seed, "caption dropout", k)).random() < \
                self.caption_dropout:
            prompt = ""  # the empty prompt: prompt_embeddings gives it the pipeline's unconditional
        item = {**self.example(path, size, rng, self.masked), "prompt": prompt, "sample": k}
        if self.class_images:  # cropped to the instance's size: a batch holds one size
            class_example = self.example(pick(self.class_pools[size], k, self.seed, "class"), size, rng)
            item.update({f"class_{name}": value for name, value in class_example.items()})
        if self.class_prompt:
            item["class_prompt"] = self.class_prompt
        return item


def collate(examples):
    """Instance samples first, class samples second: the loss splits the batch in these two halves. Without
    class images the class half is its prompts alone. Masks are the instance half's."""
    halves = ["", "class_"] if "class_prompt" in examples[0] else [""]
    batch = {"prompts": [e[f"{half}prompt"] for half in halves for e in examples]}
    if "sample" in examples[0]:  # sample k of the run: its noise is drawn from (seed, k), whatever the batch
        batch["samples"] = [e["sample"] for e in examples]
    for name in ["pixel_values", "time_ids", "latent_key"]:
        if name in examples[0]:
            values = [e[f"{half}{name}"] for half in halves for e in examples if f"{half}{name}" in e]
            batch[name] = values if name == "latent_key" else torch.stack(values)
    if "mask" in examples[0]:
        batch["masks"] = torch.stack([e["mask"] for e in examples])
    return batch


# ----------------------------------------------------------------------------------------------------------
# Caches: work that is the same every step, done once
# ----------------------------------------------------------------------------------------------------------


def latent_targets(instance_images, class_images, resolution, buckets=None):
    """{image: the (height, width) sizes it trains at}: --resolution's square; with buckets, a photo's nearest
    bucket, and for a class image every bucket a photo has (the class half is cropped to the instance half's)."""
    if not buckets:
        return {path: {(resolution, resolution)} for path in [*instance_images, *class_images]}
    targets = {path: {training_size(path, resolution, buckets)} for path in instance_images}
    for size, pool in class_pools(class_images, set().union(*targets.values()), resolution, buckets).items():
        for path in pool:
            targets.setdefault(path, set()).add(size)
    return targets


def latent_cache_is_exact(targets, center_crop):
    """A cache holds one crop per (image, size): exact with --center_crop, or where the image's resize fits the
    size exactly (a square photo to a square: no choice of crop). `targets`: latent_targets'."""
    if center_crop:
        return True
    for path, sizes in targets.items():
        height, width = image_size(path)
        if any(cover_size(width, height, size) != height_width(size)[::-1] for size in sizes):
            return False
    return True


def encode_latent_cache(vae, targets, center_crop, random_flip, seed, device, disable_progress=False, masked=False):
    """VAE posterior moments, time ids and (masked) the loss mask at latent size of each (image, flip, size) of
    `targets` (latent_targets'), encoded once. Sampling from the moments with each step's generator gives exactly
    the latents that encoding every step would."""
    cache = {}
    with torch.no_grad():
        for path, sizes in tqdm(targets.items(), desc="caching latents", unit="image", disable=disable_progress,
                                leave=False):
            for size in sorted(sizes):
                cache.update(encode_cached(vae, path, height_width(size), center_crop, random_flip, seed, device,
                                           masked))
    return cache


def encode_cached(vae, path, size, center_crop, random_flip, seed, device, masked):
    """The cache entries of one image at one size: each flip's moments, time ids and mask (None unless masked).
    Decoded anew per size, as the uncached path does: a JPEG's reduced decode depends on the size it covers."""
    image, original_size = load_image(path, max(size))
    mask = load_mask(path, image.size) if masked else None
    keys, pixels, time_ids, masks = [], [], [], []
    for flipped in ([False, True] if random_flip else [False]):
        # one crop per image, fixed by (seed, name): a cache cannot redraw it
        rng = random.Random(derive_seed(seed, "cached crop", path.name))
        state = rng.getstate()
        source = ImageOps.mirror(image) if flipped else image
        crop, (top, left) = crop_and_flip(source, size, center_crop, False, rng)
        keys.append((str(path), flipped, size))
        pixels.append(to_tensor(augment(crop, rng)))  # one that draws never reaches here (augment_draws_anew)
        time_ids.append(sdxl_time_ids(original_size, top, left, size).to(device))
        if masked:
            source = ImageOps.mirror(mask) if flipped and mask else mask
            masks.append(crop_mask_alike(source, size, center_crop, False, state))
    moments = vae.encode(torch.stack(pixels).to(device, dtype=vae.dtype)).latent_dist.parameters
    if masked:  # kept at latent size, as the loss weighs it
        masks = F.interpolate(torch.stack(masks), size=moments.shape[-2:], mode="area").to(device)
    return {key: (m, t, mask) for key, m, t, mask in
            itertools.zip_longest(keys, moments, time_ids, masks if masked else [])}


def encode_prompt_cache(models, prompts, device):
    """Embeddings of every prompt the run uses, computed once: the prompts are constant and the encoders frozen."""
    cache = {}
    with torch.no_grad():
        for prompt in sorted(set(prompts)):
            embeds, pooled = encode_prompt(models.text_encoders, models.tokenizers, [prompt], device)
            cache[prompt] = (embeds[0], pooled[0])
    return cache


# ----------------------------------------------------------------------------------------------------------
# The training step
# ----------------------------------------------------------------------------------------------------------


def encode_prompt(text_encoders, tokenizers, prompts, device):
    """SDXL conditioning: both encoders' penultimate hidden states side by side, and bigG's pooled embedding."""
    hidden_states = []
    for tokenizer, text_encoder in zip(tokenizers, text_encoders):
        # tokenizer_2 pads with "!", not with the end token: its own config says so, and we keep it
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        output = text_encoder(ids, output_hidden_states=True)
        hidden_states.append(output.hidden_states[-2])
    pooled = output[0]  # text_encoder_2 is CLIPTextModelWithProjection: its first output is the pooled projection
    return torch.cat(hidden_states, dim=-1), pooled


def dreambooth_loss(model_pred, target, timesteps, noise_scheduler, *, with_prior, prior_loss_weight, snr_gamma,
                    weights=None):
    """Instance MSE + prior_loss_weight * class MSE, the class half being the batch's second half.

    With snr_gamma, each sample is weighted by min(SNR, gamma) / SNR (Hang et al., "Min-SNR", 2023),
    or by min(SNR, gamma) / (SNR + 1) for v-prediction: class samples too, so the prior term keeps its weight
    relative to the instance term at every timestep. `weights` (N, 1, h, w), from loss_weights, weigh each
    latent pixel's squared error (--masked_loss); the mean stays over all pixels, as kohya's masked loss does.
    """
    squared_error = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    if weights is not None:
        squared_error = squared_error * weights
    per_sample = squared_error.mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        snr = compute_snr(noise_scheduler, timesteps)
        weight = snr.clamp(max=snr_gamma)
        weight = weight / (snr + 1 if noise_scheduler.config.prediction_type == "v_prediction" else snr)
        per_sample = per_sample * weight
    if not with_prior:
        return per_sample.mean()
    instance, prior = per_sample.chunk(2)
    return instance.mean() + prior_loss_weight * prior.mean()


def sample_generators(seed, batch, device):
    """One generator per sample, seeded by (seed, sample k, half): a sample's latent draw, noise and timestep
    are the same whichever batch, process or accumulation step it lands in, so 2 x 1 accumulated is 1 x 2."""
    halves = ["instance", "class"][:len(batch["prompts"]) // len(batch["samples"])]
    return [torch.Generator(device).manual_seed(derive_seed(seed, "noise", half, k) % 2**63)
            for half in halves for k in batch["samples"]]


def draw_timesteps(generators, num_train_timesteps, batch_size, device):
    """Uniform timesteps: one from each sample's generator (or a batch from a single generator)."""
    if isinstance(generators, torch.Generator):
        return torch.randint(0, num_train_timesteps, (batch_size,), generator=generators, device=device)
    return torch.cat([torch.randint(0, num_train_timesteps, (1,), generator=g, device=device) for g in generators])


def latents_and_time_ids(batch, models, generators, device):
    """The batch's fp32 latents, sampled from the VAE posterior with the samples' generators, their time ids,
    and the instance half's masks (None without --masked_loss)."""
    if "latent_key" in batch:
        moments, time_ids, masks = zip(*(models.latent_cache[key] for key in batch["latent_key"]))
        moments, time_ids = torch.stack(moments), torch.stack(time_ids)
        masks = None if masks[0] is None else torch.stack(masks[:len(batch["samples"])])
    else:
        with torch.no_grad():
            pixels = batch["pixel_values"].to(device, dtype=models.vae.dtype, non_blocking=True)
            moments = models.vae.encode(pixels).latent_dist.parameters
        time_ids = batch["time_ids"].to(device, non_blocking=True)
        masks = batch["masks"].to(device, non_blocking=True) if "masks" in batch else None
    # sampled in fp32 from half-precision moments: the latents, noise and add_noise all stay fp32
    latents = DiagonalGaussianDistribution(moments.float()).sample(generators)
    return latents * models.vae.config.scaling_factor, time_ids, masks


def loss_weights(masks, latent_size, mask_floor, batch_size):
    """Each latent pixel's loss weight: mask_floor on a mask's black, 1 on its white, the mask averaged down to
    the latents (area). The class half, when there is one, weighs 1 everywhere: its prior covers the whole image."""
    weights = mask_floor + (1 - mask_floor) * F.interpolate(masks.float(), size=latent_size, mode="area")
    ones = weights.new_ones((batch_size - len(weights), *weights.shape[1:]))
    return torch.cat([weights, ones])


def prompt_embeddings(prompts, models, train_text_encoder, device):
    """The prompts' embeddings, from the cache or the encoders; "" (--caption_dropout) as the pipeline's
    unconditional, which is zeros where the model forces them (SDXL's and SSD-1B's pipelines do)."""
    if models.prompt_cache:
        embeds, pooled = zip(*(models.prompt_cache[prompt] for prompt in prompts))
        embeds, pooled = torch.stack(embeds), torch.stack(pooled)
    else:
        with torch.set_grad_enabled(train_text_encoder):
            embeds, pooled = encode_prompt(models.text_encoders, models.tokenizers, prompts, device)
    if models.empty_prompt_is_zeros and "" in prompts:
        kept = torch.tensor([p != "" for p in prompts], device=embeds.device)
        embeds, pooled = embeds * kept[:, None, None], pooled * kept[:, None]
    return embeds, pooled


@contextlib.contextmanager
def adapters_off(modules):
    """The base model for a moment: every LoRA layer of the modules (accelerate's and compile's wrappers seen
    through) switched off, and on again however the block ends."""
    bare = [getattr(getattr(m, "module", m), "_orig_mod", getattr(m, "module", m)) for m in modules]
    for module in bare:
        switch_adapters(module, False)
    try:
        yield bare
    finally:
        for module in bare:
            switch_adapters(module, True)


def switch_adapters(module, enabled):
    """Every LoRA layer of the module on or off, through peft's layers themselves: a text encoder's own
    disable_adapters (transformers') refuses peft < 0.22 from transformers 5.24 on."""
    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.enable_adapters(enabled)


def base_prediction(models, noisy_latents, timesteps, prompts, time_ids, train_text_encoder, device):
    """--prior_target base_prediction's target for the class half: what the base model itself (adapters off, text
    encoders' too) predicts for the class prompt on the instance samples' noisy latents (kohya's "differential
    output preservation"). No gradient flows into it."""
    with torch.no_grad(), adapters_off([models.unet, *(models.text_encoders if train_text_encoder else [])]) as bare:
        base = dataclasses.replace(models, text_encoders=bare[1:] or models.text_encoders)
        embeds, pooled = prompt_embeddings(prompts, base, False, device)
        added = {"text_embeds": pooled, "time_ids": time_ids}  # fp32, as in training_step
        # the bare UNet lacks the autocast accelerate put on its wrapper (torch.compile's, or DDP's): the same one
        # here, from the frozen weights' dtype, which is --mixed_precision's (float8 and 4-bit ones aside)
        dtype = next(p.dtype for p in bare[0].parameters() if not p.requires_grad and p.dtype in COMPUTE_DTYPES)
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
            return bare[0](noisy_latents, timesteps, embeds, added_cond_kwargs=added).sample.float()


def training_step(batch, models, generators, device, *, noise_offset, train_text_encoder, with_prior,
                  prior_loss_weight, snr_gamma, prior_target="class_images", mask_floor=0.0):
    """Noise the latents, predict with the UNet under SDXL's added conditions, return the DreamBooth loss.

    Latents, noise and add_noise stay fp32 under bf16/fp16: in bf16, t=0 and t=1 would add no noise at all while
    the target is the noise. Autocast runs the UNet in half precision. `generators`: one per sample
    (sample_generators), or one for the whole batch. The keywords are the flags of the same names
    (method_settings). With prior_target "base_prediction", the class half is the instance half's noisy latents
    again, under the class prompt, and its target is base_prediction's.
    """
    device = torch.device(device)
    from_base = with_prior and prior_target == "base_prediction"
    if from_base and not isinstance(generators, torch.Generator):
        generators = generators[:len(batch["samples"])]  # the instance half's: the class half shares its draws
    latents, time_ids, masks = latents_and_time_ids(batch, models, generators, device)
    noise = randn_tensor(latents.shape, generator=generators, device=device, dtype=torch.float32)
    if noise_offset:  # Guttenberg's offset noise: one shift per (sample, channel) lets brightness be learned
        noise += noise_offset * randn_tensor((*latents.shape[:2], 1, 1), generator=generators, device=device,
                                             dtype=torch.float32)
    num_train_timesteps = models.noise_scheduler.config.num_train_timesteps
    timesteps = draw_timesteps(generators, num_train_timesteps, latents.shape[0], device)
    noisy_latents = models.noise_scheduler.add_noise(latents, noise, timesteps)
    target = prediction_target(models.noise_scheduler, latents, noise, timesteps)
    if from_base:
        noisy_latents, timesteps, time_ids = (torch.cat([x, x]) for x in (noisy_latents, timesteps, time_ids))

    prompt_embeds, pooled = prompt_embeddings(batch["prompts"], models, train_text_encoder, device)
    # time ids stay fp32: bf16 holds 8 significant bits, so an original size of 1023 would condition as 1024
    # (the UNet's sinusoidal projection of them runs in fp32 anyway)
    added = {"text_embeds": pooled, "time_ids": time_ids}
    model_pred = models.unet(noisy_latents, timesteps, prompt_embeds, added_cond_kwargs=added).sample
    if from_base:
        half = slice(len(latents), None)
        target = torch.cat([target, base_prediction(models, noisy_latents[half], timesteps[half],
                                                    batch["prompts"][half], time_ids[half], train_text_encoder,
                                                    device)])
    weights = None if masks is None else loss_weights(masks, latents.shape[-2:], mask_floor, len(model_pred))
    return dreambooth_loss(model_pred, target, timesteps, models.noise_scheduler, with_prior=with_prior,
                           prior_loss_weight=prior_loss_weight, snr_gamma=snr_gamma, weights=weights)


def prediction_target(noise_scheduler, latents, noise, timesteps):
    """What the UNet learns to predict, as the scheduler's prediction type says."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {prediction_type}")


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------


def validation_prompts(args):
    """The prompts each validation round renders. The prompt cache embeds these same ones (prompts_to_cache), so
    a prompt added here is cached and rendered with no other edit."""
    return [args.validation_prompt] if args.validation_prompt else []


def log_validation(accelerator, models, args, settings, step):
    """Fixed-seed images of each validation prompt, so rounds are comparable; PNGs, a grid (a row of grids per
    prompt), tensorboard."""
    text_encoders = [None, None] if models.prompt_cache else [unwrap(accelerator, m) for m in models.text_encoders]
    unwrapped = dataclasses.replace(models, unet=unwrap(accelerator, models.unet), text_encoders=text_encoders)
    for module in [unwrapped.unet, *(m for m in text_encoders if m is not None)]:
        module.eval()  # no LoRA dropout while sampling
    pipe = build_pipeline(unwrapped, settings.pretrained_model_name_or_path, args.revision, args.variant)
    seeds = [args.seed + i for i in range(args.num_validation_images)]
    prompts = validation_prompts(args)
    started = time.perf_counter()
    with accelerator.autocast():
        rendered = [render_validation(pipe, models, prompt, seeds, args, settings) for prompt in prompts]
        base = base_validation_images(pipe, models, args, settings, seeds) if args.validation_compare_base else None
    folder = Path(settings.output_dir) / "validation" / f"step{step - 1}"
    folder.mkdir(parents=True, exist_ok=True)
    for index, images in enumerate(rendered):
        for seed, image in zip(seeds, images):
            save_png_atomic(image, folder / validation_file_name(index, seed))
    rows = [side_by_side(image_grid(images), image_grid(base[index])) if base else image_grid(images)
            for index, images in enumerate(rendered)]
    grid = make_image_grid(rows, len(rows), 1)  # a row per prompt, each the same size
    save_png_atomic(grid, folder / "grid.png")
    count = sum(len(images) for images in rendered)
    tqdm.write(f"validation: {counted(count, 'image')} of {', '.join(repr(p) for p in prompts)} in {folder} "
               f"({(time.perf_counter() - started) / count:.1f} s/image){models.held_as}")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation_grid", np.asarray(grid), step, dataformats="HWC")
    unwrapped.unet.train()
    for text_encoder in text_encoders if args.train_text_encoder else []:
        text_encoder.train()
    return [image for images in rendered for image in images]


def render_validation(pipe, models, prompt, seeds, args, settings):
    """One prompt's images, from its cached embeddings once the text encoders have gone."""
    return generate_images(pipe, None if models.prompt_cache else prompt, seeds,
                           *(settings.validation_size or [args.resolution] * 2), args.validation_inference_steps,
                           **cached_prompt_kwargs(pipe, models, prompt))


def validation_file_name(index, seed):
    """The first prompt's images keep the plain name (infer.py renders the same seed to compare with)."""
    return f"seed{seed}.png" if index == 0 else f"prompt{index}_seed{seed}.png"


def base_validation_images(pipe, models, args, settings, seeds):
    """--validation_compare_base: the base model's images for the validation seeds, its adapters off, a list per
    validation prompt. Rendered once per run into validation/base/ with what they were made with, then read back
    by every later round, a resumed run's too; made again only when that record differs (an
    --overwrite_output_dir run, or a prompt added, say)."""
    folder = Path(settings.output_dir) / "validation" / "base"
    prompts = validation_prompts(args)
    record = {"prompts": prompts, "seeds": seeds,
              "size": list(settings.validation_size or [args.resolution] * 2),  # a list, as JSON reads it back
              "steps": args.validation_inference_steps, "model": settings.pretrained_model_name_or_path,
              "vae": settings.pretrained_vae_model_name_or_path, "mixed_precision": args.mixed_precision,
              "base": base_storage(args)}
    paths = [[folder / validation_file_name(index, seed) for seed in seeds] for index in range(len(prompts))]
    try:
        if json.loads((folder / "render.json").read_text()) == record and all(p.is_file() for row in paths
                                                                               for p in row):
            return [[load_image(path)[0] for path in row] for row in paths]
    except (OSError, ValueError):
        pass  # none yet, or unreadable: render them
    text_encoders = [m for m in [pipe.text_encoder, pipe.text_encoder_2] if m is not None and args.train_text_encoder]
    with adapters_off([pipe.unet, *text_encoders]):
        rendered = [render_validation(pipe, models, prompt, seeds, args, settings) for prompt in prompts]
    folder.mkdir(parents=True, exist_ok=True)
    for row, images in zip(paths, rendered):
        for path, image in zip(row, images):
            save_png_atomic(image, path)
    write_text_atomic(folder / "render.json", json.dumps(record) + "\n")
    return rendered


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------


def train(accelerator, models, trained, optimizer, lr_scheduler, dataloader, *, args, settings, start_step, clock,
          stop):
    """Optimise until --max_train_steps: log, save and validate on their schedules and at the end. On SIGINT or
    SIGTERM (`stop`, a GracefulStop), finish the step, save adapters and resumable state, and raise Interrupted."""
    params = [p for m in trained for p in m.parameters() if p.requires_grad]
    for module in trained:
        module.train()  # from_pretrained leaves every model in eval mode, where LoRA dropout is off
    method = method_settings(args)
    progress = tqdm(total=args.max_train_steps, initial=start_step, desc="training", unit="step",
                    disable=not accelerator.is_main_process)
    step, pending = start_step, []
    clock.started = time.perf_counter()
    with stop.finishing_steps():
        for micro_step, batch in enumerate(dataloader, start=start_step * args.gradient_accumulation_steps):
            with accelerator.accumulate(*trained):
                generators = sample_generators(args.seed, batch, accelerator.device)
                # LoRA dropout draws from torch's global RNG, which a new data iterator also draws from; seeding
                # it per micro-step makes dropout a function of (seed, step) too, so resume is exact
                torch.manual_seed(derive_seed(args.seed, "dropout", accelerator.process_index, micro_step) % 2**63)
                loss = training_step(batch, models, generators, accelerator.device, **method)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            step += 1
            pending.append(loss.detach())
            progress.update(1)
            accelerator.log({"lr": lr_scheduler.get_last_lr()[0]}, step=step)  # a host value: no device sync
            last = step == args.max_train_steps
            save = step % args.checkpointing_steps == 0 or last
            validate = bool(validation_prompts(args)) and (step % args.validation_steps == 0 or last)
            log = step % args.logging_steps == 0 or save or validate or step == start_step + WARMUP_STEPS
            # one process alone looks for a signal every step; several agree on it only where they sync anyway
            signum = stop.requested(accelerator) if log or accelerator.num_processes == 1 else 0
            if log or signum:  # the losses since the last log, read back from the device in one sync
                losses = clock.lap(accelerator, pending, step)
                pending = []
                refuse_non_finite(losses, step, settings.output_dir, args.learning_rate)
                progress.set_postfix(loss=f"{sum(losses) / len(losses):.4f}")
                accelerator.log({"loss": sum(losses) / len(losses)}, step=step)
            if save or signum:
                with clock.phase("saving"):
                    save_checkpoint(accelerator, trained, args, settings, step)
            if validate and not signum and accelerator.is_main_process:
                signum = stop.validate_unless_stopped(
                    accelerator, clock, lambda: log_validation(accelerator, models, args, settings, step),
                    Path(settings.output_dir) / "validation" / f"step{step - 1}",
                    save=None if save else lambda: save_checkpoint(accelerator, trained, args, settings, step))
            if save or validate or signum:
                if accelerator.is_main_process:
                    write_model_card(settings.output_dir, args, settings, step, accelerator.num_processes)
                accelerator.wait_for_everyone()  # the others wait while the main process saves and validates
                clock.started = time.perf_counter()
            if signum:
                progress.close()
                raise Interrupted(f"stopped at step {step} of {args.max_train_steps}; resume with:\n  "
                                  f"{resume_command(settings.command, script=__file__)}", signum)
            if last:
                break
    progress.close()


def method_settings(args):
    """The flags training_step uses, by name."""
    return dict(noise_offset=args.noise_offset, train_text_encoder=args.train_text_encoder,
                with_prior=args.with_prior_preservation, prior_loss_weight=args.prior_loss_weight,
                snr_gamma=args.snr_gamma, prior_target=args.prior_target, mask_floor=args.mask_floor)


# ----------------------------------------------------------------------------------------------------------
# main: the story
# ----------------------------------------------------------------------------------------------------------


def make_accelerator(args, settings):
    report_to = None if args.report_to == "none" else args.report_to
    output_dir = settings.output_dir
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=report_to, project_config=ProjectConfiguration(project_dir=output_dir,
                                                                logging_dir=f"{output_dir}/logs"),
        # the others wait at barriers while the main process validates and saves
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(hours=2))])
    check_precision(accelerator)
    check_base_storage(base_storage(args), accelerator.device)  # before any model loads
    return accelerator


def prepare_class_images(accelerator, models, args, settings, load_unet, instance_images=()):
    """Every process makes its share of the missing class images; N asked for means exactly N files. Making
    them needs the UNet, so it loads here then, beside the text encoders, rather than after the caches. With
    buckets, each is made at one of the instance photos' training sizes (class_image_sizes)."""
    class_dir = Path(settings.class_dir)
    if accelerator.is_main_process:
        class_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    missing = missing_class_images(class_dir, args.num_class_images)
    accelerator.wait_for_everyone()  # everyone has the same list before anyone writes
    if missing:
        accelerator.print(f"making {counted(len(missing), 'class image')} of '{args.class_prompt}' in {class_dir} "
                          f"(kept for the next run){models.held_as}")
        if models.unet is None:
            models.unet = load_unet()
        pipe = build_pipeline(models, settings.pretrained_model_name_or_path, args.revision, args.variant,
                              progress=False)  # the bar counts images instead
        sizes = (class_image_sizes(missing, args.num_class_images, [training_size(p, args.resolution, settings.buckets)
                                                                     for p in instance_images])
                 if settings.buckets else args.resolution)
        with accelerator.split_between_processes(missing) as mine, accelerator.autocast():
            generate_class_images(pipe, class_dir, args.class_prompt, mine, args.sample_batch_size,
                                  sizes, args.seed, disable_progress=not accelerator.is_local_main_process)
    accelerator.wait_for_everyone()
    return list_images(class_dir)[:args.num_class_images]


def build_caches(accelerator, models, args, targets, prompts):
    """What is the same every step, computed once: VAE latents (where that loses no random crop) and, while
    the text encoders are frozen, every prompt's embeddings. What a cache replaces is then let go: both text
    encoders (validation samples from the cached embeddings too) and the VAE's encoder (validation only decodes)."""
    if not args.train_text_encoder:  # first: the encoders go before the VAE encodes at full size
        prompts = prompts_to_cache(prompts, args, models.empty_prompt_is_zeros)
        models.prompt_cache = encode_prompt_cache(models, prompts, accelerator.device)
        models.text_encoders = [None, None]
        release_memory()
    cache = args.cache_latents == "on" or (args.cache_latents == "auto"
                                           and latent_cache_is_exact(targets, args.center_crop))
    if cache and args.cache_latents == "auto" and augment_draws_anew(targets, args.seed):
        accelerator.print("note: augment() draws anew each step: latents not cached, each step encodes")
        cache = False
    if cache:
        models.latent_cache = encode_latent_cache(models.vae, targets, args.center_crop, args.random_flip, args.seed,
                                                  accelerator.device, disable_progress=not accelerator.is_main_process,
                                                  masked=args.masked_loss)
        models.vae.encoder = models.vae.quant_conv = None
        release_memory()
    accelerator.print(f"cached: {counted(len(models.latent_cache or {}), 'latent')} ({args.cache_latents}), "
                      f"{counted(len(models.prompt_cache or {}), 'prompt embedding')}")


def prompts_to_cache(instance_prompts, args, empty_prompt_is_zeros):
    """Every prompt the run embeds after its frozen encoders have gone: the instance prompts, the class prompt,
    validation_prompts', and "" only where it is read: a dropped caption (--caption_dropout), or validation's
    negative prompt where the pipeline does not make it zeros (SSD-1B's does: force_zeros_for_empty_prompt)."""
    validation = validation_prompts(args)
    prompts = {*instance_prompts, args.class_prompt, *validation}
    if args.caption_dropout or (validation and not empty_prompt_is_zeros):
        prompts.add("")
    return sorted(prompts - {None})


def make_dataloader(instance_images, instance_prompts, class_images, args, settings, num_processes, cached):
    """One sample per (step, micro-batch, process, batch slot): the dataset is as long as the run."""
    num_samples = args.max_train_steps * args.gradient_accumulation_steps * args.train_batch_size * num_processes
    dataset = DreamBoothDataset(instance_images, instance_prompts, class_images,
                                class_prompt=args.class_prompt if args.with_prior_preservation else None,
                                resolution=args.resolution, center_crop=args.center_crop,
                                random_flip=args.random_flip, seed=args.seed, num_samples=num_samples, cached=cached,
                                caption_dropout=args.caption_dropout, masked=args.masked_loss,
                                buckets=settings.buckets, batch_size=args.train_batch_size)
    return torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, shuffle=False,
                                       collate_fn=collate, num_workers=args.dataloader_num_workers,
                                       pin_memory=torch.cuda.is_available())


def make_lr_scheduler(optimizer, args, num_processes):
    # accelerate steps a prepared scheduler once per process each step
    return get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps * num_processes,
                         num_training_steps=args.max_train_steps * num_processes)


def main(argv=None):
    """The run, with SIGINT and SIGTERM answered the same way from its first line to its last (GracefulStop)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    gc.freeze()  # what the imports made lives as long as the process: each full collection then skips it
    quiet_library_notices()
    with GracefulStop(lambda: "before training started: nothing was written") as stop:
        stopped_while_importing.superseded = True
        run(argv, stop)


def run(argv, stop):
    args = parse_args(argv)                       # the flags, every check of them in one place, then frozen
    check_versions([p for p in MINIMUM_VERSIONS if OPTIMIZER_PACKAGES.get(p, args.optimizer) == args.optimizer
                    and p not in CURVE_PACKAGES])
    settings = derive_settings(args, argv)        # what they come to: defaults, absolute model folders
    with hold_output_dir(settings.output_dir) as stop.on_exit:  # one trainer per output dir, until this one exits
        clock = Clock()
        stop.at_once(lambda: stopped_before_training(args, settings, clock, script=__file__))
        instance_images, instance_prompts, settings = check_inputs(args, settings)  # all before any model loads
        accelerator = make_accelerator(args, settings)  # processes, mixed precision, accumulation, trackers
        estimate = announce_memory(accelerator, args, settings, (UNET_TARGETS, TEXT_ENCODER_TARGETS))  # peak, parts
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 matmuls on tensor cores

        load_unet_now = functools.partial(load_unet, settings.pretrained_model_name_or_path, args.revision,
                                          args.variant, weight_dtype, accelerator.device, base_storage(args))
        with clock.phase("load"):  # all but the UNet: it comes after the caches, once the text encoders have gone
            models = load_models(settings.pretrained_model_name_or_path, settings.pretrained_vae_model_name_or_path,
                                 args.revision, args.variant, weight_dtype, accelerator.device, with_unet=False,
                                 storage=base_storage(args))
            models.held_as = storage_note(base_storage(args), weight_dtype)  # said where the base renders
        accelerator.print(f"loaded the text encoders and the VAE in {clock.phases['load']:.1f} s")
        with clock.phase("class images"):  # none with --prior_target base_prediction: the base model's is the target
            class_images = (prepare_class_images(accelerator, models, args, settings, load_unet_now, instance_images)
                            if uses_class_images(args) else None)
        with clock.phase("caches"):
            targets = latent_targets(instance_images, class_images or [], args.resolution, settings.buckets)
            build_caches(accelerator, models, args, targets, instance_prompts)
        if models.unet is None:  # so the UNet's load never shares memory with the text encoders
            loaded = clock.phases["load"]
            with clock.phase("load"):
                models.unet = load_unet_now()
            accelerator.print(f"loaded the UNet in {clock.phases['load'] - loaded:.1f} s")
        set_seed(args.seed)  # LoRA's initial weights
        trained = add_lora(models, args.rank, settings.lora_alpha, args.lora_dropout, args.train_text_encoder,
                           use_dora=args.use_dora, base=base_storage(args))
        if args.gradient_checkpointing:
            enable_unet_checkpointing(models.unet, base_storage(args))
            for text_encoder in trained[1:]:  # transformers 5 renamed it; the old name warns until it goes in v6
                getattr(text_encoder, "activation_checkpointing_enable", text_encoder.gradient_checkpointing_enable)()
                # what transformers 4 does only for an adapter of its own add_adapter: reentrant checkpointing of
                # layers whose input needs no grad would leave their LoRA none
                text_encoder.enable_input_require_grads()
        if args.compile:
            trained[0] = models.unet = torch.compile(models.unet)  # unwrap() strips it for saving

        dataloader = make_dataloader(instance_images, instance_prompts, class_images, args, settings,
                                     accelerator.num_processes,
                                     cached=models.latent_cache is not None)
        learning_rates = effective_learning_rates(args, accelerator.num_processes)
        if args.scale_lr:
            accelerator.print(f"--scale_lr: learning rates x {learning_rates[0] / args.learning_rate:g} -> "
                              f"{learning_rates[0]:g} (UNet), {learning_rates[1]:g} (text encoders)")
        optimizer = make_optimizer(trained, args, learning_rates)
        lr_scheduler = make_lr_scheduler(optimizer, args, accelerator.num_processes)
        *trained, optimizer, dataloader, lr_scheduler = accelerator.prepare(*trained, optimizer, dataloader,
                                                                           lr_scheduler)
        models.unet, models.text_encoders = trained[0], trained[1:] or models.text_encoders
        start_step, dataloader = start_checkpointing(accelerator, settings.resume_state,
                                                     args.gradient_accumulation_steps, dataloader)

        clear_replaced_run(accelerator, args, settings)  # the first of this run's writes to the output dir: logs
        accelerator.init_trackers("dreambooth-lora-ssd1b", config={k: v for k, v in vars(args).items()
                                                                   if isinstance(v, (int, float, str, bool))
                                                                   and k not in SECRET_FLAGS})
        describe_run(accelerator, args, len(instance_images), len(class_images or []))
        if torch.cuda.is_available():  # training's own peak, apart from loading's and the caches'
            clock.peak_before_training = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        train(accelerator, models, trained, optimizer, lr_scheduler, dataloader, args=args, settings=settings,
              start_step=start_step, clock=clock, stop=stop)
        stop.at_once(lambda: stopped_after_training(args, settings))
        report(accelerator, clock, start_step, estimate)
        accelerator.end_training()
        finish(accelerator, args, settings)


if __name__ == "__main__":
    run_script(main)
