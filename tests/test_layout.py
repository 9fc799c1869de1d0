"""The layout users rely on: the package installs with pip, a copied trainer runs in a folder of its own, importing a
script runs nothing, --help answers before the libraries import, and imports go one way (scripts -> package)."""

import ast
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import ROOT, tiny_args
from dreambooth_kit import artifacts

SCRIPTS = ["train_dreambooth_lora_ssd1b", "infer", "evaluate"]
LIBRARIES = ["torch", "diffusers", "transformers", "peft", "accelerate"]


def requirement_lines(path):
    """The requirements a pip requirements file names, comments and pip options (-r, -e) left out."""
    lines = [re.sub(r"#.*", "", line).replace(" ", "") for line in path.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("-")]


def test_pyproject_depends_on_what_requirements_txt_lists():
    tomllib = pytest.importorskip("tomllib", reason="python 3.11's toml reader")
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert [d.replace(" ", "") for d in dependencies] == requirement_lines(ROOT / "requirements.txt"), (
        "pyproject.toml's dependencies and requirements.txt drifted apart: make them the same list")


def test_installing_requirements_txt_installs_the_package_editable():
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert "-e ." in lines, "the README's `pip install -r requirements.txt` gives the user the package"


def python(code, cwd, **env):
    """`python -c code` in a fresh interpreter, with nothing on its path but what `cwd` and `env` add."""
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**base, "OMP_NUM_THREADS": "1", **env})


def test_a_package_installed_without_the_scripts_beside_it_names_them_by_their_bare_names(tmp_path):
    # what `pip install .` makes: the package alone in site-packages, the scripts wherever the user keeps them
    site = tmp_path / "site-packages"
    shutil.copytree(ROOT / "dreambooth_kit", site / "dreambooth_kit", ignore=shutil.ignore_patterns("__pycache__"))
    code = ("from dreambooth_kit import artifacts, model_card; "
            "print(artifacts.TRAINER_SCRIPT, artifacts.INFER_SCRIPT, model_card.infer_command('/r/step3', 'a dog'), "
            "sep='\\n')")
    result = python(code, cwd=tmp_path, PYTHONPATH=str(site))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["train_dreambooth_lora_ssd1b.py", "infer.py",
                                          "python infer.py --checkpoint /r/step3 --prompt 'a dog'"]


def test_the_package_in_this_checkout_names_the_scripts_beside_it():
    assert (artifacts.TRAINER_SCRIPT, artifacts.INFER_SCRIPT) == (ROOT / "train_dreambooth_lora_ssd1b.py",
                                                                   ROOT / "infer.py")


# Run in a fresh interpreter from the checkout, with matplotlib unavailable and a flag the scripts would refuse in
# sys.argv (so parsing at import would exit): what importing one script changed in the process. A filter that the
# project's own code adds is caught however it is added; libraries' own filters are theirs.
IMPORT_PROBE = """
import gc, importlib, json, logging, signal, sys
sys.modules["matplotlib"] = None
sys.argv = ["{name}.py", "--no_such_flag"]

def filters():
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    owners = [o for logger in loggers if isinstance(logger, logging.Logger) for o in [logger, *logger.handlers]]
    # ours only: diffusers puts its own rank-zero filter on each of its loggers as they are made
    return {{(repr(owner), module) for owner in owners for f in owner.filters
             for module in [getattr(f, "__module__", None) or type(f).__module__]
             if module.split(".")[0] in ("dreambooth_kit", "{name}", "__main__")}}

def handlers():
    return {{s.name: repr(signal.getsignal(s)) for s in signal.Signals if s not in (signal.SIGKILL, signal.SIGSTOP)}}

before = filters(), handlers()
try:
    importlib.import_module("{name}")
except SystemExit as exit:
    print(json.dumps({{"exit": repr(exit.code)}}))
    raise SystemExit(0)
after = filters(), handlers()
print(json.dumps({{"exit": None, "gc_freeze_count": gc.get_freeze_count(),
                  "new_filters": sorted(map(str, after[0] - before[0])),
                  "new_handlers": {{k: v for k, v in after[1].items() if before[1][k] != v}}}}))
"""


@pytest.mark.parametrize("name", SCRIPTS)
def test_importing_a_script_runs_nothing(name):
    result = python(IMPORT_PROBE.format(name=name), cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    probe = json.loads(result.stdout.splitlines()[-1])
    assert probe == {"exit": None, "gc_freeze_count": 0, "new_filters": [], "new_handlers": {}}, (
        "importing runs nothing: no exit, no argument parsing, no gc.freeze(), no log filter, no signal handler")


def imported_names(path):
    """The top-level module names a Python file imports (relative imports left out)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_package_imports_no_script():
    for path in sorted((ROOT / "dreambooth_kit").glob("*.py")):
        assert not imported_names(path) & set(SCRIPTS), f"{path.name} imports a script"


@pytest.mark.parametrize("name", ["train_dreambooth_lora_ssd1b", "infer", "evaluate"])
def test_no_script_imports_another(name):
    assert not imported_names(ROOT / f"{name}.py") & (set(SCRIPTS) - {name})


# The script run as `python script --help` would run it, with what had imported when it answered.
HELP_PROBE = """
import json, runpy, sys
sys.argv = ["{name}.py", "--help"]
try:
    runpy.run_path("{name}.py", run_name="__main__")
    code = "no exit"
except SystemExit as exit:
    code = exit.code
print(json.dumps({{"exit": code, "imported": [m for m in {libraries} if m in sys.modules]}}))
"""


@pytest.mark.parametrize("name", ["train_dreambooth_lora_ssd1b", "infer", "evaluate"])
def test_help_answers_before_the_libraries_import(name):
    result = python(HELP_PROBE.format(name=name, libraries=LIBRARIES), cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "usage:" in result.stdout
    assert json.loads(result.stdout.splitlines()[-1]) == {"exit": 0, "imported": []}, (
        "--help answers at once: before torch, diffusers, transformers, peft or accelerate import")


def test_a_copy_of_the_trainer_in_a_folder_of_its_own_trains(tiny_model, photos, tmp_path):
    # after the README's install the package is importable from anywhere; the copy has no checkout beside it
    work = tmp_path / "my_trainer"
    work.mkdir()
    found = python("import dreambooth_kit; print(dreambooth_kit.__path__[0])", cwd=work)
    assert found.returncode == 0 and found.stdout.strip() == str(ROOT / "dreambooth_kit"), (
        f"{sys.executable} does not import this checkout's dreambooth_kit from another folder "
        f"({found.stdout.strip() or found.stderr.strip().splitlines()[-1]}): "
        "run `pip install -r requirements.txt` (its `-e .` line) or `pip install -e .` in the checkout")
    shutil.copy(ROOT / "train_dreambooth_lora_ssd1b.py", work / "train.py")
    flags = tiny_args(tiny_model, photos, work / "out", "--max_train_steps", 2)
    result = subprocess.run([sys.executable, "train.py", *map(str, flags)], cwd=work, capture_output=True, text=True,
                            timeout=300, env={**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                                              "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    weights = load_file(work / "out" / "step1" / artifacts.LORA_FILE)
    assert weights, "the copy wrote its adapters"
