"""Which files in a folder are photos, and reading them faithfully: formats, bit depth, colour profiles, orientation,
masks, captions and aspect-ratio buckets."""

import io
import math
import random
import unicodedata
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps

from .messages import UserError, agree, counted, one_line, say, warn

# Formats Pillow registers that are no photo to train on: stubs that only identify a file and need a handler this
# project never installs (BUFR, GRIB, HDF5), MPEG video, vector drawings (EPS needs Ghostscript, WMF Windows),
# IPTC metadata and FITS astronomy data
try:  # HEIC, the iPhone's default, is read where the user has pillow-heif; it is no requirement of this project
    from pillow_heif import register_heif_opener
    register_heif_opener()
except ImportError:
    pass
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


# A photo's long side may be at most MAX_ASPECT times its short side. Training resizes it so the short side is
# --resolution and crops one square, so a longer photo costs memory for pixels no crop shows: a 2x60000 PNG at
# 1024 would become 1024 x 30.7M pixels (94 GB). With this bound, and --resolution at most 4096, one resized
# photo is at most 4096 x 32768 RGB (400 MB; 25 MB at 1024); PIL's decompression-bomb limit bounds the decode.
MAX_ASPECT = 8


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


def mask_path(photo):
    """photo.jpg's loss mask: photo.mask.png beside it."""
    return Path(photo).with_name(f"{Path(photo).stem}{MASK_SUFFIX}")


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


def nearest_bucket(height, width, buckets):
    """The bucket whose aspect ratio is nearest the image's (by log ratio: 2:1 is as far from 1:1 as 1:2)."""
    return min(buckets, key=lambda bucket: abs(math.log(bucket[0] / bucket[1]) - math.log(height / width)))


def draws_anew(augment, image, seed):
    """Whether augment(image, rng) differs from one sample to the next: it drew from its rng or from a global
    generator (random, numpy, torch), or gave two samples different results. What a cache of its output would
    freeze."""
    rngs = [random.Random(f"{seed}-augment-{k}") for k in range(2)]
    before = [rng.getstate() for rng in rngs], global_rng_states()
    first, second = [augment(image.copy(), rng) for rng in rngs]
    same = first.shape == second.shape and bool((first == second).all())
    return ([rng.getstate() for rng in rngs], global_rng_states()) != before or not same


def global_rng_states():
    import torch  # here, not at the top: the flags' checks import this module before the libraries

    return random.getstate(), np.random.get_state()[1].tobytes(), torch.random.get_rng_state().numpy().tobytes()

