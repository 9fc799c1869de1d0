#!/usr/bin/env python
"""DreamBooth LoRA for Segmind's SSD-1B, with prior preservation.

    accelerate launch train_dreambooth_lora_ssd1b.py --instance_dir dog/ --instance_prompt "a photo of sks dog"

Reads top to bottom as the method does (Ruiz et al., "DreamBooth", CVPR 2023); the sections, in file order:
  parse_args         flags, and every check of them; then frozen (derive_settings: what they came to)
  check_inputs       photos, masks, captions, models, output dir, resume state: all checked before any model loads
  load_models        tokenizers, both CLIP text encoders, UNet, fp16-fix VAE, noise scheduler
  class images       the base model makes the missing ones, split across processes, kept for the next run
  add_lora           peft LoRA on the UNet's attention (and both text encoders if asked); 8-bit AdamW or Prodigy
  DreamBoothDataset  photo -> pixels + SDXL time ids (the crop actually taken), drawn anew per sample; its mask;
                     aspect-ratio buckets, a batch one bucket; caption dropout
  caches             VAE latents and prompt embeddings that are the same every step, computed once
  training_step      noise, UNet, dreambooth_loss: instance MSE + prior_loss_weight * class MSE (the class half's
                     target from class images, or the base model's own prediction)
  save_adapters      stepN/ adapters (PEFT, diffusers, kohya) + state-stepN/ to resume, each renamed into place
  log_validation     fixed-seed images of the validation prompt; the model card; push_to_hub
  train              the loop: step, then log, save and validate where their schedules say
  main               the story, in named stages

Settings reach functions one way: the stages that main() calls take `args` (the flags as typed) and `settings`
(what they came to); the method's own functions take the values they use, by name.

Every random choice (which photo, crop, flip, noise, timesteps, dropout) is derived from (seed, sample or
step), so a run is reproducible by construction and a resumed run ends where the uninterrupted one would.
"""

import argparse
import collections
import contextlib
import dataclasses
import datetime
import filecmp
import functools
import gc
import hashlib
import io
import importlib.util
import itertools
import json
import logging
import math
import os
import pickle
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
import unicodedata
import warnings
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version
from pathlib import Path
from unittest import mock


def stopped_while_importing(signum, frame):
    """A stop while the libraries import (seconds), before main() answers signals itself: nothing is held or
    written yet. Once main() has run, its own stop was answered (or the run ended): nothing more to say."""
    if getattr(stopped_while_importing, "superseded", False):
        return
    print(f"{signal.Signals(signum).name} before training started: nothing was written", file=sys.stderr, flush=True)
    os._exit(128 + signum)


if __name__ == "__main__":
    for _signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_signum, stopped_while_importing)

import numpy as np
import torch
import torch.nn.functional as F
from packaging.version import Version
from PIL import Image, ImageCms, ImageOps
from tqdm.auto import tqdm

# huggingface_hub, accelerate, diffusers, peft, safetensors and transformers are imported below the flags section

try:  # HEIC, the iPhone's default, is read where the user has pillow-heif; it is no requirement of this project
    from pillow_heif import register_heif_opener
    register_heif_opener()
except ImportError:
    pass
# Formats Pillow registers that are no photo to train on: stubs that only identify a file and need a handler this
# project never installs (BUFR, GRIB, HDF5), MPEG video, vector drawings (EPS needs Ghostscript, WMF Windows),
# IPTC metadata and FITS astronomy data
NOT_PHOTO_FORMATS = {"BUFR", "GRIB", "HDF5", "MPEG", "EPS", "WMF", "IPTC", "FITS"}
Image.init()
# Every extension of a format the installed Pillow (and its plugins) opens: JFIF, AVIF, JPEG 2000, TGA, PPM...
IMAGE_EXTENSIONS = {ext for ext, fmt in Image.registered_extensions().items()
                    if fmt in Image.OPEN and fmt not in NOT_PHOTO_FORMATS}
# Formats a camera or phone writes that Pillow here does not read, by extension: how to make each one trainable
UNREAD_FORMATS = {
    **dict.fromkeys([".heic", ".heif", ".hif"], "HEIC, which this Pillow cannot read: convert it to JPEG (macOS: "
                    "sips -s format jpeg {name} --out {stem}.jpg) or pip install pillow-heif, which the trainer then "
                    "reads it with"),
    **dict.fromkeys([".avif", ".avifs"], "AVIF, which this Pillow cannot read: pip install -U pillow (11.3 or "
                    "newer reads it), or convert it to PNG"),
    ".jxl": "JPEG XL, which Pillow cannot read: convert it to PNG or JPEG",
    **dict.fromkeys([".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2", ".pef", ".srw", ".raw"],
                    "a camera raw file: export it as JPEG or PNG from a raw developer"),
    ".svg": "a vector drawing: export it as PNG",
    **dict.fromkeys([".mov", ".mp4", ".m4v", ".avi", ".mkv"], "a video, such as a Live Photo's motion "
                    "half: train on a still, or save a frame of it as PNG"),
}
# Files kept beside photos that are no photo and need no mention: edit sidecars (Lightroom, darktable, iPhone,
# RawTherapee), metadata (Google Takeout, Hugging Face image folders), and what file managers leave behind
SIDECAR_SUFFIXES = {".xmp", ".aae", ".pp3", ".json", ".jsonl", ".csv", ".md"}
SIDECAR_NAMES = {"thumbs.db", "desktop.ini", "license", "license.txt"}
MASK_SUFFIX = ".mask.png"  # photo.mask.png: photo.jpg's loss mask (--masked_loss), never a photo itself
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
LORA_FILE = "pytorch_lora_weights.safetensors"
SETTINGS_FILE = "run_settings.json"
KOHYA_FILE = "lora_for_comfyui_and_webui.safetensors"  # kohya names: what ComfyUI, A1111/Forge and kohya load whole
STATE_PREFIX = "state-"  # output_dir/state-stepN: accelerate's resumable state beside stepN's adapters
LOCK_FILE = ".lock"  # output_dir/.lock: the PID and host of the trainer that holds the folder
# The holder renews its lock's modification time every LOCK_HEARTBEAT_S seconds; a lock not renewed for LOCK_STALE_S
# is stale and taken over, from whichever host it came: a job rescheduled elsewhere can go on. The margin covers a
# slow file system and clocks a minute apart.
LOCK_HEARTBEAT_S = 30
LOCK_STALE_S = 300
TRAINER_STATE = "trainer_state.json"  # written last into a state folder: without it, the folder is no state
SECRET_FLAGS = {"hub_token"}  # never written to run_settings.json, a tracker or a printed command
# A photo's long side may be at most MAX_ASPECT times its short side. Training resizes it so the short side is
# --resolution and crops one square, so a longer photo costs memory for pixels no crop shows: a 2x60000 PNG at
# 1024 would become 1024 x 30.7M pixels (94 GB). With this bound, and --resolution at most 4096, one resized
# photo is at most 4096 x 32768 RGB (400 MB; 25 MB at 1024); PIL's decompression-bomb limit bounds the decode.
MAX_ASPECT = 8
WARMUP_STEPS = 3  # steps left out of the steady-state time per step (allocator, kernels and caches warm up)


class UserError(Exception):
    """A mistake the user can fix: printed as one line, never as a traceback."""


# ----------------------------------------------------------------------------------------------------------
# Installed packages: a known-broken set is refused before anything is imported from it
# ----------------------------------------------------------------------------------------------------------

# requirements.txt's lower bounds; diffusers before 0.35.2 fails at import under transformers 5
MINIMUM_VERSIONS = {"torch": "2.4", "diffusers": "0.35.2", "transformers": "4.44", "peft": "0.17",
                    "accelerate": "1.2", "bitsandbytes": "0.50", "prodigyopt": "1.1.2", "matplotlib": "3.9"}
OPTIMIZER_PACKAGES = {"bitsandbytes": "adamw8bit", "prodigyopt": "prodigy"}  # checked only for that --optimizer
CURVE_PACKAGES = ["matplotlib"]  # evaluate.py's curve.png needs it; training does not
# (package, from version, other package, below version, the pip command that fixes it). None known today: from 5.24
# on, transformers' add_adapter, disable_adapters and enable_adapters refuse peft < 0.22, so the trainer puts LoRA
# on the text encoders and switches it with peft's own functions (add_lora, adapters_off); load_adapter, which
# diffusers loads text encoders with, checks no version (transformers 5.25 with peft 0.21.2, 2026-12-07).
KNOWN_CLASHES = []


def check_versions(packages):
    """Refuse, in one line naming the pip command, installed packages that are too old or known to clash."""
    found = {}
    for name in packages:
        try:
            found[name] = Version(installed_version(name))
        except PackageNotFoundError:
            raise UserError(f"{name} is not installed: run pip install -r requirements.txt") from None
        if found[name] < Version(MINIMUM_VERSIONS[name]):
            raise UserError(f"{name} {found[name]} is older than the {MINIMUM_VERSIONS[name]} this needs: run "
                            f"pip install -U '{name}>={MINIMUM_VERSIONS[name]}'")
    for name, since, other, below, fix in KNOWN_CLASHES:
        if name in found and other in found and found[name] >= Version(since) and found[other] < Version(below):
            raise UserError(f"{name} {found[name]} does not work with {other} {found[other]} (it needs {other} >= "
                            f"{below}): run {fix}")
    return found


# ----------------------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------------------


INF = math.inf
# Every numeric flag's valid values: (low, high, which ends are included, an example that a refusal offers).
# Checked before any model loads; floats must also be finite, and None (a flag left unset) is always allowed.
# Each flag's --help states its range. A numeric flag without a row here fails tests/test_cli.py.
FLAG_RANGES = {
    "resolution": (8, 4096, "[]", 1024),  # and a multiple of 8; SDXL-family models are trained at 1024
    "train_batch_size": (1, INF, "[)", 1),
    "dataloader_num_workers": (0, INF, "[)", 0),
    "num_class_images": (1, INF, "[)", 100),
    "prior_loss_weight": (0, INF, "()", 1.0),  # 0 would switch the prior off, at the cost of computing it
    "caption_dropout": (0, 1, "[)", 0.1),  # 1 would never show the prompt: nothing would tie it to the subject
    "mask_floor": (0, 1, "[)", 0.1),  # 1 would weigh the black part as the white: the masks would do nothing
    "sample_batch_size": (1, INF, "[)", 4),
    "rank": (1, 1024, "[]", 8),  # beyond 1024, LoRA is no longer low-rank for any layer of SDXL's UNet
    "lora_alpha": (1, 65536, "[]", 8),  # 0 would switch LoRA off, a negative one flip its sign
    "lora_dropout": (0, 1, "[)", 0.0),
    "text_encoder_lr": (0, INF, "()", 5e-6),
    "learning_rate": (0, INF, "()", 1e-4),
    "adam_beta1": (0, 1, "[)", 0.9),  # torch's AdamW refuses betas outside [0, 1)
    "adam_beta2": (0, 1, "[)", 0.999),
    "adam_weight_decay": (0, INF, "[)", 1e-4),
    "adam_epsilon": (0, INF, "()", 1e-8),
    "prodigy_beta3": (0, 1, "[)", 0.999),  # an average's coefficient, as the Adam betas
    "max_grad_norm": (0, INF, "()", 1.0),
    "lr_warmup_steps": (0, INF, "[)", 0),  # and at most --max_train_steps
    "max_train_steps": (1, 10**9, "[]", 500),
    "gradient_accumulation_steps": (1, INF, "[)", 1),
    "snr_gamma": (0, INF, "()", 5.0),
    "noise_offset": (0, 1, "[]", 0.1),  # in noise standard deviations: beyond 1 the offset drowns the noise
    "seed": (0, 2**32 - 1, "[]", 0),  # numpy's seed range: accelerate's set_seed seeds numpy too
    "num_validation_images": (1, INF, "[)", 4),
    "validation_steps": (1, INF, "[)", 100),
    "validation_inference_steps": (1, INF, "[)", 50),
    "logging_steps": (1, INF, "[)", 10),
    "checkpointing_steps": (1, INF, "[)", 100),
    "checkpoints_total_limit": (1, INF, "[)", 3),
}


def describe_range(low, high, ends):
    """A range as --help and refusals say it: 'at least 1', 'above 0', 'in [0, 1)'."""
    if high == INF:
        return f"at least {low}" if ends[0] == "[" else f"above {low}"
    return f"in {ends[0]}{low}, {high}{ends[1]}"


def check_range(name, value):
    """Refuse a number outside its flag's FLAG_RANGES row, and nan or inf anywhere; None means unset."""
    if value is None:
        return
    low, high, ends, example = FLAG_RANGES[name]
    finite = math.isfinite(value)
    above_low = low <= value if ends[0] == "[" else low < value
    below_high = value <= high if ends[1] == "]" else value < high
    if not (finite and above_low and below_high):
        raise UserError(f"--{name} must be {'' if finite else 'finite and '}{describe_range(low, high, ends)} "
                        f"(got {value}), e.g. --{name} {example}")


# Flags that act only beside another flag: typed without it, each would be ignored without a word.
# flag -> (the flag it needs, how to add that one)
NEEDS = {
    "text_encoder_lr": ("train_text_encoder", "--train_text_encoder"),
    **{flag: ("with_prior_preservation", "--with_prior_preservation")
       for flag in ["class_prompt", "class_dir", "num_class_images", "prior_loss_weight", "sample_batch_size",
                    "prior_target"]},
    "mask_floor": ("masked_loss", "--masked_loss"),
    **{flag: ("validation_prompt", "--validation_prompt 'a photo of sks dog in a bucket'")
       for flag in ["validation_steps", "num_validation_images", "validation_inference_steps",
                    "validation_compare_base"]},
    "accept_changed_settings": ("resume_from_checkpoint", "--resume_from_checkpoint latest"),
    "hub_model_id": ("push_to_hub", "--push_to_hub"),
    "hub_token": ("push_to_hub", "--push_to_hub"),
}
# Class-image flags, which --prior_target base_prediction would ignore: it makes and reads no class image
CLASS_IMAGE_FLAGS = ["class_dir", "num_class_images", "sample_batch_size"]
# Flags that act only with one --optimizer (typed with another, each would be ignored without a word)
OPTIMIZER_FLAGS = {"prodigy": ["prodigy_beta3", "prodigy_decouple", "prodigy_use_bias_correction",
                               "prodigy_safeguard_warmup"]}
# Text flags where an empty value is a mistake (an empty path is the current folder) -> what to pass instead
EMPTY_FIXES = {"instance_prompt": "a prompt, e.g. --instance_prompt 'a photo of sks dog'",
               "class_prompt": "a prompt, e.g. --class_prompt 'a photo of dog'",
               "validation_prompt": "a prompt, e.g. --validation_prompt 'a photo of sks dog in a bucket'",
               "instance_dir": "the folder of photos", "class_dir": "a folder for the class images",
               "output_dir": "a folder, or leave --output_dir out for work_dirs/<name>",
               "pretrained_model_name_or_path": "a model folder or a hub id, e.g. segmind/SSD-1B",
               "resume_from_checkpoint": "latest or a state-stepN folder",
               "hub_model_id": "a repo id, e.g. you/sks-dog-lora, or leave it out for the output dir's name",
               "hub_token": "a token, or leave it out to use the one of `hf auth login`",
               "aspect_ratio_buckets": "auto, or 'h,w;h,w;...', or leave it out for squares"}
# a value that starts with a minus, as a flag's value: a number in any notation float() reads, or a list such as
# "-64,64"; argparse takes -1e-4 for a flag. No flag starts with a minus and a digit.
NEGATIVE_NUMBER = re.compile(r"-(\d|\.\d)|-(inf|infinity|nan)$", re.IGNORECASE)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help states every default: '(default: X)' after a flag's help, unless the default is None or off (a
    None default's help says what it means) or the help already says it."""

    def _get_help_string(self, action):
        unset = action.default is None or action.default is False or action.default is argparse.SUPPRESS  # 0 is set
        if unset or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its refusals as one line like every other check (a UserError, not usage text and exit
    2), and a negative value in any notation read as a value: --learning_rate -1e-4 reaches the range check.
    --help states the defaults."""

    def __init__(self, *args, formatter_class=DefaultsHelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def parse_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        joined = []
        for token in args:
            if joined and NEGATIVE_NUMBER.match(token) and joined[-1].startswith("--") and "=" not in joined[-1] \
                    and joined[-1] != "--":
                joined[-1] = f"{joined[-1]}={token}"
            else:
                joined.append(token)
        self.refuse_repeats(joined)
        return super().parse_args(joined, namespace)

    def refuse_repeats(self, argv):
        """A flag given twice (or under both its names) would keep the last value without a word."""
        seen = {}
        for flag in [token.split("=", 1)[0] for token in argv if token.startswith("--")]:
            action = self.action_named(flag)
            if action is None or action.dest == "help":
                continue
            if action.dest in seen:
                raise UserError(f"{seen[action.dest]} is given twice (then as {flag}): keep one")
            seen[action.dest] = flag

    def action_named(self, flag):
        """The flag's action, also when abbreviated as argparse accepts it (--mixed for --mixed_precision)."""
        if flag in self._option_string_actions:
            return self._option_string_actions[flag]
        found = {a for o, a in self._option_string_actions.items() if self.allow_abbrev and o.startswith(flag)}
        return found.pop() if len(found) == 1 else None  # ambiguous or unknown: argparse's own refusal names it

    def error(self, message):
        raise UserError(f"{message} (see --help)")

    def flags_given(self, argv):
        """The dests of the flags typed in argv, as opposed to those left at their defaults."""
        unset = object()
        typed = self.parse_args(argv, argparse.Namespace(**{a.dest: unset for a in self._actions}))
        return {dest for dest, value in vars(typed).items() if value is not unset}


def refuse_empty(args, fixes):
    """A text flag typed as "" or blanks, named with what to pass: `fixes` maps each flag to that."""
    for name, fix in fixes.items():
        value = getattr(args, name)
        if value is not None and not value.strip():
            raise UserError(f"--{name} is empty: pass {fix}")


