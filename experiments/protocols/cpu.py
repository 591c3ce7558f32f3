"""Results I: the LPWD paper's claims tested at a fixed, reduced scale (`--protocol=cpu`).

One model, dataset, batch size and step budget (`Setting`), and six parts in priority order, so
that a study stopped part-way is still useful:

  a. the strong-penalty cell (Adam, eta = 1e-3): baseline, WD, RWD, PWD, LPWD;
  b. a lambda sweep of WD vs LPWD at eta = 1e-3 (weak to strong);
  c. the base cell (eta = 1e-4, lambda = 1e-2): baseline, L2, WD, LPWD;
  d. the opposing-penalty rate R_op of WD (and RWD) over an (eta, lambda) grid of short runs;
  f. PWD's gain over RWD against lambda;
  e. zero-shot decay of the trained baselines of part a (`experiments.zero_shot_decay`).

With seeds 0..n-1 in every cell, two runs with the same seed share the model initialization
and the data order: comparisons between methods are paired by seed. The protocol and its
verdict rules: experiments/results/cifar10_cpu/README.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import defaultdict
from typing import Any

from lpwd_optax.experiments import engine, stats
from lpwd_optax.experiments.report import (
    Bars,
    Comparison,
    Curves,
    Grid,
    Lines,
    Points,
    Table,
    compare,
    per_run,
)


@dataclasses.dataclass(frozen=True)
class Setting:
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

CPU = Setting(
    # convnext_atto_cifar from scratch on CIFAR-10, 2,400 steps of batch 128 (6.1 epochs),
    # evaluated 15 times. lambda = 2 at eta = 1e-3 gives d * T = 4.8, the paper's strong cell
    # (0.5 over 9,800 steps: 4.9); lambda = 0.5 is the paper's own value (here d * T = 1.2).
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
)
# A minute-scale version on scikit-learn's digits with a one-block model, for tests.
TINY = dataclasses.replace(
    CPU,
    name="tiny",
    batch_size=64,
    periods=2,
    steps_per_period=3,
    seeds=(0, 1),
    strong_lambdas=(0.05, 0.5),
    base_lr=1e-3,
    rop_lrs=(1e-3,),
    rop_lambdas=(0.5,),
    rop_periods=1,
    rop_steps_per_period=3,
    zero_shot_lambdas="0,0.05",
    extra_flags=('--model_overrides={"dims": [8], "depths": [1], "kernel_size": 3}',),
    seconds_per_step=0.05,
    seconds_per_eval=1.0,
)


def train_run(
    s: Any,
    dataset: str,
    part: str,
    method: str,
    lr: float,
    weight_decay: float,
    seed: int,
    kind: str = "train",
    optimizer: str = "adam",
    facts: dict[str, Any] | None = None,
) -> engine.Run:
    """One run of the fixed budget `s` (the full one, or a short R_op run), in
    `<kind>/[<optimizer>-]<method>-lr<lr>-wd<lambda>-s<seed>` (no prefix for Adam)."""
    periods, steps = s.periods, s.steps_per_period
    flags = []
    if method == "lpwd_shuffled":  # recorded in config.json; the same for every seed
        flags.append(f"--lpwd_permutation_seed={getattr(s, 'permutation_seed', 0)}")
    if kind == "rop":
        periods, steps = s.rop_periods, s.rop_steps_per_period
        flags.append("--eval_steps=1")
    flags = [
        *s.extra_flags,
        *flags,
        f"--dataset={dataset}",
        f"--model={s.model}",
        f"--optimizer={optimizer}",
        f"--method={method}",
        f"--lr={lr!r}",
        f"--weight_decay={weight_decay!r}",
        f"--seed={seed}",
        f"--batch_size={s.batch_size}",
        "--eval_batch_size=1000",
        f"--epochs={periods}",
        f"--steps_per_epoch={steps}",
        "--keep_checkpoints=1",
        "--no-progress",
    ]
    prefix = "" if optimizer == "adam" else f"{optimizer}-"
    name = f"{kind}/{prefix}{method}-lr{lr:g}-wd{weight_decay:g}-s{seed}"
    if facts is None:
        facts = dict(kind=kind, method=method, lr=lr, weight_decay=weight_decay, seed=seed)
    return engine.Run(part, name, tuple(flags), facts)


def plan(s: Setting, dataset: str, runs_dir: str) -> list[engine.Run]:
    """Parts a-d and f in priority order, each run once (a run two parts share is listed under
    the first); then part e, zero-shot decay of part a's baselines once each has finished."""

    def cell(method, lr, rate, seed, part, kind="train"):
        rate = 0.0 if method == "baseline" else rate
        return train_run(s, dataset, part, method, lr, rate, seed, kind)

    runs = []
    strong = [lam for lam in s.strong_lambdas if lam >= s.paper_strong_lambda]
    weak = [lam for lam in s.strong_lambdas if lam < s.paper_strong_lambda]
    for seed in s.seeds:
        runs.append(cell("baseline", s.strong_lr, 0.0, seed, "a"))
        for lam in sorted(strong, reverse=True):
            for method in ("wd", "rwd", "pwd", "lpwd"):
                runs.append(cell(method, s.strong_lr, lam, seed, "a"))
    for seed in s.seeds:
        for lam in weak:
            for method in ("wd", "lpwd"):
                runs.append(cell(method, s.strong_lr, lam, seed, "b"))
    for seed in s.seeds:
        for method in ("baseline", "l2", "wd", "lpwd"):
            runs.append(cell(method, s.base_lr, s.base_lambda, seed, "c"))
    for lr in s.rop_lrs:
        for lam in s.rop_lambdas:
            runs.append(cell("wd", lr, lam, s.seeds[0], "d", kind="rop"))
        runs.append(cell("rwd", lr, s.paper_strong_lambda, s.seeds[0], "d", kind="rop"))
    for seed in s.seeds:
        for lam in weak:
            for method in ("rwd", "pwd"):
                runs.append(cell(method, s.strong_lr, lam, seed, "f"))
    unique: dict[str, engine.Run] = {}
    for run in runs:
        unique.setdefault(run.name, run)
    trained = list(unique.values())
    return trained + [zero_shot_run(s, runs_dir, r) for r in baselines(trained)]


