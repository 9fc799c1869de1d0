"""The data stage: photo on disk -> RGB image -> random crop and flip -> tensor + SDXL time ids -> batch."""

import hashlib
import random
import re
import struct

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms, ImageOps

from dreambooth_kit import imaging
from dreambooth_kit.imaging import list_images, load_image
from train_dreambooth_lora_ssd1b import DreamBoothDataset, collate, crop_and_flip, derive_seed, pick, to_tensor

EXIF_ORIENTATION = 0x0112


def save(image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def coordinate_image(width, height):
    """Every pixel holds its own position: R = x, G = y, B = 7 (so its content says where a crop came from)."""
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    array = np.stack([xs, ys, np.full_like(xs, 7)], axis=-1).astype(np.uint8)
    return Image.fromarray(array, "RGB")


def dataset(instance_images, resolution=32, class_images=None, center_crop=False, random_flip=False, seed=0,
            num_samples=100):
    return DreamBoothDataset(instance_images, "a photo of sks dog", class_images,
                             class_prompt="a photo of dog" if class_images else None, resolution=resolution,
                             center_crop=center_crop, random_flip=random_flip, seed=seed, num_samples=num_samples)


# ----------------------------------------------------------------------------------------------------------
# Sizes and value ranges
# ----------------------------------------------------------------------------------------------------------


def test_item_has_pixels_in_minus_one_to_one_and_six_time_ids(tmp_path):
    image = Image.new("RGB", (48, 40), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 48, 20))  # top half black, bottom half white
    photo = save(image, tmp_path / "a.png")
    item = dataset([photo], resolution=32, center_crop=True)[0]

    assert set(item) == {"pixel_values", "time_ids", "prompt", "sample"}
    assert item["prompt"] == "a photo of sks dog"
    pixels = item["pixel_values"]
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    assert pixels.min() == -1.0 and pixels.max() == 1.0  # black -> -1, white -> +1, exactly
    assert torch.all(pixels[:, 0] == -1.0) and torch.all(pixels[:, -1] == 1.0)
    # 48x40 -> short side 32: 38x32 (round(48 * 0.8) = 38), centre crop at left = 3
    assert item["time_ids"].dtype == torch.float32
    assert item["time_ids"].tolist() == [40, 48, 0, 3, 32, 32]  # (orig_h, orig_w, top, left, R, R)


def test_to_tensor_is_channels_first_and_maps_0_255_to_minus_one_one():
    image = Image.new("RGB", (5, 3), (0, 255, 51))
    tensor = to_tensor(image)
    assert tensor.shape == (3, 3, 5)
    assert torch.all(tensor[0] == -1.0) and torch.all(tensor[1] == 1.0)
    assert torch.allclose(tensor[2], torch.full((3, 5), 51 / 127.5 - 1))


def test_item_with_class_images_has_class_pixels_time_ids_and_prompt(tmp_path):
    instance = save(Image.new("RGB", (40, 32), (255, 0, 0)), tmp_path / "instance.png")
    klass = save(Image.new("RGB", (32, 48), (0, 0, 255)), tmp_path / "class.png")
    item = dataset([instance], resolution=32, class_images=[klass], center_crop=True)[0]

    assert item["class_pixel_values"].shape == (3, 32, 32)
    assert item["class_prompt"] == "a photo of dog"
    assert item["class_time_ids"].tolist() == [48, 32, 8, 0, 32, 32]
    assert item["time_ids"].tolist() == [32, 40, 0, 4, 32, 32]
    assert torch.all(item["class_pixel_values"][2] == 1.0) and torch.all(item["class_pixel_values"][0] == -1.0)
    assert torch.all(item["pixel_values"][0] == 1.0) and torch.all(item["pixel_values"][2] == -1.0)


