"""The run's file names, and writes that are atomic: a file or a folder is renamed into place whole, or not at all."""

import hashlib
import itertools
import os
import re
import shutil
from pathlib import Path


def beside_package(script):
    """The project's script by its path beside this package (a checkout, or its editable install). A package that
    `pip install .` copied into site-packages has no script beside it: then the bare name, as run from the folder
    that holds the user's copy."""
    path = Path(__file__).resolve().parents[1] / script
    return path if path.is_file() else Path(script)


# The project's scripts: what a printed command names when the running script is unknown
TRAINER_SCRIPT = beside_package("train_dreambooth_lora_ssd1b.py")
INFER_SCRIPT = beside_package("infer.py")
LORA_FILE = "pytorch_lora_weights.safetensors"


SETTINGS_FILE = "run_settings.json"


KOHYA_FILE = "lora_for_comfyui_and_webui.safetensors"  # kohya names: what ComfyUI, A1111/Forge and kohya load whole


STATE_PREFIX = "state-"  # output_dir/state-stepN: accelerate's resumable state beside stepN's adapters


LOCK_FILE = ".lock"  # output_dir/.lock: the PID and host of the trainer that holds the folder


TRAINER_STATE = "trainer_state.json"  # written last into a state folder: without it, the folder is no state


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


# What the trainer writes at the top of an output dir, besides stepN/ and state-stepN/: the model card, the validation
# rounds (validation/stepN/, validation/base/), tensorboard's logs (logs/<project>/) and --push_to_hub's staging
# folder. Anything else there is the user's, and is never written, replaced or removed.
CARD_FILE = "README.md"


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


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path, write):
    """The one way a file is written: write(tmp) fills a hidden file beside `path`, which is then renamed onto it,
    so `path` holds the old content or the new, whole. Cut short (a stop, a full disk), nothing half-written stays."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_png_atomic(image, path, pnginfo=None):
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=pnginfo))


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
    write_atomic(path, lambda tmp: tmp.write_text(text))


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


def looks_like_hub_id(name):
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not os.path.exists(name)


def absolute_if_local(name):
    return os.path.abspath(name) if os.path.exists(name) else name


def ran(settings):
    """A run's recorded settings as they ran: the flags, with what they came to ("derived") in place of what was
    typed. {} stays {}: a step dir copied without its run_settings.json records nothing."""
    return {**settings, **settings.get("derived", {})}