def make_parser():
    """Every flag; a numeric one's --help ends with its range from FLAG_RANGES."""
    p = ArgumentParser(description=__doc__.split("\n")[0])
    add_data_flags(p)
    add_training_flags(p)
    add_output_flags(p)
    for action in p._actions:
        if action.dest in FLAG_RANGES:
            valid = describe_range(*FLAG_RANGES[action.dest][:3])
            action.help = f"{action.help}; {valid}" if action.help else valid
        elif action.help is None and action.default not in (None, False):  # argparse shows no help line at all
            action.help = "default: %(default)s"
    return p


class Flags(argparse.Namespace):
    """The flags as typed, once checked. Frozen: run_settings.json records what was asked, and what it came to
    lives apart, in Settings."""

    def __setattr__(self, name, value):
        raise AttributeError(f"the flags are frozen after their checks: derive --{name}'s value in Settings")


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


def auto_buckets(resolution):
    """SDXL's aspect-ratio buckets at --resolution's pixel area: sides multiples of 64, from 1:4 to 4:1 (at 1024:
    512x2048 ... 1024x1024 ... 2048x512, the sizes SDXL was trained at), as (height, width), each with its mirror."""
    area, buckets = resolution * resolution, set()
    for height in range(64, 4 * resolution + 1, 64):
        width = area // height // 64 * 64
        if width >= 64 and 1 / 4 <= height / width <= 4:
            buckets.update([(height, width), (width, height)])
    return sorted(buckets)


def parse_buckets(text, resolution):
    """--aspect_ratio_buckets as sorted (height, width) pairs: 'auto', or 'h,w;h,w;...' with sides multiples of 32
    (the VAE's 8 times the 4 of SSD-1B's two UNet downsamplings) up to 4096, at most MAX_ASPECT to 1. None: no
    buckets."""
    if text is None:
        return None
    if text.strip().lower() == "auto":
        if len(auto_buckets(resolution)) < 2:
            raise UserError(f"--aspect_ratio_buckets auto at --resolution {resolution} leaves only the square (sides "
                            "are multiples of 64): pass a larger --resolution, or a list such as '64,64;64,96;96,64'")
        return tuple(auto_buckets(resolution))
    buckets = set()
    for part in filter(None, (p.strip() for p in text.split(";"))):
        try:
            height, width = (int(side) for side in part.split(","))
        except ValueError:
            raise UserError(f"--aspect_ratio_buckets {text!r}: {part!r} is not 'height,width'; pass e.g. "
                            "'1024,1024;832,1216;1216,832', or auto") from None
        if not (0 < height <= 4096 and 0 < width <= 4096 and height % 32 == 0 and width % 32 == 0) \
                or max(height, width) > MAX_ASPECT * min(height, width):
            raise UserError(f"--aspect_ratio_buckets: {height}x{width} (height x width) needs sides that are "
                            f"multiples of 32 in [32, 4096], at most {MAX_ASPECT}:1; e.g. 832,1216")
        buckets.add((height, width))
    if not buckets:
        raise UserError("--aspect_ratio_buckets is empty: pass auto, or 'h,w;h,w;...' such as '1024,1024;832,1216'")
    return tuple(sorted(buckets))


def absolute_if_local(name):
    return os.path.abspath(name) if os.path.exists(name) else name


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
    g.add_argument("--resolution", type=int, default=1024, help="a multiple of 8")
    g.add_argument("--aspect_ratio_buckets", default=None,
                   help="train each photo at the aspect ratio nearest its own: 'auto' (SDXL's buckets at "
                        "--resolution's area, sides multiples of 64) or 'h,w;h,w;...'; default: squares")
    g.add_argument("--center_crop", action="store_true", help="default: a random crop, drawn anew every time")
    g.add_argument("--random_flip", action="store_true")
    g.add_argument("--caption_dropout", type=float, default=0.0,
                   help="the probability that an instance sample trains with the empty prompt (the unconditional "
                        "that classifier-free guidance renders against), drawn per sample from --seed")
    g.add_argument("--masked_loss", action="store_true",
                   help="photo.mask.png beside photo.jpg (grey scale, white = subject) weights the loss per latent "
                        "pixel; a photo without one weighs 1 everywhere")
    g.add_argument("--mask_floor", type=float, default=0.0, help="the loss weight of a mask's black part")
    g.add_argument("--train_batch_size", type=int, default=1)
    g.add_argument("--dataloader_num_workers", type=int, default=0)

    g = p.add_argument_group("prior preservation")
    g.add_argument("--with_prior_preservation", action="store_true")
    g.add_argument("--class_prompt", default=None, help='e.g. "a photo of dog"')
    g.add_argument("--class_dir", "--class_data_dir", dest="class_dir", default=None,
                   help="default: OUTPUT_DIR/class_images")
    g.add_argument("--num_class_images", type=int, default=100)
    g.add_argument("--prior_loss_weight", type=float, default=1.0)
    g.add_argument("--sample_batch_size", type=int, default=4, help="batch size for making class images")
    g.add_argument("--prior_target", choices=["class_images", "base_prediction"], default="class_images",
                   help="class_images: the paper's, the base model's own images of the class prompt; "
                        "base_prediction: the base model's prediction (adapters off) for the class prompt on each "
                        "instance sample's noisy latent, so no class image is made or stored")


def add_training_flags(p):
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=8)
    g.add_argument("--lora_alpha", type=int, default=None, help="default: the rank")
    g.add_argument("--lora_dropout", type=float, default=0.0)
    g.add_argument("--use_dora", action="store_true",
                   help="DoRA (weight-decomposed LoRA): each adapted layer also trains a magnitude per output row")
    g.add_argument("--train_text_encoder", action="store_true", help="LoRA on both CLIP text encoders too")
    g.add_argument("--text_encoder_lr", type=float, default=5e-6)

    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=["adamw8bit", "adamw", "prodigy"], default="adamw8bit",
                   help="prodigy (prodigyopt) finds the step size itself: its learning rate is a multiplier, best 1.0")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--scale_lr", action="store_true",
                   help="multiply the learning rates by batch size x processes x accumulation")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-4)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    # diffusers' flag names and defaults; Prodigy takes the Adam flags above too
    g.add_argument("--prodigy_beta3", type=float, default=None,
                   help="Prodigy's average for its step-size estimate; default: the square root of --adam_beta2")
    g.add_argument("--prodigy_decouple", action=argparse.BooleanOptionalAction, default=True,
                   help="decoupled (AdamW) weight decay; --no-prodigy_decouple: Adam's L2 penalty")
    g.add_argument("--prodigy_use_bias_correction", action=argparse.BooleanOptionalAction, default=True,
                   help="Adam's bias correction in Prodigy")
    g.add_argument("--prodigy_safeguard_warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the learning rate out of Prodigy's step-size estimate, so a warm-up does not inflate it")
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--lr_scheduler", default="constant",
                   choices=["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                            "polynomial"])
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="at most --max_train_steps")
    g.add_argument("--max_train_steps", type=int, default=500)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--compile", action="store_true", help="torch.compile the UNet (pays off on long runs)")
    g.add_argument("--cache_latents", choices=["auto", "on", "off"], default="auto",
                   help="encode each image (and its flip) once; auto: only where no random crop is lost")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="default: the accelerate config's")
    g.add_argument("--snr_gamma", type=float, default=None,
                   help="min-SNR weighting, 5.0 is the paper's choice; it weights the class half too (diffusers' "
                        "script: only the instance half), so --prior_loss_weight means the same at every timestep")
    g.add_argument("--noise_offset", type=float, default=0.0, help="e.g. 0.1")
    g.add_argument("--seed", type=int, default=0)


def add_output_flags(p):
    g = p.add_argument_group("validation")
    g.add_argument("--validation_prompt", default=None, help='e.g. "A photo of sks dog in a bucket"')
    g.add_argument("--num_validation_images", type=int, default=4)
    g.add_argument("--validation_steps", type=int, default=100)
    g.add_argument("--validation_inference_steps", type=int, default=50)
    g.add_argument("--validation_compare_base", action="store_true",
                   help="beside each round's images, the base model's (adapters off, same seeds), rendered once")
    g.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "wandb", "all", "none"])
    g.add_argument("--logging_steps", type=int, default=10,
                   help="read the loss back from the device every N steps (each read waits for the device)")

    g = p.add_argument_group("output")
    g.add_argument("--output_dir", default=None,
                   help="default: work_dirs/ssd_1b_dreambooth_lora_<name of the instance folder>")
    g.add_argument("--checkpointing_steps", type=int, default=100)
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="replace the earlier run in the output dir: its steps, states, validation, card and logs "
                        "are removed before this run writes; files of your own there stay")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="'latest', or a state-stepN folder: restores LoRA, optimizer, scheduler, RNGs, data position")
    g.add_argument("--accept_changed_settings", action="store_true",
                   help="resume although flags that shape training (learning rate, prompts, seed, ...) changed")
    g.add_argument("--checkpoints_total_limit", type=int, default=None,
                   help="keep only the newest N resumable states (adapters are always kept)")
    g.add_argument("--output_kohya_format", action=argparse.BooleanOptionalAction, default=True,
                   help=f"write stepN/{KOHYA_FILE} (kohya names), the file ComfyUI and A1111/Forge load whole: they "
                        "skip every UNet tensor of the diffusers file")

    g = p.add_argument_group("Hugging Face Hub")
    g.add_argument("--push_to_hub", action="store_true",
                   help="at the end, upload the final adapters, the model card and the last validation grid")
    g.add_argument("--hub_model_id", default=None, help="default: the output dir's name, under your account")
    g.add_argument("--hub_token", default=None, help="default: the token of `hf auth login`")


def check_args(args, given):
    """Every check of the flags on their own, in one place; raises UserError naming the fix. `given`: the flags
    typed, so one that would be ignored beside the others is refused rather than dropped."""
    check_numbers(args)
    refuse_empty(args, EMPTY_FIXES)
    if args.mixed_precision == "fp16" and not has_accelerator():  # the accelerate config's fp16: make_accelerator
        raise UserError(FP16_ON_CPU)
    tracker = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(args.report_to)
    if tracker and importlib.util.find_spec(tracker) is None:  # accelerate would drop the tracker without a word
        raise UserError(f"--report_to {args.report_to} needs {tracker}: pip install {tracker}, or pass --report_to "
                        "none")
    if args.optimizer == "prodigy" and importlib.util.find_spec("prodigyopt") is None:
        raise UserError("--optimizer prodigy needs prodigyopt: pip install prodigyopt, or pass --optimizer adamw8bit")
    for name, (needed, add) in NEEDS.items():
        if name in given and not getattr(args, needed):
            raise UserError(f"--{name} acts only with --{needed}: add {add}, or drop --{name}")
    for optimizer, names in OPTIMIZER_FLAGS.items():
        for name in sorted(given.intersection(names)):
            typed = f"--no-{name}" if getattr(args, name) is False else f"--{name}"  # as the user spelled it
            if args.optimizer != optimizer:
                raise UserError(f"{typed} acts only with --optimizer {optimizer}: add --optimizer {optimizer}, "
                                f"or drop {typed}")
    if args.optimizer == "prodigy" and "text_encoder_lr" in given and args.text_encoder_lr != args.learning_rate:
        raise UserError(f"--text_encoder_lr {args.text_encoder_lr} would be ignored: Prodigy takes one learning rate "
                        "for every parameter group, so the text encoders train at --learning_rate; drop "
                        "--text_encoder_lr")
    if args.lr_warmup_steps and args.lr_scheduler == "constant":
        raise UserError(f"--lr_warmup_steps {args.lr_warmup_steps} has no effect with --lr_scheduler constant: "
                        "pass --lr_scheduler constant_with_warmup (or another schedule), or drop --lr_warmup_steps")
    if args.with_prior_preservation and not args.class_prompt:
        raise UserError("--with_prior_preservation needs --class_prompt, e.g. --class_prompt 'a photo of dog'")
    for name in CLASS_IMAGE_FLAGS if args.prior_target == "base_prediction" else []:
        if name in given:
            raise UserError(f"--{name} has no effect with --prior_target base_prediction, which makes and reads no "
                            f"class image: drop --{name}, or pass --prior_target class_images")
    if args.use_dora and args.output_kohya_format and "output_kohya_format" in given:
        raise UserError(f"--output_kohya_format cannot carry --use_dora: {DORA_IN_KOHYA_FILE}; drop "
                        f"--output_kohya_format ({LORA_FILE} carries DoRA), or drop --use_dora")
    caption_suffix(args.caption_extension)
    parse_buckets(args.aspect_ratio_buckets, args.resolution)


# Why --use_dora writes no kohya file: diffusers' SDXL loader (0.42) deletes a kohya file's dora_scale keys before
# converting it, with only a warning, so nothing here can check such a file against the trained model
DORA_IN_KOHYA_FILE = ("diffusers drops a kohya file's DoRA magnitudes (dora_scale) and loads it as plain LoRA, so "
                      "that file could not be checked against the trained model")
FP16_ON_CPU = ("mixed precision fp16 (from --mixed_precision or the accelerate config) needs a GPU; on this CPU pass "
               "--mixed_precision bf16 (faster where the CPU supports it) or no")


def has_accelerator():
    """A device that runs fp16 mixed precision: CUDA (or ROCm), Apple's MPS or Intel's XPU."""
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


def check_numbers(args):
    """Every numeric flag within its FLAG_RANGES row, then the rules that tie two of them together."""
    for name in FLAG_RANGES:
        check_range(name, getattr(args, name))
    if args.resolution % 8:
        raise UserError(f"--resolution {args.resolution} must be a positive multiple of 8, e.g. 1024")
    if args.lr_warmup_steps > args.max_train_steps:
        raise UserError(f"--lr_warmup_steps {args.lr_warmup_steps} is more than --max_train_steps "
                        f"{args.max_train_steps}: the run would end still warming up; pass --lr_warmup_steps "
                        f"{args.max_train_steps} or less, or a larger --max_train_steps")


def caption_suffix(extension):
    """--caption_extension as the suffix read_captions puts on each photo's name: 'txt' means '.txt'."""
    suffix = extension if extension.startswith(".") else f".{extension}"
    try:
        Path("photo").with_suffix(suffix)  # the call read_captions makes: refuse now what it would refuse then
    except ValueError:
        raise UserError(f"--caption_extension {extension!r} is not a file name suffix: pass one like .txt, the "
                        "ending of photo.txt beside photo.jpg") from None
    if suffix.lower() in IMAGE_EXTENSIONS:  # photo.jpg would be its own caption
        raise UserError(f"--caption_extension {extension} is an image's extension: pass the captions' own, like .txt")
    return suffix


# ----------------------------------------------------------------------------------------------------------
# The libraries: imported here, below the flags, so that a mistyped command is refused (and --help shown) at once,
# not after the ~8 s their imports take on a CPU; and only once check_versions() has refused a mismatched install
# in one line, since a known clash (diffusers 0.34 with transformers 5) fails inside the import itself.
# bitsandbytes and prodigyopt are imported by make_optimizer(), as only 8-bit AdamW and Prodigy need them.
# ----------------------------------------------------------------------------------------------------------

if __name__ == "__main__":  # main() checks the flags again, as parse_args() does for every caller
    try:
        parse_args()
    except UserError as error:
        sys.exit(f"error: {error}")
try:
    check_versions([name for name in MINIMUM_VERSIONS if name not in OPTIMIZER_PACKAGES and name not in CURVE_PACKAGES])
except UserError as error:
    sys.exit(f"error: {error}")
# Third-party notices about nothing the user did: transformers falls back to its PIL image processors without
# torchvision, as this project means it to; diffusers says an adapter file holds no text-encoder LoRA, as one
# trained without --train_text_encoder does not; bitsandbytes misses an optional package (below).
logging.getLogger("transformers.utils.import_utils").addFilter(lambda r: "requires torchvision" not in r.getMessage())
for _name in ("diffusers.loaders.lora_base", "diffusers.loaders.peft"):
    logging.getLogger(_name).addFilter(lambda r: "No LoRA keys associated to" not in r.getMessage())
# bitsandbytes (imported by diffusers) looks, on a CPU with AVX512-BF16, for a 4-bit kernel in the `kernels` package
# and warns when that is not installed: no layer here is 4-bit, and the warning would stand above every refusal
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda r: "kernels-community" not in r.getMessage())
# where `kernels` is installed (transformers 5.25 requires it), that look says, under HF_HUB_OFFLINE, that it skips
# the kernel's publisher check: a line above every refusal, about a kernel no layer here uses
logging.getLogger("kernels._internals.hf_hub").addFilter(lambda r: "kernels-community" not in r.getMessage())
import huggingface_hub  # noqa: E402
import accelerate.utils  # noqa: E402
from accelerate import Accelerator, init_empty_weights  # noqa: E402
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed  # noqa: E402
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # noqa: E402
from diffusers.optimization import get_scheduler  # noqa: E402
from diffusers.training_utils import cast_training_params, compute_snr  # noqa: E402
from diffusers.utils import convert_state_dict_to_diffusers, make_image_grid  # noqa: E402
from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from peft import (LoraConfig, get_peft_model_state_dict, inject_adapter_in_model,  # noqa: E402
                  set_peft_model_state_dict)
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
import safetensors.torch  # noqa: E402
from safetensors import SafetensorError, safe_open  # noqa: E402
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402
# What these imports made (about 480,000 objects) lives as long as the process: frozen, a full garbage collection
# (release_memory, as each cache lets models go) skips it, and takes milliseconds instead of 0.25 s on a CPU
gc.freeze()

# transformers 4.56 renamed from_pretrained's torch_dtype to dtype; the old name warns from 5 on
TRANSFORMERS_DTYPE = "dtype" if Version(installed_version("transformers")) >= Version("4.56") else "torch_dtype"
# diffusers 0.40 did the same (0.42 warns at torch_dtype); 0.35.2, the lowest this supports, knows only torch_dtype
DIFFUSERS_DTYPE = "dtype" if Version(installed_version("diffusers")) >= Version("0.40") else "torch_dtype"


# ----------------------------------------------------------------------------------------------------------
# Inputs: checked before any model loads
# ----------------------------------------------------------------------------------------------------------


def looks_like_hub_id(name):
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not os.path.exists(name)


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


