"""The output dir belongs to one run: a lock with a heartbeat, folders that must not overlap, files the trainer did not
write left alone, and an earlier run replaced only when asked."""

import contextlib
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import huggingface_hub

from .artifacts import (
    CARD_FILE,
    LOCK_FILE,
    LORA_FILE,
    SETTINGS_FILE,
    STATE_PREFIX,
    TRAINER_STATE,
    below,
    create_exclusive,
    finished_adapters,
    partial_dir,
    same_folder,
    step_of,
)
from .checkpoints import complete_states
from .checks import uses_class_images
from .messages import UserError, say

# The holder renews its lock's modification time every LOCK_HEARTBEAT_S seconds; a lock not renewed for LOCK_STALE_S
# is stale and taken over, from whichever host it came: a job rescheduled elsewhere can go on. The margin covers a
# slow file system and clocks a minute apart.
LOCK_HEARTBEAT_S = 30


LOCK_STALE_S = 300


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
    is checked: gone, or its PID now another process (its start time differs). Elsewhere, and where that cannot
    tell (no /proc), the heartbeat decides."""
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname():
        if not process_alive(pid):
            return f"the trainer that held it (PID {pid}) is gone"
        started, running = holder.get("pid_started"), process_start(pid)
        if started is not None and running is not None:
            return None if started == running else f"PID {pid} is now another process, not the trainer that held it"
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


TRACKER_PROJECT = "dreambooth-lora-ssd1b"  # the project main() gives init_trackers: tensorboard logs to logs/<it>/


TRAINER_FOLDERS = ("validation", "logs", "hub")


CARD_MARKS = {"dreambooth", "ssd-1b"}  # tags every card this trainer has written carries (CARD_TAGS)


def is_trainer_card(path):
    """A model card this trainer wrote: a plain file whose Hub tags carry CARD_MARKS. A user's own README, or a
    link to one, is not: the trainer would replace it at its first save."""
    if path.is_symlink() or not path.is_file() or path.stat().st_size > 2**20:  # its cards are a few kB
        return False
    try:
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
