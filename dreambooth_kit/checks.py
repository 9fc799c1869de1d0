"""Checks of the flags and of the installed packages, made before any model loads; one range mechanism for every
numeric flag."""

import argparse
import importlib.util
import math
import re
import sys
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version

from packaging.version import Version

from .artifacts import LORA_FILE
from .imaging import caption_suffix, parse_buckets
from .messages import UserError, quiet_library_notices, warn

SECRET_FLAGS = {"hub_token"}  # never written to run_settings.json, a tracker or a printed command


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


def answer_before_libraries(parse_args):
    """A script run's first answers, in the seconds before its libraries have imported: --help, a mistyped flag
    and an install known to fail inside an import are answered in one line. Then the libraries' notices are
    filtered, as they import."""
    try:
        parse_args()
        check_versions([name for name in MINIMUM_VERSIONS if name not in OPTIMIZER_PACKAGES
                        and name not in CURVE_PACKAGES])
    except UserError as error:
        sys.exit(f"error: {error}")
    quiet_library_notices()


INF = math.inf


# Every numeric flag declares its valid values beside it, as add_argument(..., range=(low, high, ends, example)):
# which ends are included, and an example that a refusal offers. ArgumentParser checks them as it parses, before
# any model loads; floats must also be finite, and None (a flag left unset) is always allowed. Each flag's --help
# states its range, and a numeric flag declared without one is refused when the parser is built.
IMAGE_SIDE = (8, 4096, "[]", 1024)  # SDXL-family models are trained at 1024; past 4096 a render needs tens of GB


def describe_range(low, high, ends):
    """A range as --help and refusals say it: 'at least 1', 'above 0', 'in [0, 1)', 'a finite number'."""
    if low == -INF and high == INF:
        return "a finite number"
    if high == INF:
        return f"at least {low}" if ends[0] == "[" else f"above {low}"
    return f"in {ends[0]}{low}, {high}{ends[1]}"


def range_refusal(name, value, valid):
    """The one-line refusal of --name's value outside valid (low, high, ends, example), or of nan or inf; None
    where the value is within it."""
    low, high, ends, example = valid
    finite = math.isfinite(value)
    above_low = low <= value if ends[0] == "[" else low < value
    below_high = value <= high if ends[1] == "]" else value < high
    if finite and above_low and below_high:
        return None
    described = describe_range(low, high, ends)
    must = described if finite or described == "a finite number" else f"finite and {described}"
    return f"--{name} must be {must} (got {value}), e.g. --{name} {example}"


def check_range(name, value, valid):
    """Refuse --name's value outside valid, in one line; None means unset."""
    refusal = None if value is None else range_refusal(name, value, valid)
    if refusal:
        raise UserError(refusal)


class RangedStore(argparse.Action):
    """argparse's store, with a numeric flag's valid values (range=) declared beside it and stated in its help."""

    def __init__(self, option_strings, dest, range=None, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        if self.type in (int, float) and range is None:  # a copy's new flag, say: unchecked, it fails deep in a run
            raise UserError(f"{option_strings[0]} is a number: declare its valid values, add_argument(..., "
                            "range=(low, high, ends, example))")
        self.range = range
        if range:  # before a "default: ..." the help ends with, which says what an unset value means
            said, _, default = (self.help or "").partition("default: ")
            parts = [said.removesuffix("; "), describe_range(*range[:3]), default and f"default: {default}"]
            self.help = "; ".join(part for part in parts if part)
        elif self.help is None and self.default not in (None, False):  # argparse would show no help line at all
            self.help = "default: %(default)s"

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)


SEED_MAX = 2**64 - 1  # the largest seed torch.Generator takes; it takes negative ones too, as aliases of large ones


