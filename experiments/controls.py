"""The controls study: what in LPWD helps, and the AdaDecay, WRS and AdamP papers' claims.

`lpwd-study --protocol=controls` runs this plan (`plan`), in this priority order so that a study
stopped part-way is still useful:

  p.  the SGD-momentum pilot: baseline, seed 0, lr in `pilot_lrs` (part h takes the lr with the
      best best-10; its seed-0 baseline is the pilot's run at that lr);
  g1. Adam (eta 1e-3, lambda 2): WD, LPWD, lwd and lpwd_reversed, seeds 0-5;
  h.  SGD-momentum 0.9 at the pilot's lr: baseline, WD, AdaDecay, WRS, WRS(IC), SGDP and
      SGDP + WRS, seeds 0-2, at one per-step decay d with d * T ~ 1;
  g2. Adam (eta 1e-3, lambda 2): the baseline, lpwd_shuffled and wd_matched, seeds 0-5;
  g3. Adam (eta 1e-3, lambda 0.5, the LPWD paper's value): WD and LPWD, seeds 0-5.

Seeds in `reused_seeds` of the cells the first study (`--protocol=cpu`) ran with exactly these
settings (baseline, WD and LPWD at eta 1e-3) are not trained again: their records in the first
study's runs.jsonl (`--reuse_from`) are written as the runs' summary.json, marked `reused_from`.
Part h is planned once the pilot has finished, since its lr comes from the pilot.

A study outlives its runs directory through its committed report: `restore` writes each trained
run's record in a report's runs.jsonl (`--restore_from`) back as that run's summary.json, marked
`restored_from`, so the runner skips it and the report is rebuilt from the same numbers.

Part h's decay. With SGD-momentum the methods do not all decay alike at the same lambda: WD, the
WD of WRS's other leaves and SGDP + WRS's decay are decoupled (d = eta * lambda per step);
AdaDecay adds its penalty to the gradient, which momentum 0.9 amplifies in the steady state by
1 / (1 - 0.9) = 10; SGDP decays by eta * lambda / (1 - momentum) (the AdamP authors'
convention). So the decoupled methods run at `lambda_h` and AdaDecay and SGDP at
`(1 - momentum) * lambda_h`: every method then has the same per-step decay d = eta * lambda_h,
and `lambda_h` (`sgd_lambdas`) puts d * T at about 1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from typing import Any

from lpwd_optax.experiments.study import StudyRun, _duration, _summary, is_finished, launch

# Part h: (method, "decoupled" or "coupled"); coupled methods run at (1 - momentum) * lambda_h.
PART_H = (
    ("baseline", "none"),
    ("wd", "decoupled"),
    ("adadecay", "coupled"),
    ("wrs", "decoupled"),
    ("wrs_ic", "decoupled"),
    ("adamp", "coupled"),  # SGDP with --optimizer=sgdm
    ("wrs+adamp", "decoupled"),  # SGDP's projected update + WRS
)
PART_G1 = ("wd", "lpwd", "lwd", "lpwd_reversed")
PART_G2 = ("baseline", "lpwd_shuffled", "wd_matched")
PART_G3 = ("wd", "lpwd")
FIRST_STUDY_METHODS = ("baseline", "wd", "lpwd")  # the cells the first study ran


@dataclasses.dataclass(frozen=True)
class ControlsProtocol:
    """Everything that is fixed before the controls study runs."""

    name: str
    model: str
    batch_size: int
    periods: int
    steps_per_period: int
    seeds: tuple[int, ...]  # part g
    sgd_seeds: tuple[int, ...]  # parts p (the first) and h
    reused_seeds: tuple[int, ...]  # of the first study's cells, not trained again
    adam_lr: float
    strong_lambda: float
    paper_lambda: float
    pilot_lrs: tuple[float, ...]
    # lambda_h for each pilot lr: d * T = lr * lambda_h * T ~ 1; the coupled methods' lambda.
    sgd_lambdas: tuple[tuple[float, float, float], ...]  # (lr, lambda_h, coupled lambda)
    momentum: float = 0.9
    permutation_seed: int = 0
    extra_flags: tuple[str, ...] = ()
    seconds_per_step: float = 0.23
    seconds_per_eval: float = 7.0

    @property
    def steps(self) -> int:
        return self.periods * self.steps_per_period

    def lambdas_at(self, lr: float) -> tuple[float, float]:
        for at, decoupled, coupled in self.sgd_lambdas:
            if at == lr:
                return decoupled, coupled
        raise ValueError(f"no part h lambda is fixed for lr {lr!r}")


def _sgd_lambdas(lrs: Sequence[float], steps: int, momentum: float):
    """lambda_h = 1 / (lr * T) to two significant digits, and (1 - momentum) * lambda_h."""
    out = []
    for lr in lrs:
        decoupled = float(f"{1 / (lr * steps):.2g}")
        out.append((lr, decoupled, float(f"{(1 - momentum) * decoupled:.2g}")))
    return tuple(out)


PROTOCOLS = {
    # The first study's setting (convnext_atto_cifar, batch 128, 2,400 steps, 15 evaluations).
    "controls": ControlsProtocol(
        name="controls",
        model="convnext_atto_cifar",
        batch_size=128,
        periods=15,
        steps_per_period=160,
        seeds=(0, 1, 2, 3, 4, 5),
        sgd_seeds=(0, 1, 2),
        reused_seeds=(0, 1, 2),
        adam_lr=1e-3,
        strong_lambda=2.0,
        paper_lambda=0.5,
        pilot_lrs=(0.01, 0.03, 0.1),
        sgd_lambdas=_sgd_lambdas((0.01, 0.03, 0.1), 2400, 0.9),
    ),
    # Minutes on digits with a one-block model, for tests.
    "controls_tiny": ControlsProtocol(
        name="controls_tiny",
        model="convnext_atto_cifar",
        batch_size=64,
        periods=2,
        steps_per_period=3,
        seeds=(0, 1, 2),
        sgd_seeds=(0, 1),
        reused_seeds=(0,),
        adam_lr=1e-3,
        strong_lambda=2.0,
        paper_lambda=0.5,
        pilot_lrs=(0.01, 0.1),
        sgd_lambdas=_sgd_lambdas((0.01, 0.1), 6, 0.9),
        extra_flags=('--model_overrides={"dims": [8], "depths": [1], "kernel_size": 3}',),
        seconds_per_step=0.05,
        seconds_per_eval=1.0,
    ),
}


DIVERGED = "non-finite loss or gradients"  # the training program's message when it stops


def has_diverged(runs_dir: str, run: StudyRun) -> bool:
    """The run stopped because its loss or gradients stopped being finite (see its log.txt);
    resuming it would only repeat that, so the study does not run it again."""
    if is_finished(runs_dir, run):
        return False
    path = os.path.join(runs_dir, run.directory, "log.txt")
    if not os.path.exists(path):
        return False
    with open(path, errors="replace") as f:
        return DIVERGED in f.read()


def pilot_runs(p: ControlsProtocol) -> list[StudyRun]:
    return [
        StudyRun("p", "baseline", lr, 0.0, p.sgd_seeds[0], optimizer="sgdm") for lr in p.pilot_lrs
    ]


def chosen_lr(p: ControlsProtocol, runs_dir: str) -> float | None:
    """The pilot lr with the best best-10 (the smaller lr on a tie); a pilot run that diverged
    is not chosen. None until every pilot run has finished or diverged, or if all diverged."""
    results = []
    for run in pilot_runs(p):
        summary = _summary(runs_dir, run)
        if summary is not None:
            results.append((-summary["best10_mean"], run.lr))
        elif not has_diverged(runs_dir, run):
            return None
    return min(results)[1] if results else None


def plan(p: ControlsProtocol, runs_dir: str) -> list[StudyRun]:
    """Every run in priority order; part h only once the pilot has chosen its lr."""

    def adam(part, method, lam, seed):
        return StudyRun(part, method, p.adam_lr, 0.0 if method == "baseline" else lam, seed)

    runs = pilot_runs(p)
    runs += [adam("g1", m, p.strong_lambda, s) for s in p.seeds for m in PART_G1]
    lr = chosen_lr(p, runs_dir)
    if lr is not None:
        decoupled, coupled = p.lambdas_at(lr)
        rate = {"none": 0.0, "decoupled": decoupled, "coupled": coupled}
        runs += [
            StudyRun("h", m, lr, rate[kind], s, optimizer="sgdm")
            for s in p.sgd_seeds
            for m, kind in PART_H
        ]
    runs += [adam("g2", m, p.strong_lambda, s) for s in p.seeds for m in PART_G2]
    runs += [adam("g3", m, p.paper_lambda, s) for s in p.seeds for m in PART_G3]
    unique: dict[str, StudyRun] = {}  # part h's seed-0 baseline is the pilot's run
    for run in runs:
        unique.setdefault(run.directory, run)
    return list(unique.values())


def is_reused(p: ControlsProtocol, run: StudyRun) -> bool:
    return (
        run.seed in p.reused_seeds
        and run.optimizer == "adam"
        and run.method in FIRST_STUDY_METHODS
        and run.lr == p.adam_lr
    )


def materialize_reused(
    p: ControlsProtocol, runs: Sequence[StudyRun], runs_dir: str, reuse_from: str | None
) -> int:
    """Writes each reused run's first-study record as its summary.json; returns how many."""
    todo = [r for r in runs if is_reused(p, r) and not is_finished(runs_dir, r)]
    if not todo:
        return 0
    if reuse_from is None:
        raise ValueError(
            f"the protocol reuses the first study's seeds {list(p.reused_seeds)}: pass "
            "--reuse_from=<the first study's runs.jsonl>"
        )
    path = os.path.expanduser(reuse_from)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--reuse_from: no such file: {reuse_from}")
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    for run in todo:
        matches = [
            r
            for r in records
            if r.get("kind", "train") == "train"
            and (r["method"], r["lr"], r["weight_decay"], r["seed"])
            == (run.method, run.lr, run.weight_decay, run.seed)
            and r["steps"] == p.steps
        ]
        if len(matches) != 1:
            raise ValueError(
                f"{reuse_from} has {len(matches)} records of {run.name} with {p.steps} steps; "
                "expected exactly one"
            )
        _write_summary(runs_dir, run, {**matches[0], "reused_from": os.path.abspath(reuse_from)})
    return len(todo)


