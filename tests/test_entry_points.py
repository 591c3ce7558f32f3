"""The programs start the same way from any directory: console script, script path, -m."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAMS = {
    "cifar": "lpwd-cifar",
    "sweep": "lpwd-sweep",
    "plots": "lpwd-plots",
    "zero_shot_decay": "lpwd-zero-shot",
    "study": "lpwd-study",
}


def _help(command: list[str], cwd) -> str:
    done = subprocess.run(
        [*command, "--help"], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:"), done.stdout[:500]
    return done.stdout


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_help_from_elsewhere_by_console_script_and_path(name, tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), PROGRAMS[name])
    assert os.path.exists(script), f"{PROGRAMS[name]} is not installed: pip install -e '.[test]'"
    by_script = _help([script], tmp_path)
    by_path = _help([sys.executable, os.path.join(REPO, "experiments", f"{name}.py")], tmp_path)
    # The same parser either way; only the usage block, which names the program, differs.
    assert by_script.split("\n\n", 1)[1] == by_path.split("\n\n", 1)[1]


def test_module_form_from_the_repository_root():
    _help([sys.executable, "-m", "experiments.cifar"], REPO)


def test_programs_import_under_one_name():
    code = (
        "import sys\n"
        "import lpwd_optax.experiments.cifar, lpwd_optax.experiments.study\n"
        "generic = sorted(m for m in sys.modules if m.split('.')[0] in ('models', 'experiments'))\n"
        "assert not generic, generic\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
