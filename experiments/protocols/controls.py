"""Results II: what in LPWD helps, and the AdaDecay, WRS and AdamP papers' claims.

`lpwd-study --protocol=controls` runs this plan, in this priority order so that a study stopped
part-way is still useful:

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

Part h's decay. With SGD-momentum the methods do not all decay alike at the same lambda: WD, the
WD of WRS's other leaves and SGDP + WRS's decay are decoupled (d = eta * lambda per step);
AdaDecay adds its penalty to the gradient, which momentum 0.9 amplifies in the steady state by
1 / (1 - 0.9) = 10; SGDP decays by eta * lambda / (1 - momentum) (the AdamP authors'
convention). So the decoupled methods run at `lambda_h` and AdaDecay and SGDP at
`(1 - momentum) * lambda_h`: every method then has the same per-step decay d = eta * lambda_h,
and `lambda_h` (`sgd_lambdas`) puts d * T at about 1.

The verdict rules (`named`), fixed before any run: each named comparison's paired t-test on
best-10, Holm-adjusted across all twelve; experiments/results/cifar10_cpu_controls/README.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from lpwd_optax.experiments import engine
from lpwd_optax.experiments.protocols.cpu import train_run
from lpwd_optax.experiments.report import Bars, Comparison, Curves, Table, compare, per_run

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
class Setting:
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


CONTROLS = Setting(
    # The first study's setting (convnext_atto_cifar, batch 128, 2,400 steps, 15 evaluations).
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
)
# Minutes on digits with a one-block model, for tests.
CONTROLS_TINY = dataclasses.replace(
    CONTROLS,
    name="controls_tiny",
    batch_size=64,
    periods=2,
    steps_per_period=3,
    seeds=(0, 1, 2),
    sgd_seeds=(0, 1),
    reused_seeds=(0,),
    pilot_lrs=(0.01, 0.1),
    sgd_lambdas=_sgd_lambdas((0.01, 0.1), 6, 0.9),
    extra_flags=('--model_overrides={"dims": [8], "depths": [1], "kernel_size": 3}',),
    seconds_per_step=0.05,
    seconds_per_eval=1.0,
)


def run(s: Setting, dataset: str, part: str, optimizer: str, method: str, lr, lam, seed):
    facts = dict(optimizer=optimizer, method=method, lr=lr, weight_decay=lam, seed=seed)
    return train_run(s, dataset, part, method, lr, lam, seed, optimizer=optimizer, facts=facts)


def pilot_runs(s: Setting, dataset: str = "") -> list[engine.Run]:
    return [run(s, dataset, "p", "sgdm", "baseline", lr, 0.0, s.sgd_seeds[0]) for lr in s.pilot_lrs]


def chosen_lr(s: Setting, runs_dir: str) -> float | None:
    """The pilot lr with the best best-10 (the smaller lr on a tie); a pilot run that diverged
    is not chosen. None until every pilot run has finished or diverged, or if all diverged."""
    results = []
    for pilot in pilot_runs(s):
        done = engine.summary(runs_dir, pilot)
        if done is not None:
            results.append((-done["best10_mean"], pilot.facts["lr"]))
        elif not engine.has_diverged(runs_dir, pilot):
            return None
    return min(results)[1] if results else None


def part_h_rates(s: Setting, lr: float) -> dict[str, float]:
    """Part h's lambda per method at `lr`: the same per-step decay for every method."""
    decoupled, coupled = s.lambdas_at(lr)
    rate = {"none": 0.0, "decoupled": decoupled, "coupled": coupled}
    return {method: rate[kind] for method, kind in PART_H}


def plan(s: Setting, dataset: str, runs_dir: str) -> list[engine.Run]:
    """Every run in priority order; part h only once the pilot has chosen its lr."""

    def adam(part, method, lam, seed):
        lam = 0.0 if method == "baseline" else lam
        return run(s, dataset, part, "adam", method, s.adam_lr, lam, seed)

    runs = pilot_runs(s, dataset)
    runs += [adam("g1", m, s.strong_lambda, seed) for seed in s.seeds for m in PART_G1]
    lr = chosen_lr(s, runs_dir)
    if lr is not None:
        rates = part_h_rates(s, lr)
        runs += [
            run(s, dataset, "h", "sgdm", m, lr, rates[m], seed)
            for seed in s.sgd_seeds
            for m, _ in PART_H
        ]
    runs += [adam("g2", m, s.strong_lambda, seed) for seed in s.seeds for m in PART_G2]
    runs += [adam("g3", m, s.paper_lambda, seed) for seed in s.seeds for m in PART_G3]
    unique: dict[str, engine.Run] = {}  # part h's seed-0 baseline is the pilot's run
    for r in runs:
        unique.setdefault(r.name, r)
    return list(unique.values())


