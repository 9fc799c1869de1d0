"""Shared fixtures: one tiny SSD-1B-shaped model per test run, the demo photos, one trained run and one DoRA run;
and the offline demo, run beside the suite from its start."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dreambooth_kit.messages import quiet_library_notices

quiet_library_notices()  # before the libraries import: their notices about nothing the tests did stay out of the log
from make_tiny_ssd1b import make_tiny_ssd1b  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO_PHOTOS = ROOT / "examples" / "dog"
OFFLINE_DEMO_TEST = "test_offline_demo_runs_as_written"
# the tests that read the demo's finished run: either one, collected, starts it
OFFLINE_DEMO_READERS = (OFFLINE_DEMO_TEST, "test_evaluate_py_scores_the_offline_demo_run_offline_as_documented")
BESIDE = {}  # the offline demo's process and work folder, while the session runs


# The offline demo (tests/test_examples.py) is the suite's longest test, a minute or more, and shares nothing with
# the others: when it is collected, it starts as collection ends, on one thread beside the tests before it (which
# mostly wait on one core: imports, subprocesses, small models), and its test waits for it and checks it.
# Under pytest-xdist (-n 2) the controller starts it once, when a worker reports it collected, and owns it; the
# worker that runs its test finds its folder in workerinput and waits for the return code the run writes last.
def pytest_collection_finish(session):
    worker = hasattr(session.config, "workerinput")  # under xdist, the controller starts it
    if not worker and any(item.name in OFFLINE_DEMO_READERS for item in session.items):
        start_offline_demo()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    node.workerinput["offline_demo"] = str(demo_folder())


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    if "process" not in BESIDE and any(i.split("::")[-1] in OFFLINE_DEMO_READERS for i in ids):
        start_offline_demo()


# The files whose fixtures train the longest (test_world.py's four runs take about 3 minutes), started first: at the
# end, in name order, one of them would keep a worker busy for minutes while the other has nothing left to run
LONGEST_FIRST = ["test_world.py", "test_evaluate.py", "test_resume.py", "test_options.py", "test_outputs.py"]


def pytest_collection_modifyitems(session, config, items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: within a file, and among the rest, the order stays


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under -n 2, each test file runs whole on one worker: a file's module fixtures (test_world.py's four trained
    runs, test_adapters.py's trained run, ...) are then built once, not once on each worker that gets one of its
    tests."""
    from xdist.scheduler import LoadScopeScheduling

    return LoadScopeScheduling(config, log)


def pytest_configure(config):
    if hasattr(config, "workerinput") and "offline_demo" in config.workerinput:
        BESIDE["found"] = Path(config.workerinput["offline_demo"])


def demo_folder():
    """The demo's work folder, made once by the process that owns the demo."""
    if "work" not in BESIDE:
        BESIDE["work"] = Path(tempfile.mkdtemp(prefix="offline_demo_"))
    return BESIDE["work"]


def start_offline_demo():
    """The demo in its own folder, in its own process group (so it ends whole); returncode is written last."""
    work = demo_folder()
    # the script calls `python` and `accelerate` from PATH: make them this interpreter's, not whatever is first
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
           "OMP_NUM_THREADS": "1"}
    command = ["bash", "-c", 'bash "$0" "$1"; echo $? > "$2.tmp" && mv "$2.tmp" "$2"',
               str(ROOT / "examples" / "offline_demo.sh"), str(work / "demo"), str(work / "returncode")]
    with open(work / "stdout", "w") as stdout, open(work / "stderr", "w") as stderr:
        BESIDE["process"] = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env, start_new_session=True)


def pytest_sessionfinish(session):
    if "process" in BESIDE:
        if BESIDE["process"].poll() is None:  # the session stopped before the demo's test
            os.killpg(BESIDE["process"].pid, signal.SIGKILL)
        BESIDE["process"].wait()
    if "work" in BESIDE:  # only where it was made: the controller, or a run without xdist
        shutil.rmtree(BESIDE["work"], ignore_errors=True)


