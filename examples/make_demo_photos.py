"""Draw the five small "subject photos" in examples/dog/ for the offline demo.

A cartoon brown dog on plain coloured backgrounds, at different sizes, aspect
ratios and positions: enough to exercise a DreamBooth data pipeline (resizing,
cropping, portrait images) without shipping real photographs. PIL only, no
randomness, so rerunning the script rewrites the same pictures.

    python examples/make_demo_photos.py [OUT_DIR]   # default: examples/dog
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

BROWN = (139, 90, 43)
DARK_BROWN = (92, 58, 28)
BLACK = (20, 20, 20)

# (width, height, background, where the dog stands as a fraction of the width, dog size, facing right?)
PHOTOS = [
    (128, 128, (170, 210, 240), 0.50, 1.00, True),  # square, sky blue
    (160, 120, (150, 200, 120), 0.35, 0.90, True),  # landscape, grass green
    (112, 160, (240, 225, 190), 0.50, 0.80, False),  # portrait, sand
    (128, 96, (200, 200, 205), 0.60, 0.85, False),  # wide, grey
    (96, 96, (235, 180, 170), 0.45, 0.95, True),  # small, pink
]


def draw_dog(draw: ImageDraw.ImageDraw, cx: float, ground: float, scale: float, facing_right: bool) -> None:
    """Body ellipse, legs, tail, head circle, a floppy ear, eye and nose, standing on `ground`."""
    side = 1 if facing_right else -1

    def point(x: float, y: float) -> tuple[float, float]:
        # Coordinates are given for a right-facing dog in a 96 px scene; mirror for a left-facing one.
        return cx + side * x * scale, ground + y * scale

    def box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
        (a, top), (b, bottom) = point(x0, y0), point(x1, y1)
        return [min(a, b), top, max(a, b), bottom]

    for leg_x in (-22, -12, 10, 20):
        draw.rectangle(box(leg_x, -18, leg_x + 6, 0), fill=DARK_BROWN)
    draw.line([point(-28, -34), point(-40, -48)], fill=DARK_BROWN, width=max(2, int(4 * scale)))  # tail
    draw.ellipse(box(-32, -42, 30, -14), fill=BROWN)  # body
    draw.ellipse(box(14, -66, 44, -36), fill=BROWN)  # head
    draw.ellipse(box(12, -64, 22, -40), fill=DARK_BROWN)  # ear
    draw.ellipse(box(32, -58, 37, -53), fill=BLACK)  # eye
    draw.ellipse(box(40, -50, 46, -44), fill=BLACK)  # nose


def make_photo(width: int, height: int, background: tuple[int, int, int], x: float, size: float, right: bool) -> Image.Image:
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    ground = height * 0.8
    # A darker floor band gives the crops something besides the dog to differ in.
    draw.rectangle([0, ground, width, height], fill=tuple(int(c * 0.8) for c in background))
    scale = size * min(width, height) / 96
    draw_dog(draw, cx=x * width, ground=ground + 4 * scale, scale=scale, facing_right=right)
    return image


def make_demo_photos(out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (width, height, background, x, size, right) in enumerate(PHOTOS):
        path = out_dir / f"dog_{i}.jpg"
        make_photo(width, height, background, x, size, right).save(path, quality=85)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parent / "dog"
    parser.add_argument("out_dir", nargs="?", type=Path, default=default, help="default: examples/dog")
    args = parser.parse_args(argv)
    for path in make_demo_photos(args.out_dir):
        print(path)


if __name__ == "__main__":
    main()