def refuse_file_as_folder(path, flag, fix):
    """A file given where a folder belongs is named as one, rather than as missing or by a later OS error."""
    if Path(path).exists() and not Path(path).is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder: {fix}")


def list_images(folder):
    """Image files of a folder, sorted; hidden files, other files, subfolders and broken symlinks are skipped."""
    return sorted(p for p in Path(folder).iterdir() if not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_EXTENSIONS and not points_nowhere(p) and p.is_file())


def points_nowhere(path):
    """A symlink whose target is gone, or a loop of symlinks. Asked before is_file(), which raises OSError on a
    loop on some Pythons."""
    try:
        path.stat()
    except OSError:
        return path.is_symlink()
    return False


def warn_broken_links(folder, what):
    """Name the symlinks that list_images skips: each may be a photo the user meant to train on."""
    broken = sorted(p.name for p in Path(folder).iterdir() if not p.name.startswith(".") and points_nowhere(p))
    if broken:
        warn(f"{counted(len(broken), 'broken symlink')} in the {what} folder {folder} "
             f"{agree(len(broken), 'is', 'are')} skipped (the target is missing, "
             f"or the links loop): {', '.join(broken)}")


HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}
# Formats with a signature of their own: a file Pillow opens as one of these is that image, whatever its name
# (Pillow's TGA, by contrast, has none, and "opens" some video and random files)
SIGNED_FORMATS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "TIFF": ".tif",
                  "BMP": ".bmp", "AVIF": ".avif", "JPEG2000": ".jp2", "PSD": ".psd", "QOI": ".qoi", "HEIF": ".heic"}


def sniffed_kind(path):
    """What a file holds by its first bytes: 'HEIC' where this Pillow cannot read it, a format of SIGNED_FORMATS,
    or None."""
    try:
        with open(path, "rb") as file:
            head = file.read(12)
        if head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS and ".heic" not in IMAGE_EXTENSIONS:
            return "HEIC"
        with Image.open(path) as image:
            return image.format if image.format in SIGNED_FORMATS else None
    except Exception:
        return None


CAPTION_SUFFIXES = {".txt", ".caption", ".cap", ".tags"}  # what captioning tools write beside photo.jpg


def left_out_reason(path, photo_stems=(), caption_extension=".txt"):
    """Why a file of a photo folder is not trained on, and the fix, in a few words."""
    suffix = path.suffix.lower()
    if suffix in CAPTION_SUFFIXES and path.stem in photo_stems:  # kohya's .caption beside the default .txt, say
        return (f"a caption, but --caption_extension is {caption_extension}: pass --caption_extension {suffix} to "
                "use it")
    if suffix in UNREAD_FORMATS:
        return UNREAD_FORMATS[suffix].format(name=path.name, stem=path.stem)
    kind = sniffed_kind(path)
    if kind == "HEIC":
        return UNREAD_FORMATS[".heic"].format(name=path.name, stem=path.stem)
    if kind:  # photo.jpg.download: rename it photo.jpg, not photo.jpg.jpg
        name = path.stem if Path(path.stem).suffix.lower() in IMAGE_EXTENSIONS else path.stem + SIGNED_FORMATS[kind]
        return f"a {kind} image named {suffix or 'without an extension'}: rename it {name}"
    if Image.registered_extensions().get(suffix) in NOT_PHOTO_FORMATS:
        return f"{Image.registered_extensions()[suffix]}, which is no photo: export it as PNG"
    return "not an image Pillow reads: convert it to PNG or JPEG, or move it out of the folder"


def left_out_files(folder, images, caption_extension):
    """'name (why, and the fix)' for each file of a photo folder that is not trained on: not an image Pillow reads
    here. Captions, masks (they are among `images`), known sidecar files and hidden files are no photos and are
    not named; broken symlinks and subfolders have warnings of their own."""
    kept, stems = set(images), {p.stem for p in images}
    special = "not a regular file: a pipe, socket or device"  # never opened: reading a pipe would wait forever
    return [f"{p.name} ({left_out_reason(p, stems, caption_extension) if p.is_file() else special})"
            for p in sorted(Path(folder).iterdir())
            if p not in kept and not p.name.startswith(".") and not points_nowhere(p) and not p.is_dir()
            and p.suffix.lower() not in (caption_extension.lower(), *SIDECAR_SUFFIXES)
            and p.name.lower() not in SIDECAR_NAMES]


def warn_left_out(folder, what, images, caption_extension, required=True):
    """Name in one line every file of the folder that is left out, so no photo is dropped without a word; refuse
    in one line a `required` folder where none can be read."""
    left_out = left_out_files(folder, images, caption_extension)
    if left_out and not images and required:
        raise UserError(f"no photo in the {what} folder {folder} can be read: {'; '.join(left_out)}")
    if left_out:
        warn(f"{counted(len(left_out), 'file')} of the {what} folder {folder} {agree(len(left_out), 'is', 'are')} "
             f"not trained on: {'; '.join(left_out)}")


def say(message):
    """A note on stderr, once per machine: only the first local process speaks (checks run on every process)."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(message, file=sys.stderr)


def warn(message):
    say(f"warning: {message}")


def counted(number, noun, plural=None):
    """'1 image', '2 images': a count with its noun in the number it takes."""
    return f"{number} {noun if number == 1 else plural or noun + 's'}"


def agree(number, one, many):
    """The word that agrees with a count: agree(1, 'is', 'are') is 'is'."""
    return one if number == 1 else many


def image_size(path):
    """An image file's (height, width) as it is meant to be seen, from its header alone."""
    with Image.open(path) as image:
        return oriented_size(image)


def oriented_size(image):
    """(height, width) as the photo is meant to be seen: EXIF orientations 5-8 swap the sides."""
    width, height = image.size
    return (width, height) if image.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (height, width)


def decoded_size(path):
    """Decode an image, so a broken one is found now rather than mid-run; its oriented (height, width). PIL
    refuses over twice its decompression-bomb limit (about 179 megapixels) with DecompressionBombError; between
    once and twice it only warns, and a large camera photo is welcome there (a JPEG decodes at reduced size)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            size = oriented_size(image)
            image.draft("RGB", (256, 256))  # JPEG: decode at reduced size, enough to prove it decodes
            image.load()
            as_srgb(eight_bit(image), image.info.get("icc_profile"))  # PixelError where it cannot
    return size


def frame_count(path):
    """How many frames (an animation) or pages (a TIFF) an image file holds; an MPO's second picture is a
    camera's preview or depth map, not a frame."""
    with warnings.catch_warnings():  # decoded_size has refused what PIL's decompression-bomb check must refuse
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            return 1 if image.format == "MPO" else getattr(image, "n_frames", 1)


def check_images(paths, what, resolution, buckets=None):
    """Decode every image and name every bad file at once. Refuse images whose resize would need unbounded
    memory (see MAX_ASPECT); warn once, listing them, about images that will be upscaled to their training size
    (--resolution's square, or with buckets their nearest bucket)."""
    bad, huge, small, animated = [], [], [], []
    for path in paths:
        try:
            height, width = decoded_size(path)
            frames = frame_count(path)
        except Image.DecompressionBombError:
            huge.append(f"{path.name} (over PIL's limit of {2 * Image.MAX_IMAGE_PIXELS} pixels)")
            continue
        except PixelError as e:
            bad.append(f"{path.name} ({e})")
            continue
        except Exception as e:
            heic = sniffed_kind(path) == "HEIC"
            bad.append(f"{path.name} ({left_out_reason(path) if heic else type(e).__name__})")
            continue
        if frames > 1:
            animated.append(f"{path.name} ({frames} frames)")
        if max(height, width) > MAX_ASPECT * min(height, width):
            huge.append(f"{path.name} ({width}x{height}: one side over {MAX_ASPECT} times the other)")
        elif max(size / side for size, side in zip(
                nearest_bucket(height, width, buckets) if buckets else (resolution, resolution), (height, width))) > 1:
            small.append(f"{path.name} ({width}x{height})")
    if bad:
        raise UserError(f"{counted(len(bad), f'unreadable {what} image')} in {paths[0].parent}: {', '.join(bad)}; "
                        f"remove or re-export {agree(len(bad), 'it', 'them')}")
    if huge:
        raise UserError(f"{counted(len(huge), f'{what} image')} in {paths[0].parent} would need too much memory to "
                        "train on: "
                        f"{', '.join(huge)}; crop each to at most {MAX_ASPECT}:1 and downscale it below "
                        f"{2 * Image.MAX_IMAGE_PIXELS} pixels")
    if animated:  # trained as a viewer shows it still, and said: the other frames would be other photos
        say(f"note: {counted(len(animated), f'{what} image')} {agree(len(animated), 'holds', 'hold')} several frames "
            f"and {agree(len(animated), 'trains on its', 'train on their')} first only: "
            f"{', '.join(animated)}; save each frame you want as a photo of its own")
    if small:
        warn(f"{counted(len(small), f'{what} image')} {agree(len(small), 'is', 'are')} smaller than "
             f"{agree(len(small), 'its', 'their')} training size ("
             + (f"--resolution {resolution}" if not buckets else "their bucket") + ") and will be "
             f"upscaled: {', '.join(small)}")


def uses_class_images(args):
    """Prior preservation the paper's way: over class images that the base model makes once."""
    return args.with_prior_preservation and args.prior_target == "class_images"


def check_masks(folder, images, masked_loss, mask_floor):
    """The photos of a folder's images, its photo.mask.png files set apart: with --masked_loss each must be a
    readable grey-scale file that belongs to a photo and has its size (a mask cut to another size would weigh the
    wrong pixels); without it, a mask would be trained on as a photo, so it is refused."""
    masks = [p for p in images if p.name.lower().endswith(MASK_SUFFIX)]
    photos = [p for p in images if p not in masks]
    misnamed = [p.name for p in photos if ".mask." in p.name.lower()]  # a mask saved as JPEG would train as a photo
    if misnamed:
        raise UserError(f"{', '.join(misnamed)} in {folder}: a loss mask must be a PNG named photo{MASK_SUFFIX}; "
                        "save each as PNG under that name (or rename it, if it is a photo)")
    if masks and not masked_loss:
        raise UserError(f"{masks[0].name} in {masks[0].parent} is a loss mask ({len(masks)} in all): pass "
                        "--masked_loss to use them, or move them out of the folder")
    if not masked_loss:
        return photos
    named = sorted(p for p in Path(folder).iterdir() if p.name.lower().endswith(MASK_SUFFIX) and p not in masks)
    bad = [f"{p.name} ({'a broken symlink' if points_nowhere(p) else 'not a file'})" for p in named]
    if not masks and not bad:
        raise UserError(f"--masked_loss found no masks: add photo{MASK_SUFFIX} (grey scale, white = subject) beside "
                        "photo.jpg in the instance folder, or drop --masked_loss")
    owners = {mask_path(p): p for p in photos}
    for mask in masks:
        stem = mask.name[:-len(MASK_SUFFIX)]
        if mask not in owners:
            bad.append(f"{mask.name} (" + ("not named in lower case" if mask.name != stem + MASK_SUFFIX else
                                           f"no photo named {stem}.*") + ")")
        else:
            problem = mask_problem(mask, owners[mask], mask_floor)
            bad += [f"{mask.name} ({problem})"] if problem else []
    if bad:
        raise UserError(f"{counted(len(bad), 'mask')} in {folder} cannot be used: {', '.join(bad)}; each mask must "
                        "be a "
                        f"grey-scale photo{MASK_SUFFIX} for a photo.* beside it, with the photo's size")
    return photos


def mask_problem(mask, photo, mask_floor):
    """What makes a mask unusable for its photo, in a few words; None for a good one. A photo that cannot be
    read is check_images' to name."""
    try:
        photo_size = decoded_size(photo)
    except Exception:
        return None
    try:
        with Image.open(mask) as image:
            size, mode = oriented_size(image), image.mode
            transparent = mode in ("RGBA", "LA", "PA") or "transparency" in image.info
            weights = mask_weights(image) if not transparent else None
            all_black = weights is not None and weights.getextrema()[1] == 0
    except PixelError as e:
        return str(e)
    except Exception as e:
        return f"unreadable: {type(e).__name__}"
    if transparent:  # is the subject in its alpha or in its grey? Either reading could be the wrong one
        return "has transparency: save it as grey scale without alpha"
    if size != photo_size:
        return f"{size[1]}x{size[0]}, its photo {photo.name} is {photo_size[1]}x{photo_size[0]}"
    if all_black and mask_floor == 0:
        return "all black: at --mask_floor 0 its photo would train nothing"
    return None


# Characters that show nothing, beyond the white space strip() removes: Unicode's format characters (zero-width
# space and joiners, soft hyphen, word joiner, BOM), separators, controls, and the blanks that count as letters
INVISIBLE_CATEGORIES = {"Cc", "Cf", "Zs", "Zl", "Zp"}
BLANK_LETTERS = set("\u115f\u1160\u2800\u3164\uffa0")  # Hangul fillers and the blank Braille pattern


def shows_nothing(text):
    return all(unicodedata.category(c) in INVISIBLE_CATEGORIES or c in BLANK_LETTERS for c in text)


def read_caption(caption_file):
    """A caption file's text: UTF-8, a byte-order mark (Windows Notepad writes one) dropped, as it is no part of
    the prompt and would add tokens. Raises UnicodeDecodeError with what the file is instead."""
    data = caption_file.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UnicodeDecodeError("utf-16", data, 0, 2, "UTF-16, not UTF-8")
    return data.decode("utf-8-sig").strip()


def read_captions(images, instance_prompt, caption_extension):
    """photo.txt beside photo.jpg (UTF-8) replaces the instance prompt for that photo, as kohya users expect."""
    prompts, bad, blank = [], [], []
    for path in images:
        caption_file = path.with_suffix(caption_extension)
        if caption_file.exists() and not caption_file.is_file():  # a folder, say: not a caption to skip silently
            bad.append(f"{caption_file.name} (not a file)")
            continue
        try:
            caption = read_caption(caption_file) if caption_file.is_file() else None
        except UnicodeDecodeError as e:
            why = e.reason if e.encoding == "utf-16" else f"not UTF-8: byte 0x{e.object[e.start]:02x} at {e.start}"
            bad.append(f"{caption_file.name} ({why})")
            caption = None
        except OSError as e:
            bad.append(f"{caption_file.name} ({one_line(e)})")
            caption = None
        if caption == "":  # a caption left empty is more likely a mistake than a wish for the instance prompt
            blank.append(caption_file.name)
        elif caption and shows_nothing(caption):
            blank.append(f"{caption_file.name} (only invisible characters: "
                         f"{', '.join(sorted({f'U+{ord(c):04X}' for c in caption}))})")
            caption = ""
        prompts.append(caption or instance_prompt)
    if bad:
        raise UserError(f"{counted(len(bad), 'caption file')} unreadable or not UTF-8: {', '.join(bad)}; "
                        f"re-save {agree(len(bad), 'it', 'them')} as UTF-8 text")
    if blank:
        raise UserError(f"{counted(len(blank), 'caption file')} empty: {', '.join(blank)}; write each photo's prompt "
                        "in it, or delete it "
                        "to use --instance_prompt for that photo")
    return prompts


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


def step_of(folder):
    """stepN or state-stepN -> N + 1, the number of optimiser steps behind that folder. None for any other name
    (stepfinal/, a copy the user named): such a folder is not this trainer's, and is left alone."""
    match = re.fullmatch(rf"(?:{STATE_PREFIX})?step([0-9]+)", Path(folder).name)
    return int(match[1]) + 1 if match else None


def finished_adapters(output_dir):
    """The step dirs of an output dir that hold adapters, oldest first."""
    return sorted((p.parent for p in Path(output_dir).glob(f"step*/{LORA_FILE}") if step_of(p.parent)), key=step_of)


def remove_partial_dirs(output_dir):
    """Hidden folders a save left half-written (killed, or a full disk), or an overwrite left half-removed: never
    complete, so never kept."""
    for partial in [p for pattern in (".*.partial", "validation/.*.partial", "logs/.*.partial")
                    for p in Path(output_dir).glob(pattern)]:
        shutil.rmtree(partial, ignore_errors=True)


@contextlib.contextmanager
def hold_output_dir(output_dir):
    """One trainer per output dir: a lock file with this run's PID, host and process start time, made atomically
    before anything is written, renewed every LOCK_HEARTBEAT_S seconds, and removed at exit. A stale lock (see
    why_lock_is_stale) is taken over. Only the first process of a multi-process run takes it. Yields the function
    that releases it, for an exit that skips the context's end. Folders made just for the lock go again if left
    empty."""
    lock = Path(output_dir) / LOCK_FILE
    if os.environ.get("RANK", "0") != "0":
        yield lambda: None
        return
    if lock.parent.is_file():
        raise UserError(f"--output_dir {lock.parent} is a file, not a folder: choose a folder")
    created = [folder for folder in [lock.parent, *lock.parent.parents] if not folder.exists()]  # deepest first
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write to --output_dir {lock.parent} ({e.strerror}): choose a writable folder") \
            from None
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
          "pid_started": process_start(os.getpid())}
    heartbeat = threading.Event()

    def release():
        heartbeat.set()
        if read_lock(lock) == me:  # never another trainer's, that took over a lock it judged stale
            lock.unlink(missing_ok=True)

    try:  # from before the lock exists: a stop that comes just after it is made still removes it
        while not create_exclusive(lock, json.dumps(me)):
            refuse_or_take_over(lock)
        threading.Thread(target=renew_lock, args=(lock, me, heartbeat), daemon=True, name="lock heartbeat").start()
        yield release
    finally:
        release()
        for folder in created:
            if any(folder.iterdir()):
                break
            folder.rmdir()


def refuse_or_take_over(lock):
    """Refuse an output dir whose lock a trainer may hold, naming it; remove a stale lock, saying why."""
    holder = read_lock(lock)
    if holder is None:
        return  # removed in between: try again
    if not holder:
        raise UserError(f"{lock} is unreadable, so whether a trainer holds {lock.parent} is unknown: delete "
                        "it if no trainer is running there")
    stale = why_lock_is_stale(lock, holder)
    if stale is None:
        age = lock_age(lock)
        renewed = f", renewed {age:.0f} s ago" if age is not None and age >= 0 else ""
        raise UserError(f"{lock.parent} is in use by the trainer with PID {holder.get('pid')} on "
                        f"{holder.get('host')} (since {holder.get('started')}{renewed}): wait for it, choose "
                        f"another --output_dir, or delete {lock} if that run is gone (a lock not renewed for "
                        f"{LOCK_STALE_S} s is taken over)")
    say(f"{lock}: {stale}; taking it over")
    take_away(lock, holder)