def offline_demo(timeout=600):
    """The offline demo's finished run, started as collection ended: (returncode, stdout, stderr, its work folder)."""
    work = BESIDE.get("found") or BESIDE["work"]
    deadline = time.monotonic() + timeout
    while not (work / "returncode").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the offline demo did not finish in {timeout} s: see {work}")
        time.sleep(0.5)
    returncode = int((work / "returncode").read_text())
    return returncode, (work / "stdout").read_text(), (work / "stderr").read_text(), work / "demo"


def reset_accelerate():
    """Forget accelerate's process-wide state, so the next Accelerator is made from its own arguments."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_trainer(*argv):
    """The trainer's main() in this process, with accelerate's process-wide state reset between runs."""
    import train_dreambooth_lora_ssd1b as trainer

    reset_accelerate()
    trainer.main([str(a) for a in with_flags([], *argv)])


def check_inputs(argv):
    """Parse and check as main() does, up to the point where models would load: (photos, prompts, settings)."""
    import train_dreambooth_lora_ssd1b as trainer

    argv = [str(a) for a in argv]
    args = trainer.parse_args(argv)
    return trainer.check_inputs(args, trainer.derive_settings(args, argv))


def with_flags(argv, *extra):
    """argv with the extra flags: a flag argv (or an earlier extra) already has takes the new value, as a test
    that changes one flag means (the trainer refuses a flag given twice)."""
    argv, extra = list(argv), list(extra)
    while extra:
        flag = extra.pop(0)
        value = [extra.pop(0)] if extra and not str(extra[0]).startswith("--") else []
        if flag in argv and value:
            argv[argv.index(flag) + 1] = value[0]
        elif flag not in argv:
            argv += [flag, *value]
    return argv


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_tiny_ssd1b(tmp_path_factory.mktemp("tiny") / "ssd1b")


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos") / "dog"
    shutil.copytree(DEMO_PHOTOS, folder)
    return folder


def tiny_args(tiny_model, photos, output_dir, *extra):
    """Flags for a fast run on the tiny model: 64x64 pixels, plain AdamW, no tensorboard."""
    return with_flags(["--pretrained_model_name_or_path", tiny_model,
                       "--pretrained_vae_model_name_or_path", Path(tiny_model) / "vae",
                       "--instance_dir", photos, "--instance_prompt", "a photo of sks dog",
                       "--resolution", 64, "--output_dir", output_dir, "--report_to", "none"], *extra)


@pytest.fixture(scope="session")
def trained_run(tiny_model, photos, tmp_path_factory):
    """A 4-step run with prior preservation and both text encoders trained; rank 4 with alpha 8.

    The learning rate is high so the adapters visibly change outputs after so few steps.
    """
    output_dir = tmp_path_factory.mktemp("run") / "out"
    run_trainer(*tiny_args(tiny_model, photos, output_dir,
                           "--with_prior_preservation", "--class_prompt", "a photo of dog", "--num_class_images", 3,
                           "--train_text_encoder", "--text_encoder_lr", 1e-2, "--learning_rate", 1e-2,
                           "--rank", 4, "--lora_alpha", 8, "--max_train_steps", 4, "--checkpointing_steps", 2,
                           "--optimizer", "adamw", "--random_flip"))
    return output_dir


DORA_VALIDATION = ["--validation_prompt", "a photo of sks dog in a bucket", "--num_validation_images", 1,
                   "--validation_inference_steps", 2]


def dora_args(tiny_model, photos, output_dir, *extra):
    """The DoRA run's flags, validation aside: DoRA on the UNet and both text encoders, rank 4 with alpha 8."""
    return tiny_args(tiny_model, photos, output_dir, "--use_dora", "--train_text_encoder", "--text_encoder_lr", 1e-2,
                     "--learning_rate", 1e-2, "--rank", 4, "--lora_alpha", 8, "--optimizer", "adamw", *extra)


@pytest.fixture(scope="session")
def dora_run(tiny_model, photos, tmp_path_factory):
    """A 2-step DoRA run that validates at its end: validation/step1/seed0.png is the trained model's own render.

    The learning rate is high so the adapters visibly change outputs after so few steps.
    """
    output_dir = tmp_path_factory.mktemp("dora") / "out"
    run_trainer(*dora_args(tiny_model, photos, output_dir, "--max_train_steps", 2, *DORA_VALIDATION))
    return output_dir