def add_render_flags(p):
    """The rendering flags of infer.py and evaluate.py, declared once so that they mean the same in both. Out of
    range, each would fail only after the base model has loaded, or worse render noise with exit 0."""
    p.add_argument("--negative_prompt", default=None, help="what the images should not show; default: none")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i", range=(0, SEED_MAX, "[]", 0))
    p.add_argument("--num_inference_steps", type=int, default=50, help="denoising steps", range=(1, INF, "[)", 50))
    p.add_argument("--guidance_scale", type=float, default=5.0,
                   help="classifier-free guidance; 1 or below turns it off", range=(0, INF, "[)", 5.0))
    for side in ("height", "width"):  # a multiple of 8 too: check_render_numbers
        p.add_argument(f"--{side}", type=int, default=None, range=IMAGE_SIDE,
                       help="a multiple of 8; default: the size the run validated at (its photos' most common), "
                            "else 1024")
    p.add_argument("--lora_scale", type=float, default=1.0, help="the adapters' strength; 0 renders the base model",
                   range=(-INF, INF, "()", 1.0))
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="default: what the checkpoint recorded (segmind/SSD-1B if nothing)")
    p.add_argument("--pretrained_vae_model_name_or_path", default=None,
                   help="default: what the checkpoint recorded; 'none' means the model's own VAE")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None, help="default: fp16 on GPU, fp32 on CPU")


def check_render_numbers(args, count_flag):
    """The rules beyond the rendering flags' own ranges; count_flag names the flag that says how many seeds follow
    --seed."""
    for side in ("height", "width"):
        value = getattr(args, side)
        if value is not None and value % 8:
            raise UserError(f"--{side} must be a multiple of 8 (got {value}), e.g. --{side} {value + 8 - value % 8}")
    count = getattr(args, count_flag)
    if args.seed + count - 1 > SEED_MAX:
        raise UserError(f"--seed {args.seed} leaves no room for {count} images (image i uses seed + i, and seeds "
                        f"end at 2**64 - 1): pass --seed {SEED_MAX - count + 1} or less")


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
    Every numeric flag is checked against its range= as the flags parse. --help states the defaults."""

    def __init__(self, *args, formatter_class=DefaultsHelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)
        for name in (None, "store"):  # argument groups share the registry: their flags take range= too
            self.register("action", name, RangedStore)

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
        parsed = super().parse_args(joined, namespace)
        for action in self._actions:
            value = getattr(parsed, action.dest, None)
            if getattr(action, "range", None) and isinstance(value, (int, float)):  # not a flags_given sentinel
                check_range(action.dest, value, action.range)
        return parsed

    def within(self, name, value):
        """value is one that --name takes typed: a number of its type (an int flag takes no 64.0, and no flag
        takes true) within its range. For values read from a file, held to the flag's own range."""
        action = next(a for a in self._actions if a.dest == name)
        types = (int,) if action.type is int else (int, float)
        return type(value) in types and range_refusal(name, value, action.range) is None

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


class Flags(argparse.Namespace):
    """The flags as typed, once checked. Frozen: run_settings.json records what was asked, and what it came to
    lives apart, in Settings."""

    def __setattr__(self, name, value):
        raise AttributeError(f"the flags are frozen after their checks: derive --{name}'s value in Settings")


def check_args(args, given):
    """Every check of the flags on their own, in one place; raises UserError naming the fix. `given`: the flags
    typed, so one that would be ignored beside the others is refused rather than dropped."""
    check_numbers(args)
    refuse_empty(args, EMPTY_FIXES)
    if args.mixed_precision == "fp16" and not has_accelerator():  # the accelerate config's fp16: make_accelerator
        raise UserError(FP16_ON_CPU)
    check_base_flags(args)
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


def check_base_flags(args):
    """--fp8_base and --nf4_base: one at a time, and not with what cannot run over them."""
    if args.fp8_base and args.nf4_base:
        raise UserError("--fp8_base and --nf4_base both say how to hold the frozen base: pass one of them")
    flag = "--fp8_base" if args.fp8_base else "--nf4_base" if args.nf4_base else None
    if flag and args.compile:
        raise UserError(f"--compile cannot trace {flag}'s base (its layers cast or dequantise their weights in "
                        f"hooks at every call): drop --compile, or drop {flag}")
    if args.fp8_base and args.use_dora:
        raise UserError("--use_dora reads each base weight whole for its magnitudes, and under --fp8_base those are "
                        "float8, which torch's arithmetic refuses: drop --use_dora, or pass --nf4_base instead")