def why_lock_is_stale(lock, holder):
    """Why the trainer a lock names no longer holds it, or None while it may. On the lock's own host the process
    is checked: gone, or its PID now another process (its start time differs, or, for a lock that records none,
    it does not run this script). Elsewhere, and where that cannot tell, the heartbeat decides."""
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname():
        if not process_alive(pid):
            return f"the trainer that held it (PID {pid}) is gone"
        started, running = holder.get("pid_started"), process_start(pid)
        if started is not None and running is not None:
            return None if started == running else f"PID {pid} is now another process, not the trainer that held it"
        if runs_other_program(pid):
            return f"PID {pid} is now another program, not the trainer that held it"
    age = lock_age(lock)
    if age is not None and age > LOCK_STALE_S:
        return (f"it was last renewed {age:.0f} s ago by PID {pid} on {holder.get('host')} (a trainer renews it "
                f"every {LOCK_HEARTBEAT_S} s; it is stale after {LOCK_STALE_S} s)")
    return None


def lock_age(lock):
    """Seconds since the lock's holder last renewed it (negative where the writer's clock runs ahead)."""
    try:
        return time.time() - lock.stat().st_mtime
    except OSError:
        return None


def process_start(pid):
    """When process `pid` started, in clock ticks since boot (Linux's /proc/PID/stat, field 22); None where that
    cannot be read. A PID used again by a new process comes with a new start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def runs_other_program(pid):
    """True when process `pid` is known not to run this script (its command line names no file called so)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return bool(raw) and not any(Path(os.fsdecode(arg)).name == Path(__file__).name for arg in raw.split(b"\0"))


def take_away(lock, holder):
    """Remove a stale lock, unless another trainer took it over first: it is moved aside, and put back where it is
    not the lock judged stale. The caller then creates its own, exclusively."""
    aside = lock.with_name(f"{lock.name}.stale-{os.getpid()}")
    try:
        os.replace(lock, aside)
    except FileNotFoundError:
        return
    if read_lock(aside) != holder:
        with contextlib.suppress(OSError):  # exclusive: not where yet another trainer has made a lock since
            create_exclusive(lock, aside.read_text())
    aside.unlink(missing_ok=True)


def renew_lock(lock, me, stopped):
    """The holder's heartbeat: touch the lock every LOCK_HEARTBEAT_S seconds while it is still this run's. A
    touch changes no content, so it is atomic, and never writes over a lock another trainer made."""
    while not stopped.wait(LOCK_HEARTBEAT_S):
        if read_lock(lock) != me:
            return
        with contextlib.suppress(OSError):
            os.utime(lock)


def create_exclusive(path, text):
    """Create `path` holding `text`, or return False if it exists. A hard link of a finished file makes it one
    atomic step, so `path` never exists half-written; O_EXCL where links are not supported."""
    tmp = path.with_name(f".{path.name}.exclusive-{os.getpid()}")  # not .tmp-PID: save_png_new's own file
    try:
        tmp.write_text(text)
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return True


