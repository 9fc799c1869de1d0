"""SIGINT and SIGTERM get the same answer in every phase of a run: one message, the command that resumes, and exit 130
or 143."""

import contextlib
import filecmp
import functools
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from tqdm.auto import tqdm

from .artifacts import LORA_FILE, TRAINER_SCRIPT
from .checks import answer_before_libraries
from .imaging import list_images
from .messages import UserError


def stopped_while_importing(signum, frame):
    """A stop while the libraries import (seconds), before main() answers signals itself: nothing is held or
    written yet. Once main() has run, its own stop was answered (or the run ended): nothing more to say."""
    if getattr(stopped_while_importing, "superseded", False):
        return
    print(f"{signal.Signals(signum).name} before training started: nothing was written", file=sys.stderr, flush=True)
    os._exit(128 + signum)


def before_libraries(parse_args):
    """A script run's first answers, in the seconds before its libraries have imported: a stop writes nothing yet;
    --help, a mistyped flag and an install known to fail inside an import are answered in one line."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stopped_while_importing)
    answer_before_libraries(parse_args)


@functools.cache
def parent_command_line():
    """The command line of the process that started this one (a shell, `accelerate launch`, torchrun), from Linux's
    /proc; () where there is none. Read once, at start: accelerate's launcher dies of the same Ctrl-C or SIGTERM
    before the run has saved, and its orphan is adopted by another parent."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return ()
    return tuple(os.fsdecode(arg) for arg in raw.split(b"\0")[:-1])


def resume_command(argv, resume=True, script=TRAINER_SCRIPT):
    """The command that resumes this run from any folder: `cd` to the folder it was started in, then the launch as
    typed (`accelerate launch` or torchrun with their flags, or the interpreter), the script, the same flags, and
    --resume_from_checkpoint latest (with resume=False, none: a run stopped before it saved anything starts again).

    The launch is read from the parent process's command line (parent_command_line), else this interpreter's
    (sys.orig_argv); the folder is the current one. script: the trainer's file, which a user's copy passes as its
    own __file__."""
    parent, own, cwd = list(parent_command_line()), list(getattr(sys, "orig_argv", [])), os.getcwd()
    argv = list(argv)

    def launch_in(command):
        """The words before this run's flags when `command` ends with the script and them (a launcher passes both
        on as typed), else None."""
        n = len(command) - len(argv)
        if n > 0 and command[n:] == argv and Path(command[n - 1]).name == Path(script).name:
            return command[:n]
        return None

    launch = launch_in(parent) or launch_in(own) or ["python", str(Path(script).resolve())]
    if len(launch) > 2 and Path(launch[0]).name.startswith("python") and Path(launch[1]).is_absolute() \
            and Path(launch[1]).suffix != ".py":
        launch = [Path(launch[1]).name, *launch[2:]]  # a console script run by its shebang: `accelerate launch ...`
    kept, skip = [], False
    for arg in argv:  # --hub_token is a secret: not printed (the token of `hf auth login` serves, or pass it again)
        if skip or arg.startswith(("--resume_from_checkpoint=", "--hub_token=")):
            skip = False
            continue
        if arg in ("--resume_from_checkpoint", "--hub_token"):
            skip = True
            continue
        kept.append(arg)
    again = ["--resume_from_checkpoint", "latest"] if resume else []
    return f"cd {shlex.quote(str(cwd))} && " + shlex.join([*launch, *kept, *again])