# Why --use_dora writes no kohya file: diffusers' SDXL loader (0.42) deletes a kohya file's dora_scale keys before
# converting it, with only a warning, so nothing here can check such a file against the trained model
DORA_IN_KOHYA_FILE = ("diffusers drops a kohya file's DoRA magnitudes (dora_scale) and loads it as plain LoRA, so "
                      "that file could not be checked against the trained model")


FP16_ON_CPU = ("mixed precision fp16 (from --mixed_precision or the accelerate config) needs a GPU; on this CPU pass "
               "--mixed_precision bf16 (faster where the CPU supports it) or no")


def has_accelerator():
    """A device that runs fp16 mixed precision: CUDA (or ROCm), Apple's MPS or Intel's XPU."""
    import torch  # here, not at the top: the flags are checked before the libraries import

    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


def check_numbers(args):
    """The rules beyond a numeric flag's own range, which ArgumentParser has checked: a multiple of 8, and the two
    flags that one bounds the other."""
    if args.resolution % 8:
        raise UserError(f"--resolution {args.resolution} must be a positive multiple of 8, e.g. 1024")
    if args.lr_warmup_steps > args.max_train_steps:
        raise UserError(f"--lr_warmup_steps {args.lr_warmup_steps} is more than --max_train_steps "
                        f"{args.max_train_steps}: the run would end still warming up; pass --lr_warmup_steps "
                        f"{args.max_train_steps} or less, or a larger --max_train_steps")


def uses_class_images(args):
    """Prior preservation the paper's way: over class images that the base model makes once."""
    return args.with_prior_preservation and args.prior_target == "class_images"


def warn_prodigy_learning_rate(optimizer, learning_rate, default_learning_rate):
    """Prodigy's learning rate multiplies the step size it finds, so it belongs near 1.0: an AdamW-sized one
    (1e-4) all but stops training. Warned where it is more than 10x from 1.0, not refused, and the flag stays as
    typed. Said here, not in check_args, which a script run calls twice."""
    if optimizer != "prodigy" or 0.1 <= learning_rate <= 10:
        return
    default = " (the default, sized for AdamW)" if learning_rate == default_learning_rate else ""
    warn(f"--learning_rate {learning_rate}{default} with --optimizer prodigy: Prodigy finds the step size itself "
         "and multiplies it by the learning rate, which is usually 1.0; pass --learning_rate 1.0")


def effective_learning_rates(args, num_processes):
    """(UNet, text encoders) learning rates as trained: with --scale_lr, times the effective batch size. Prodigy
    takes one learning rate for every group (prodigyopt refuses any other but 0), so its text encoders share the
    UNet's."""
    factor = args.train_batch_size * num_processes * args.gradient_accumulation_steps if args.scale_lr else 1
    text_encoder_lr = args.learning_rate if args.optimizer == "prodigy" else args.text_encoder_lr
    return args.learning_rate * factor, text_encoder_lr * factor


def check_precision(accelerator):
    """The device and precision accelerate chose, said once; fp16 on a CPU refused, fp32 there noted."""
    if accelerator.device.type == "cpu" and accelerator.mixed_precision == "fp16":  # CPU autocast would mix dtypes
        raise UserError(FP16_ON_CPU)
    accelerator.print(f"{accelerator.state}".strip())
    if accelerator.device.type == "cpu" and accelerator.mixed_precision == "no":
        accelerator.print("note: on a CPU that supports bf16, --mixed_precision bf16 trains about 1.7x faster in "
                          "under 60% of fp32's memory (full-size SSD-1B at 128 px, benchmarks/RESULTS.md: 3.4 vs "
                          "6.0 GiB at peak)")

