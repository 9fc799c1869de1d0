# Sourced by .ci/run, .ci/lowest and .ci/latest. Each script works in a venv of its own under the repo root, so
# nothing is installed into whatever python is first on PATH. Needs python 3.11 (the CPU torch wheel on the CI
# machine is cp311); set PYTHON to pick another interpreter.

# ci_venv DIR [fresh]: make DIR a working venv (anew with "fresh"; otherwise reuse it if it runs, remake it if it
# does not), then activate it: tests and examples/offline_demo.sh run `python` and `accelerate` from PATH.
ci_venv() {
    local dir=$1
    if [[ ${2:-} == fresh ]] || ! "$dir/bin/python" -m pip --version >/dev/null 2>&1; then
        rm -rf "$dir"
        "${PYTHON:-python3}" -m venv "$dir"
    fi
    export VIRTUAL_ENV=$PWD/$dir
    export PATH=$VIRTUAL_ENV/bin:$PATH
    hash -r
    PY=$VIRTUAL_ENV/bin/python
}

# torch first and pinned: the CI machine has this version's CPU wheel on disk, and an unpinned or ranged torch
# would make pip download GBs of CUDA packages. Elsewhere: pip install torch --index-url https://download.pytorch.org/whl/cpu
# Later installs that name torch (requirements.txt does) get "$CI_TORCH" too, so they cannot move it.
CI_TORCH=torch==2.13.0
ci_install_torch() {
    "$PY" -m pip install --quiet "$CI_TORCH"
}

# The versions this run tests, and the seconds the script has taken so far (venv and installs), for the log.
ci_print_versions() {
    echo "venv and installs: ${SECONDS}s"
    "$PY" -I - <<'PY'  # -I: not the current folder's dreambooth_kit/, the one the venv imports from anywhere
import platform
from importlib.metadata import PackageNotFoundError, version
names = ["torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "huggingface_hub",
         "safetensors", "tokenizers", "numpy", "pillow", "matplotlib", "pytest", "pytest-xdist"]
def v(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return "missing"
print("python " + platform.python_version() + ", " + ", ".join(f"{n} {v(n)}" for n in names), flush=True)
import importlib.util  # the package the scripts import: this checkout's (editable), or the run tests another copy
spec = importlib.util.find_spec("dreambooth_kit")
print("dreambooth_kit from " + (spec.submodule_search_locations[0] if spec else "nowhere: not installed"), flush=True)
PY
}