def read_lock(lock):
    """The holder recorded in a lock file; {} for an unreadable one (never taken over), None if it is gone."""
    try:
        holder = json.loads(lock.read_text())
        return holder if isinstance(holder, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def process_alive(pid):
    if not isinstance(pid, int) or pid <= 0:
        return True  # unknown: never take over what might be a live run
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def save_was_cut_short(step_dir, resume_state):
    """Adapters published just before a kill, whose state-stepN never was: the same run (its recorded settings
    are the resumed state's), so resuming remakes them exactly."""
    if (step_dir.parent / f"{STATE_PREFIX}{step_dir.name}").exists():  # published whole: damaged, not cut short
        return False
    try:
        theirs = json.loads((step_dir / SETTINGS_FILE).read_text())
        ours = json.loads((resume_state / TRAINER_STATE).read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    ignored = ("step", "max_train_steps", "resume_from_checkpoint", "overwrite_output_dir")
    return all(theirs.get(k) == v for k, v in ours.items() if k not in ignored)


def check_output_dir(output_dir, overwrite, resume_state):
    """Refuse to replace another run's adapters silently, and prove the folder is writable."""
    output_dir = Path(output_dir)
    finished = finished_adapters(output_dir)
    if resume_state is not None:  # resuming: only adapters beyond the resumed step would be replaced
        later = [p for p in finished if step_of(p) > step_of(resume_state)]
        remade = [p for p in later if save_was_cut_short(p, resume_state)]
        if remade:
            say(f"{', '.join(p.name for p in remade)} of this run lost its resumable state to an interrupted save; "
                "resuming makes it again")
        later = [p.name for p in later if p not in remade]
        if later and not overwrite:
            raise UserError(f"resuming from {resume_state.name} would replace later adapters ({', '.join(later)}) "
                            f"in {output_dir}: resume from 'latest', or pass --overwrite_output_dir")
    elif finished and not overwrite:
        raise UserError(f"{output_dir} already holds adapters ({finished[-1].name}); continue that run with "
                        "--resume_from_checkpoint latest, choose another --output_dir, or pass "
                        "--overwrite_output_dir to replace them")
    elif complete_states(output_dir) and not overwrite:  # a run whose adapters were moved away: still a run
        raise UserError(f"{output_dir} already holds a resumable state ({complete_states(output_dir)[-1].name}); "
                        "continue that run with --resume_from_checkpoint latest, choose another --output_dir, or "
                        "pass --overwrite_output_dir to replace it")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to --output_dir {output_dir} ({e.strerror}): choose a writable folder")


# What the trainer writes at the top of an output dir, besides stepN/ and state-stepN/: the model card, the validation
# rounds (validation/stepN/, validation/base/), tensorboard's logs (logs/<project>/) and --push_to_hub's staging
# folder. Anything else there is the user's, and is never written, replaced or removed.
CARD_FILE = "README.md"
TRACKER_PROJECT = "dreambooth-lora-ssd1b"  # the project main() gives init_trackers: tensorboard logs to logs/<it>/
TRAINER_FOLDERS = ("validation", "logs", "hub")
CARD_MARKS = {"dreambooth", "ssd-1b"}  # tags every card this trainer has written carries (CARD_TAGS)
LEGACY_CARD = ("# DreamBooth LoRA: `", "by `train_dreambooth_lora_ssd1b.py`")  # its cards before 51c6b7c began so


def is_trainer_card(path):
    """A model card this trainer wrote: a plain file whose Hub tags carry CARD_MARKS, or a card of the trainer
    from before it had Hub metadata (LEGACY_CARD). A user's own README, or a link to one, is not: the trainer
    would replace it at its first save."""
    if path.is_symlink() or not path.is_file() or path.stat().st_size > 2**20:  # its cards are a few kB
        return False
    try:
        if all(mark in path.read_text(encoding="utf-8")[:2000] for mark in LEGACY_CARD):
            return True
        metadata = huggingface_hub.metadata_load(path)
    except Exception:  # any text is a README: its front matter may be YAML that fails in any way, or not text
        return False
    tags = metadata.get("tags") if isinstance(metadata, dict) else None
    return isinstance(tags, list) and CARD_MARKS <= {str(tag) for tag in tags}


def is_trainer_name(name):
    """A name the trainer writes at the top of an output dir, and replaces or removes there: its outputs, its
    lock, and the hidden names of its partial saves and temporary files, which every start clears."""
    return (step_of(name) is not None or name in (CARD_FILE, LOCK_FILE, *TRAINER_FOLDERS)
            or name.startswith(".") and (name.endswith(".partial") or ".tmp-" in name or "write-test" in name))


def foreign_output(output_dir, args):
    """The first thing in output_dir at a name the trainer writes that the trainer did not write, with why it is
    not the trainer's and what the run would write there; None if there is none."""
    output_dir = Path(output_dir)
    card = output_dir / CARD_FILE
    if os.path.lexists(card) and not is_trainer_card(card):
        return card, "not a model card this trainer wrote", "the model card at each save"
    for path in sorted(output_dir.iterdir()) if output_dir.is_dir() else []:
        if step_of(path) is None:
            continue
        if path.is_symlink() or not path.is_dir():
            return path, "not a folder this trainer wrote", "a checkpoint under that name"
        if path.name.startswith("step") and not any((path / f).is_file() for f in (LORA_FILE, SETTINGS_FILE)):
            return path, f"a folder without {LORA_FILE} or {SETTINGS_FILE}", "the adapters of that step there"
    rounds = output_dir / "validation"
    folders = [rounds, rounds / "base", *(p for p in rounds.glob("step*") if step_of(p))]
    if args.report_to in ("tensorboard", "all"):
        folders += [output_dir / "logs", output_dir / "logs" / TRACKER_PROJECT]
    for path in folders:
        if os.path.lexists(path) and not path.is_dir():
            return path, "a file, not a folder", f"{path.relative_to(output_dir).as_posix()}/ there"
    hub = output_dir / "hub"
    if args.push_to_hub and os.path.lexists(hub) and (hub.is_symlink() or not is_trainer_card(hub / CARD_FILE)):
        return hub, "not the Hub upload this trainer staged", "its upload there, replacing the folder"
    return None


def refuse_foreign_output(output_dir, args):
    """A user's own file or folder at a name the trainer writes is refused, --overwrite_output_dir or not: that
    flag replaces an earlier run of this trainer, never what the user put there."""
    found = foreign_output(output_dir, args)
    if found:
        path, what, written = found
        raise UserError(f"{path} is {what}, and this run writes {written}: move it out of {output_dir}, or choose "
                        "another --output_dir")


def same_folder(a, b):
    """Whether two paths name one folder: equal once links are resolved, or one inode (a bind mount, another
    spelling on a case-insensitive disk)."""
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one is missing: then only equal paths are the same
        return False


def below(path, folder):
    """The name of `folder`'s child that holds `path` (resolved), or None when path is not inside folder."""
    chain = [path, *path.parents]
    for child, parent in zip(chain, chain[1:]):
        if same_folder(parent, folder):
            return child.name
    return None


def overlap(a, b):
    """How folder a lies to folder b, links resolved, in words ('is the same folder as', 'is inside', 'holds'), or
    None when they are apart."""
    a, b = Path(a).resolve(), Path(b).resolve()
    if same_folder(a, b):
        return "is the same folder as"
    if below(a, b) is not None:
        return "is inside"
    return "holds" if below(b, a) is not None else None


def local_folders(args, settings):
    """The folder flags that name a local folder, as {flag: path}: the inputs the run reads, then the folders it
    writes. A Hub id is no local folder, and overlaps nothing."""
    inputs = {"--instance_dir": args.instance_dir, "--pretrained_model_name_or_path":
              settings.pretrained_model_name_or_path,
              "--pretrained_vae_model_name_or_path": settings.pretrained_vae_model_name_or_path}
    inputs = {flag: path for flag, path in inputs.items() if path and os.path.exists(path)}
    return inputs, {"--output_dir": settings.output_dir, **({"--class_dir": settings.class_dir}
                                                           if uses_class_images(args) else {})}


def check_folders(args, settings):
    """No folder the run writes (the output dir, the class images') overlaps another folder flag: not equal, not
    one inside the other, not the same place through a link. The inputs may overlap each other (photos kept in the
    model folder are only read), except the class images and the photos, which must be apart. The class folder may
    lie inside the output dir, as its default does, but not under a name the trainer writes and replaces there."""
    inputs, written = local_folders(args, settings)
    class_dir = written.get("--class_dir")
    pairs = [(w, r) for w in written for r in inputs] + [("--class_dir", "--output_dir")] * bool(class_dir)
    folders, found = {**inputs, **written}, []
    for one, other in pairs:
        how = overlap(folders[one], folders[other])
        if how == "is inside" and (one, other) == ("--class_dir", "--output_dir"):
            name = below(Path(class_dir).resolve(), Path(settings.output_dir).resolve())
            how = "is inside" if is_trainer_name(name) else None
        if how:
            found.append((how, one, other))
    if found:  # the same folder is the plainest to name: a VAE folder is also inside its model's
        how, one, other = min(found, key=lambda f: f[0] != "is the same folder as")
        raise UserError(f"{one} {folders[one]} {how} {other} {folders[other]}{through_link(folders, one, other)}: "
                        f"{OVERLAP_FIXES[one, other] if (one, other) in OVERLAP_FIXES else OVERLAP_FIXES[one]}")


def through_link(folders, one, other):
    """Says how, when the two paths as typed do not show the overlap: through a link, or a mount (one folder
    under two names even with links resolved)."""
    def nested(a, b):
        return a == b or b in a.parents or a in b.parents
    typed = [Path(os.path.abspath(folders[flag])) for flag in (one, other)]
    resolved = [Path(folders[flag]).resolve() for flag in (one, other)]
    if nested(*typed):
        return ""
    if nested(*resolved):
        return f" (through a link: {resolved[0]} and {resolved[1]})"
    return " (one folder under two names: a bind mount, or another spelling of it)"


OVERLAP_FIXES = {
    ("--class_dir", "--instance_dir"): "the subject's own photos would serve as the class prior, which defeats prior "
                                       "preservation; pass a --class_dir apart from the photos, or leave it out for "
                                       "OUTPUT_DIR/class_images",
    ("--class_dir", "--output_dir"): "the run writes and replaces its steps, states, card and validation there; pass "
                                     "a --class_dir of its own, or leave it out for OUTPUT_DIR/class_images",
    "--class_dir": "the run writes class images there; pass a --class_dir of its own, or leave it out for "
                   "OUTPUT_DIR/class_images",
    "--output_dir": "the run writes its steps, states, card and validation there; choose an --output_dir apart from "
                    "every input folder",
}


def remove_earlier_run(output_dir, resume_state):
    """--overwrite_output_dir: remove what an earlier run of this trainer wrote here, so the folder holds one run
    and 'latest', the card and evaluate.py see only it. Resuming, only what lies beyond the resumed step goes.
    Every folder is first renamed to its hidden .partial name (states first), all before any is deleted: a crash
    in the slow deletes leaves only hidden folders, which the next start clears. Returns the names removed."""
    output_dir, kept = Path(output_dir), step_of(resume_state) if resume_state else 0
    later = [p for pattern in (f"{STATE_PREFIX}step*", "step*", "validation/step*")
             for p in sorted(output_dir.glob(pattern)) if (step_of(p) or 0) > kept]
    doomed = [*later, *[output_dir / CARD_FILE] * bool(later or not resume_state)]
    if not resume_state:
        doomed += [output_dir / "validation" / "base", output_dir / "logs" / TRACKER_PROJECT, output_dir / "hub"]
    hub = output_dir / "hub"  # a user's own hub/ is refused only where --push_to_hub would replace it
    doomed = [p for p in doomed if os.path.lexists(p) and (p.name != CARD_FILE or is_trainer_card(p))
              and (p != hub or not hub.is_symlink() and is_trainer_card(hub / CARD_FILE))]
    hidden = [hide(path) for path in doomed]
    for path in hidden:
        if path:
            shutil.rmtree(path)
    for folder in (output_dir / "validation", output_dir / "logs"):
        if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
            folder.rmdir()
    return [p.relative_to(output_dir).as_posix() for p in doomed]


def hide(path):
    """Remove a file (or link) at once; rename a folder to its hidden .partial name, returned for deleting: one
    rename each, so it is whole or gone from view, never half there."""
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return None
    hidden = partial_dir(path)
    shutil.rmtree(hidden, ignore_errors=True)
    os.replace(path, hidden)
    return hidden


def clear_replaced_run(accelerator, args, settings):
    """--overwrite_output_dir, once the models have loaded and just before this run writes: remove the earlier
    run (late, so a run that fails to start leaves it as it was)."""
    if args.overwrite_output_dir and accelerator.is_main_process:
        removed = remove_earlier_run(settings.output_dir, settings.resume_state)
        if removed:
            accelerator.print(f"--overwrite_output_dir: removed the earlier run's {', '.join(removed)} from "
                              f"{settings.output_dir}")
    accelerator.wait_for_everyone()


def check_resume(args, current):
    """The state to resume from, checked against this run's settings (`current`, flags and what they came to);
    None for a fresh run."""
    output_dir = current["output_dir"]
    if not args.resume_from_checkpoint:
        return None
    state = find_resume_state(output_dir, args.resume_from_checkpoint)
    if state is None:
        say(f"no resumable state in {output_dir} yet: starting a new run")
        return None
    saved = read_trainer_state(state)
    verify_state_files(state, saved)
    if saved["step"] != step_of(state):  # a copy renamed, or a resealed edit: which step it holds is unknown
        raise UserError(f"{state / TRAINER_STATE} records {saved['step']} steps, but {state.name} is the state after "
                        f"{step_of(state)}: delete {state} to resume from the state before it, or start a new run")
    saved_settings = ran(saved["settings"])
    check_state_loads(state, saved_settings.get("train_text_encoder"), saved_settings.get("rank"))
    # a record from before "derived" holds a model folder as typed, maybe relative: compare where it points
    for key in ("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path"):
        if isinstance(saved_settings.get(key), str):
            saved_settings[key] = absolute_if_local(saved_settings[key])
    saved_settings.setdefault("use_dora", False)  # a state from before --use_dora existed trained plain LoRA
    check_same_settings(state, saved_settings, current, args.accept_changed_settings)
    if saved["step"] >= args.max_train_steps:
        raise UserError(f"{state} has already done {saved['step']} steps: pass a larger --max_train_steps "
                        "to extend the run")
    check_same_schedule(state, saved_settings, args)
    return state


def ran(settings):
    """A run's recorded settings as they ran: the flags, with what they came to in place of what was typed (a
    record from before "derived" existed holds only those)."""
    return {**settings, **settings.get("derived", {})}


def read_trainer_state(state):
    """A state folder's trainer_state.json: {"step": int, "settings": dict}. Anything else (a truncated copy, an
    edit) is refused naming the file, rather than resuming from a state whose step is unknown."""
    file = state / TRAINER_STATE
    try:
        saved = json.loads(file.read_text(encoding="utf-8"))
        valid = type(saved["step"]) is int and isinstance(saved["settings"], dict)  # a bool is an int to isinstance
    except (OSError, ValueError, TypeError, KeyError):  # ValueError: not UTF-8 or not JSON; TypeError: not a dict
        valid = False
    if not valid:
        raise UserError(f"{file} is damaged (not the JSON with step and settings that this trainer writes): delete "
                        f"{state}, or resume from another {STATE_PREFIX}stepN folder")
    return saved


# What a resumed run must share with its state: the first ones shape the saved tensors themselves, the others
# what the run learns (--accept_changed_settings accepts a change of those)
STATE_SHAPING_FLAGS = ["pretrained_model_name_or_path", "rank", "lora_alpha", "train_text_encoder", "use_dora",
                       "optimizer"]
TRAINING_FLAGS = ["pretrained_vae_model_name_or_path", "revision", "variant", "instance_dir", "instance_prompt",
                  "caption_extension", "with_prior_preservation", "class_prompt", "num_class_images",
                  "prior_loss_weight", "prior_target", "caption_dropout", "masked_loss", "mask_floor", "resolution",
                  "buckets", "center_crop", "random_flip", "train_batch_size", "lora_dropout",
                  "learning_rate", "text_encoder_lr", "scale_lr", "adam_beta1", "adam_beta2", "adam_weight_decay",
                  "adam_epsilon", "max_grad_norm", "gradient_accumulation_steps", "snr_gamma", "noise_offset", "seed",
                  "mixed_precision", "instance_data_sha256", "model_fingerprint", *OPTIMIZER_FLAGS["prodigy"]]
# what a fingerprint covers: every part that training reads from the base model folder
MODEL_PARTS = ["unet", "text_encoder", "text_encoder_2", "vae", "tokenizer", "tokenizer_2", "scheduler"]
FINGERPRINT_SAMPLES = 16  # blocks of 4 KiB read from each weight file: a retrained model of the same shapes differs


def instance_data_sha256(images, prompts, instance_prompt):
    """One checksum of the photos' names and bytes, their own captions (--instance_prompt is compared as a flag)
    and their masks: a resume notices a photo or mask swapped or edited in the folder."""
    digest = hashlib.sha256()
    for path, prompt in zip(images, prompts):
        entry = [path.name, file_sha256(path), prompt if prompt != instance_prompt else None]
        if mask_path(path).is_file():  # only masks add to it: a run without them keeps its checksum
            entry.append(file_sha256(mask_path(path)))
        digest.update(json.dumps(entry).encode())
    return digest.hexdigest()


def model_fingerprint(model, vae_model, revision, variant):
    """What each part of the base model is, cheaply: a local folder's config, tokenizer and scheduler files by
    content, and its weight files by name, size, safetensors header (every tensor's name, shape, dtype and offset)
    and 16 sampled blocks of 4 KiB (a few reads, where the weights are gigabytes). A Hub id's part is the commit its
    revision resolved to in the local cache, which names every file's content; None if it is not cached."""
    fingerprint = {}
    for part in MODEL_PARTS:
        if part == "vae" and vae_model:
            fingerprint[part] = part_fingerprint(vae_model, ".", "config.json", None, None)
        else:
            fingerprint[part] = part_fingerprint(model, part, "model_index.json", revision, variant)
    return fingerprint


def part_fingerprint(name, sub, index, revision, variant):
    folder = Path(name) / sub
    if not Path(name).is_dir():  # check_model_source has fetched (or found cached) the index: its snapshot's commit
        cached = huggingface_hub.try_to_load_from_cache(name, index, revision=revision)
        return f"{name}@{Path(cached).parent.name}" if isinstance(cached, str) else None
    weights = set(weight_files(folder, variant))
    digest = hashlib.sha256()
    for file in sorted(folder.iterdir()) if folder.is_dir() else []:
        if file.name in weights:
            entry = [file.name, file.stat().st_size, weight_file_sample_sha256(file)]
        elif file.suffix in (".json", ".txt") and file.is_file():  # configs, vocabularies, merges
            entry = [file.name, file_sha256(file)]
        else:
            continue
        digest.update(json.dumps(entry).encode())
    return digest.hexdigest()


def weight_file_sample_sha256(file):
    """The SHA-256 of a weight file's safetensors header (8 bytes of length, then JSON naming every tensor) and of
    FINGERPRINT_SAMPLES blocks spread evenly over the file."""
    digest = hashlib.sha256()
    size = file.stat().st_size
    with open(file, "rb") as f:
        if file.suffix == ".safetensors":
            head = f.read(8)
            digest.update(head + f.read(min(int.from_bytes(head.ljust(8, b"\0"), "little"), size)))
        for k in range(FINGERPRINT_SAMPLES):
            f.seek(size * k // FINGERPRINT_SAMPLES)
            digest.update(f.read(4096))
    return digest.hexdigest()


def fingerprint_changes(was, now):
    """The parts of the base model whose fingerprints differ, where both are known (a state from before
    fingerprints has none; a Hub model not in the cache has none)."""
    was, now = was or {}, now or {}
    return [part for part in MODEL_PARTS if was.get(part) and now.get(part) and was[part] != now[part]]


def moved_model(key, saved, current):
    """A model folder passed from another place (or a Hub revision spelled another way) whose files are the ones
    the state was trained on, by their fingerprint: moved or copied, not changed."""
    if key not in ("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "revision"):
        return False
    was, now = saved.get("model_fingerprint") or {}, current.get("model_fingerprint") or {}
    same_kind = key == "revision" or bool(saved.get(key)) == bool(current[key])  # the model's own VAE is no move
    return same_kind and all(was.get(p) for p in MODEL_PARTS) and not fingerprint_changes(was, now)


def describe_change(key, was, now):
    if key == "instance_data_sha256":
        return "the instance photos, their captions or their masks (put them back as they were)"
    if key == "model_fingerprint":
        parts = fingerprint_changes(was, now)
        hub = [(was[p].rpartition("@"), now[p].rpartition("@")) for p in parts if "@" in was[p] and "@" in now[p]]
        if hub:  # the same id and revision, resolved to another commit: the repo moved on
            (name, _, then), (_, _, commit) = hub[0]
            return (f"the base model {name} (its revision now resolves to commit {commit[:12]}, not {then[:12]}; "
                    f"pass --revision {then} to resume on the files it was trained on)")
        return (f"the base model's {', '.join(parts)} (changed since the state was saved: its config, tokenizer or "
                "weight files differ; put the model back as it was)")
    if key == "buckets":  # compared as parsed, so a list spelled another way is the same buckets
        return f"the aspect-ratio buckets {was} (now {now})"
    return f"--{key} {was} (now {now})"


def check_same_settings(state, saved, current, accept_changed_settings):
    """Refuse a resume whose settings differ from its state's, listing every difference in one line."""
    for key in [*STATE_SHAPING_FLAGS, *TRAINING_FLAGS]:
        if moved_model(key, saved, current) and saved.get(key) != current[key]:
            say(f"--{key} {current[key]} (was {saved.get(key)}) holds the same base model files, by their "
                "fingerprint: resuming")
    for key in STATE_SHAPING_FLAGS:
        if saved.get(key) != current[key] and not moved_model(key, saved, current):
            differ = (" (whose files differ from those it was trained on, by their fingerprint)"
                      if key == "pretrained_model_name_or_path"
                      and fingerprint_changes(saved.get("model_fingerprint"), current["model_fingerprint"]) else "")
            raise UserError(f"{state} was trained with --{key} {saved.get(key)}, not {current[key]}{differ}: resume "
                            "with the same flags")
    changed = [describe_change(key, saved[key], current[key]) for key in TRAINING_FLAGS
               if key in saved and not same_setting(key, saved, current)]
    if changed and not accept_changed_settings:
        raise UserError(f"{state} was trained with other settings: {', '.join(changed)}; resume with the same flags, "
                        "or pass --accept_changed_settings to go on with the new ones")
    if changed:
        say(f"resuming with changed settings, as --accept_changed_settings asks: {', '.join(changed)}")


def same_setting(key, saved, current):
    if key == "model_fingerprint":
        return not fingerprint_changes(saved[key], current[key])
    return saved[key] == current[key] or moved_model(key, saved, current)


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def state_record(folder, step, settings):
    """trainer_state.json's content: the step, the settings, a checksum of every file, and a seal over all three,
    so a corrupted, truncated, swapped or edited file is found before any model loads."""
    files = {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    record = {"step": step, "settings": settings, "files": files}
    return {**record, "seal": seal(record)}


def seal(record):
    fields = {key: record.get(key) for key in ("step", "settings", "files")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def verify_state_files(state, saved):
    """Every file of a state as it was saved, and nothing added; refused in one line naming what differs."""
    fix = f"delete {state} to resume from the state before it, or start a new run"
    if "files" not in saved:
        say(f"{state} was written by an older trainer without checksums: its files are not verified")
        return
    if saved.get("seal") != seal(saved):
        raise UserError(f"{state / TRAINER_STATE} was changed after it was saved (its seal does not match): {fix}")
    on_disk = {p.relative_to(state).as_posix() for p in state.rglob("*") if p.is_file()} - {TRAINER_STATE}
    for name in sorted(on_disk | set(saved["files"])):
        if name not in saved["files"]:
            raise UserError(f"{state} holds {name}, which it was not saved with: {fix}")
        if name not in on_disk or file_sha256(state / name) != saved["files"][name]:
            raise UserError(f"{state / name} is {'missing' if name not in on_disk else 'corrupt'} (its checksum "
                            f"does not match the one saved): {fix}")


# accelerate's state files that resume reads with torch.load(weights_only=True), by name, and the keys each holds
TORCH_STATE_FILES = {"optimizer.bin": ("state", "param_groups"), "scheduler.bin": (), "scaler.pt": (),
                     "random_states_*.pkl": ("random_state", "numpy_random_seed", "torch_manual_seed")}
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6: a zip; anything else is no state accelerate wrote


def check_state_loads(state, train_text_encoder, rank):
    """Every file of a state loads as what resume will read, before any model loads: its seal is unkeyed, so a
    file swapped with the seal recomputed (a foreign pickle, a pickled optimizer) passes verify_state_files.
    The loads map the files (mmap) rather than read their tensors."""
    fix = f"delete {state} to resume from the state before it, or start a new run"
    needed = [f"lora_{i}.safetensors" for i in range(3 if train_text_encoder else 1)]
    for name in [*needed, "optimizer.bin", "scheduler.bin", "random_states_0.pkl"]:
        if not (state / name).is_file():
            raise UserError(f"{state} has no {name}, which resume reads: {fix}")
    for file in sorted(state.iterdir()):
        problem = state_file_problem(file, needed, rank)
        if problem:
            raise UserError(f"{file} {problem}: {fix}")
    saved_processes = len(list(state.glob("random_states_*.pkl")))
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > saved_processes:  # accelerate would skip the missing ones with an info log only
        warn(f"{state} holds the RNG states of {saved_processes} process(es), this run has {processes}: the others "
             "start from fresh RNG states, so the resume is not exact")


def state_file_problem(file, lora_files, rank):
    """What keeps one file of a state from loading as resume reads it, or None."""
    kind = next((pattern for pattern in TORCH_STATE_FILES if file.match(pattern)), None)
    if file.name in lora_files:
        try:
            with safe_open(str(file), framework="pt") as weights:
                shapes = {key: weights.get_slice(key).get_shape() for key in weights.keys()}
        except (SafetensorError, OSError) as e:
            return f"is not a readable safetensors file ({one_line(e)[:120]})"
        # LoRA's down (A) and up (B) matrices are rank x in and out x rank: a header read, no tensor
        wrong = [key for key, shape in shapes.items() if len(shape) == 2 and (
            ("lora_A" in key and shape[0] != rank) or ("lora_B" in key and shape[1] != rank))]
        if not any("lora_A" in key for key in shapes) or wrong:
            return (f"holds LoRA tensors of another rank than the state's {rank} (e.g. {wrong[0]})" if wrong
                    else "holds no LoRA tensors")
        return None
    if kind is None:
        return None  # a file resume does not read: the seal covers it
    with open(file, "rb") as f:
        magic = f.read(4)
    if magic != ZIP_MAGIC:
        return f"is not a torch.save file as accelerate writes it (it begins {magic!r}, not a zip's {ZIP_MAGIC!r})"
    try:
        content = accelerate.utils.load(file, map_location="cpu", mmap=True)  # weights_only=True, as resume loads it
    except pickle.UnpicklingError as e:  # torch names the first global it refused, deep in a long message
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"a pickled {found[1]}" if found else "a pickle"
        return f"holds {what}, not only tensors and plain values, so it was not loaded (nothing in it ran)"
    except Exception as e:  # noqa: BLE001 - whatever torch says of a damaged zip, it is named, never a traceback
        return f"does not load ({type(e).__name__}: {one_line(e)[:120]})"
    missing = [key for key in TORCH_STATE_FILES[kind] if not (isinstance(content, dict) and key in content)]
    if not isinstance(content, dict) or missing:
        what = f"no {', '.join(missing)}" if isinstance(content, dict) else f"a {type(content).__name__}"
        return f"holds {what}, not the {kind.replace('*', 'N')} that accelerate writes"
    return rng_problem(content) if kind.startswith("random_states") else None


def rng_problem(states):
    """Whether the RNG states set, tried and then undone: accelerate skips RNG states that do not set with only an
    info log, and the resume would not be exact."""
    before = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        random.setstate(states["random_state"])
        np.random.set_state(states["numpy_random_seed"])
        torch.set_rng_state(states["torch_manual_seed"])
    except Exception as e:  # noqa: BLE001 - TypeError, ValueError, RuntimeError: whichever, named
        return (f"holds RNG states that do not set ({type(e).__name__}: {one_line(e)[:120]}), so the resume would "
                "not be exact")
    finally:
        random.setstate(before[0])
        np.random.set_state(before[1])
        torch.set_rng_state(before[2])
    return None


def check_same_schedule(state, saved, args):
    """A resumed run keeps its learning-rate curve. Only a curve that does not depend on the run's length
    (constant, constant_with_warmup) may be extended; a cosine or linear one would bend mid-run."""
    keys = ["lr_scheduler", "lr_warmup_steps"]
    if args.lr_scheduler not in ("constant", "constant_with_warmup"):
        keys.append("max_train_steps")
    changed = [key for key in keys if saved.get(key) != getattr(args, key)]
    if changed:
        was = " ".join(f"--{key} {saved.get(key)}" for key in keys)
        raise UserError(f"{state} was trained with {was}: changing {', '.join('--' + k for k in changed)} would "
                        f"bend its learning-rate curve mid-run; resume with those flags, or start a new run in "
                        "another --output_dir (only constant schedules can be extended)")


def warn_prodigy_learning_rate(optimizer, learning_rate):
    """Prodigy's learning rate multiplies the step size it finds, so it belongs near 1.0: an AdamW-sized one
    (1e-4) all but stops training. Warned where it is more than 10x from 1.0, not refused, and the flag stays as
    typed. Said here, not in check_args, which a script run calls twice."""
    if optimizer != "prodigy" or 0.1 <= learning_rate <= 10:
        return
    default = " (the default, sized for AdamW)" if learning_rate == make_parser().get_default("learning_rate") else ""
    warn(f"--learning_rate {learning_rate}{default} with --optimizer prodigy: Prodigy finds the step size itself "
         "and multiplies it by the learning rate, which is usually 1.0; pass --learning_rate 1.0")


def check_inputs(args, settings):
    """Everything that can be checked before a model loads. Returns the instance photos, their prompts, and the
    settings completed with what the inputs decide: the photos' checksum and the state to resume from."""
    warn_prodigy_learning_rate(args.optimizer, args.learning_rate)
    check_folders(args, settings)
    instance_dir = resolve_instance_dir(args.instance_dir)
    instance_images = check_masks(instance_dir, list_images(instance_dir), args.masked_loss, args.mask_floor)
    warn_broken_links(instance_dir, "instance")
    warn_left_out(instance_dir, "instance", list_images(instance_dir), settings.caption_extension)
    if not instance_images:
        raise UserError(f"no images in {instance_dir}: add 3-20 photos (jpg, png, webp, ...) of the subject")
    subfolders = [p.name for p in instance_dir.iterdir()
                  if not p.name.startswith(".") and not points_nowhere(p) and p.is_dir()]
    if subfolders:
        warn(f"subfolders of {instance_dir} are ignored: {', '.join(sorted(subfolders))}")
    check_images(instance_images, "instance", args.resolution, settings.buckets)
    instance_prompts = read_captions(instance_images, args.instance_prompt, settings.caption_extension)
    class_dir = settings.class_dir
    if uses_class_images(args):
        refuse_file_as_folder(class_dir, "--class_dir", "pass a folder for the class images (made if missing)")
    class_images = []
    if uses_class_images(args) and Path(class_dir).is_dir():
        warn_broken_links(class_dir, "class")
        class_images = list_images(class_dir)
        warn_left_out(class_dir, "class", class_images, settings.caption_extension, required=False)  # else filled
        check_images(class_images, "class", args.resolution)
        extra = len(class_images) - args.num_class_images
        if extra > 0:  # prepare_class_images takes the first, by name
            say(f"note: the class folder {class_dir} holds {len(class_images)} images; --num_class_images "
                f"{args.num_class_images} trains on the first by name, through "
                f"{class_images[args.num_class_images - 1].name}: the {extra} after it are not used")
    targets = latent_targets(instance_images, class_images, args.resolution, settings.buckets)
    if args.cache_latents == "on" and not latent_cache_is_exact(targets, args.center_crop):
        raise UserError("--cache_latents on would fix one random crop of each image that does not fit its training "
                        "size for the whole run (kohya refuses this too): add --center_crop, or pass --cache_latents "
                        "auto, which caches only where no crop is lost")
    check_models(settings.pretrained_model_name_or_path, settings.pretrained_vae_model_name_or_path, args.revision,
                 args.variant)
    warn_long_prompts(settings.pretrained_model_name_or_path, args.revision, [
        *((image.with_suffix(settings.caption_extension).name, prompt)
          for image, prompt in zip(instance_images, instance_prompts) if prompt != args.instance_prompt),
        ("--instance_prompt", args.instance_prompt), ("--class_prompt", args.class_prompt),
        ("--validation_prompt", args.validation_prompt)])
    if args.push_to_hub:
        check_hub(args.hub_model_id, Path(settings.output_dir).name, args.hub_token)
    refuse_file_as_folder(settings.output_dir, "--output_dir", "choose another --output_dir")
    remove_partial_dirs(settings.output_dir)
    sizes = collections.Counter(training_size(path, args.resolution, settings.buckets) for path in instance_images)
    settings = dataclasses.replace(settings, instance_data_sha256=instance_data_sha256(
        instance_images, instance_prompts, args.instance_prompt), validation_size=sizes.most_common(1)[0][0],
        model_fingerprint=model_fingerprint(settings.pretrained_model_name_or_path,
                                            settings.pretrained_vae_model_name_or_path, args.revision, args.variant))
    settings = dataclasses.replace(settings, resume_state=check_resume(args, ran(run_settings(args, settings))))
    refuse_foreign_output(settings.output_dir, args)
    check_output_dir(settings.output_dir, args.overwrite_output_dir, settings.resume_state)
    if args.output_kohya_format and not settings.output_kohya_format:
        say(f"note: --use_dora writes no {KOHYA_FILE}: {DORA_IN_KOHYA_FILE}")
    captioned = sum(p != args.instance_prompt for p in instance_prompts)
    say(f"{captioned} of {counted(len(instance_images), 'photo')} {'has' if captioned == 1 else 'have'} a "
        f"{settings.caption_extension} caption"
        + ("; the others use the instance prompt" if captioned else ""))
    return instance_images, instance_prompts, settings


# ----------------------------------------------------------------------------------------------------------
# Models and pipeline (shared with infer.py)
# ----------------------------------------------------------------------------------------------------------


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


def load_models(model, vae_model, revision, variant, dtype, device, with_unet=True):
    """SSD-1B's parts, frozen, in `dtype` on `device`. vae_model=None means the model's own VAE. with_unet=False
    leaves models.unet None, for load_unet once the text encoders have gone."""
    common = dict(revision=revision, variant=variant)
    # each loaded straight in its run dtype: no full-precision copy first (and diffusers warns at a later cast)
    diffusers_common = dict(common, **{DIFFUSERS_DTYPE: dtype})
    transformers_common = dict(common, **{TRANSFORMERS_DTYPE: dtype})
    with load_errors_named(model, vae_model):
        tokenizers = [CLIPTokenizer.from_pretrained(model, subfolder=sub, revision=revision)
                      for sub in ("tokenizer", "tokenizer_2")]
        text_encoders = [CLIPTextModel.from_pretrained(model, subfolder="text_encoder", **transformers_common),
                         CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2",
                                                                     **transformers_common)]
        unet = load_unet(model, revision, variant, dtype, device) if with_unet else None
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


def load_unet(model, revision, variant, dtype, device):
    """The UNet, frozen, in `dtype` on `device`. The trainer loads it last, once the prompt cache has let the text
    encoders go, and from a safetensors file a few tensors at a time (stream_weights), so the file is never mapped
    whole beside the weights cast from it: from_pretrained keeps all of SSD-1B's fp16 file (2.5 GiB) mapped until
    the bf16 weights made from it (2.5 GiB more) are complete. Other weights (.bin, a hub model's shards) load with
    from_pretrained."""
    with load_errors_named(model):
        files = unet_safetensors(model, revision, variant)
        if not files:
            unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", revision=revision, variant=variant,
                                                        torch_dtype=dtype)
            return unet.requires_grad_(False).to(device)
        config = UNet2DConditionModel.load_config(model, subfolder="unet", revision=revision)
    with init_empty_weights():  # parameters on the meta device: no memory until the weights come
        unet = UNet2DConditionModel.from_config(config)
    unexpected = [name for file in files for name in stream_weights(unet, file, dtype, device, model)]
    missing = [name for name, tensor in unet.state_dict().items() if tensor.is_meta]
    if missing or unexpected:
        raise UserError(f"cannot load {model}: its UNet weights do not fit its config "
                        f"({counted(len(missing), 'tensor')} missing, {len(unexpected)} unknown, e.g. "
                        f"{(missing + unexpected)[0]}); download the model again")
    unet.register_to_config(_name_or_path=model)  # as from_pretrained does
    return unet.eval().requires_grad_(False).to(device)  # from_pretrained's eval mode; buffers to the device


def unet_safetensors(model, revision, variant):
    """The UNet's safetensors files, as from_pretrained would pick them: a local folder's single file or its
    shards, or a hub model's single file (fetched, or found in the cache). [] when there are none, or the hub
    does not give one: from_pretrained then loads what there is, or names what is wrong."""
    name = f"diffusion_pytorch_model{'.' + variant if variant else ''}.safetensors"
    folder = Path(model) / "unet"
    if folder.is_dir():
        index = folder / f"{name}.index.json"
        if (folder / name).is_file():
            return [folder / name]
        if index.is_file():
            shards = read_json_config(index, "--pretrained_model_name_or_path", model).get("weight_map")
            if not isinstance(shards, dict) or not shards:
                raise UserError(f"--pretrained_model_name_or_path {model}: unet/{index.name} lists no shards: "
                                "download the model again")
            return [folder / shard for shard in sorted(set(shards.values()))]
        return []
    try:
        return [Path(huggingface_hub.hf_hub_download(model, name, subfolder="unet", revision=revision))]
    except Exception:  # not there (a model of shards or .bin), offline and not cached, unreachable
        return []


def stream_weights(unet, file, dtype, device, model, tensors_at_once=32, scratch_size=2**18):
    """One safetensors file into `unet` (made on the meta device), each tensor cast to `dtype` on `device`.
    safe_open maps the whole file, and the tensors it hands out are views of that mapping; opening it again for
    every few tensors lets the pages read so far go. Returns the names the UNet has no place for."""
    with unreadable_named(file, model), safe_open(file, "pt") as weights:
        names = list(weights.keys())
    unexpected, scratch = [], torch.empty(scratch_size, dtype=torch.float32)
    for start in range(0, len(names), tensors_at_once):
        with unreadable_named(file, model), safe_open(file, "pt") as weights:
            tensors = {name: cast(weights.get_tensor(name), dtype, device, scratch)
                       for name in names[start:start + tensors_at_once]}
        try:
            unexpected += unet.load_state_dict(tensors, strict=False, assign=True).unexpected_keys
        except RuntimeError as e:  # a tensor of another shape than the config's
            raise UserError(f"cannot load {model}: its UNet weights do not fit its config ({one_line(e)}); "
                            "download the model again") from None
    return unexpected


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
    """A damaged or missing safetensors file of the UNet as one line naming it."""
    try:
        yield
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot load {model}: unet/{Path(file).name} is unreadable ({one_line(e)}); download "
                        "the model again") from None


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


def one_line(error):
    """An exception's message cut to one short line, for a UserError."""
    return (str(error).splitlines() or [""])[0][:200]


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


def add_lora(models, rank, alpha, dropout, train_text_encoder, use_dora=False):
    """Inject LoRA (DoRA with use_dora: its magnitudes start at the base weights' row norms, so the model starts
    unchanged); returns the modules that train. Their parameters are kept fp32 under mixed precision."""
    def config(targets, exclude=None):
        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                          target_modules=targets, exclude_modules=exclude, use_dora=use_dora)

    models.unet.add_adapter(config(UNET_TARGETS))
    trained = [models.unet]
    if train_text_encoder:
        # CLIP-L's last layer feeds only hidden_states[-1], which SDXL never reads: LoRA there would never train
        last = models.text_encoders[0].config.num_hidden_layers - 1
        excluded = [[f"encoder.layers.{last}.self_attn.{target}" for target in TEXT_ENCODER_TARGETS], None]
        for text_encoder, exclude in zip(models.text_encoders, excluded):
            # peft's own injection: transformers' add_adapter refuses peft < 0.22 from transformers 5.24 on
            inject_adapter_in_model(config(TEXT_ENCODER_TARGETS, exclude), text_encoder)
            trained.append(text_encoder)
    # fp32 trainables under fp16/bf16 frozen weights: no "Attempting to unscale FP16 gradients"
    cast_training_params(trained, dtype=torch.float32)
    return trained


def effective_learning_rates(args, num_processes):
    """(UNet, text encoders) learning rates as trained: with --scale_lr, times the effective batch size. Prodigy
    takes one learning rate for every group (prodigyopt refuses any other but 0), so its text encoders share the
    UNet's."""
    factor = args.train_batch_size * num_processes * args.gradient_accumulation_steps if args.scale_lr else 1
    text_encoder_lr = args.learning_rate if args.optimizer == "prodigy" else args.text_encoder_lr
    return args.learning_rate * factor, text_encoder_lr * factor


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


def load_image(path, min_side=None):
    """RGB in sRGB (see as_srgb), EXIF orientation applied, transparency composited on white, an animation's first
    frame (check_images names animations). Returns the image and its full
    (height, width) after orientation, which is what SDXL's original-size time ids mean.

    With min_side, a JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale whose short side still reaches
    min_side, so a 50-megapixel photo never sits in memory at full size.
    """
    with Image.open(path) as image:
        original_size = oriented_size(image)
        if min_side:
            scale = min_side / min(image.size)
            image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))
        image = as_srgb(eight_bit(ImageOps.exif_transpose(image), bit_depth(image)), image.info.get("icc_profile"))
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            image = Image.new("RGB", rgba.size, (255, 255, 255))
            image.paste(rgba, mask=rgba.getchannel("A"))
        return image.convert("RGB"), original_size


