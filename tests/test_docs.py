"""README.md is a front door and docs/ holds one topic per page: the first screen has what a new user types, every
page is linked and every link lands, and no user page carries a commit hash, a date or a machine timing."""

import re

import pytest

from conftest import ROOT

USER_DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def first_screen():
    return "\n".join((ROOT / "README.md").read_text().splitlines()[:60])


@pytest.mark.parametrize("command", [
    "pip install torch --index-url https://download.pytorch.org/whl/cpu",
    "pip install -r requirements.txt",
    "bash examples/offline_demo.sh",
    "](examples/tiny_world_before_after.png)",
    "pip install -r requirements-dev.txt",
    "python -m pytest -q -n 2",
    "accelerate launch train_dreambooth_lora_ssd1b.py --instance_dir ",
    "python infer.py --checkpoint ",
    "To change X, edit Y",
])
def test_the_readmes_first_screen_holds_what_a_new_user_types(command):
    assert command in first_screen()


def links(page):
    """The relative targets of the page's markdown links and images, without their #anchors."""
    return [target.split("#")[0] for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text())
            if not target.startswith(("http://", "https://", "#"))]


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / target).resolve() for target in links(ROOT / "README.md")}
    assert [page.name for page in USER_DOCS[1:] if page.resolve() not in linked] == []


@pytest.mark.parametrize("page", USER_DOCS, ids=lambda page: page.name)
def test_every_link_in_the_user_docs_lands_on_a_file(page):
    assert [target for target in links(page) if not (page.parent / target).exists()] == []


# a 7-40 digit hex word with a digit and a letter in it, a date, or a time measured on some machine ("48 s on
# this machine", "11 min 26 s"); floors and targets ("at least 22 ms per step on an H100") are no measurement
DATED = re.compile(r"\b(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b|\b20\d\d-\d\d-\d\d\b"
                   r"|\b\d+(\.\d+)? ?(ms|s|min) on (this|a|the)\b|\b\d+ min \d+ s\b|\d+(-\d+)? ms/step")


@pytest.mark.parametrize("page", USER_DOCS, ids=lambda page: page.name)
def test_user_docs_carry_no_commit_hash_date_or_machine_timing(page):
    found = [match.group(0) for match in DATED.finditer(page.read_text())]
    assert found == [], "measured numbers go to benchmarks/RESULTS.md, with their machine, settings and date"


def launched_argv(page):
    """The trainer's argv in the page's first `accelerate launch train_dreambooth_lora_ssd1b.py` command."""
    import shlex

    text = page.read_text().replace("\\\n", " ")
    command = "accelerate launch train_dreambooth_lora_ssd1b.py"
    line = next(line for line in text.splitlines() if line.startswith(command))
    return shlex.split(line)[3:]


def test_the_short_launch_command_trains_the_reference_recipe_by_its_defaults(monkeypatch, tmp_path):
    import train_dreambooth_lora_ssd1b as trainer
    from dreambooth_kit import checks
    from test_examples import dog_recipe_argv

    monkeypatch.setattr(checks, "has_accelerator", lambda: True)  # the recipe's fp16 is for a GPU, which CI lacks
    short = vars(trainer.parse_args(launched_argv(ROOT / "docs" / "training.md")))
    assert short == vars(trainer.parse_args(dog_recipe_argv(tmp_path)))
    readme = vars(trainer.parse_args(launched_argv(ROOT / "README.md")))
    assert {k: v for k, v in readme.items() if k != "instance_dir"} == {k: v for k, v in short.items()
                                                                         if k != "instance_dir"}
