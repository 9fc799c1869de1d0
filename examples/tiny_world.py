"""A tiny procedural world to pre-train the tiny SSD-1B-shaped model on, a subject in it, and a similarity measure.

The world: 64x64 photos of one object each, a circle, square, triangle or star, in one of ten named colours
(jittered, so no two reds are the same) or, one time in four, in any colour, which the caption does not name; plain, striped or dotted, of any size and position, on one of five
backgrounds, captioned as "a photo of a red striped star on a grey background". Training drops parts of the
caption at random, so "a photo of a star" renders some star.

The subject: a star no caption describes, split across its middle, yellow above and teal below, photographed five
times at different sizes, positions, angles and backgrounds. Its class is "star"; DreamBooth calls it "sks star".
Its marks are as large as the model can draw: the VAE turns each 8x8 pixels into one latent, and finer marks (an
earlier subject's 2-pixel outline and small centre dot) blurred into one colour in every reconstruction.

The similarity is the colours of the object, not of the background, and is computed here from pixels alone,
independently of any model or of the trainer:
- the background is the median colour of the photo's 2-pixel border;
- the object is every pixel that differs from it by more than 40 (of 255) in some channel;
- its core is the object less a 2-pixel rim (or the whole object, if nothing is left): at the rim the object's
  colour blends with the background's, in photos as in renders, and these pixels would count as other colours;
- its profile is the histogram of the core's colours in 4x4x4 bins, as fractions;
- the distance of an image to the subject is the total-variation distance (0: same colours, 1: none shared) from
  its profile to the mean profile of the subject's photos. An image with no object is at distance 1.

    python examples/tiny_world.py OUT_DIR [--count 16]   # a sample of the world with captions, and the subject
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 64
SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {"red": (210, 40, 40), "orange": (240, 140, 30), "yellow": (235, 215, 40), "green": (50, 160, 60),
           "blue": (40, 80, 210), "purple": (130, 60, 190), "pink": (240, 130, 190), "white": (240, 240, 240),
           "black": (25, 25, 25), "brown": (125, 80, 40)}
PATTERNS = ("plain", "striped", "dotted")
BACKGROUNDS = {"grey": (128, 128, 128), "sand": (215, 195, 150), "sky": (150, 200, 240), "grass": (110, 150, 80),
               "night": (30, 35, 70)}
JITTER = 25  # each colour channel moves by up to this much, per photo
UNNAMED = 0.25  # chance that an object has any colour at all, one no caption names (so the VAE can draw any colour)
DROP = 0.35  # chance that a caption leaves out the colour, the pattern or the background, each on its own

SUBJECT_CLASS = "star"
SUBJECT_TOP, SUBJECT_BOTTOM = (245, 215, 30), (0, 175, 165)  # yellow above, teal below
# (background, centre x, centre y, radius, turn in degrees) of each of the subject's photos
SUBJECT_SHOTS = (("grey", 32, 32, 22, 0), ("sand", 26, 36, 18, 12), ("sky", 38, 28, 20, -10),
                 ("grass", 30, 30, 24, 25), ("night", 36, 36, 17, -20))
RIM = 2  # pixels of the object's edge left out of its profile
SCALE = 4  # shapes are drawn at 4x and shrunk, for smooth edges


def world_vocabulary():
    """Every word a caption or the examples' prompts use, so the tokenizers can give each one token."""
    return ("a", "an", "photo", "of", "on", "background", "sks", "in", "bucket", *SHAPES, *COLOURS, *PATTERNS,
            *BACKGROUNDS)


def jitter(colour, rng):
    return tuple(int(np.clip(c + rng.randint(-JITTER, JITTER), 0, 255)) for c in colour)


def polygon(shape, cx, cy, radius, turn):
    """The outline of a square, triangle or star as points, turned by `turn` degrees."""
    if shape == "star":
        corners = [(radius if i % 2 == 0 else 0.45 * radius, 90 + 36 * i) for i in range(10)]
    elif shape == "triangle":
        corners = [(radius, 90 + 120 * i) for i in range(3)]
    else:
        corners = [(radius, 45 + 90 * i) for i in range(4)]
    return [(cx + r * np.cos(np.radians(a + turn)), cy - r * np.sin(np.radians(a + turn))) for r, a in corners]