def height_width(size):
    """A training size as (height, width): --resolution's square, or an aspect-ratio bucket."""
    return (size, size) if isinstance(size, int) else tuple(size)


def cover_size(width, height, size):
    """(width, height) of an image resized, keeping its aspect, to just cover `size`: what crop_and_flip crops."""
    target_height, target_width = height_width(size)
    scale = max(target_height / height, target_width / width)
    return max(target_width, round(width * scale)), max(target_height, round(height * scale))


class PixelError(ValueError):
    """An image whose pixels cannot be read as they are meant to be seen: refused rather than guessed at."""


SRGB = ImageCms.createProfile("sRGB")


def bit_depth(image):
    """(bits per sample, signed) of a grey image as its file states them (a TIFF's BitsPerSample and
    SampleFormat); 16 unsigned for the other formats that Pillow opens as I (PNG, and PGM, which Pillow scales to
    16 bits)."""
    if image.format == "TIFF" and image.mode == "I":
        return image.tag_v2.get(258, (16,))[0], image.tag_v2.get(339, (1,))[0] == 2
    return 16, False


def eight_bit(image, depth=None):
    """An image of more than 8 bits per sample (grey: Pillow holds deeper colour as 8-bit already) as 8-bit
    grey, each value scaled by its format's full range rather than clipped to 255 by convert():
    - integers (I;16, and I: 16-bit PNG and PGM, 16- or 32-bit TIFF) by their bit depth (`depth`, from
      bit_depth), e.g. 65535 -> 255, and a signed 32-bit TIFF's 2^31-1 -> 255;
    - floats (F: TIFF, PFM) by 0.0 = black, 1.0 = white, the convention of float image files.
    A float image with values outside 0-1 or not finite (HDR, or data saved as 0-255 floats), or an integer one
    with negative values, has no one reading, and raises PixelError, as does one whose values all lie under 1/255
    of its range: it would train as black."""
    if image.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return image
    bits, signed = depth or bit_depth(image)
    values = np.asarray(image)
    # Pillow holds an unsigned 32-bit TIFF in its signed I: values from 2^31 on read negative until reinterpreted
    values = (values.view(np.uint32) if values.dtype == np.int32 and bits == 32 and not signed else values).astype(
        np.float64)
    white = 1.0 if image.mode == "F" else 2 ** (bits - signed) - 1
    kind = "float" if image.mode == "F" else f"{bits}-bit {'signed' if signed else 'unsigned'}"
    if not np.isfinite(values).all():
        raise PixelError(f"{kind} pixels that are no number (NaN or infinite): re-export it as 8- or 16-bit")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    span = f"{kind} pixels from {low:.10g} to {high:.10g}"
    if low < 0 or high > white:
        raise PixelError(f"{span}, outside 0-{white:.10g}: re-export it as 8- or 16-bit")
    eight = (values / white * 255).round().clip(0, 255).astype(np.uint8)
    if high > 0 and eight.max() == 0:
        raise PixelError(f"{span}, all under 1/255 of 0-{white:.10g}: it would train black; re-export it as 8- or "
                         "16-bit")
    return Image.fromarray(eight)


