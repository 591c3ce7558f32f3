"""The study engine: a protocol is a plan of runs; one runner trains them, resumably.

A run is one process of the training program (`experiments.cifar`) with fixed flags, in its own
directory under the study's runs directory. A protocol's `plan(dataset, runs_dir)` lists every
run in priority order; it may read finished runs (a pilot's choice, a pretrained checkpoint), so
the runner plans again after each run. A run is finished when its directory holds summary.json;
one that was stopped continues from its checkpoints (`--resume`); one whose loss stopped being
finite is not run again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

DIVERGED = "non-finite loss or gradients"  # the training program's message when it stops


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of a study.

    Attributes:
      part: the protocol's part the run belongs to (runs are selected by part).
      name: its directory relative to the runs directory, e.g. "pilot/r2-wd-lr0.001-wd0.05-s0".
      flags: the training program's flags, without --output_dir and --resume.
      facts: what the report groups and pairs by (regime, method, lr, weight_decay, seed, ...).
      needs: names of runs that must have finished first (a pretrained checkpoint).
    """

    part: str
    name: str
    flags: tuple[str, ...]
    facts: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False, compare=False)
    needs: tuple[str, ...] = ()


Plan = Callable[[str, str], list[Run]]  # (dataset, runs_dir) -> runs in priority order


def summary(runs_dir: str, run: Run | str) -> dict[str, Any] | None:
    """The run's summary.json, or None while it has not finished."""
    name = run if isinstance(run, str) else run.name
    path = os.path.join(runs_dir, name, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def is_finished(runs_dir: str, run: Run | str) -> bool:
    """Its summary.json exists and, for a Run, covers the epochs its flags ask for (a run
    planned again with more --epochs continues from its last checkpoint)."""
    if isinstance(run, str):
        return os.path.exists(os.path.join(runs_dir, run, "summary.json"))
    done = summary(runs_dir, run)
    epochs = [int(f.split("=", 1)[1]) for f in run.flags if f.startswith("--epochs=")]
    return done is not None and (not epochs or done.get("epochs", 0) >= epochs[-1])


def has_diverged(runs_dir: str, run: Run) -> bool:
    """The run stopped because its loss or gradients stopped being finite (its log.txt says
    so); resuming it would only repeat that."""
    if is_finished(runs_dir, run):
        return False
    path = os.path.join(runs_dir, run.name, "log.txt")
    if not os.path.exists(path):
        return False
    with open(path, errors="replace") as f:
        return DIVERGED in f.read()


def launch(run: Run, runs_dir: str) -> tuple[int, float]:
    """Runs (or resumes) one run in its own process; (exit code, seconds). Output: log.txt."""
    run_dir = os.path.join(runs_dir, run.name)
    os.makedirs(run_dir, exist_ok=True)
    resume = os.path.isdir(os.path.join(run_dir, "checkpoints"))
    command = [
        sys.executable,
        "-m",
        "lpwd_optax.experiments.cifar",
        *run.flags,
        f"--output_dir={run_dir}",
        *(["--resume"] if resume else []),
    ]
    start = time.time()
    with open(os.path.join(run_dir, "log.txt"), "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
    return code, time.time() - start


def duration(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


def pending(runs: Sequence[Run], runs_dir: str, failed: set[str] = frozenset()) -> list[Run]:
    """The runs still to train, in plan order: not finished, not diverged, not failed here,
    and every run they need finished."""
    return [
        r
        for r in runs
        if not is_finished(runs_dir, r)
        and not has_diverged(runs_dir, r)
        and r.name not in failed
        and all(is_finished(runs_dir, n) for n in r.needs)
    ]


def run_all(
    plan: Plan,
    dataset: str,
    runs_dir: str,
    parts: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> int:
    """Trains every pending run of the selected parts, planning again after each run; returns
    the number that failed."""
    log = log or (lambda line: print(line, flush=True))
    failed: set[str] = set()
    done = 0
    while True:
        runs = [r for r in plan(dataset, runs_dir) if parts is None or r.part in parts]
        todo = pending(runs, runs_dir, failed)
        if not todo:
            return len(failed)
        run = todo[0]
        start = time.time()
        code, seconds = launch(run, runs_dir)
        done += 1
        result = summary(runs_dir, run) if code == 0 else None
        best = f", best-10 {result['best10_mean']:.2f}" if result else ""
        status = "ok" if code == 0 else f"FAILED (exit {code}, see its log.txt)"
        log(
            f"[{done}, {len(todo) - 1} left] part {run.part} {run.name}: {status} in "
            f"{duration(seconds)}{best} ({time.strftime('%H:%M', time.localtime(start))} start)"
        )
        if code != 0:
            failed.add(run.name)