def test_collate_puts_instance_samples_first_and_class_samples_second(tmp_path):
    instance = save(Image.new("RGB", (32, 32), (255, 0, 0)), tmp_path / "instance.png")
    klass = save(Image.new("RGB", (32, 40), (0, 0, 255)), tmp_path / "class.png")
    data = dataset([instance], resolution=32, class_images=[klass])
    examples = [data[0], data[1], data[2]]
    batch = collate(examples)

    assert batch["pixel_values"].shape == (6, 3, 32, 32)
    assert batch["time_ids"].shape == (6, 6)
    assert batch["prompts"] == ["a photo of sks dog"] * 3 + ["a photo of dog"] * 3
    for i, example in enumerate(examples):
        assert torch.equal(batch["pixel_values"][i], example["pixel_values"])
        assert torch.equal(batch["pixel_values"][3 + i], example["class_pixel_values"])
        assert torch.equal(batch["time_ids"][i], example["time_ids"])
        assert torch.equal(batch["time_ids"][3 + i], example["class_time_ids"])
    assert torch.all(batch["pixel_values"][:3, 0] == 1.0)  # red instance photos
    assert torch.all(batch["pixel_values"][3:, 2] == 1.0)  # blue class images
    assert torch.all(batch["time_ids"][:3, :2] == torch.tensor([32.0, 32.0]))
    assert torch.all(batch["time_ids"][3:, :2] == torch.tensor([40.0, 32.0]))


def test_collate_without_class_images_is_the_instance_batch(tmp_path):
    instance = save(Image.new("RGB", (32, 32), (255, 0, 0)), tmp_path / "instance.png")
    data = dataset([instance], resolution=32)
    examples = [data[0], data[1]]
    batch = collate(examples)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["time_ids"].shape == (2, 6)
    assert batch["prompts"] == ["a photo of sks dog"] * 2
    assert torch.equal(batch["pixel_values"][1], examples[1]["pixel_values"])


# ----------------------------------------------------------------------------------------------------------
# Loading: EXIF orientation and conversion to RGB
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation, marker_xy", [(6, (40, 8)), (8, (8, 72))])
def test_exif_orientation_is_applied_on_load(tmp_path, orientation, marker_xy):
    image = Image.new("RGB", (80, 48), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 16, 16))  # a red square in the stored top-left corner
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    path = save(image, tmp_path / "rotated.jpg", exif=exif, quality=95)

    loaded = load_image(path)[0]
    assert loaded.mode == "RGB"
    assert loaded.size == (48, 80)  # W x H stored -> H x W shown
    # 6: rotate 90 degrees clockwise to show, so the stored top-left goes to the top-right; 8: to the bottom-left
    r, g, b = loaded.getpixel(marker_xy)
    assert r > 200 and g < 50 and b < 50
    assert loaded.getpixel((8, 8))[2] > 200  # from the stored bottom-left (6) or top-right (8) corner: blue


def test_time_ids_original_size_is_the_size_after_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    path = save(Image.new("RGB", (80, 48), (0, 128, 0)), tmp_path / "rotated.jpg", exif=exif)
    item = dataset([path], resolution=32, center_crop=True)[0]
    # shown as 48 wide x 80 high: (orig_h, orig_w) = (80, 48); 48x80 -> 32x53, centre top = round(10.5) = 10
    assert item["time_ids"][:2].tolist() == [80, 48]
    assert item["time_ids"][2:].tolist() in ([10, 0, 32, 32], [11, 0, 32, 32])


@pytest.mark.parametrize("mode, color, suffix", [
    ("L", 200, ".png"),
    ("P", None, ".png"),
    ("CMYK", (0, 255, 255, 0), ".jpg"),
    ("CMYK", (0, 255, 255, 0), ".tif"),
    ("RGBA", (255, 0, 0, 255), ".png"),
    ("LA", (200, 255), ".png"),
])
def test_any_mode_loads_as_rgb(tmp_path, mode, color, suffix):
    if mode == "P":
        image = Image.new("RGB", (20, 12), (255, 0, 0)).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    else:
        image = Image.new(mode, (20, 12), color)
    path = save(image, tmp_path / f"image{suffix}", **({"quality": 95} if suffix == ".jpg" else {}))
    loaded = load_image(path)[0]
    assert loaded.mode == "RGB"
    assert loaded.size == (20, 12)
    expected = {"L": (200, 200, 200), "LA": (200, 200, 200)}.get(mode, (255, 0, 0))  # CMYK (0,255,255,0) is red
    assert np.abs(np.asarray(loaded, dtype=int) - np.array(expected)).max() <= 3