def as_srgb(image, icc_profile):
    """The image in sRGB, as browsers and photo tools show it: an embedded colour profile (Adobe RGB, Display P3,
    a CMYK press profile...) is converted through Pillow's littleCMS; an image without one is sRGB already.
    Alpha is kept as it was. A profile that cannot be read, or that does not fit the image's colours (but for a
    grey image with an RGB profile), raises PixelError: shown without it, the colours would be wrong without a
    word."""
    if not icc_profile and image.mode != "LAB":
        return image
    alpha = None
    if image.mode in ("RGBA", "LA", "PA", "P") or "transparency" in image.info:  # littleCMS converts colour only
        image = image.convert("LA" if image.mode in ("L", "LA") else "RGBA")
        alpha, image = image.getchannel("A"), image.convert(image.mode[:-1])
    try:
        source = (ImageCms.ImageCmsProfile(io.BytesIO(icc_profile)) if icc_profile
                  else ImageCms.createProfile("LAB"))
        if image.mode in ("1", "L") and icc_profile and source.profile.xcolor_space.strip() == "RGB":
            image = image.convert("RGB")  # grey saved with an RGB profile (some tools do): neutral grey in it
        converted = ImageCms.profileToProfile(image, source, SRGB, outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as e:
        raise PixelError(f"its colour profile cannot be applied ({one_line(e)}): re-export it with an sRGB profile "
                         "or none") from None
    if alpha is not None:
        converted.putalpha(alpha)
    return converted


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


def sdxl_time_ids(original_size, top, left, size):
    """SDXL's added conditions: original (height, width), crop (top, left), target (height, width)."""
    return torch.tensor([*original_size, top, left, *height_width(size)], dtype=torch.float32)


def to_tensor(image):
    """PIL RGB -> float tensor (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def mask_path(photo):
    """photo.jpg's loss mask: photo.mask.png beside it."""
    return Path(photo).with_name(f"{Path(photo).stem}{MASK_SUFFIX}")


def load_mask(photo, size):
    """photo.mask.png in grey scale, oriented like its photo and sized like the photo as decoded (load_image may
    decode a JPEG at 1/2, 1/4 or 1/8): a mask for every pixel of it. None where the photo has no mask."""
    if not mask_path(photo).is_file():
        return None
    with Image.open(mask_path(photo)) as mask:
        mask = mask_weights(ImageOps.exif_transpose(mask), bit_depth(mask))
    return mask if mask.size == size else mask.resize(size, Image.Resampling.BILINEAR)


def mask_weights(mask, depth=None):
    """A mask as 8-bit grey weights. A mask saved as RGB or palette is read as grey where every pixel is grey; a
    coloured one raises PixelError, since its luminance (a red subject: 0.30) is no weight its author meant."""
    mask = eight_bit(mask, depth)
    if mask.mode not in ("L", "1"):
        channels = np.asarray(mask.convert("RGB"), dtype=np.int16)
        if (channels.max(axis=2) - channels.min(axis=2)).max() > 2:  # a few levels of a colour tool's rounding
            raise PixelError("has colours, not only grey: paint the subject white and the rest black, and save it "
                             "as grey scale")
    return mask.convert("L")


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


def nearest_bucket(height, width, buckets):
    """The bucket whose aspect ratio is nearest the image's (by log ratio: 2:1 is as far from 1:1 as 1:2)."""
    return min(buckets, key=lambda bucket: abs(math.log(bucket[0] / bucket[1]) - math.log(height / width)))


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
        example = {"pixel_values": to_tensor(crop), "time_ids": sdxl_time_ids(original_size, top, left, size)}
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
        pixels.append(to_tensor(crop))
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
        # here, from the frozen weights' dtype, which is --mixed_precision's
        dtype = next(p.dtype for p in bare[0].parameters() if not p.requires_grad)
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
# Saving: every file of a step dir appears at once, or not at all
# ----------------------------------------------------------------------------------------------------------


def save_png_atomic(image, path, pnginfo=None):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        image.save(tmp, format="PNG", pnginfo=pnginfo)
        os.replace(tmp, path)
    finally:  # cut short (a stop, a full disk): nothing half-written stays
        tmp.unlink(missing_ok=True)


def save_png_new(image, path, pnginfo=None):
    """Save under `path`, or path_2, path_3, ... where that name is taken: a render never replaces an earlier
    one. The name is claimed with a hard link, which fails where a file exists, so two writers cannot collide;
    where links are not supported, by creating the name exclusively, then renaming the finished file onto it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    image.save(tmp, format="PNG", pnginfo=pnginfo)
    try:
        for n in itertools.count(1):
            final = path if n == 1 else path.with_name(f"{path.stem}_{n}{path.suffix}")
            try:
                os.link(tmp, final)
                return final
            except FileExistsError:
                continue
            except OSError:  # a file system without hard links
                if create_exclusive(final, ""):
                    os.replace(tmp, final)
                    return final
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path, text):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:  # cut short (a stop, a full disk): nothing half-written stays
        tmp.unlink(missing_ok=True)


def partial_dir(final):
    """Where `final` is written first: hidden, and in the same folder so the rename stays on one filesystem."""
    return final.with_name(f".{final.name}.partial")


def publish(tmp, final):
    """Make a fully written folder visible under its final name in one rename: complete, or absent."""
    for file in tmp.rglob("*"):
        if file.is_file():
            with open(file, "rb+") as f:
                os.fsync(f.fileno())
    if final.exists():  # only when replacing was asked for: move the old one aside, then swap
        old = final.with_name(f".{final.name}.replaced")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    return final


def save_peft_adapter(model, folder, base_model):
    """PEFT's own layout, so `PeftModel.from_pretrained(pipe.unet, folder)` loads it."""
    config = model.peft_config["default"]
    config.base_model_name_or_path = base_model
    config.save_pretrained(str(folder))
    state = {f"base_model.model.{k}": v.detach().float().cpu().contiguous()
             for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()}
    safetensors.torch.save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def portable_lora_weights(model):
    """LoRA weights named as transformers 4, diffusers, ComfyUI and kohya name them. transformers 5's
    CLIPTextModel dropped its `text_model.` level; diffusers strips it again when the model lacks it. A text
    encoder's DoRA magnitude is named as the parameter it is (`lora_magnitude_vector.weight`): transformers 5's
    load_adapter, which diffusers loads text encoders with, leaves peft's shorter name unloaded; peft reads both."""
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    if isinstance(model, CLIPTextModel) and not hasattr(model, "text_model"):
        state = {f"text_model.{key}": value for key, value in state.items()}
    if isinstance(model, (CLIPTextModel, CLIPTextModelWithProjection)):
        state = {f"{key}.weight" if key.endswith(".lora_magnitude_vector") else key: value
                 for key, value in state.items()}
    return state


def portable_lora_metadata(config):
    """The LoraConfig stored in the diffusers file: what diffusers reads, and what differs from the defaults.
    diffusers builds LoraConfig(**metadata), and an older peft refuses fields it doesn't know."""
    defaults = LoraConfig().to_dict()
    needed = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern")
    metadata = {key: value for key, value in config.to_dict().items() if key in needed or value != defaults.get(key)}
    if metadata.get("base_model_name_or_path"):  # the file goes to the Hub: no local path in it
        metadata["base_model_name_or_path"] = shared_name(metadata["base_model_name_or_path"])
    return metadata


def kohya_module_name(module, layers_per_block):
    """A diffusers UNet module path in SGM/kohya naming, e.g. down_blocks.1.attentions.0.x -> input_blocks.4.1.x
    (each UNet level holds layers_per_block blocks plus a down/upsampler)."""
    per_level = layers_per_block + 1
    if match := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", module):
        return f"input_blocks.{1 + per_level * int(match[1]) + int(match[2])}.1.{match[3]}"
    if match := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", module):
        return f"output_blocks.{per_level * int(match[1]) + int(match[2])}.1.{match[3]}"
    if match := re.match(r"mid_block\.attentions\.0\.(.*)", module):
        return f"middle_block.1.{match[1]}"
    return module


def kohya_state_dict(trained, lora_alpha):
    """The WebUI/ComfyUI/kohya file: lora_unet_* in SGM block names, lora_te1_*, lora_te2_*, each with alpha."""
    kohya = {}
    layers_per_block = trained[0].config.layers_per_block
    for model, prefix in zip(trained, ["lora_unet", "lora_te1", "lora_te2"]):
        for key, value in portable_lora_weights(model).items():
            module, kind = key.rsplit(".lora_", 1)  # kind: "A.weight" (down) or "B.weight" (up)
            if prefix == "lora_unet":
                module = kohya_module_name(module, layers_per_block)
            name = f"{prefix}_{module.replace('.', '_')}"
            kohya[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value.detach().float().cpu()
            kohya[f"{name}.alpha"] = torch.tensor(float(lora_alpha))
    return kohya


def save_adapters(step_dir, trained, settings, kohya=False):
    """Write stepN/{unet,text_encoder_one,text_encoder_two}/ (PEFT), stepN/pytorch_lora_weights.safetensors
    (diffusers), optionally the kohya file, and stepN/run_settings.json; then rename the folder into place."""
    step_dir = Path(step_dir)
    tmp = partial_dir(step_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    base = ran(settings)["pretrained_model_name_or_path"]
    for model, name in zip(trained, ["unet", "text_encoder_one", "text_encoder_two"]):
        save_peft_adapter(model, tmp / name, base)
    layers = [convert_state_dict_to_diffusers(portable_lora_weights(m)) for m in trained]
    metadata = [portable_lora_metadata(m.peft_config["default"]) for m in trained]
    StableDiffusionXLPipeline.save_lora_weights(
        str(tmp), unet_lora_layers=layers[0], unet_lora_adapter_metadata=metadata[0],
        text_encoder_lora_layers=layers[1] if len(layers) > 1 else None,
        text_encoder_lora_adapter_metadata=metadata[1] if len(layers) > 1 else None,
        text_encoder_2_lora_layers=layers[2] if len(layers) > 2 else None,
        text_encoder_2_lora_adapter_metadata=metadata[2] if len(layers) > 2 else None,
        weight_name=LORA_FILE)
    if kohya:
        safetensors.torch.save_file(kohya_state_dict(trained, ran(settings)["lora_alpha"]), str(tmp / KOHYA_FILE),
                                    metadata={"ss_network_module": "networks.lora"})
    (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))
    return publish(tmp, step_dir)


# ----------------------------------------------------------------------------------------------------------
# Resumable state: beside each step's adapters, never inside the folders users copy around
# ----------------------------------------------------------------------------------------------------------


def unwrap(accelerator, model):
    """The model under accelerate's wrappers and torch.compile's, whose weights keep the model's own names
    (a compiled module's start with `_orig_mod.`, which no loader reads)."""
    model = accelerator.unwrap_model(model)
    return getattr(model, "_orig_mod", model)


def save_lora_hook(accelerator, models, weights, output_dir):
    """accelerate's save_state hook: store the LoRA weights only, not the frozen multi-GB base model."""
    if accelerator.is_main_process:
        for i, model in enumerate(models):
            state = get_peft_model_state_dict(unwrap(accelerator, model), save_embedding_layers=False)
            safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()},
                                        f"{output_dir}/lora_{i}.safetensors")
    weights.clear()


def load_lora_hook(accelerator, models, input_dir):
    """accelerate's load_state hook: the LoRA weights back into each model; the base weights are untouched."""
    for i, model in enumerate(models):
        file = Path(input_dir) / f"lora_{i}.safetensors"
        fix = f"delete {input_dir} to resume from the state before it, or start a new run"
        try:
            result = set_peft_model_state_dict(unwrap(accelerator, model), safetensors.torch.load_file(file))
        except RuntimeError as e:  # a size mismatch: check_state_loads compares ranks, not every module's width
            raise UserError(f"{file} does not fit the model ({one_line(e)}): {fix}") from None
        # loaded with strict=False: a LoRA tensor the model lacks, or one the file lacks, would go without a word
        unexpected = list(result.unexpected_keys)
        missing = [key for key in result.missing_keys if "lora_" in key]
        if unexpected or missing:
            which, example = ("holds tensors the model has no place for", unexpected) if unexpected \
                else ("lacks LoRA tensors of the model", missing)
            raise UserError(f"{file} {which} ({len(example)}, e.g. {example[0]}), so it is not this run's: {fix}")
    models.clear()


def save_resumable_state(accelerator, output_dir, step, settings):
    """accelerate's save_state (LoRA, optimizer with its 8-bit states, scheduler, scaler, every RNG) into
    state-stepN/, written hidden and renamed into place. Every process takes part."""
    final = Path(output_dir) / f"{STATE_PREFIX}step{step - 1}"
    tmp = partial_dir(final)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / TRAINER_STATE).write_text(json.dumps(state_record(tmp, step, settings), indent=2))
        publish(tmp, final)
    accelerator.wait_for_everyone()
    return final


def complete_states(output_dir):
    """Resumable states by step, oldest first; a folder without its trainer_state.json is not one, nor is one
    not named state-stepN. Sorted by name, which save_resumable_state derives from the step: pruning reads no
    file that could be damaged."""
    states = [p for p in Path(output_dir).glob(f"{STATE_PREFIX}step*") if step_of(p) and (p / TRAINER_STATE).is_file()]
    return sorted(states, key=step_of)


def prune_states(output_dir, keep):
    """Keep the newest `keep` resumable states; adapters are never deleted."""
    for old in complete_states(output_dir)[:-keep]:
        shutil.rmtree(old)


def find_resume_state(output_dir, resume):
    """The state folder to resume from: a path (a stepN adapter dir maps to its state), or the newest complete
    one for 'latest' (None when there is none yet)."""
    if resume == "latest":
        states = complete_states(output_dir)
        refuse_damaged_newer_states(output_dir, states[-1] if states else None)
        return states[-1] if states else None
    path = Path(resume)
    if not path.exists() and len(path.parts) == 1:  # a bare name, as diffusers' script takes: in the output dir
        path = Path(output_dir) / path
    if not (path / TRAINER_STATE).is_file() and (path.parent / f"{STATE_PREFIX}{path.name}").is_dir():
        path = path.parent / f"{STATE_PREFIX}{path.name}"
    if not (path / TRAINER_STATE).is_file():
        raise UserError(f"{resume} is not a resumable checkpoint (no {TRAINER_STATE}): pass a "
                        f"{STATE_PREFIX}stepN folder of the output dir, or 'latest'")
    if step_of(path) is None:  # its step is read from its name, as for every state of the output dir
        raise UserError(f"{path} is not named {STATE_PREFIX}stepN, as the trainer names the states it writes: "
                        f"rename it to {STATE_PREFIX}step<its step - 1>, or pass 'latest'")
    return path


def refuse_damaged_newer_states(output_dir, newest):
    """'latest' never falls back past a state-stepN that is not whole (its trainer_state.json, written last, is
    gone: deleted or damaged; a save cut short leaves only a hidden .partial folder): that state's step and
    settings are unknown, so whether its adapters are this run's is too. Named, with the choices, in one line."""
    complete = complete_states(output_dir)
    newer = [p for p in Path(output_dir).glob(f"{STATE_PREFIX}step*")
             if step_of(p) and p not in complete and (newest is None or step_of(p) > step_of(newest))]
    if not newer:
        return
    damaged = max(newer, key=step_of)
    what = f"has no {TRAINER_STATE} (deleted or damaged)" if damaged.is_dir() else "is not a folder"
    then = f"'latest' resumes from {newest.name}, the state before it" if newest else "the run starts anew"
    raise UserError(f"--resume_from_checkpoint latest: {damaged} {what}, so its step and settings are unknown, and "
                    f"'latest' does not fall back past it without a word: delete it (or move it out of "
                    f"{output_dir}), then {then}")


@functools.cache
def parent_command_line():
    """The command line of the process that started this one (a shell, `accelerate launch`, torchrun), from Linux's
    /proc; () where there is none. Read once, at start: accelerate's launcher dies of the same Ctrl-C or SIGTERM
    before the run has saved, and its orphan is adopted by another parent."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return ()
    return tuple(os.fsdecode(arg) for arg in raw.split(b"\0")[:-1])


def resume_command(argv, parent=None, own=None, cwd=None, resume=True):
    """The command that resumes this run from any folder: `cd` to the folder it was started in, then the launch as
    typed (`accelerate launch` or torchrun with their flags, or the interpreter), the script, the same flags, and
    --resume_from_checkpoint latest (with resume=False, none: a run stopped before it saved anything starts again).

    parent: the parent process's command line ([] when unknown); own: this interpreter's (sys.orig_argv); cwd: the
    folder the run was started in. Each is read from the system when not given."""
    parent = list(parent_command_line() if parent is None else parent)
    own = list(getattr(sys, "orig_argv", [])) if own is None else list(own)
    cwd = os.getcwd() if cwd is None else cwd
    argv = list(argv)

    def launch_in(command):
        """The words before this run's flags when `command` ends with the script and them (a launcher passes both
        on as typed), else None."""
        n = len(command) - len(argv)
        if n > 0 and command[n:] == argv and Path(command[n - 1]).name == Path(__file__).name:
            return command[:n]
        return None

    launch = launch_in(parent) or launch_in(own) or ["python", str(Path(__file__).resolve())]
    if len(launch) > 2 and Path(launch[0]).name.startswith("python") and Path(launch[1]).is_absolute() \
            and Path(launch[1]).suffix != ".py":
        launch = [Path(launch[1]).name, *launch[2:]]  # a console script run by its shebang: `accelerate launch ...`
    kept, skip = [], False
    for arg in argv:  # --hub_token is a secret: not printed (the token of `hf auth login` serves, or pass it again)
        if skip or arg.startswith(("--resume_from_checkpoint=", "--hub_token=")):
            skip = False
            continue
        if arg in ("--resume_from_checkpoint", "--hub_token"):
            skip = True
            continue
        kept.append(arg)
    again = ["--resume_from_checkpoint", "latest"] if resume else []
    return f"cd {shlex.quote(str(cwd))} && " + shlex.join([*launch, *kept, *again])


class Interrupted(BaseException):
    """A run stopped by SIGINT or SIGTERM, once what it could keep is kept; carries the exit code. Not an
    Exception, as KeyboardInterrupt is not: a stop raised inside a library is never caught as its error."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.exit_code = 128 + signum


class GracefulStop:
    """SIGINT / SIGTERM (Ctrl-C, cluster preemption), answered the same in every phase of the run. While training
    (within finishing_steps): finish the step, save, exit (train raises Interrupted). Elsewhere there is nothing
    to finish: Interrupted is raised where the run stands, with what `describe()` says about it (the phase, what is
    kept, the command that goes on). A second one exits at once, after on_exit (the lock's release), unless it comes
    within REPEAT_WINDOW seconds of the first: that is the same stop passed on by a launcher (accelerate launch 1.16
    sends its own SIGTERM to the trainer when it gets Ctrl-C or a SIGTERM of the group)."""

    REPEAT_WINDOW = 1.0

    def __init__(self, describe=None):
        self.describe, self.on_exit = describe, lambda: None

    def __enter__(self):
        self.signum, self.previous, self.first = 0, {}, None
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum, frame):
        if self.signum and time.monotonic() - self.first < self.REPEAT_WINDOW:
            return
        if self.signum:
            self.on_exit()
            os._exit(128 + signum)
        self.signum, self.first = signum, time.monotonic()
        if self.describe is not None:
            self.stop_now()
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a resumable checkpoint "
              "(interrupt again to exit at once)", file=sys.stderr, flush=True)

    def stop_now(self):
        raise Interrupted(f"{signal.Signals(self.signum).name} {self.describe()}", self.signum)

    def at_once(self, describe):
        """From here a stop ends the run where it stands, saying `describe()`; one asked for already ends it now."""
        self.describe = describe
        if self.signum:
            self.stop_now()

    @contextlib.contextmanager
    def at_once_within(self, describe):
        """at_once for a block, then as before: for work within a step that a stop need not wait for."""
        previous = self.describe
        self.at_once(describe)
        try:
            yield
        finally:
            self.describe = previous

    @contextlib.contextmanager
    def finishing_steps(self):
        """Within, a stop lets the step end and be saved: the training loop asks requested() after each."""
        describe, self.describe = self.describe, None
        yield
        self.describe = describe

    def requested(self, accelerator):
        """The signal to stop on, agreed by all processes so that they stop at the same step."""
        if accelerator.num_processes == 1:
            return self.signum
        flag = torch.tensor([self.signum], device=accelerator.device)
        return int(accelerator.reduce(flag, reduction="max").item())


def run_settings(args, settings, step=None, num_processes=1):
    """run_settings.json: the flags as typed, and under "derived" what they came to (defaults, absolute model
    folders, the photos' checksum, the learning rates after --scale_lr). infer.py rebuilds the run's pipeline from
    it without repeating flags; a resume compares it with its state's."""
    unet_lr, text_encoder_lr = effective_learning_rates(args, num_processes)
    flags = {k: ("<hidden>" if k in SECRET_FLAGS and v else v) for k, v in vars(args).items()}
    derived = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(settings).items()
               if k != "command"}
    derived.update(num_processes=num_processes, effective_learning_rate=unet_lr,
                   effective_text_encoder_lr=text_encoder_lr)
    record = {**flags, "derived": derived, "step": step, "trainer": "train_dreambooth_lora_ssd1b.py"}
    return json.loads(json.dumps(record))  # as it reads back: a resume compares it with a saved one


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------


def image_grid(images):
    """Images in rows of ceil(sqrt(n)), the last row filled with white: make_image_grid takes full grids only."""
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    blank = Image.new("RGB", images[0].size, "white")
    return make_image_grid([*images, *[blank] * (rows * columns - len(images))], rows, columns)


def log_validation(accelerator, models, args, settings, step):
    """Fixed-seed images of the validation prompt, so rounds are comparable; PNGs, a grid, tensorboard."""
    text_encoders = [None, None] if models.prompt_cache else [unwrap(accelerator, m) for m in models.text_encoders]
    unwrapped = dataclasses.replace(models, unet=unwrap(accelerator, models.unet), text_encoders=text_encoders)
    for module in [unwrapped.unet, *(m for m in text_encoders if m is not None)]:
        module.eval()  # no LoRA dropout while sampling
    pipe = build_pipeline(unwrapped, settings.pretrained_model_name_or_path, args.revision, args.variant)
    seeds = [args.seed + i for i in range(args.num_validation_images)]
    started = time.perf_counter()
    with accelerator.autocast():
        prompt = None if models.prompt_cache else args.validation_prompt  # else it comes as embeddings
        images = generate_images(pipe, prompt, seeds, *(settings.validation_size or [args.resolution] * 2),
                                 args.validation_inference_steps, **cached_prompt_kwargs(pipe, models, args))
        base = base_validation_images(pipe, models, args, settings, seeds) if args.validation_compare_base else None
    folder = Path(settings.output_dir) / "validation" / f"step{step - 1}"
    folder.mkdir(parents=True, exist_ok=True)
    for seed, image in zip(seeds, images):
        save_png_atomic(image, folder / f"seed{seed}.png")
    grid = side_by_side(image_grid(images), image_grid(base)) if base else image_grid(images)
    save_png_atomic(grid, folder / "grid.png")
    tqdm.write(f"validation: {counted(len(images), 'image')} of '{args.validation_prompt}' in {folder} "
               f"({(time.perf_counter() - started) / len(images):.1f} s/image)")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation_grid", np.asarray(grid), step, dataformats="HWC")
    unwrapped.unet.train()
    for text_encoder in text_encoders if args.train_text_encoder else []:
        text_encoder.train()
    return images


