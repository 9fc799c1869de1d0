#!/usr/bin/env python
"""Render images with adapters saved by train_dreambooth_lora_ssd1b.py.

    python infer.py --checkpoint work_dirs/ssd_1b_dreambooth_lora_dog/step499 --prompt "a photo of sks dog in a bucket"

The base model, VAE and resolution default to what the checkpoint's run_settings.json recorded. Image i uses
seed --seed + i through a CPU generator, so `--seed S` gives exactly the picture of a plain diffusers call with
`generator=torch.Generator("cpu").manual_seed(S)` and the adapters applied, on any machine. Each PNG carries its
settings in a `parameters` text chunk (the A1111 convention).

The rendering itself (resolve: the flags with the checkpoint's settings filling the rest, frozen in a Render;
load_pipeline; render_images) is dreambooth_kit.render's, which evaluate.py renders through too; both scripts
declare their rendering flags with dreambooth_kit.checks.add_render_flags.
"""

import os
import sys
from pathlib import Path

from dreambooth_kit.checks import (INF, ArgumentParser, add_render_flags, answer_before_libraries, check_render_numbers,
                                   check_versions, refuse_empty)
from dreambooth_kit.messages import UserError, quiet_library_notices


def parser():
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a step dir, e.g. work_dirs/<run>/step499")
    p.add_argument("--prompt", default=None, help="default: the run's instance prompt")
    p.add_argument("--num_images", type=int, default=1, help="how many images, one per seed", range=(1, INF, "[)", 1))
    p.add_argument("--output", default="outputs", help="a folder for the PNGs")
    add_render_flags(p)
    return p


# Text flags where an empty value is a mistake (an empty path is the current folder) -> what to pass instead
EMPTY_FIXES = {"checkpoint": "a step dir, e.g. work_dirs/<run>/step499",
               "prompt": "a prompt, or leave --prompt out to use the run's instance prompt",
               "output": "a folder for the PNGs, or leave it out for outputs/"}


def parse_args(argv=None):
    args = parser().parse_args(argv)
    refuse_empty(args, EMPTY_FIXES)
    check_render_numbers(args, "num_images")
    return args


# ----------------------------------------------------------------------------------------------------------
# The libraries: imported below the flags, so that a script run answers --help and a mistyped flag at once, not
# after the seconds torch, diffusers and transformers take to import
# ----------------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    answer_before_libraries(parse_args)

from dreambooth_kit.rendering import (check_adapters_fit, load_pipeline, read_settings, render_images,  # noqa: E402
                                      resolve)


def check_output_folder(output):
    """--output can be made and written: nothing on its path is a file, and the nearest existing folder on it
    takes new files. Made only when the first image is ready."""
    existing = next(p for p in [Path(output), *Path(output).parents] if p.exists())  # "." always exists
    if not existing.is_dir():
        what = "is a file" if existing == Path(output) else f"is under {existing}, which is a file"
        raise UserError(f"--output {output} {what}, not a folder: pass a folder for the PNGs")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--output {output}: {existing} is not writable: pass a folder you can write to")


def main(argv=None):
    quiet_library_notices()
    args = parse_args(argv)
    check_versions(["torch", "diffusers", "transformers", "peft"])  # as a script run does first, for callers too
    check_output_folder(args.output)
    settings = read_settings(args.checkpoint)
    render = resolve(args, settings, args.prompt, args.num_images)
    check_adapters_fit(render.checkpoint, settings, render.model, render.revision)
    pipe = load_pipeline(render)
    paths = []
    for path, _ in render_images(pipe, render, args.output, Path(args.checkpoint).resolve().name):
        paths.append(path)
        print(path)
    return paths


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        sys.exit(f"error: {error}")