def is_reused(s: Setting, run: engine.Run) -> bool:
    f = run.facts
    return (
        f["seed"] in s.reused_seeds
        and f["optimizer"] == "adam"
        and f["method"] in FIRST_STUDY_METHODS
        and f["lr"] == s.adam_lr
    )


def notes(s: Setting, runs_dir: str) -> list[str]:
    lr = chosen_lr(s, runs_dir)
    if lr is None:
        return ["part h: planned once the pilot (part p) has finished"]
    decoupled, coupled = s.lambdas_at(lr)
    return [
        f"part h: lr {lr:g} (the pilot's best best-10), lambda {decoupled:g} decoupled / "
        f"{coupled:g} coupled (d * T = {lr * decoupled * s.steps:.3g})"
    ]


# ----------------------------------------------------------------------------------------------
# The report: cells are (optimizer, method, lr, lambda)


def adam_cell(s: Setting, method: str, lam: float) -> tuple:
    return ("adam", method, s.adam_lr, 0.0 if method == "baseline" else lam)


def sgd_cell(s: Setting, method: str, lr: float) -> tuple:
    return ("sgdm", method, lr, part_h_rates(s, lr)[method])


def named(s: Setting, lr: float | None) -> list[tuple]:
    """The verdict rules, in README order: (part, name, a, b, rule); "> 0": a beats b,
    "none": a - b is not shown."""
    lam, paper = s.strong_lambda, s.paper_lambda
    g = [
        ("LPWD - WD", "lpwd", "wd", lam, "> 0"),
        ("lwd - WD", "lwd", "wd", lam, "> 0"),
        ("LPWD - lwd", "lpwd", "lwd", lam, "none"),
        ("LPWD - lpwd_reversed", "lpwd", "lpwd_reversed", lam, "> 0"),
        ("LPWD - lpwd_shuffled", "lpwd", "lpwd_shuffled", lam, "> 0"),
        ("LPWD - wd_matched", "lpwd", "wd_matched", lam, "> 0"),
        ("LPWD - WD (lambda 0.5)", "lpwd", "wd", paper, "> 0"),
    ]
    rows = [("g", c, adam_cell(s, a, x), adam_cell(s, b, x), rule) for c, a, b, x, rule in g]
    if lr is not None:
        h = [
            ("AdaDecay - WD", "adadecay", "wd", "> 0"),
            ("WRS - WD", "wrs", "wd", ">= 0"),
            ("SGDP+WRS - WD", "wrs+adamp", "wd", "> 0"),
            ("SGDP+WRS - WRS", "wrs+adamp", "wrs", "> 0"),
            ("SGDP+WRS - SGDP", "wrs+adamp", "adamp", "> 0"),
        ]
        rows += [("h", c, sgd_cell(s, a, lr), sgd_cell(s, b, lr), rule) for c, a, b, rule in h]
    return rows


def descriptive(s: Setting, lr: float | None) -> list[tuple]:
    """Comparisons reported for context, not part of a verdict (not adjusted)."""
    lam = s.strong_lambda
    g = [
        ("WD - baseline", "wd", "baseline"),
        ("LPWD - baseline", "lpwd", "baseline"),
        ("wd_matched - WD", "wd_matched", "wd"),
        ("lwd - wd_matched", "lwd", "wd_matched"),
    ]
    rows = [("g", c, adam_cell(s, a, lam), adam_cell(s, b, lam), None) for c, a, b in g]
    if lr is not None:
        h = [
            ("WD - baseline", "wd", "baseline"),
            ("WRS - WRS(IC)", "wrs", "wrs_ic"),
            ("SGDP - WD", "adamp", "wd"),
        ]
        rows += [("h", c, sgd_cell(s, a, lr), sgd_cell(s, b, lr), None) for c, a, b in h]
    return rows