def draw_shape(draw, shape, cx, cy, radius, turn, fill, outline=None, width=0):
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill, outline=outline, width=width)
    else:
        draw.polygon(polygon(shape, cx, cy, radius, turn), fill=fill, outline=outline, width=width)


def background(colour, rng):
    """A jittered colour with a gentle vertical gradient and a little grain, at the drawing scale."""
    base = np.array(jitter(colour, rng), dtype=np.float64)
    side = SIZE * SCALE
    ramp = np.linspace(-1, 1, side)[:, None, None] * rng.uniform(-12, 12)
    grain = np.random.default_rng(rng.getrandbits(32)).normal(0, 3, (side, side, 3))
    return Image.fromarray(np.clip(base + ramp + grain, 0, 255).astype(np.uint8))


def pattern_mask(pattern, cx, cy, radius, rng):
    """White stripes or dots over the object's area, as a mask at the drawing scale (None for plain)."""
    if pattern == "plain":
        return None
    side = SIZE * SCALE
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    step = radius * SCALE * 0.5
    if pattern == "striped":
        for x in np.arange(cx * SCALE - 2 * radius * SCALE, cx * SCALE + 2 * radius * SCALE, step):
            draw.rectangle([x, 0, x + step / 2, side], fill=255)
    else:
        dot = step * 0.3
        for x in np.arange(cx * SCALE - radius * SCALE, cx * SCALE + radius * SCALE, step):
            for y in np.arange(cy * SCALE - radius * SCALE, cy * SCALE + radius * SCALE, step):
                draw.ellipse([x - dot, y - dot, x + dot, y + dot], fill=255)
    return mask


def render(shape, fill, pattern, backdrop, cx, cy, radius, turn, rng):
    """One photo of the world as a 64x64 RGB image, the object filled with the RGB colour `fill`, on the background
    named `backdrop` or of the RGB colour `backdrop`."""
    image = background(BACKGROUNDS.get(backdrop, backdrop), rng)
    shape_mask = Image.new("L", image.size, 0)
    draw_shape(ImageDraw.Draw(shape_mask), shape, cx * SCALE, cy * SCALE, radius * SCALE, turn, fill=255)
    image.paste(Image.new("RGB", image.size, fill), mask=shape_mask)
    marks = pattern_mask(pattern, cx, cy, radius, rng)
    if marks is not None:
        mark_colour = (25, 25, 25) if min(fill) > 200 else (245, 245, 245)
        marks = Image.fromarray(np.minimum(np.asarray(marks), np.asarray(shape_mask)))
        image.paste(Image.new("RGB", image.size, mark_colour), mask=marks)
    return image.resize((SIZE, SIZE), Image.LANCZOS)


def caption(shape, colour, pattern, backdrop, rng=None):
    """The photo's caption; with rng, the colour, pattern and background are each left out with chance DROP."""
    keep = (lambda: rng is None or rng.random() >= DROP)
    words = [colour if colour and keep() else None, pattern if pattern != "plain" and keep() else None, shape]
    words = [w for w in words if w]
    article = "an" if words[0][0] in "aeiou" else "a"
    text = f"a photo of {article} {' '.join(words)}"
    return f"{text} on a {backdrop} background" if keep() else text


def sample(rng):
    """(image, full caption, attributes) of one random photo of the world; an unnamed colour's attribute is None."""
    shape, colour = rng.choice(SHAPES), rng.choice(sorted(COLOURS))
    fill = jitter(COLOURS[colour], rng)
    if rng.random() < UNNAMED:
        colour, fill = None, tuple(rng.randrange(256) for _ in range(3))
    pattern, backdrop = rng.choice(PATTERNS), rng.choice(sorted(BACKGROUNDS))
    radius = rng.uniform(10, 24)
    cx, cy = (rng.uniform(radius + 2, SIZE - radius - 2) for _ in range(2))
    image = render(shape, fill, pattern, backdrop, cx, cy, radius, rng.uniform(-30, 30), rng)
    return image, caption(shape, colour, pattern, backdrop), (shape, colour, pattern, backdrop)