def test_transparent_rgba_pixels_become_white_not_black(tmp_path):
    image = Image.new("RGBA", (20, 10), (0, 0, 0, 0))  # fully transparent "black"
    image.paste((10, 200, 30, 255), (10, 0, 20, 10))  # right half opaque green
    loaded = load_image(save(image, tmp_path / "cutout.png"))[0]
    array = np.asarray(loaded)
    assert loaded.mode == "RGB"
    assert np.all(array[:, :10] == 255)
    assert np.all(array[:, 10:] == (10, 200, 30))


def test_half_transparent_rgba_is_composited_on_white(tmp_path):
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    array = np.asarray(load_image(save(image, tmp_path / "half.png"))[0], dtype=int)
    assert np.all(np.abs(array - 127) <= 1)  # halfway between black and white, not black


def test_transparent_la_pixels_become_white_not_black(tmp_path):
    image = Image.new("LA", (8, 8), (0, 0))
    image.paste((50, 255), (0, 0, 4, 8))
    array = np.asarray(load_image(save(image, tmp_path / "gray.png"))[0])
    assert np.all(array[:, 4:] == 255)
    assert np.all(array[:, :4] == 50)


def test_transparent_palette_pixels_become_white_not_black(tmp_path):
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))  # index 0 black, index 1 blue
    image.paste(1, (0, 0, 4, 8))
    image.info["transparency"] = 0  # black (index 0) is transparent
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)
    with Image.open(path) as reopened:
        assert reopened.mode == "P" and "transparency" in reopened.info

    array = np.asarray(load_image(path)[0])
    assert np.all(array[:, 4:] == 255)
    assert np.all(array[:, :4] == (0, 0, 255))


def test_transparent_gif_pixels_become_white_not_black(tmp_path):
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    image.paste(1, (0, 0, 4, 8))
    path = tmp_path / "anim.gif"
    image.save(path, transparency=0)
    array = np.asarray(load_image(path)[0])
    assert np.all(array[:, 4:] == 255)
    assert np.all(array[:, :4] == (255, 0, 0))


@pytest.mark.parametrize("mode, transparent, opaque", [("RGB", (0, 0, 0), (0, 0, 255)), ("L", 0, 90)])
def test_colour_key_transparent_pixels_become_white_not_black(tmp_path, mode, transparent, opaque):
    """PNG's tRNS colour key: an RGB or L image whose pixels of one colour are transparent."""
    image = Image.new(mode, (8, 8), transparent)
    image.paste(opaque, (0, 0, 4, 8))
    path = tmp_path / "keyed.png"
    image.save(path, transparency=transparent)
    with Image.open(path) as reopened:
        assert reopened.mode == mode and reopened.info.get("transparency") == transparent

    array = np.asarray(load_image(path)[0])
    assert np.all(array[:, 4:] == 255)
    expected = opaque if mode == "RGB" else (opaque,) * 3
    assert np.all(array[:, :4] == expected)


def test_16_bit_grayscale_keeps_its_tones(tmp_path):
    """A 16-bit grayscale PNG (mode I;16) scales to 0-255 rather than clipping everything above 255 to white."""
    levels = [0, 16384, 32768, 65535]
    array = np.repeat(np.array(levels, dtype=np.uint16), 4).reshape(1, 16).repeat(4, axis=0)
    path = tmp_path / "scan16.png"
    Image.fromarray(array).save(path)
    with Image.open(path) as reopened:
        assert reopened.mode.startswith("I")

    loaded = np.asarray(load_image(path)[0], dtype=int)
    assert load_image(path)[0].mode == "RGB"
    shown = loaded[0, ::4, 0].tolist()
    assert shown == pytest.approx([0, 64, 128, 255], abs=2)