def base_validation_images(pipe, models, args, settings, seeds):
    """--validation_compare_base: the base model's images for the validation seeds, its adapters off. Rendered
    once per run into validation/base/ with what they were made with, then read back by every later round, a
    resumed run's too; made again only when that record differs (an --overwrite_output_dir run, say)."""
    folder = Path(settings.output_dir) / "validation" / "base"
    record = {"prompt": args.validation_prompt, "seeds": seeds,
              "size": list(settings.validation_size or [args.resolution] * 2),  # a list, as JSON reads it back
              "steps": args.validation_inference_steps, "model": settings.pretrained_model_name_or_path,
              "vae": settings.pretrained_vae_model_name_or_path, "mixed_precision": args.mixed_precision}
    paths = [folder / f"seed{seed}.png" for seed in seeds]
    try:
        if json.loads((folder / "render.json").read_text()) == record and all(p.is_file() for p in paths):
            return [load_image(path)[0] for path in paths]
    except (OSError, ValueError):
        pass  # none yet, or unreadable: render them
    text_encoders = [m for m in [pipe.text_encoder, pipe.text_encoder_2] if m is not None and args.train_text_encoder]
    with adapters_off([pipe.unet, *text_encoders]):
        prompt = None if models.prompt_cache else args.validation_prompt
        images = generate_images(pipe, prompt, seeds, *record["size"], args.validation_inference_steps,
                                 **cached_prompt_kwargs(pipe, models, args))
    folder.mkdir(parents=True, exist_ok=True)
    for path, image in zip(paths, images):
        save_png_atomic(image, path)
    write_text_atomic(folder / "render.json", json.dumps(record) + "\n")
    return images


def side_by_side(left, right):
    """Two grids in one picture, a white gap between: the trained model's, then the base model's."""
    gap = max(left.width // 16, 4)
    both = Image.new("RGB", (left.width + gap + right.width, max(left.height, right.height)), "white")
    both.paste(left, (0, 0))
    both.paste(right, (left.width + gap, 0))
    return both


def cached_prompt_kwargs(pipe, models, args):
    """The pipeline's prompt arguments from the prompt cache, when the text encoders have left the device."""
    if not models.prompt_cache:
        return {}
    embeds, pooled = models.prompt_cache[args.validation_prompt]
    kwargs = {"prompt_embeds": embeds[None], "pooled_prompt_embeds": pooled[None]}
    if not pipe.config.force_zeros_for_empty_prompt:  # SDXL's default negative is zeros; else embed ""
        negative, negative_pooled = models.prompt_cache[""]
        kwargs.update(negative_prompt_embeds=negative[None], negative_pooled_prompt_embeds=negative_pooled[None])
    return kwargs


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
        f"| optimizer, precision | {args.optimizer}, {args.mixed_precision or 'as accelerate is configured'} |",
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
    infer = Path(__file__).resolve().parent / "infer.py"
    relative = Path(os.path.relpath(infer, Path(output_dir).resolve()))
    script = relative.as_posix() if set(relative.parent.parts) <= {".."} else "infer.py"
    return shlex.join(["python", script, "--checkpoint", step_dir, "--prompt", prompt])


def infer_command(step_dir, prompt):
    """The infer.py command for a step dir, with absolute paths: it works from whichever folder it is run in."""
    infer = Path(__file__).resolve().parent / "infer.py"
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


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------


class Clock:
    """Where the run's time goes: its phases, and training timed in windows that end where the loop reads the
    losses back anyway (one host-device sync), so the device is never waited on just to time it."""

    def __init__(self):
        self.phases, self.windows = collections.defaultdict(float), []  # windows: (first step, steps, seconds)
        self.started, self.peak_before_training, self.current = time.perf_counter(), 0, None

    @contextlib.contextmanager
    def phase(self, name):
        started, self.current = time.perf_counter(), name  # current: what a stop names (left where one raised)
        yield
        self.phases[name] += time.perf_counter() - started
        self.current = None

    def lap(self, accelerator, pending, step):
        """The window's losses (each step's mean over processes), read back in one sync, and its duration."""
        losses = accelerator.gather(torch.stack(pending)).view(accelerator.num_processes, -1).mean(0).tolist()
        seconds = time.perf_counter() - self.started
        self.windows.append((step - len(losses) + 1, len(losses), seconds))
        self.phases["training"] += seconds
        self.started = time.perf_counter()
        return losses


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
            validate = bool(args.validation_prompt) and (step % args.validation_steps == 0 or last)
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
                signum = validate_unless_stopped(accelerator, models, args, settings, step, clock, stop, saved=save,
                                                 trained=trained)
            if save or validate or signum:
                if accelerator.is_main_process:
                    write_model_card(settings.output_dir, args, settings, step, accelerator.num_processes)
                accelerator.wait_for_everyone()  # the others wait while the main process saves and validates
                clock.started = time.perf_counter()
            if signum:
                progress.close()
                raise Interrupted(f"stopped at step {step} of {args.max_train_steps}; resume with:\n  "
                                  f"{resume_command(settings.command)}", signum)
            if last:
                break
    progress.close()


def validate_unless_stopped(accelerator, models, args, settings, step, clock, stop, *, saved, trained):
    """Validation images, which take minutes at full size: one process alone stops them at once for a stop, drops
    the step's unfinished images, and saves the step if it was not saved already. Returns the signal that stopped
    them, 0 if none. Several processes finish them (the others wait for the main one at a barrier)."""
    alone = accelerator.num_processes == 1
    try:
        with clock.phase("validation"), (stop.at_once_within(lambda: "") if alone else contextlib.nullcontext()):
            log_validation(accelerator, models, args, settings, step)
        return 0
    except Interrupted:
        folder = Path(settings.output_dir) / "validation" / f"step{step - 1}"
        if not (folder / "grid.png").is_file():  # written last: without it, the round is not complete
            shutil.rmtree(folder, ignore_errors=True)
        if not saved:
            with clock.phase("saving"):
                save_checkpoint(accelerator, trained, args, settings, step)
        return stop.signum


def method_settings(args):
    """The flags training_step uses, by name."""
    return dict(noise_offset=args.noise_offset, train_text_encoder=args.train_text_encoder,
                with_prior=args.with_prior_preservation, prior_loss_weight=args.prior_loss_weight,
                snr_gamma=args.snr_gamma, prior_target=args.prior_target, mask_floor=args.mask_floor)


def refuse_non_finite(losses, step, output_dir, learning_rate):
    """Stop at the first nan or inf loss, naming its step exactly (the window's losses end at `step`)."""
    for offset, value in enumerate(losses):
        if not math.isfinite(value):
            raise UserError(f"the loss became {value} at step {step - len(losses) + 1 + offset}, so training "
                            f"stopped and nothing since was saved; {last_good_adapters(output_dir)}. Likely "
                            "fp16 overflow: use --mixed_precision bf16, or a lower --learning_rate (now "
                            f"{learning_rate})")


def last_good_adapters(output_dir):
    finished = finished_adapters(output_dir)
    return f"the last good adapters are in {finished[-1]}" if finished else "no adapters were saved yet"


def save_checkpoint(accelerator, trained, args, settings, step):
    """Adapters (main process) and resumable state (all processes) of this step. Non-finite weights are never
    written, and a failed write (a full disk, say) leaves every earlier checkpoint as it was."""
    output_dir = settings.output_dir
    unwrapped = [unwrap(accelerator, m) for m in trained]
    if not all(torch.isfinite(p).all() for m in unwrapped for p in m.parameters() if p.requires_grad):
        raise UserError(f"the LoRA weights hold nan or inf at step {step}, so they were not saved; "
                        f"{last_good_adapters(output_dir)}. Likely fp16 overflow: use --mixed_precision bf16, "
                        "or a lower --learning_rate")
    if accelerator.num_processes > 1:  # DDP keeps replicas equal; prove it before writing one of them
        checksum = torch.stack([p.detach().double().sum() for m in unwrapped for p in m.parameters()
                                if p.requires_grad]).sum().reshape(1).to(accelerator.device)
        checksums = accelerator.gather(checksum)
        if not torch.all(checksums == checksums[0]):
            raise RuntimeError(f"the processes hold different adapters at step {step}: {checksums.tolist()}")
        accelerator.print(f"adapters identical on all {accelerator.num_processes} processes "
                          f"(checksum {checksums[0].item():.6f})")
    record = run_settings(args, settings, step, accelerator.num_processes)
    try:
        if accelerator.is_main_process:
            step_dir = save_adapters(Path(output_dir) / f"step{step - 1}", unwrapped, record,
                                     kohya=settings.output_kohya_format)
            tqdm.write(f"saved adapters to {step_dir}")
        save_resumable_state(accelerator, output_dir, step, record)
    except Exception as e:  # OSError, and safetensors' own error for a full disk
        if accelerator.is_main_process:
            remove_partial_dirs(output_dir)  # frees the space a full disk needs back
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise UserError(f"could not save step {step} in {output_dir}: {reason}; earlier checkpoints "
                        "are intact. Free some space (or fix the folder), then resume with "
                        "--resume_from_checkpoint latest") from None
    if accelerator.is_main_process and args.checkpoints_total_limit:
        prune_states(output_dir, args.checkpoints_total_limit)


def report(accelerator, clock, start_step):
    """The closing line: steady-state time per step (warm-up, saving and validation left out), peak memory, and
    where the run's time went. FLOPs and MFU are measured by benchmarks/, off the training path."""
    steady = [(n, s) for first, n, s in clock.windows if first > start_step + WARMUP_STEPS] or \
        [(n, s) for _, n, s in clock.windows]
    ms_per_step = 1000 * sum(s for _, s in steady) / sum(n for n, _ in steady)
    if torch.cuda.is_available():
        peak_gib = torch.cuda.max_memory_allocated() / 2**30
        run_gib = max(peak_gib, clock.peak_before_training / 2**30)
        memory = f"peak GPU memory {peak_gib:.2f} GiB in training ({run_gib:.2f} GiB in the whole run)"
    else:
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        memory = f"peak RSS {peak_gib:.2f} GiB"
    accelerator.print(f"steady-state {ms_per_step:.1f} ms/step over {sum(n for n, _ in steady)} steps; {memory}\n"
                      "time: " + ", ".join(f"{name} {sec:.1f} s" for name, sec in clock.phases.items()))
    accelerator.log({"ms_per_step": ms_per_step, "peak_memory_gib": peak_gib,
                     **{f"seconds/{name}": sec for name, sec in clock.phases.items()}})
    return ms_per_step


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
    if accelerator.device.type == "cpu" and accelerator.mixed_precision == "fp16":  # CPU autocast would mix dtypes
        raise UserError(FP16_ON_CPU)
    accelerator.print(f"{accelerator.state}".strip())
    if accelerator.device.type == "cpu" and accelerator.mixed_precision == "no":
        accelerator.print("note: on a CPU that supports bf16, --mixed_precision bf16 trains about 1.7x faster in "
                          "under 60% of fp32's memory (full-size SSD-1B at 128 px, benchmarks/RESULTS.md: 3.4 vs "
                          "6.0 GiB at peak)")
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
                          "(kept for the next run)")
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
    if args.cache_latents == "on" or (args.cache_latents == "auto"
                                      and latent_cache_is_exact(targets, args.center_crop)):
        models.latent_cache = encode_latent_cache(models.vae, targets, args.center_crop, args.random_flip, args.seed,
                                                  accelerator.device, disable_progress=not accelerator.is_main_process,
                                                  masked=args.masked_loss)
        models.vae.encoder = models.vae.quant_conv = None
        release_memory()
    accelerator.print(f"cached: {counted(len(models.latent_cache or {}), 'latent')} ({args.cache_latents}), "
                      f"{counted(len(models.prompt_cache or {}), 'prompt embedding')}")


def prompts_to_cache(instance_prompts, args, empty_prompt_is_zeros):
    """Every prompt the run embeds after its frozen encoders have gone: the instance prompts, the class prompt,
    the validation prompt, and "" only where it is read: a dropped caption (--caption_dropout), or validation's
    negative prompt where the pipeline does not make it zeros (SSD-1B's does: force_zeros_for_empty_prompt)."""
    prompts = {*instance_prompts, args.class_prompt, args.validation_prompt}
    if args.caption_dropout or (args.validation_prompt and not empty_prompt_is_zeros):
        prompts.add("")
    return sorted(prompts - {None})


def release_memory():
    """Give back what was let go: Python's cycles first, then the GPU's cached blocks."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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


def start_checkpointing(accelerator, resume_state, gradient_accumulation_steps, dataloader):
    """Save and load LoRA-only state; when resuming, restore it and skip the data already seen.
    Returns the step to start from and the dataloader to continue with."""
    accelerator.register_save_state_pre_hook(functools.partial(save_lora_hook, accelerator))
    accelerator.register_load_state_pre_hook(functools.partial(load_lora_hook, accelerator))
    if not resume_state:
        return 0, dataloader
    try:  # accelerate reads state with torch.load(weights_only=True): tensors and plain values, never code
        accelerator.load_state(str(resume_state))
    except pickle.UnpicklingError as e:
        raise UserError(f"{resume_state} holds more than tensors and plain values, so it was not loaded "
                        f"({str(e).splitlines()[0][:120]}); it was not written by this trainer: delete it, or "
                        "resume from another state") from None
    start_step = read_trainer_state(resume_state)["step"]
    accelerator.print(f"resumed from {resume_state} at step {start_step}")
    # sample k is a pure function of (seed, k), so skipping the batches already seen restores the data position
    return start_step, accelerator.skip_first_batches(dataloader, start_step * gradient_accumulation_steps)


def main(argv=None):
    """The run, with SIGINT and SIGTERM answered the same way from its first line to its last (GracefulStop)."""
    argv = sys.argv[1:] if argv is None else list(argv)
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
        stop.at_once(lambda: stopped_before_training(args, settings, clock))
        instance_images, instance_prompts, settings = check_inputs(args, settings)  # all before any model loads
        accelerator = make_accelerator(args, settings)  # processes, mixed precision, accumulation, trackers
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 matmuls on tensor cores

        load_unet_now = functools.partial(load_unet, settings.pretrained_model_name_or_path, args.revision,
                                          args.variant, weight_dtype, accelerator.device)
        with clock.phase("load"):  # all but the UNet: it comes after the caches, once the text encoders have gone
            models = load_models(settings.pretrained_model_name_or_path, settings.pretrained_vae_model_name_or_path,
                                 args.revision, args.variant, weight_dtype, accelerator.device, with_unet=False)
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
                           use_dora=args.use_dora)
        if args.gradient_checkpointing:
            models.unet.enable_gradient_checkpointing()
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
        effective = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        processes = counted(accelerator.num_processes, "process", "processes")
        accelerator.print(f"{counted(len(instance_images), 'instance photo')}, "
                          f"{counted(len(class_images or []), 'class image')}; "
                          f"{counted(args.max_train_steps, 'step')}, "
                          f"effective batch {effective} = {args.train_batch_size} per device x {processes} x "
                          f"{args.gradient_accumulation_steps} accumulation")
        if torch.cuda.is_available():  # training's own peak, apart from loading's and the caches'
            clock.peak_before_training = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        train(accelerator, models, trained, optimizer, lr_scheduler, dataloader, args=args, settings=settings,
              start_step=start_step, clock=clock, stop=stop)
        stop.at_once(lambda: stopped_after_training(args, settings))
        report(accelerator, clock, start_step)
        accelerator.end_training()
        finish(accelerator, args, settings)


STOPPED_IN = {"load": "loading the models", "class images": "making class images",
              "caches": "caching latents and prompt embeddings"}  # Clock's phases before training, in words


def stopped_before_training(args, settings, clock):
    """What a stop before the first step says: where it came, what is kept, and the command that goes on."""
    where = STOPPED_IN.get(clock.current, "preparing to train")
    kept = ""
    if clock.current == "class images":
        made = len(list_images(settings.class_dir)) if Path(settings.class_dir).is_dir() else 0
        kept = (f"; {made} of {args.num_class_images} class images are made, in {settings.class_dir}: the next run "
                "makes only the rest" if made else "; no class image was made yet")
    if settings.resume_state:
        return (f"while {where}, before training resumed from {Path(settings.resume_state).name}{kept}; resume "
                f"with:\n  {resume_command(settings.command)}")
    return (f"while {where}, before training started: nothing to resume{kept}; start again with:\n  "
            f"{resume_command(settings.command, resume=False)}")


def stopped_after_training(args, settings):
    """What a stop after the last step was saved says: the run is complete, all but what finish() does."""
    step_dir = Path(settings.output_dir).resolve() / f"step{args.max_train_steps - 1}"
    if not args.push_to_hub:
        return f"after training ended: the adapters in {step_dir} are complete"
    # push_to_hub gathers what it uploads in output_dir/hub first; a stop before that is done leaves an older one
    repo_id, upload = args.hub_model_id or Path(settings.output_dir).name, step_dir
    with contextlib.suppress(OSError):
        if filecmp.cmp(step_dir.parent / "hub" / LORA_FILE, step_dir / LORA_FILE, shallow=False):
            upload = step_dir.parent / "hub"  # the adapters with their model card, as the push meant them
    return (f"after training ended: the adapters in {step_dir} are complete, but were not pushed to the Hub; push "
            f"them with: hf upload {repo_id} {upload} .")


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


if __name__ == "__main__":
    parent_command_line()  # while the launcher is alive, for the resume command
    try:
        main()
    except UserError as error:
        sys.exit(f"error: {error}")
    except Interrupted as stopped:
        for signum in (signal.SIGINT, signal.SIGTERM):  # answered: a launcher's echo must not cut the exit short
            signal.signal(signum, signal.SIG_IGN)       # (Python's own exit resets handlers, not an ignored one)
        for bar in list(getattr(tqdm, "_instances", [])):  # the stopped phase's bar ends above the message
            bar.close()
        if os.environ.get("LOCAL_RANK", "0") == "0":  # all processes stop at the same step: say it once a machine
            print(stopped, file=sys.stderr)
        sys.exit(stopped.exit_code)