def baselines(runs: list[engine.Run]) -> list[engine.Run]:
    """Part e's inputs: the trained baselines of part a."""
    return [r for r in runs if r.part == "a" and r.facts["method"] == "baseline"]


def zero_shot_run(s: Setting, runs_dir: str, trained: engine.Run) -> engine.Run:
    """Zero-shot decay of a trained run: 100 decay steps of each lambda_s, no training; its
    zero_shot_decay.json goes beside the run's summary."""
    flags = (
        f"--run_dir={os.path.join(runs_dir, trained.name)}",
        f"--lambdas={s.zero_shot_lambdas}",
    )
    return engine.Run(
        "e",
        trained.name,
        flags,
        dict(trained.facts),
        needs=(trained.name,),
        program="zero_shot_decay",
        output="zero_shot_decay.json",
    )


# ----------------------------------------------------------------------------------------------
# The report

METHOD_ORDER = ("baseline", "l2", "wd", "rwd", "pwd", "lpwd")
# (a, b) pairs reported as a - b, per lambda of the strong learning rate; and at the base cell.
STRONG_COMPARISONS = (
    ("lpwd", "wd"),
    ("rwd", "wd"),
    ("pwd", "rwd"),
    ("lpwd", "pwd"),
    ("wd", "baseline"),
    ("lpwd", "baseline"),
)
BASE_COMPARISONS = (("lpwd", "wd"), ("wd", "baseline"), ("lpwd", "baseline"), ("l2", "wd"))
# (a, b) pairs whose a - b is compared across the strong learning rate's lambdas: per seed, a - b
# at the largest lambda minus a - b at the smallest (Fig. 3b: PWD's gain over RWD grows with
# lambda; and LPWD's over WD).
GROWTH_COMPARISONS = (("pwd", "rwd"), ("lpwd", "wd"))
ROP_METHODS = ("wd", "rwd", "pwd", "lpwd")


def key(method: str, lr: float, lam: float) -> tuple:
    """A cell: (method, lr, lambda); the baseline's lambda is 0."""
    return (method, lr, 0.0 if method == "baseline" else lam)


def comparisons(s: Setting) -> list[Comparison]:
    groups = [(s.strong_lr, lam, STRONG_COMPARISONS) for lam in s.strong_lambdas]
    groups.append((s.base_lr, s.base_lambda, BASE_COMPARISONS))
    return [
        Comparison(
            key(a, lr, lam), key(b, lr, lam), dict(comparison=f"{a} - {b}", lr=lr, weight_decay=lam)
        )
        for lr, lam, pairs in groups
        for a, b in pairs
    ]


def growth(s: Setting) -> list[Comparison]:
    lr, low, high = s.strong_lr, min(s.strong_lambdas), max(s.strong_lambdas)
    return [
        Comparison(
            (key(a, lr, high), key(b, lr, high)),
            (key(a, lr, low), key(b, lr, low)),
            dict(comparison=f"{a} - {b}", lr=lr, from_lambda=low, to_lambda=high),
        )
        for a, b in GROWTH_COMPARISONS
    ]


def zero_shot_rows(results) -> list[dict[str, Any]]:
    """Test top-1 after zero-shot decay, per lambda_s over the baselines (part e)."""
    per_lambda: dict[float, list[float]] = defaultdict(list)
    for run in results.protocol.plan("", results.runs_dir):
        path = os.path.join(results.runs_dir, run.name, run.output)
        if run.part == "e" and os.path.exists(path):
            with open(path) as f:
                for r in json.load(f)["results"]:
                    per_lambda[r["lambda_s"]].append(r["top1"])
    rows = []
    for lam, values in sorted(per_lambda.items()):
        s = stats.summarize(values)
        # With no training, 100 steps of d = lambda_s scale every decayed weight by (1 - d)^100.
        rows.append(dict(lambda_s=lam, factor=(1 - lam) ** 100, top1=s.mean, top1_std=s.std, n=s.n))
    return rows