@pytest.mark.parametrize("name, mode, levels, white", [
    ("float.tif", "F", [0.0, 0.25, 0.5, 1.0], 1.0),  # float image files: 0.0 is black, 1.0 white
    ("int32.tif", "I", [0, 2**29, 2**30, 2**31 - 1], 2**31 - 1),  # by its bit depth: 32-bit, signed
    ("uint16.tif", "I;16", [0, 16384, 32768, 65535], 65535),
])
def test_deep_tiffs_keep_their_tones_rather_than_turning_black_or_white(tmp_path, name, mode, levels, white):
    dtype = {"F": np.float32, "I": np.int32, "I;16": np.uint16}[mode]
    array = np.repeat(np.array(levels, dtype=dtype), 4).reshape(1, 16).repeat(4, axis=0)
    path = save(Image.fromarray(array), tmp_path / name)
    with Image.open(path) as reopened:
        assert reopened.mode == mode
    shown = np.asarray(load_image(path)[0], dtype=int)[0, ::4].tolist()
    assert shown == [[round(level / white * 255)] * 3 for level in levels]


@pytest.mark.parametrize("values, problem", [
    ([0.0, 255.0], "float pixels from 0 to 255, outside 0-1"),  # 8-bit data saved as floats: no one reading
    ([0.0, float("nan")], "float pixels that are no number (NaN or infinite)"),
    ([0, 255], "32-bit signed pixels from 0 to 255, all under 1/255 of 0-2147483647: it would train black"),
])
def test_deep_images_with_no_faithful_8_bit_reading_are_refused_not_guessed(tmp_path, values, problem):
    dtype = np.float32 if isinstance(values[0], float) else np.int32
    path = save(Image.fromarray(np.array([values] * 2, dtype=dtype)), tmp_path / "deep.tif")
    with pytest.raises(imaging.PixelError, match=re.escape(problem)):
        load_image(path)


def primaries_swapped_profile():
    """An RGB colour profile whose red primary is sRGB's green and whose green is sRGB's red: sRGB's own, made by
    ImageCms, with its rXYZ and gXYZ tags swapped. Pixels tagged with it look very different in sRGB."""
    data = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    count = struct.unpack(">I", data[128:132])[0]
    entries = {data[132 + 12 * i:136 + 12 * i]: 132 + 12 * i for i in range(count)}  # tag -> its table entry
    swapped = bytearray(data)
    red, green = entries[b"rXYZ"], entries[b"gXYZ"]
    swapped[red + 4:red + 12], swapped[green + 4:green + 12] = data[green + 4:green + 12], data[red + 4:red + 12]
    return bytes(swapped)


@pytest.mark.parametrize("name, mode", [("tagged.jpg", "RGB"), ("tagged.png", "RGB"), ("tagged.png", "RGBA"),
                                        ("tagged.webp", "RGB"), ("tagged.tif", "RGB")])
def test_an_embedded_colour_profile_is_converted_to_srgb_as_a_browser_shows_it(tmp_path, name, mode):
    image = Image.new(mode, (8, 8), (200, 30, 30, 255)[:len(mode)])
    path = save(image, tmp_path / name, icc_profile=primaries_swapped_profile(),
                **({"quality": 100} if name.endswith((".jpg", ".webp")) else {}))
    shown = np.asarray(load_image(path)[0], dtype=int)
    assert np.abs(shown - (30, 200, 30)).max() <= 4, "its red channel means sRGB's green"
    plain = save(image, tmp_path / f"plain{path.suffix}", icc_profile=ImageCms.ImageCmsProfile(
        ImageCms.createProfile("sRGB")).tobytes(), **({"quality": 100} if name.endswith((".jpg", ".webp")) else {}))
    assert np.abs(np.asarray(load_image(plain)[0], dtype=int) - (200, 30, 30)).max() <= 4, "sRGB stays as it is"


def test_a_grey_photo_saved_with_an_rgb_profile_trains_as_its_grey(tmp_path):
    """Some tools tag grey images with their RGB working space: grey is neutral in any RGB space."""
    path = save(Image.new("L", (8, 8), 90), tmp_path / "grey.png", icc_profile=primaries_swapped_profile())
    assert np.abs(np.asarray(load_image(path)[0], dtype=int) - 90).max() <= 2


def test_a_colour_profile_that_cannot_be_read_is_refused_not_ignored(tmp_path):
    path = save(Image.new("RGB", (8, 8), "red"), tmp_path / "broken.png", icc_profile=b"not a profile" * 20)
    with pytest.raises(imaging.PixelError, match="its colour profile cannot be applied"):
        load_image(path)


