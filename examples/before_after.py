"""Before and after: the subject's photos, then each prompt rendered by the base model and by the trained adapters.

    python examples/before_after.py --checkpoint RUN/stepN --output before_after.png \
        [--model examples/tiny_world_model] [--photos examples/tiny_world_subject] [--prompt ...] [--seeds 0 1 2 3]

Rows: the photos; then, per prompt, the base model's renders and the trained model's, same seeds. Prints each
row's distance to the subject (examples/tiny_world.py's subject_distance: object colours, 0 = the subject's).
Renders on one thread unless OMP_NUM_THREADS says otherwise: the tiny model is fastest so.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples"), str(ROOT / "benchmarks")]
import prior_drift as world  # noqa: E402
import tiny_world  # noqa: E402
from dreambooth_kit import artifacts, imaging

LABEL = 260  # pixels left of each row for its label


def row(label, images, size=64, scale=2):
    strip = Image.new("RGB", (LABEL + len(images) * size * scale, size * scale), "white")
    ImageDraw.Draw(strip).text((4, size * scale // 2 - 6), label, fill="black")
    for i, image in enumerate(images):
        strip.paste(image.resize((size * scale, size * scale), Image.NEAREST), (LABEL + i * size * scale, 0))
    return strip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, type=Path, help="a step dir of a run on the tiny world")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--model", default=str(world.WORLD_MODEL))
    p.add_argument("--photos", default=str(world.WORLD_SUBJECT), type=Path)
    p.add_argument("--prompt", nargs="+", default=[world.INSTANCE_PROMPT, "a photo of sks star on a night background",
                                                  world.CLASS_PROMPT])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    p.add_argument("--inference_steps", type=int, default=world.INFERENCE_STEPS)
    args = p.parse_args(argv)
    tiny_world.one_thread_unless_set()
    photos = [Image.open(path).convert("RGB") for path in imaging.list_images(args.photos)]
    profile = tiny_world.subject_profile(photos)
    pipe = world.world_pipeline(args.model)
    rows = [row("the subject's photos", photos)]
    for prompt in args.prompt:
        for label, step_dir in (("base", None), ("trained", args.checkpoint)):
            images = world.renders(pipe, step_dir, prompt, args.seeds, args.inference_steps)
            distance = tiny_world.subject_distance(images, profile)
            print(f"{label:8s} {prompt!r}: distance to the subject {distance:.2f}")
            rows.append(row(f"{label}: {distance:.2f}\n{prompt}", images))
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height + 4 for r in rows)), "white")
    for i, strip in enumerate(rows):
        sheet.paste(strip, (0, i * (strip.height + 4)))
    artifacts.save_png_atomic(sheet, args.output)
    print(args.output)


if __name__ == "__main__":
    main()
