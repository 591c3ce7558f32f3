"""Every package of the repository is in pyproject.toml's list, so a built wheel imports; the
library needs none of the extras, and the parts that do name the extra to install."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_package_directory_is_installed():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    roots = {"lpwd_optax": "lpwd_optax", **setuptools["package-dir"]}
    found = set()
    for package, folder in roots.items():
        for directory, _, files in os.walk(os.path.join(ROOT, folder)):
            if "__init__.py" in files and "__pycache__" not in directory:
                relative = os.path.relpath(directory, os.path.join(ROOT, folder))
                parts = [] if relative == "." else relative.split(os.sep)
                found.add(".".join([package, *parts]))
    assert found == listed, f"missing from pyproject: {found - listed}, extra: {listed - found}"


# Imports each module with flax and orbax hidden, as an install without the extras would.
_WITHOUT_EXTRAS = """
import sys
sys.modules["flax"] = None
sys.modules["orbax"] = None
for name in ("lpwd_optax.models", "lpwd_optax.experiments.cifar"):
    try:
        __import__(name)
    except ImportError as e:
        print(e)
import lpwd_optax
print("lpwd_optax", len(lpwd_optax.__all__))
"""


def test_without_the_extras_the_library_imports_and_the_rest_says_what_to_install():
    proc = subprocess.run(
        [sys.executable, "-c", _WITHOUT_EXTRAS], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == (
        "lpwd_optax.models needs flax, which is not installed: pip install 'lpwd_optax[models]'"
    )
    assert lines[1] == (
        "lpwd_optax.experiments needs flax, orbax-checkpoint, which are not installed: "
        "pip install 'lpwd_optax[experiments]'"
    )
    assert lines[2].startswith("lpwd_optax ") and int(lines[2].split()[1]) > 20
