"""What the user reads: UserError, printed as one line, never as a traceback; notes and warnings; counts in words."""

import logging
import os
import sys


class UserError(Exception):
    """A mistake the user can fix: printed as one line, never as a traceback."""


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


def one_line(error):
    """An exception's message cut to one short line, for a UserError."""
    return (str(error).splitlines() or [""])[0][:200]


def ignore_notice(record):
    """Third-party notices about nothing the user did, each with why it is nothing."""
    message = record.getMessage()
    return not (
        # transformers falls back to its PIL image processors without torchvision, as this project means it to
        "requires torchvision" in message
        # diffusers says an adapter file holds no text-encoder LoRA, as one trained without --train_text_encoder
        or "No LoRA keys associated to" in message
        # bitsandbytes looks, on a CPU with AVX512-BF16, for a 4-bit kernel in the `kernels` package (and, under
        # HF_HUB_OFFLINE, says it skips the kernel's publisher check): no layer here is 4-bit
        or "kernels-community" in message)


NOTICE_LOGGERS = ["transformers.utils.import_utils", "diffusers.loaders.lora_base", "diffusers.loaders.peft",
                  "bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"]


def quiet_library_notices():
    """Filter the notices of ignore_notice from the loggers that print them, once per process: each would stand
    above every refusal. main() calls this first; importing the package filters nothing."""
    for name in NOTICE_LOGGERS:
        logger = logging.getLogger(name)
        if ignore_notice not in logger.filters:
            logger.addFilter(ignore_notice)