class Interrupted(BaseException):
    """A run stopped by SIGINT or SIGTERM, once what it could keep is kept; carries the exit code. Not an
    Exception, as KeyboardInterrupt is not: a stop raised inside a library is never caught as its error."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.exit_code = 128 + signum


class GracefulStop:
    """SIGINT / SIGTERM (Ctrl-C, cluster preemption), answered the same in every phase of the run. While training
    (within finishing_steps): finish the step, save, exit (train raises Interrupted). Elsewhere there is nothing
    to finish: Interrupted is raised where the run stands, with what `describe()` says about it (the phase, what is
    kept, the command that goes on). A second one exits at once, after on_exit (the lock's release), unless it comes
    within REPEAT_WINDOW seconds of the first: that is the same stop passed on by a launcher (accelerate launch 1.16
    sends its own SIGTERM to the trainer when it gets Ctrl-C or a SIGTERM of the group)."""

    REPEAT_WINDOW = 1.0

    def __init__(self, describe=None):
        self.describe, self.on_exit = describe, lambda: None

    def __enter__(self):
        self.signum, self.previous, self.first = 0, {}, None
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum, frame):
        if self.signum and time.monotonic() - self.first < self.REPEAT_WINDOW:
            return
        if self.signum:
            self.on_exit()
            os._exit(128 + signum)
        self.signum, self.first = signum, time.monotonic()
        if self.describe is not None:
            self.stop_now()
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a resumable checkpoint "
              "(interrupt again to exit at once)", file=sys.stderr, flush=True)

    def stop_now(self):
        raise Interrupted(f"{signal.Signals(self.signum).name} {self.describe()}", self.signum)

    def at_once(self, describe):
        """From here a stop ends the run where it stands, saying `describe()`; one asked for already ends it now."""
        self.describe = describe
        if self.signum:
            self.stop_now()

    @contextlib.contextmanager
    def at_once_within(self, describe):
        """at_once for a block, then as before: for work within a step that a stop need not wait for."""
        previous = self.describe
        self.at_once(describe)
        try:
            yield
        finally:
            self.describe = previous

    @contextlib.contextmanager
    def finishing_steps(self):
        """Within, a stop lets the step end and be saved: the training loop asks requested() after each."""
        describe, self.describe = self.describe, None
        yield
        self.describe = describe

    def validate_unless_stopped(self, accelerator, clock, validate, folder, save=None):
        """Validation images, which take minutes at full size: one process alone stops them at once for a stop,
        drops the round's unfinished images (its folder), and calls save() (None: the step was saved already).
        Returns the signal that stopped them, 0 if none. Several processes finish them (the others wait for the
        main one at a barrier)."""
        alone = accelerator.num_processes == 1
        try:
            with clock.phase("validation"), (self.at_once_within(lambda: "") if alone else contextlib.nullcontext()):
                validate()
            return 0
        except Interrupted:
            if not (Path(folder) / "grid.png").is_file():  # written last: without it, the round is not complete
                shutil.rmtree(folder, ignore_errors=True)
            if save:
                with clock.phase("saving"):
                    save()
            return self.signum

    def requested(self, accelerator):
        """The signal to stop on, agreed by all processes so that they stop at the same step."""
        if accelerator.num_processes == 1:
            return self.signum
        import torch  # here, not at the top: stop.py answers a stop while torch itself imports

        flag = torch.tensor([self.signum], device=accelerator.device)
        return int(accelerator.reduce(flag, reduction="max").item())


STOPPED_IN = {"load": "loading the models", "class images": "making class images",
              "caches": "caching latents and prompt embeddings"}  # Clock's phases before training, in words


def stopped_before_training(args, settings, clock, script=TRAINER_SCRIPT):
    """What a stop before the first step says: where it came, what is kept, and the command that goes on."""
    where = STOPPED_IN.get(clock.current, "preparing to train")
    kept = ""
    if clock.current == "class images":
        made = len(list_images(settings.class_dir)) if Path(settings.class_dir).is_dir() else 0
        kept = (f"; {made} of {args.num_class_images} class images are made, in {settings.class_dir}: the next run "
                "makes only the rest" if made else "; no class image was made yet")
    if settings.resume_state:
        return (f"while {where}, before training resumed from {Path(settings.resume_state).name}{kept}; resume "
                f"with:\n  {resume_command(settings.command, script=script)}")
    return (f"while {where}, before training started: nothing to resume{kept}; start again with:\n  "
            f"{resume_command(settings.command, resume=False, script=script)}")


def stopped_after_training(args, settings):
    """What a stop after the last step was saved says: the run is complete, all but what finish() does."""
    step_dir = Path(settings.output_dir).resolve() / f"step{args.max_train_steps - 1}"
    if not args.push_to_hub:
        return f"after training ended: the adapters in {step_dir} are complete"
    # push_to_hub gathers what it uploads in output_dir/hub first; a stop before that is done leaves an older one
    repo_id, upload = args.hub_model_id or Path(settings.output_dir).name, step_dir
    with contextlib.suppress(OSError):
        if filecmp.cmp(step_dir.parent / "hub" / LORA_FILE, step_dir / LORA_FILE, shallow=False):
            upload = step_dir.parent / "hub"  # the adapters with their model card, as the push meant them
    return (f"after training ended: the adapters in {step_dir} are complete, but were not pushed to the Hub; push "
            f"them with: hf upload {repo_id} {upload} .")


def run_script(main):
    """A script run of main(): a user's mistake (UserError) ends in one line and exit 1; a stop (Interrupted), once
    answered, in its message and exit 130 or 143."""
    parent_command_line()  # while the launcher is alive, for the resume command
    try:
        main()
    except UserError as error:
        sys.exit(f"error: {error}")
    except Interrupted as stopped:
        for signum in (signal.SIGINT, signal.SIGTERM):  # answered: a launcher's echo must not cut the exit short
            signal.signal(signum, signal.SIG_IGN)       # (Python's own exit resets handlers, not an ignored one)
        for bar in list(getattr(tqdm, "_instances", [])):  # the stopped phase's bar ends above the message
            bar.close()
        if os.environ.get("LOCAL_RANK", "0") == "0":  # all processes stop at the same step: say it once a machine
            print(stopped, file=sys.stderr)
        sys.exit(stopped.exit_code)

