"""Every package of the repository is in pyproject.toml's list, so a built wheel imports."""

from __future__ import annotations

import os
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