def comparisons(s: Setting, runs_dir: str) -> list[Comparison]:
    lr = chosen_lr(s, runs_dir)
    seeds = {"g": len(s.seeds), "h": len(s.sgd_seeds)}
    return [
        Comparison(
            a,
            b,
            dict(
                part=part,
                comparison=name,
                claim=rule or "-",
                named=rule is not None,
                optimizer=a[0],
                lr=a[2],
                weight_decay_a=a[3],
                weight_decay_b=b[3],
            ),
            rule,
            seeds[part] if rule else None,
        )
        for part, name, a, b, rule in named(s, lr) + descriptive(s, lr)
    ]


LABELS = {
    "wd": "WD",
    "wrs": "WRS",
    "adamp": "SGDP",
    "wrs+adamp": "SGDP+WRS",
    "wrs_ic": "WRS(IC)",
    "adadecay": "AdaDecay",
}
PART_G_BARS = ("baseline", "wd", "wd_matched", "lwd", "lpwd", "lpwd_reversed", "lpwd_shuffled")


def figures(s: Setting, runs_dir: str) -> list[Any]:
    lam = s.strong_lambda
    out: list[Any] = [
        Bars(
            "fig_controls.png",
            f"Part g: Adam, eta={s.adam_lr:g}, lambda={lam:g}",
            (("", tuple((m, adam_cell(s, m, lam)) for m in PART_G_BARS)),),
        ),
        Curves(
            "fig_lpwd_lwd_wd_curves.png",
            f"LPWD vs lwd vs WD, Adam eta={s.adam_lr:g}, lambda={lam:g} (band: min-max over seeds)",
            (("", tuple((m, adam_cell(s, m, lam)) for m in ("wd", "lwd", "lpwd"))),),
        ),
    ]
    lr = chosen_lr(s, runs_dir)
    if lr is not None:
        d_t = lr * s.lambdas_at(lr)[0] * s.steps
        out.append(
            Bars(
                "fig_part_h.png",
                f"Part h: SGD-momentum {s.momentum:g}, eta={lr:g}, d*T={d_t:.2g}",
                (("", tuple((LABELS.get(m, m), sgd_cell(s, m, lr)) for m, _ in PART_H)),),
            )
        )
    return out


def protocol(s: Setting) -> engine.Protocol:
    family = len(named(s, s.pilot_lrs[0]))  # once part h is planned
    return engine.Protocol(
        name=s.name,
        plan=lambda dataset, runs_dir: plan(s, dataset, runs_dir),
        parts=("p", "g1", "h", "g2", "g3"),
        summary=(
            f"{s.model}, Adam and SGD-momentum {s.momentum:g}, batch {s.batch_size}, "
            f"T = {s.steps} steps ({s.periods} evaluations every {s.steps_per_period} steps)"
        ),
        cell=("optimizer", "method", "lr", "weight_decay"),
        cell_columns=(
            *("optimizer", "method", "lr", "weight_decay", "d_T", "n", "reused"),
            *("best10_mean", "best10_mean_std", "final_top1", "final_top1_std"),
            *("final_train_loss", "final_train_loss_std"),
        ),
        tables=(
            Table(
                "comparisons",
                "Comparisons (the verdict rules, best-10 decides; then context, not adjusted)",
                compare(lambda results: comparisons(s, results.runs_dir), True, family),
                (
                    *("part", "comparison", "claim", "best10_mean", "p", "p_holm", "outcome"),
                    *("final_top1", "final_train_loss", "n"),
                ),
                "Mean over seeds of the paired difference with its 95% t-interval (* = excludes "
                "0); the paired t-test's p-value on best-10 and, for the verdict rules, its Holm "
                "adjustment across every one that has data. A reading is final when no outcome "
                "of the comparisons still to come can change it: all its seeds are in, and "
                f"Holm's p over all {family} rules, which lies between p and {family} p, is on "
                "the same side of 0.05 either way; else it is provisional.",
            ),
            Table(
                "pilot",
                "SGD-momentum pilot (baseline, seed 0)",
                per_run(
                    lambda r: r["part"] == "p",
                    ("lr", "best10_mean", "final_top1", "final_train_loss"),
                ),
            ),
        ),
        figures=lambda runs_dir: figures(s, runs_dir),
        notes=lambda runs_dir: notes(s, runs_dir),
        reuse=engine.Reuse("the first study", lambda r: is_reused(s, r)),
        seconds_per_step=s.seconds_per_step,
        seconds_per_eval=s.seconds_per_eval,
    )


PROTOCOLS = {"controls": protocol(CONTROLS), "controls_tiny": protocol(CONTROLS_TINY)}