def test_an_animation_trains_on_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "blue", "green")]
    for name in ("anim.webp", "anim.png", "anim.gif"):
        path = save(frames[0], tmp_path / name, save_all=True, append_images=frames[1:], lossless=True)
        assert np.abs(np.asarray(load_image(path)[0], dtype=int) - (255, 0, 0)).max() <= 2, name


# ----------------------------------------------------------------------------------------------------------
# Crop and flip
# ----------------------------------------------------------------------------------------------------------


def test_random_crop_and_flip_returns_the_crop_actually_taken():
    """(top, left) name the crop in the resized image *after* the flip, as SDXL's crop time ids mean."""
    resolution = 64
    image = coordinate_image(100, resolution)  # already at the target short side: no resizing
    mirrored = ImageOps.mirror(image)
    flips, positions = set(), set()
    for seed in range(60):
        square, (top, left) = crop_and_flip(image, resolution, False, True, random.Random(seed))
        assert square.size == (resolution, resolution)
        assert top == 0 and 0 <= left <= 100 - resolution
        box = (left, top, left + resolution, top + resolution)
        content = np.asarray(square)
        flipped = np.array_equal(content, np.asarray(mirrored.crop(box)))
        unflipped = np.array_equal(content, np.asarray(image.crop(box)))
        assert flipped != unflipped, f"seed {seed}: the crop is neither region [top:top+R, left:left+R]"
        # the red channel says which original column each pixel came from
        first_column = content[0, 0, 0]
        assert first_column == (99 - left if flipped else left)
        flips.add(flipped)
        positions.add(left)
    assert flips == {True, False}
    assert len(positions) > 1


def test_random_crop_of_a_portrait_photo_moves_vertically_and_reports_top():
    resolution = 64
    image = coordinate_image(resolution, 100)
    positions = set()
    for seed in range(30):
        square, (top, left) = crop_and_flip(image, resolution, False, False, random.Random(seed))
        assert left == 0
        assert np.array_equal(np.asarray(square), np.asarray(image.crop((0, top, resolution, top + resolution))))
        assert np.asarray(square)[0, 0, 1] == top  # green channel = original row
        positions.add(top)
    assert len(positions) > 1


def test_without_random_flip_the_image_is_never_mirrored():
    image = coordinate_image(100, 64)
    for seed in range(20):
        square, (top, left) = crop_and_flip(image, 64, False, False, random.Random(seed))
        assert np.asarray(square)[0, 0, 0] == left
        assert np.all(np.diff(np.asarray(square)[0, :, 0].astype(int)) == 1)  # columns increase left to right


@pytest.mark.parametrize("width, height, expected", [(100, 64, (0, 18)), (64, 100, (18, 0)), (64, 64, (0, 0))])
def test_center_crop_always_takes_the_centred_square(width, height, expected):
    image = coordinate_image(width, height)
    for seed in range(10):
        square, (top, left) = crop_and_flip(image, 64, True, False, random.Random(seed))
        assert (top, left) == expected
        assert np.array_equal(np.asarray(square), np.asarray(image.crop((left, top, left + 64, top + 64))))


def test_center_crop_with_flip_is_centred_in_the_flipped_image():
    image = coordinate_image(100, 64)
    mirrored = ImageOps.mirror(image)
    seen = set()
    for seed in range(20):
        square, (top, left) = crop_and_flip(image, 64, True, True, random.Random(seed))
        assert (top, left) == (0, 18)
        flipped = np.array_equal(np.asarray(square), np.asarray(mirrored.crop((18, 0, 82, 64))))
        assert flipped or np.array_equal(np.asarray(square), np.asarray(image.crop((18, 0, 82, 64))))
        seen.add(flipped)
    assert seen == {True, False}


@pytest.mark.parametrize("size", [(20, 30), (30, 20), (10, 10), (63, 200)])
def test_small_images_are_upscaled_so_the_short_side_is_the_resolution(size):
    resolution = 64
    image = Image.new("RGB", size, (90, 90, 90))
    scale = resolution / min(size)
    long_side = max(resolution, round(max(size) * scale))
    square, (top, left) = crop_and_flip(image, resolution, True, False, random.Random(0))
    assert square.size == (resolution, resolution)
    # the centred offset along the long side shows the resized size: short side == R, aspect kept
    expected_offset = round((long_side - resolution) / 2)
    if size[0] >= size[1]:
        assert (top, left) == (0, expected_offset)
    else:
        assert (top, left) == (expected_offset, 0)
    # a random crop of the upscaled image stays inside it
    for seed in range(10):
        square, (top, left) = crop_and_flip(image, resolution, False, False, random.Random(seed))
        assert square.size == (resolution, resolution)
        assert 0 <= top + left <= long_side - resolution
        assert np.all(np.asarray(square) == 90)  # no black padding: the crop lies within the image


