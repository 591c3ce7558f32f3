r"""The LPWD paper's claims tested at a fixed, reduced scale: run or resume a study, then report.

A study is a fixed protocol (`PROTOCOLS`): one model, dataset, batch size and step budget, and
six parts in priority order, so that a study stopped part-way is still useful:

  a. the strong-penalty cell (Adam, eta = 1e-3): baseline, WD, RWD, PWD, LPWD;
  b. a lambda sweep of WD vs LPWD at eta = 1e-3 (weak to strong);
  c. the base cell (eta = 1e-4, lambda = 1e-2): baseline, L2, WD, LPWD;
  d. the opposing-penalty rate R_op of WD (and RWD) over an (eta, lambda) grid of short runs;
  e. zero-shot decay of the trained baselines of part a;
  f. PWD's gain over RWD against lambda.

Every training run is one `experiments.cifar` process (flags only, so the study does not depend
on the training program's internals) in its own directory under --output_dir. Finished runs are
skipped and interrupted ones continue from their checkpoints, so the same command resumes the
study after a restart. With seeds 0..n-1 in every cell, two runs with the same seed share the
model initialization and the data order: comparisons between methods are paired by seed.

    # What would run, and how long it should take:
    lpwd-study --protocol=cpu --data=../shared/data/cifar10-jpeg.zip \
        --output_dir=~/lpwd_runs/cifar10_cpu --dry_run
    # Run (or resume) it, then write the tables and figures:
    lpwd-study --protocol=cpu --data=../shared/data/cifar10-jpeg.zip \
        --output_dir=~/lpwd_runs/cifar10_cpu --results_dir=~/lpwd_runs/cifar10_cpu/results
    # Only the report, from whatever has finished:
    lpwd-study ... --report_only

`--protocol=controls` is a second study on the same setting (experiments/controls.py): controls
for what in LPWD helps (lwd, lpwd_reversed, lpwd_shuffled, wd_matched) and the AdaDecay, WRS and
AdamP papers' claims with SGD-momentum; it reuses the first study's seeds via --reuse_from.
"""

from __future__ import annotations