def any_colour_photo(rng):
    """A photo of the world's shapes and patterns with the object and the background each in any RGB colour, for
    the VAE only (no caption describes it): so that it draws every colour back true, not the nearest of the
    world's, which is what it learns from the world's photos alone (teal came back blue-grey)."""
    shape, pattern, radius = rng.choice(SHAPES), rng.choice(PATTERNS), rng.uniform(10, 24)
    fill, backdrop = (tuple(rng.randrange(256) for _ in range(3)) for _ in range(2))
    cx, cy = (rng.uniform(radius + 2, SIZE - radius - 2) for _ in range(2))
    return render(shape, fill, pattern, backdrop, cx, cy, radius, rng.uniform(-30, 30), rng)


def subject_photo(backdrop, cx, cy, radius, turn, seed=0):
    """One photo of the subject: a star, yellow above the line across its middle (turned with it), teal below."""
    rng = random.Random(f"subject {seed} {backdrop}")
    image = background(BACKGROUNDS[backdrop], rng)
    star = Image.new("L", image.size, 0)
    draw_shape(ImageDraw.Draw(star), "star", cx * SCALE, cy * SCALE, radius * SCALE, turn, fill=255)
    top = Image.new("L", image.size, 0)  # the half-plane above the line through the centre, turned by `turn`
    far = 4 * SIZE * SCALE
    ImageDraw.Draw(top).polygon([(cx * SCALE + far * np.cos(np.radians(a + turn)),
                                  cy * SCALE - far * np.sin(np.radians(a + turn))) for a in (0, 90, 180)], fill=255)
    image.paste(Image.new("RGB", image.size, SUBJECT_BOTTOM), mask=star)
    image.paste(Image.new("RGB", image.size, SUBJECT_TOP), mask=Image.fromarray(np.minimum(np.asarray(star),
                                                                                             np.asarray(top))))
    return image.resize((SIZE, SIZE), Image.LANCZOS)


def subject_photos():
    return [subject_photo(*shot) for shot in SUBJECT_SHOTS]


def object_mask(image):
    """Which pixels are the object's: those that differ from the background (the median colour of the image's
    2-pixel border) by more than 40 of 255 in some channel, as a boolean array."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    return np.abs(pixels - np.median(border, axis=0)).max(axis=-1) > 40


def object_profile(image):
    """The colours of an image's object: a 64-bin histogram (4 levels a channel) of its core's pixels (the object
    less a RIM-pixel rim, or all of it if nothing is left), as fractions; None if the image has no object."""
    mask = object_mask(image)
    if not mask.any():
        return None
    core = np.asarray(Image.fromarray(mask).convert("L").filter(ImageFilter.MinFilter(2 * RIM + 1))) > 0
    object_pixels = np.asarray(image.convert("RGB"), dtype=np.int16)[core if core.any() else mask]
    bins = object_pixels // 64
    counts = np.bincount(bins[:, 0] * 16 + bins[:, 1] * 4 + bins[:, 2], minlength=64)
    return counts / counts.sum()


def subject_profile(photos=None):
    """The mean object profile of the subject's photos (default: the ones made here)."""
    return np.mean([object_profile(photo) for photo in (photos or subject_photos())], axis=0)


def subject_distance(images, profile=None):
    """Mean total-variation distance of the images' object profiles from the subject's: 0 is the subject's
    colours exactly, 1 shares none (an image with no object counts as 1)."""
    profile = subject_profile() if profile is None else profile
    distances = [1.0 if p is None else 0.5 * float(np.abs(p - profile).sum())
                 for p in (object_profile(image) for image in images)]
    return float(np.mean(distances))


def one_thread_unless_set():
    """Run torch on one thread unless the user set OMP_NUM_THREADS. Models this small gain nothing from a second
    thread, and on a busy machine OpenMP's extra threads spin while they wait for a core: the offline demo ran many
    times slower on a shared 2-core machine with torch's default threads than with one (benchmarks/RESULTS.md)."""
    if "OMP_NUM_THREADS" not in os.environ:
        import torch  # here, not at the top: the world itself is drawn without torch

        torch.set_num_threads(1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    for i in range(args.count):
        image, text, _ = sample(rng)
        image.save(args.out_dir / f"world_{i:03d}.png")
        print(f"world_{i:03d}.png  {text}  (distance to the subject {subject_distance([image]):.2f})")
    for i, photo in enumerate(subject_photos()):
        photo.save(args.out_dir / f"subject_{i}.png")
        print(f"subject_{i}.png  (distance to the subject {subject_distance([photo]):.2f})")


if __name__ == "__main__":
    main()