def _write_summary(runs_dir: str, run: StudyRun, summary: dict[str, Any]) -> None:
    directory = os.path.join(runs_dir, run.directory)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)


def restore(p: ControlsProtocol, runs_dir: str, restore_from: str) -> int:
    """Writes each trained run recorded in a controls report's runs.jsonl whose directory has no
    summary.json back as its summary.json (marked `restored_from`); returns how many.

    Reused records are left to `materialize_reused`. A record that matches no planned run, or
    two records of one run, is an error: the file is not this protocol's report.
    """
    path = os.path.expanduser(restore_from)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--restore_from: no such file: {restore_from}")
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]

    def key(optimizer, method, lr, weight_decay, seed):
        return (optimizer, method, float(lr), float(weight_decay), int(seed))

    pending = {}
    for record in records:
        if record.get("reused"):
            continue
        k = key(*(record[f] for f in ("optimizer", "method", "lr", "weight_decay", "seed")))
        if k in pending:
            raise ValueError(f"{restore_from} has two records of {k}")
        if record.get("steps") != p.steps:
            raise ValueError(
                f"{restore_from}: a record of {k} has {record.get('steps')} steps; the "
                f"protocol '{p.name}' has {p.steps}"
            )
        pending[k] = record
    restored = 0
    while pending:  # the pilot's records decide whether part h is planned: plan again
        runs = {
            key(r.optimizer, r.method, r.lr, r.weight_decay, r.seed): r for r in plan(p, runs_dir)
        }
        found = [k for k in pending if k in runs]
        if not found:
            raise ValueError(
                f"{restore_from} records {len(pending)} runs the protocol '{p.name}' does not "
                f"plan, e.g. {sorted(pending)[0]}"
            )
        for k in found:
            record, run = pending.pop(k), runs[k]
            if is_finished(runs_dir, run):
                continue
            summary = {f: v for f, v in record.items() if f not in ("part", "optimizer", "reused")}
            summary["restored_from"] = os.path.abspath(path)
            _write_summary(runs_dir, run, summary)
            restored += 1
    return restored