def test_large_images_are_downscaled_so_the_short_side_is_the_resolution(tmp_path):
    image = Image.new("RGB", (400, 256), (255, 255, 255))
    path = save(image, tmp_path / "big.png")
    item = dataset([path], resolution=64, center_crop=True)[0]
    assert item["pixel_values"].shape == (3, 64, 64)
    assert item["time_ids"].tolist() == [256, 400, 0, 18, 64, 64]  # 400x256 -> 100x64, centre left 18


# ----------------------------------------------------------------------------------------------------------
# Randomness: drawn anew per sample, reproducible from (seed, k)
# ----------------------------------------------------------------------------------------------------------


def test_each_sample_of_the_same_photo_gets_its_own_crop_and_flip(tmp_path):
    path = save(coordinate_image(100, 64), tmp_path / "only.png")
    data = dataset([path], resolution=64, random_flip=True, seed=3)
    items = [data[k] for k in range(24)]
    crops = {tuple(item["time_ids"][2:4].tolist()) for item in items}
    assert len(crops) > 1
    distinct_pixels = {item["pixel_values"].numpy().tobytes() for item in items}
    assert len(distinct_pixels) > len(crops)  # the flip varies too, not only the position
    for item in items:
        assert item["time_ids"][:2].tolist() == [64, 100]


def test_the_same_sample_index_always_gives_the_same_pixels_and_time_ids(tmp_path):
    path = save(coordinate_image(100, 64), tmp_path / "only.png")
    data = dataset([path], resolution=64, random_flip=True, seed=3)
    again = dataset([path], resolution=64, random_flip=True, seed=3)
    for k in [0, 1, 7, 50, 99]:
        first, second, third = data[k], data[k], again[k]
        assert torch.equal(first["pixel_values"], second["pixel_values"])
        assert torch.equal(first["pixel_values"], third["pixel_values"])
        assert torch.equal(first["time_ids"], third["time_ids"])
    # reading in another order (as a resumed run or several workers do) changes nothing
    forward = [data[k]["time_ids"] for k in range(10)]
    backward = [data[k]["time_ids"] for k in reversed(range(10))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(forward, backward))


def test_a_different_seed_draws_different_crops(tmp_path):
    path = save(coordinate_image(100, 64), tmp_path / "only.png")

    def draws(seed):
        data = dataset([path], resolution=64, random_flip=True, seed=seed)
        return [data[k]["pixel_values"].numpy().tobytes() for k in range(16)]

    assert draws(0) == draws(0)
    assert draws(0) != draws(1)


def test_class_images_get_their_own_crops(tmp_path):
    instance = save(coordinate_image(100, 64), tmp_path / "instance.png")
    klass = save(coordinate_image(100, 64), tmp_path / "class.png")
    data = dataset([instance], resolution=64, class_images=[klass], random_flip=True, seed=1)
    items = [data[k] for k in range(16)]
    assert any(not torch.equal(item["pixel_values"], item["class_pixel_values"]) for item in items)
    assert len({tuple(item["class_time_ids"].tolist()) for item in items}) > 1


def test_pick_visits_every_item_once_per_epoch():
    items = list("abcdefg")
    for seed in range(3):
        for epoch in range(5):
            visited = [pick(items, epoch * len(items) + i, seed, "instance") for i in range(len(items))]
            assert sorted(visited) == items


def test_pick_orders_differ_across_epochs_and_seeds():
    items = list(range(8))

    def order(seed, epoch, tag="instance"):
        return [pick(items, epoch * 8 + i, seed, tag) for i in range(8)]

    assert len({tuple(order(0, epoch)) for epoch in range(6)}) > 1
    assert order(0, 0) != order(1, 0) or order(0, 1) != order(1, 1)
    assert order(0, 0) == order(0, 0)
    assert [order(0, e, "instance") for e in range(3)] != [order(0, e, "class") for e in range(3)]


