"""Run a program of this folder under its one installed name, however it was started.

`python experiments/cifar.py` runs the file as `__main__` with experiments/ first on
`sys.path`, and `python -m experiments.cifar` (from the repository root) imports it as the
top-level package `experiments`; both would otherwise define the program's classes a second time
beside `lpwd_optax.experiments.cifar`. Each program calls `run` before anything else, which
imports the program as `lpwd_optax.experiments.<name>` and runs its `main`.
"""

from __future__ import annotations

import importlib
import os
import sys


def run(program_file: str) -> None:
    """Runs `lpwd_optax.experiments.<stem of program_file>.main()` and exits with its status."""
    folder = os.path.dirname(os.path.abspath(program_file))
    # A script's folder on sys.path would make its sibling modules (data, config, ...) importable
    # under generic top-level names.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != folder]
    name = os.path.splitext(os.path.basename(program_file))[0]
    program = importlib.import_module(f"lpwd_optax.experiments.{name}")
    sys.exit(program.main())