if __name__ == "__main__":  # started as a script or as experiments.study: see _entry.py
    from lpwd_optax.experiments import _entry

    _entry.run(__file__)

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Everything that is fixed before a study runs."""

    name: str
    model: str
    batch_size: int
    # Training is `periods` evaluation periods of `steps_per_period` steps; each period draws its
    # batches from a fresh shuffle of the training set and ends with a full test-set evaluation.
    periods: int
    steps_per_period: int
    seeds: tuple[int, ...]
    strong_lr: float  # parts a, b, f
    strong_lambdas: tuple[float, ...]  # parts a (the last two), b and f
    paper_strong_lambda: float  # the paper's Fig. 1 lambda, one of strong_lambdas
    base_lr: float  # part c
    base_lambda: float
    rop_lrs: tuple[float, ...]  # part d
    rop_lambdas: tuple[float, ...]
    rop_periods: int
    rop_steps_per_period: int
    zero_shot_lambdas: str  # part e: lambda_s values, 100 decay steps of d = lambda_s
    extra_flags: tuple[str, ...] = ()
    seconds_per_step: float = 0.23  # measured on the reference machine, for the time estimate
    seconds_per_eval: float = 7.0

    @property
    def steps(self) -> int:
        return self.periods * self.steps_per_period


PAPER_STEPS = 9_800  # 100 epochs of CIFAR's 50,000 images at batch 512

PROTOCOLS = {
    # convnext_atto_cifar from scratch on CIFAR-10, 2,400 steps of batch 128 (6.1 epochs),
    # evaluated 15 times. lambda = 2 at eta = 1e-3 gives d * T = 4.8, the paper's strong cell
    # (0.5 over 9,800 steps: 4.9); lambda = 0.5 is the paper's own value (here d * T = 1.2).
    "cpu": Protocol(
        name="cpu",
        model="convnext_atto_cifar",
        batch_size=128,
        periods=15,
        steps_per_period=160,
        seeds=(0, 1, 2),
        strong_lr=1e-3,
        strong_lambdas=(0.05, 0.5, 2.0),
        paper_strong_lambda=0.5,
        base_lr=1e-4,
        base_lambda=1e-2,
        rop_lrs=(1e-4, 3e-4, 1e-3),
        rop_lambdas=(0.01, 0.1, 0.5, 2.0),
        rop_periods=3,
        rop_steps_per_period=100,
        zero_shot_lambdas="0,1e-3,2e-3,5e-3,1e-2,2e-2,5e-2",
    ),
    # A minute-scale version on scikit-learn's digits with a one-block model, for tests.
    "tiny": Protocol(
        name="tiny",
        model="convnext_atto_cifar",
        batch_size=64,
        periods=2,
        steps_per_period=3,
        seeds=(0, 1),
        strong_lr=1e-3,
        strong_lambdas=(0.05, 0.5),
        paper_strong_lambda=0.5,
        base_lr=1e-3,
        base_lambda=1e-2,
        rop_lrs=(1e-3,),
        rop_lambdas=(0.5,),
        rop_periods=1,
        rop_steps_per_period=3,
        zero_shot_lambdas="0,0.05",
        extra_flags=('--model_overrides={"dims": [8], "depths": [1], "kernel_size": 3}',),
        seconds_per_step=0.05,
        seconds_per_eval=1.0,
    ),
}


@dataclasses.dataclass(frozen=True)
class StudyRun:
    """One training run of a study (the protocol's model and dataset)."""

    part: str
    method: str
    lr: float
    weight_decay: float
    seed: int
    kind: str = "train"  # "train" (the full budget) or "rop" (a short R_op run)
    optimizer: str = "adam"  # adam | sgdm; the directory name says sgdm, not adam

    @property
    def name(self) -> str:
        prefix = "" if self.optimizer == "adam" else f"{self.optimizer}-"
        return f"{prefix}{self.method}-lr{self.lr:g}-wd{self.weight_decay:g}-s{self.seed}"

    @property
    def directory(self) -> str:
        """The run's directory relative to the study's runs_dir."""
        return os.path.join(self.kind, self.name)


def plan(protocol: Protocol) -> list[StudyRun]:
    """The study's training runs in priority order (parts a-d and f), each run once."""
    p = protocol

    def cell(method, lr, rate, seed, part, kind="train"):
        return StudyRun(part, method, lr, 0.0 if method == "baseline" else rate, seed, kind)

    runs: list[StudyRun] = []
    strong = [lam for lam in p.strong_lambdas if lam >= p.paper_strong_lambda]
    weak = [lam for lam in p.strong_lambdas if lam < p.paper_strong_lambda]
    for seed in p.seeds:
        runs.append(cell("baseline", p.strong_lr, 0.0, seed, "a"))
        for lam in sorted(strong, reverse=True):
            for method in ("wd", "rwd", "pwd", "lpwd"):
                runs.append(cell(method, p.strong_lr, lam, seed, "a"))
    for seed in p.seeds:
        for lam in weak:
            for method in ("wd", "lpwd"):
                runs.append(cell(method, p.strong_lr, lam, seed, "b"))
    for seed in p.seeds:
        for method in ("baseline", "l2", "wd", "lpwd"):
            runs.append(cell(method, p.base_lr, p.base_lambda, seed, "c"))
    for lr in p.rop_lrs:
        for lam in p.rop_lambdas:
            runs.append(cell("wd", lr, lam, p.seeds[0], "d", kind="rop"))
        runs.append(cell("rwd", lr, p.paper_strong_lambda, p.seeds[0], "d", kind="rop"))
    for seed in p.seeds:
        for lam in weak:
            for method in ("rwd", "pwd"):
                runs.append(cell(method, p.strong_lr, lam, seed, "f"))
    unique: dict[str, StudyRun] = {}  # a run two parts share is listed under the first
    for run in runs:
        unique.setdefault(run.directory, run)
    return list(unique.values())


def zero_shot_sources(protocol: Protocol) -> list[StudyRun]:
    """Part e's inputs: the trained baselines of part a."""
    return [r for r in plan(protocol) if r.part == "a" and r.method == "baseline"]


def run_flags(protocol: Protocol, dataset: str, run: StudyRun) -> list[str]:
    """The training program's flags for one run (output directory and resume aside)."""
    periods, steps = protocol.periods, protocol.steps_per_period
    flags = []
    if run.method == "lpwd_shuffled":  # recorded in config.json; the same for every seed
        flags.append(f"--lpwd_permutation_seed={getattr(protocol, 'permutation_seed', 0)}")
    if run.kind == "rop":
        periods, steps = protocol.rop_periods, protocol.rop_steps_per_period
        flags.append("--eval_steps=1")
    return [
        *protocol.extra_flags,
        *flags,
        f"--dataset={dataset}",
        f"--model={protocol.model}",
        f"--optimizer={run.optimizer}",
        f"--method={run.method}",
        f"--lr={run.lr!r}",
        f"--weight_decay={run.weight_decay!r}",
        f"--seed={run.seed}",
        f"--batch_size={protocol.batch_size}",
        "--eval_batch_size=1000",
        f"--epochs={periods}",
        f"--steps_per_epoch={steps}",
        "--keep_checkpoints=1",
        "--no-progress",
    ]


def launch(protocol: Protocol, dataset: str, run: StudyRun, runs_dir: str) -> tuple[int, float]:
    """Runs (or resumes) one run in its own process; (exit code, seconds). Output: log.txt."""
    run_dir = os.path.join(runs_dir, run.directory)
    os.makedirs(run_dir, exist_ok=True)
    resume = os.path.isdir(os.path.join(run_dir, "checkpoints"))
    command = [
        sys.executable,
        "-m",
        "lpwd_optax.experiments.cifar",
        *run_flags(protocol, dataset, run),
        f"--output_dir={run_dir}",
        *(["--resume"] if resume else []),
    ]
    start = time.time()
    with open(os.path.join(run_dir, "log.txt"), "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
    return code, time.time() - start


def expected_seconds(protocol: Protocol, run: StudyRun) -> float:
    if run.kind == "rop":
        return 30 + protocol.rop_periods * protocol.rop_steps_per_period * protocol.seconds_per_step
    return (
        30
        + protocol.steps * protocol.seconds_per_step
        + protocol.periods * protocol.seconds_per_eval
    )


def is_finished(runs_dir: str, run: StudyRun) -> bool:
    return os.path.exists(os.path.join(runs_dir, run.directory, "summary.json"))


def _duration(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


def describe(protocol: Protocol, dataset: str, runs: Sequence[StudyRun], runs_dir: str) -> str:
    """What will run and how long it should take, part by part."""
    p = protocol
    lines = [
        f"study '{p.name}': {p.model} on {dataset}, Adam, batch {p.batch_size}, "
        f"{p.steps} steps ({p.periods} evaluations every {p.steps_per_period} steps), "
        f"seeds {list(p.seeds)}",
    ]
    for part in "abcdf":
        todo = [r for r in runs if r.part == part and not is_finished(runs_dir, r)]
        total = [r for r in runs if r.part == part]
        seconds = sum(expected_seconds(p, r) for r in todo)
        lines.append(
            f"  part {part}: {len(total)} runs, {len(total) - len(todo)} finished, "
            f"{len(todo)} to run (about {_duration(seconds)})"
        )
    lines.append(f"  part e: zero-shot decay of {len(zero_shot_sources(p))} baselines")
    todo = [r for r in runs if not is_finished(runs_dir, r)]
    lines.append(
        f"total to run: {len(todo)} of {len(runs)} runs, about "
        f"{_duration(sum(expected_seconds(p, r) for r in todo))} at {p.seconds_per_step} s/step"
    )
    return "\n".join(lines)


def run_study(
    protocol: Protocol, dataset: str, runs: Sequence[StudyRun], runs_dir: str, parts: str
) -> int:
    """Runs every unfinished run of the selected parts in order; returns the number that failed."""
    todo = [r for r in runs if r.part in parts and not is_finished(runs_dir, r)]
    failed = 0
    for index, run in enumerate(todo, 1):
        start = time.time()
        code, seconds = launch(protocol, dataset, run, runs_dir)
        left = sum(expected_seconds(protocol, r) for r in todo[index:])
        status = "ok" if code == 0 else f"FAILED (exit {code}, see its log.txt)"
        summary = _summary(runs_dir, run) if code == 0 else None
        result = f", best-10 {summary['best10_mean']:.2f}" if summary else ""
        print(
            f"[{index}/{len(todo)}] part {run.part} {run.name}: {status} in "
            f"{_duration(seconds)}{result}; about {_duration(left)} left "
            f"({time.strftime('%H:%M', time.localtime(start))} start)",
            flush=True,
        )
        failed += code != 0
    if "e" in parts:
        failed += run_zero_shot(protocol, dataset, runs_dir)
    return failed


def run_zero_shot(protocol: Protocol, dataset: str, runs_dir: str) -> int:
    """Part e: zero-shot decay of each finished baseline; returns the number that failed."""
    failed = 0
    for run in zero_shot_sources(protocol):
        run_dir = os.path.join(runs_dir, run.directory)
        output = os.path.join(run_dir, "zero_shot_decay.json")
        if os.path.exists(output) or not is_finished(runs_dir, run):
            continue
        command = [
            sys.executable,
            "-m",
            "lpwd_optax.experiments.zero_shot_decay",
            f"--run_dir={run_dir}",
            f"--lambdas={protocol.zero_shot_lambdas}",
        ]
        with open(os.path.join(run_dir, "zero_shot_log.txt"), "a") as log:
            code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
        print(f"part e {run.name}: zero-shot decay {'ok' if code == 0 else 'FAILED'}")
        failed += code != 0
    return failed


def _summary(runs_dir: str, run: StudyRun) -> dict[str, Any] | None:
    path = os.path.join(runs_dir, run.directory, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--protocol",
        default="cpu",
        choices=sorted([*PROTOCOLS, *_controls_protocols(), *ENGINE_PROTOCOLS]),
        help="cpu: the LPWD paper's claims (parts a-f); controls: what in LPWD helps, and the "
        "AdaDecay, WRS and AdamP papers' claims (experiments/controls.py; parts p, g1, h, g2, "
        "g3); tiny, controls_tiny: minute-scale versions for tests.",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="CIFAR-10 as an image folder or zip (e.g. ../shared/data/cifar10-jpeg.zip); "
        "default: the 'cifar10' dataset of tensorflow-datasets ('digits' for --protocol=tiny).",
    )
    parser.add_argument(
        "--output_dir", required=True, help="Where the runs go (outside the repository)."
    )
    parser.add_argument(
        "--results_dir",
        default=None,
        help="Where the tables and figures go; default output_dir/results.",
    )
    parser.add_argument(
        "--parts",
        default=None,
        help="Which parts to run, e.g. 'ab' (default all: abcdef); for the controls protocol a "
        "comma-separated list, e.g. 'p,g1'.",
    )
    parser.add_argument(
        "--reuse_from",
        default=None,
        help="controls: the first study's runs.jsonl (experiments/results/cifar10_cpu/), whose "
        "seeds the protocol reuses instead of training them again.",
    )
    parser.add_argument(
        "--restore_from",
        default=None,
        help="controls: a controls report's runs.jsonl (e.g. the committed "
        "experiments/results/cifar10_cpu_controls/runs.jsonl); its trained runs missing from "
        "--output_dir are written back as finished, so a study survives the loss of its runs "
        "directory.",
    )
    parser.add_argument("--dry_run", action="store_true", help="Print the plan and exit.")
    parser.add_argument(
        "--report_only", action="store_true", help="Only write the report from finished runs."
    )
    parser.add_argument("--no_report", action="store_true", help="Run, but write no report.")
    return parser


def dataset_name(protocol: Any, data: str | None) -> str:
    if data is None:
        return "digits" if protocol.name.endswith("tiny") else "cifar10"
    return f"folder:{os.path.abspath(os.path.expanduser(data))}"


def _controls_protocols() -> dict[str, Any]:
    from lpwd_optax.experiments import controls

    return controls.PROTOCOLS


# Protocols run by the study engine (experiments/engine.py), one module each under protocols/.
ENGINE_PROTOCOLS = ("regimes",)


def _main_engine(args: argparse.Namespace) -> int:
    import importlib

    from lpwd_optax.experiments import engine

    protocol = importlib.import_module(f"lpwd_optax.experiments.protocols.{args.protocol}")
    dataset = dataset_name(protocol, args.data)
    runs_dir = os.path.abspath(os.path.expanduser(args.output_dir))
    parts = args.parts.split(",") if args.parts else None
    runs = protocol.plan(dataset, runs_dir)
    todo = engine.pending(runs, runs_dir)
    print(
        f"study '{args.protocol}': {len(runs)} runs planned so far, "
        f"{sum(engine.is_finished(runs_dir, r) for r in runs)} finished, {len(todo)} to run",
        flush=True,
    )
    for run in runs:
        state = "finished" if engine.is_finished(runs_dir, run) else "to run"
        print(f"  {run.part:<10} {run.name:<50} {state}", flush=True)
    if args.dry_run or args.report_only:
        return 0
    os.makedirs(runs_dir, exist_ok=True)
    return 1 if engine.run_all(protocol.plan, dataset, runs_dir, parts) else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.protocol in ENGINE_PROTOCOLS:
        return _main_engine(args)
    if args.protocol in _controls_protocols():
        return _main_controls(args)
    protocol = PROTOCOLS[args.protocol]
    args.parts = args.parts or "abcdef"
    dataset = dataset_name(protocol, args.data)
    runs_dir = os.path.abspath(os.path.expanduser(args.output_dir))
    results_dir = os.path.expanduser(args.results_dir or os.path.join(runs_dir, "results"))
    runs = plan(protocol)
    print(describe(protocol, dataset, runs, runs_dir), flush=True)
    if args.dry_run:
        return 0
    failed = 0
    if not args.report_only:
        os.makedirs(runs_dir, exist_ok=True)
        failed = run_study(protocol, dataset, runs, runs_dir, args.parts)
    if args.no_report:
        return 1 if failed else 0
    from lpwd_optax.experiments import study_report  # matplotlib only when reporting

    study_report.write_report(protocol, dataset, runs, runs_dir, results_dir)
    print(f"wrote the report to {results_dir}")
    return 1 if failed else 0


def _main_controls(args: argparse.Namespace) -> int:
    from lpwd_optax.experiments import controls

    protocol = controls.PROTOCOLS[args.protocol]
    dataset = dataset_name(protocol, args.data)
    runs_dir = os.path.abspath(os.path.expanduser(args.output_dir))
    results_dir = os.path.expanduser(args.results_dir or os.path.join(runs_dir, "results"))
    parts = args.parts.split(",") if args.parts else None
    if args.restore_from and not args.dry_run:
        os.makedirs(runs_dir, exist_ok=True)
        try:
            restored = controls.restore(protocol, runs_dir, args.restore_from)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
        print(f"restored {restored} finished runs from {args.restore_from}", flush=True)
    if args.report_only and args.reuse_from and not args.dry_run:
        # A study that runs writes the reused records first; a report alone needs them too.
        os.makedirs(runs_dir, exist_ok=True)
        try:
            controls.materialize_reused(
                protocol, controls.plan(protocol, runs_dir), runs_dir, args.reuse_from
            )
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
    print(controls.describe(protocol, dataset, controls.plan(protocol, runs_dir), runs_dir))
    if args.dry_run:
        return 0
    failed = 0
    if not args.report_only:
        os.makedirs(runs_dir, exist_ok=True)
        try:
            failed = controls.run_study(protocol, dataset, runs_dir, parts, args.reuse_from)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
    if args.no_report:
        return 1 if failed else 0
    from lpwd_optax.experiments import controls_report

    controls_report.write_report(protocol, dataset, runs_dir, results_dir)
    print(f"wrote the report to {results_dir}")
    return 1 if failed else 0