def test_pick_with_a_single_item_always_returns_it():
    assert {pick(["only"], k, 0, "instance") for k in range(10)} == {"only"}


def test_dataset_uses_every_photo_once_per_epoch(tmp_path):
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]
    paths = [save(Image.new("RGB", (32, 32), c), tmp_path / f"{i}.png") for i, c in enumerate(colors)]
    data = dataset(paths, resolution=32, seed=5)
    for epoch in range(3):
        seen = set()
        for k in range(epoch * 4, epoch * 4 + 4):
            seen.add(tuple(((data[k]["pixel_values"][:, 0, 0] + 1) * 127.5).round().int().tolist()))
        assert seen == set(colors)


def test_derive_seed_is_a_stable_64_bit_function_of_its_parts():
    assert derive_seed(0, "noise", 3) == derive_seed(0, "noise", 3)
    assert derive_seed(0, "noise", 3) != derive_seed(0, "noise", 4)
    assert derive_seed(0, "noise", 3) != derive_seed(1, "noise", 3)
    assert derive_seed(0, "augment", 3) != derive_seed(0, "noise", 3)
    assert all(0 <= derive_seed(s, "x") < 2**64 for s in range(50))
    # sha256-based, not Python's salted hash(): the same value in every process
    assert derive_seed(0, "augment", 0) == int.from_bytes(
        hashlib.sha256(repr((0, "augment", 0)).encode()).digest()[:8], "little")


# ----------------------------------------------------------------------------------------------------------
# The instance folder
# ----------------------------------------------------------------------------------------------------------


def test_list_images_skips_hidden_files_other_files_and_subfolders(tmp_path):
    for name in ["a.jpg", "B.JPG", "c.PNG", "d.webp", "e.jpeg", "f.Png"]:
        save(Image.new("RGB", (4, 4)), tmp_path / name)
    (tmp_path / "notes.txt").write_text("not a photo")
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "Thumbs.db").write_bytes(b"\0")
    save(Image.new("RGB", (4, 4)), tmp_path / ".hidden.jpg")
    (tmp_path / "._a.jpg").write_bytes(b"\0\5\26\7")  # macOS resource fork beside a.jpg
    (tmp_path / "sub").mkdir()
    save(Image.new("RGB", (4, 4)), tmp_path / "sub" / "inside.jpg")
    (tmp_path / "folder.jpg").mkdir()  # a folder with an image's name is still a folder

    names = [p.name for p in list_images(tmp_path)]
    assert names == sorted(["a.jpg", "B.JPG", "c.PNG", "d.webp", "e.jpeg", "f.Png"])


@pytest.mark.parametrize("name, format", [
    ("a.jfif", "JPEG"), ("b.jpe", "JPEG"), ("c.avif", "AVIF"), ("d.jp2", "JPEG2000"), ("e.tga", "TGA"),
    ("f.ppm", "PPM"), ("g.ico", "ICO"), ("h.qoi", "QOI"), ("i.apng", "PNG"), ("j.pcx", "PCX"), ("k.sgi", "SGI"),
])
def test_every_photo_format_the_installed_pillow_reads_is_trained_on(tmp_path, name, format):
    Image.init()  # registers every plugin, so SAVE lists them all
    if format not in Image.SAVE:  # Pillow before 11.3 has no AVIF
        pytest.skip(f"this Pillow cannot write {format}")
    image = Image.new("RGB", (16, 16), (200, 30, 30))
    save(image, tmp_path / name, format=format)
    assert [p.name for p in list_images(tmp_path)] == [name]
    assert np.abs(np.asarray(load_image(tmp_path / name)[0], dtype=int) - (200, 30, 30)).max() <= 12


def test_list_images_is_sorted_and_empty_for_a_folder_without_photos(tmp_path):
    for name in ["3.png", "1.png", "2.png"]:
        save(Image.new("RGB", (4, 4)), tmp_path / name)
    assert [p.name for p in list_images(tmp_path)] == ["1.png", "2.png", "3.png"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("x")
    assert list_images(empty) == []