def figures(s: Setting) -> list[Any]:
    lr, lambdas = s.strong_lr, sorted(s.strong_lambdas)
    strong = sorted((lam for lam in lambdas if lam >= s.paper_strong_lambda), reverse=True)
    methods = ("baseline", "wd", "rwd", "pwd", "lpwd")
    return [
        Curves(
            "fig_strong_curves.png",
            "Fig. 1 style: mean over seeds, band min-max",
            tuple(
                (
                    f"eta={lr:g}, lambda={lam:g} (d*T={lr * lam * s.steps:.2g})",
                    tuple((m, key(m, lr, lam)) for m in ("baseline", "wd", "lpwd")),
                )
                for lam in strong
            ),
        ),
        Bars(
            "fig_ablation.png",
            f"Ablation at eta={lr:g} (baseline has no decay)",
            tuple(
                (
                    f"lambda={lam:g}\nd*T={lr * lam * s.steps:.2g}",
                    tuple((m, key(m, lr, lam)) for m in methods),
                )
                for lam in lambdas
            ),
        ),
        Lines(
            "fig_lambda_sweep.png",
            f"lambda sweep at eta={lr:g}",
            "lambda",
            tuple((m, tuple((lam, key(m, lr, lam)) for lam in lambdas)) for m in methods[1:]),
            ("baseline (no decay)", key("baseline", lr, 0.0)),
            (
                "PWD - RWD",
                tuple((lam, key("pwd", lr, lam), key("rwd", lr, lam)) for lam in lambdas),
            ),
        ),
        Grid(
            "fig_rop_grid.png",
            "WD's opposing-penalty rate (short runs, seed 0)",
            "rop_grid",
            rows="lr",
            columns="weight_decay",
            value="mean_rop",
            where=dict(kind="rop", method="wd"),
        ),
        Points(
            "fig_zero_shot.png",
            "Zero-shot weight decay of the trained baselines",
            "zero_shot",
            x="lambda_s",
            y="top1",
            error="top1_std",
            xlabel="lambda_s (100 decay steps, no training)",
            ylabel="test top-1 (%), mean +- std",
        ),
    ]


METRIC_COLUMNS = (
    "best10_mean",
    "best10_mean_std",
    "final_top1",
    "final_top1_std",
    "final_train_loss",
    "final_train_loss_std",
)
INTERVALS = ("best10_mean", "final_top1", "final_train_loss", "n")


def protocol(s: Setting) -> engine.Protocol:
    return engine.Protocol(
        name=s.name,
        plan=lambda dataset, runs_dir: plan(s, dataset, runs_dir),
        parts=("a", "b", "c", "d", "f", "e"),
        summary=(
            f"{s.model}, Adam, batch {s.batch_size}, T = {s.steps} steps ({s.periods} "
            f"evaluations every {s.steps_per_period} steps), seeds {list(s.seeds)}"
        ),
        cell=("method", "lr", "weight_decay"),
        cell_columns=("method", "lr", "weight_decay", "d_T", *METRIC_COLUMNS, "n"),
        cell_order=lambda k: (
            -k[1],
            k[2],
            METHOD_ORDER.index(k[0]) if k[0] in METHOD_ORDER else 99,
        ),
        in_cells=lambda r: r["kind"] == "train",
        tables=(
            Table(
                "comparisons",
                "Paired differences (mean over seeds, 95% t-interval; * = interval excludes 0)",
                compare(comparisons(s)),
                ("comparison", "lr", "weight_decay", *INTERVALS),
            ),
            Table(
                "growth",
                "Change of a paired difference from the smallest to the largest lambda",
                compare(growth(s)),
                ("comparison", "lr", "from_lambda", "to_lambda", *INTERVALS),
                "Per seed, a - b at the largest lambda minus a - b at the smallest; mean over "
                "seeds, 95% t-interval.",
            ),
            Table(
                "rop_grid",
                "Opposing-penalty rate R_op (mean over a run's steps)",
                per_run(
                    lambda r: r["mean_rop"] is not None and r["method"] in ROP_METHODS,
                    ("kind", "method", "lr", "weight_decay", "seed", "steps", "mean_rop"),
                    order=("kind", "method", "lr", "weight_decay", "seed"),
                ),
            ),
            Table(
                "zero_shot",
                "Zero-shot decay of the trained baselines (100 steps of d = lambda_s, no training)",
                zero_shot_rows,
                ("lambda_s", "factor", "top1", "n"),
            ),
        ),
        figures=figures(s),
        seconds_per_step=s.seconds_per_step,
        seconds_per_eval=s.seconds_per_eval,
    )


PROTOCOLS = {"cpu": protocol(CPU), "tiny": protocol(TINY)}