def describe(p: ControlsProtocol, dataset: str, runs: Sequence[StudyRun], runs_dir: str) -> str:
    def seconds(run):
        return 30 + p.steps * p.seconds_per_step + p.periods * p.seconds_per_eval

    lines = [
        f"study '{p.name}': {p.model} on {dataset}, batch {p.batch_size}, {p.steps} steps "
        f"({p.periods} evaluations every {p.steps_per_period} steps)",
    ]
    for part in ("p", "g1", "h", "g2", "g3"):
        total = [r for r in runs if r.part == part]
        if part == "h" and not total:
            lines.append("  part h: planned once the pilot (part p) has finished")
            continue
        reused = [r for r in total if is_reused(p, r)]
        todo = [r for r in total if not is_finished(runs_dir, r) and not is_reused(p, r)]
        lines.append(
            f"  part {part}: {len(total)} runs ({len(reused)} reused from the first study), "
            f"{len(total) - len(todo) - len(reused)} trained, {len(todo)} to run "
            f"(about {_duration(sum(seconds(r) for r in todo))})"
        )
    diverged = [r.name for r in runs if has_diverged(runs_dir, r)]
    if diverged:
        lines.append(f"  diverged (not run again): {', '.join(diverged)}")
    lr = chosen_lr(p, runs_dir)
    if lr is not None:
        decoupled, coupled = p.lambdas_at(lr)
        lines.append(
            f"  part h: lr {lr:g} (the pilot's best best-10), lambda {decoupled:g} decoupled / "
            f"{coupled:g} coupled (d * T = {lr * decoupled * p.steps:.3g})"
        )
    return "\n".join(lines)


def run_study(
    p: ControlsProtocol,
    dataset: str,
    runs_dir: str,
    parts: Sequence[str] | None,
    reuse_from: str | None,
) -> int:
    """Runs every unfinished run of the selected parts in priority order, planning again after
    each run (the pilot decides part h); returns the number that failed."""
    failed: set[str] = set()
    done = 0
    while True:
        runs = [r for r in plan(p, runs_dir) if parts is None or r.part in parts]
        materialize_reused(p, runs, runs_dir, reuse_from)
        todo = [
            r
            for r in runs
            if not is_finished(runs_dir, r)
            and not has_diverged(runs_dir, r)
            and r.directory not in failed
        ]
        if not todo:
            return len(failed)
        run = todo[0]
        start = time.time()
        code, seconds = launch(p, dataset, run, runs_dir)
        done += 1
        summary = _summary(runs_dir, run) if code == 0 else None
        result = f", best-10 {summary['best10_mean']:.2f}" if summary else ""
        status = "ok" if code == 0 else f"FAILED (exit {code}, see its log.txt)"
        print(
            f"[{done}, {len(todo) - 1} left] part {run.part} {run.name}: {status} in "
            f"{_duration(seconds)}{result} ({time.strftime('%H:%M', time.localtime(start))} "
            "start)",
            flush=True,
        )
        if code != 0:
            failed.add(run.directory)


def records(p: ControlsProtocol, runs_dir: str) -> list[dict[str, Any]]:
    """One record per finished run, with its optimizer and whether it was reused."""
    out = []
    for run in plan(p, runs_dir):
        summary = _summary(runs_dir, run)
        if summary is None:
            continue
        out.append(
            dict(
                part=run.part,
                optimizer=run.optimizer,
                method=run.method,
                lr=run.lr,
                weight_decay=run.weight_decay,
                seed=run.seed,
                reused=bool(summary.get("reused_from")),
                **{
                    k: summary.get(k)
                    for k in (
                        "best10_mean",
                        "final_top1",
                        "best_top1",
                        "final_train_loss",
                        "mean_rop",
                        "steps",
                        "wall_time_s",
                    )
                },
                history=[
                    {k: r.get(k) for k in ("epoch", "train_loss", "test_top1", "rop")}
                    for r in summary["history"]
                ],
            )
        )
    return out
