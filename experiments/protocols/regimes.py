"""Results III: does LPWD help where weight decay helps? The pilot that finds such a regime.

Three candidate regimes at CPU scale, all `convnext_atto_cifar` on CIFAR-10 (JPEG) with Adam at
a constant learning rate, batch 128, drop-path 0, best-10 of the evaluations as the statistic:

  R1 fine-tune: pretrain once on classes 0-4 (all 25,000 images, no decay, lr 1e-3), then
     fine-tune on classes 5-9 with 500 images per class for 100 epochs at the LPWD paper's
     fine-tuning lr 1e-4 (1,900 steps), evaluated every 5 epochs on the 5,000 test images of
     classes 5-9.
  R2 small data from scratch: 5,000 images (500 per class), 100 epochs at lr 1e-3 (3,900 steps),
     evaluated every 5 epochs on the full test set.
  R3 longer horizon: the full training set for 28 epochs at lr 1e-3 (10,920 steps, about 45 min
     at the 0.23 s per step measured on this machine), evaluated every epoch.

The pilot (part "pilot") runs the baseline and WD at two lambda, seeds 0 and 1, in R1 and R2,
and the baseline and WD at one lambda, seed 0, in R3. The lambda are chosen so that the total
decay d * T = lr * lambda * T spans weak to strong in every regime:
R1 (lr 1e-4, T 1,900): 0.5 (the largest of the paper's grid) and 5, d * T = 0.095 and 0.95;
R2 (lr 1e-3, T 3,900): 0.05 (timm's ConvNeXt AdamW default) and 0.5, d * T = 0.195 and 1.95;
R3 (lr 1e-3, T 10,920): 0.05, d * T = 0.55.

The rule, fixed before the first pilot run (`choose`): the (regime, lambda) whose mean WD -
baseline best-10 difference over the pilot's seeds (paired by seed) is largest, provided it is
at least +1.0 point. If none reaches +1.0 once all Adam runs have finished, part "pilot_sgdm"
adds SGD-momentum 0.9 on R2 (lr 0.03, the controls study's choice at batch 128; decoupled
lambda 0.0017 and 0.017, the same d * T as R2's Adam cells; seeds 0 and 1) and the rule is
applied again over all candidates. If still none reaches +1.0, the protocol runs in the
candidate with the largest difference, and every verdict carries that caveat.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

from lpwd_optax.experiments import engine, report

name = "regimes"
MODEL = "convnext_atto_cifar"
BATCH_SIZE = 128
PRETRAIN = "pilot/r1-pretrain"
PRETRAIN_EPOCHS = 20  # 3,900 steps; extended by PRETRAIN_MORE until it reaches PRETRAIN_TARGET
PRETRAIN_MORE = 10
PRETRAIN_MAX_EPOCHS = 60
PRETRAIN_TARGET = 75.0  # best test top-1 (%) on classes 0-4
MIN_GAIN = 1.0  # best-10 points of WD over the baseline for a regime to be chosen


@dataclasses.dataclass(frozen=True)
class Regime:
    name: str
    lr: float
    epochs: int
    eval_every: int
    lambdas: tuple[float, ...]  # the pilot's WD lambda
    seeds: tuple[int, ...]  # the pilot's seeds
    data_flags: tuple[str, ...] = ()
    optimizer: str = "adam"
    needs: tuple[str, ...] = ()


REGIMES = {
    "r1": Regime(
        "r1",
        lr=1e-4,
        epochs=100,
        eval_every=5,
        lambdas=(0.5, 5.0),
        seeds=(0, 1),
        data_flags=("--classes=5-9", "--train_examples=2500", "--subset_seed=0"),
        needs=(PRETRAIN,),
    ),
    "r2": Regime(
        "r2",
        lr=1e-3,
        epochs=100,
        eval_every=5,
        lambdas=(0.05, 0.5),
        seeds=(0, 1),
        data_flags=("--train_examples=5000", "--subset_seed=0"),
    ),
    "r3": Regime("r3", lr=1e-3, epochs=28, eval_every=1, lambdas=(0.05,), seeds=(0,)),
    "r2_sgdm": Regime(
        "r2_sgdm",
        lr=0.03,
        epochs=100,
        eval_every=5,
        lambdas=(0.0017, 0.017),
        seeds=(0, 1),
        data_flags=("--train_examples=5000", "--subset_seed=0"),
        optimizer="sgdm",
    ),
}


def common_flags(dataset: str) -> tuple[str, ...]:
    return (
        f"--dataset={dataset}",
        f"--model={MODEL}",
        f"--batch_size={BATCH_SIZE}",
        "--eval_batch_size=1000",
        "--keep_checkpoints=1",
        "--no-progress",
    )


def run(
    part: str, regime: Regime, method: str, weight_decay: float, seed: int, dataset: str, runs_dir
) -> engine.Run:
    """One run of `method` in `regime`, named by regime, optimizer, method, lr, lambda, seed."""
    optimizer = "" if regime.optimizer == "adam" else f"{regime.optimizer}-"
    base = regime.name.split("_")[0]
    name = f"{part}/{base}-{optimizer}{method}-lr{regime.lr:g}-wd{weight_decay:g}-s{seed}"
    flags = [
        *common_flags(dataset),
        *regime.data_flags,
        f"--optimizer={regime.optimizer}",
        f"--method={method}",
        f"--lr={regime.lr!r}",
        f"--weight_decay={weight_decay!r}",
        f"--seed={seed}",
        f"--epochs={regime.epochs}",
        f"--eval_every={regime.eval_every}",
    ]
    if regime.needs:
        flags.append(f"--init_from={runs_dir}/{regime.needs[0]}")
    facts = dict(
        regime=regime.name,
        optimizer=regime.optimizer,
        method=method,
        lr=regime.lr,
        weight_decay=weight_decay,
        seed=seed,
    )
    return engine.Run(part, name, tuple(flags), facts, regime.needs)


def pretrain_run(dataset: str, runs_dir: str) -> engine.Run:
    """R1's pretraining on classes 0-4, extended 10 epochs at a time until its best test top-1
    reaches 75% (at most 60 epochs)."""
    epochs = PRETRAIN_EPOCHS
    done = engine.summary(runs_dir, PRETRAIN)
    if done is not None and done["best_top1"] < PRETRAIN_TARGET:
        epochs = min(done["epochs"] + PRETRAIN_MORE, PRETRAIN_MAX_EPOCHS)
    flags = (
        *common_flags(dataset),
        "--classes=0-4",
        "--optimizer=adam",
        "--method=baseline",
        "--lr=0.001",
        "--weight_decay=0.0",
        "--seed=0",
        f"--epochs={epochs}",
        "--eval_every=2",
    )
    return engine.Run("pilot", PRETRAIN, flags, dict(regime="r1_pretrain", method="baseline"))


def pretrain_ready(runs_dir: str) -> bool:
    done = engine.summary(runs_dir, PRETRAIN)
    return done is not None and (
        done["best_top1"] >= PRETRAIN_TARGET or done["epochs"] >= PRETRAIN_MAX_EPOCHS
    )


def pilot_cells(regime: Regime) -> list[tuple[str, float]]:
    return [("baseline", 0.0)] + [("wd", lam) for lam in regime.lambdas]


def pilot(dataset: str, runs_dir: str) -> list[engine.Run]:
    """The pilot's runs in priority order: R2 seed 0, the pretraining, R1 seed 0, R2 and R1
    seed 1, R3; SGD-momentum on R2 only if the Adam candidates do not reach the rule's gain."""

    def cells(name, seed, part="pilot"):
        regime = REGIMES[name]
        return [
            run(part, regime, m, lam, seed, dataset, runs_dir) for m, lam in pilot_cells(regime)
        ]

    runs = cells("r2", 0)
    runs.append(pretrain_run(dataset, runs_dir))
    # R1 is planned once the pretraining has reached its target (or its epoch cap).
    r1 = cells("r1", 0) + cells("r1", 1) if pretrain_ready(runs_dir) else []
    runs += r1[:3] + cells("r2", 1) + r1[3:] + cells("r3", 0)
    if bool(r1) and _settled(runs, runs_dir) and choose(runs_dir, include_sgdm=False)[0] is None:
        runs += cells("r2_sgdm", 0, "pilot_sgdm") + cells("r2_sgdm", 1, "pilot_sgdm")
    return runs


def _settled(runs: list[engine.Run], runs_dir: str) -> bool:
    """Every run has finished or diverged (a diverged run is not run again)."""
    return all(engine.is_finished(runs_dir, r) or engine.has_diverged(runs_dir, r) for r in runs)


def gains(runs_dir: str, regimes: tuple[str, ...]) -> dict[tuple[str, float], dict[str, Any]]:
    """(regime, lambda) -> WD - baseline best-10 per seed and their mean, from finished runs."""
    out = {}
    for name in regimes:
        regime = REGIMES[name]
        part = "pilot_sgdm" if name == "r2_sgdm" else "pilot"
        for lam in regime.lambdas:
            diffs = []
            for seed in regime.seeds:
                base = engine.summary(
                    runs_dir, run(part, regime, "baseline", 0.0, seed, "", runs_dir).name
                )
                wd = engine.summary(runs_dir, run(part, regime, "wd", lam, seed, "", runs_dir).name)
                if base is not None and wd is not None:
                    diffs.append(wd["best10_mean"] - base["best10_mean"])
            out[(name, lam)] = dict(
                diffs=diffs,
                mean=statistics.fmean(diffs) if diffs else None,
                complete=len(diffs) == len(regime.seeds),
            )
    return out


def choose(runs_dir: str, include_sgdm: bool = True) -> tuple[tuple[str, float] | None, dict]:
    """The rule: ((regime, lambda) with the largest mean WD - baseline, if >= MIN_GAIN, else
    None; the table of gains). Only candidates whose every pilot seed has finished count."""
    names = ("r1", "r2", "r3", "r2_sgdm") if include_sgdm else ("r1", "r2", "r3")
    table = gains(runs_dir, names)
    complete = {k: v["mean"] for k, v in table.items() if v["complete"]}
    if not complete:
        return None, table
    best = max(complete, key=complete.get)
    return (best if complete[best] >= MIN_GAIN else None), table


# ---------------------------------------------------------------------------------------------
# The protocol, in the regime and (lr, lambda) the pilot chose

MAIN_SEEDS = (0, 1, 2, 3, 4, 5)
ROBUST_SEEDS = (0, 1, 2)
MAIN_METHODS = ("baseline", "wd", "lpwd", "lwd", "lpwd_reversed")
R1_METHODS = ("decay_to_init",)  # the rival explanation when pretrained weights are fine-tuned
ROBUST_FACTORS = (0.25, 4.0)  # lambda / 4 and 4 lambda


def decision(runs_dir: str) -> tuple[str, float, bool] | None:
    """(regime, lambda, caveat) once the pilot has settled, else None. `caveat` is True when
    no candidate reached MIN_GAIN and the protocol runs in the one with the largest gain."""
    pilot_runs = pilot("", runs_dir)
    if not pretrain_ready(runs_dir) or not _settled(pilot_runs, runs_dir):
        return None
    chosen, table = choose(runs_dir)
    if chosen is not None:
        return (*chosen, False)
    complete = {k: v["mean"] for k, v in table.items() if v["complete"]}
    if not complete:
        return None
    return (*max(complete, key=complete.get), True)


def protocol(dataset: str, runs_dir: str) -> list[engine.Run]:
    """The protocol's runs in priority order, once the pilot has decided: the five main cells
    (and decay-to-init in R1) at six seeds, then WD and LPWD at lambda / 4 and 4 lambda at
    three seeds. A run the pilot made with the same flags is the pilot's run."""
    decided = decision(runs_dir)
    if decided is None:
        return []
    name, lam, _ = decided
    regime = REGIMES[name]
    methods = MAIN_METHODS + (R1_METHODS if name == "r1" else ())
    pilot_part = "pilot_sgdm" if name == "r2_sgdm" else "pilot"

    def cell(part, method, rate, seed):
        rate = 0.0 if method == "baseline" else rate
        if (
            method in ("baseline", "wd")
            and seed in regime.seeds
            and (method == "baseline" or rate in regime.lambdas)
        ):
            part = pilot_part  # the pilot's own run
        return run(part, regime, method, rate, seed, dataset, runs_dir)

    runs = [cell("main", m, lam, s) for s in MAIN_SEEDS for m in methods]
    runs += [
        cell("robust", m, float(f"{lam * f:.4g}"), s)
        for s in ROBUST_SEEDS
        for f in ROBUST_FACTORS
        for m in ("wd", "lpwd")
    ]
    return runs


def plan(dataset: str, runs_dir: str) -> list[engine.Run]:
    """The pilot, then the protocol it decides."""
    runs = pilot(dataset, runs_dir)
    names = {r.name for r in runs}
    return runs + [r for r in protocol(dataset, runs_dir) if r.name not in names]


# ---------------------------------------------------------------------------------------------
# The report: cells are (regime, optimizer, method, lr, lambda); the verdict rules of the README


def pilot_rows(results: report.Results) -> list[dict[str, Any]]:
    """The rule's table: WD - baseline best-10 per candidate (regime, lambda), paired by seed;
    `chosen` marks the candidate the protocol runs in, once the whole pilot has settled."""
    _, table = choose(results.runs_dir)
    decided = decision(results.runs_dir)
    chosen = decided[:2] if decided is not None else None
    return [
        dict(
            regime=name,
            weight_decay=lam,
            differences=", ".join(f"{d:+.2f}" for d in row["diffs"]) or "-",
            mean=row["mean"],
            complete=row["complete"],
            chosen=(name, lam) == chosen,
        )
        for (name, lam), row in table.items()
    ]


def cell(regime: Regime, method: str, lam: float) -> tuple:
    return (regime.name, regime.optimizer, method, regime.lr, 0.0 if method == "baseline" else lam)


def comparisons(runs_dir: str) -> list[report.Comparison]:
    """The named comparisons (Holm-adjusted together) in the regime the pilot chose."""
    decided = decision(runs_dir)
    if decided is None:
        return []
    name, lam, _ = decided
    regime = REGIMES[name]
    low, high = (float(f"{lam * f:.4g}") for f in ROBUST_FACTORS)
    pairs = [("WD - baseline", "wd", "baseline"), ("LPWD - WD", "lpwd", "wd")]
    pairs += [("LPWD - lwd", "lpwd", "lwd"), ("LPWD - lpwd_reversed", "lpwd", "lpwd_reversed")]
    pairs += [("LPWD - decay_to_init", "lpwd", "decay_to_init")] if name == "r1" else []
    out = [
        report.Comparison(
            cell(regime, a, lam),
            cell(regime, b, lam),
            dict(comparison=c, claim="> 0"),
            "> 0",
            len(MAIN_SEEDS),
        )
        for c, a, b in pairs
    ]
    for other in (high, low):  # LPWD's drop from lambda to `other` minus WD's
        drop = [(cell(regime, m, lam), cell(regime, m, other)) for m in ("lpwd", "wd")]
        what = f"LPWD's drop to lambda {other:g} - WD's"
        columns = dict(comparison=what, claim="< 0")
        out.append(report.Comparison(*drop, columns, "< 0", len(ROBUST_SEEDS)))
    return out


def same_machine(results: report.Results) -> list[dict[str, Any]]:
    """The named comparisons again, over the seeds whose runs all trained on one CPU model:
    each cell's records are keyed by (seed, machine), so a pair shares both or drops out. A run
    repeats bit for bit only on the same CPU model, and an R1 fine-tune starts from the
    pretraining trained on its own machine. A record's `machine`, or for a run whose summary
    predates it the runs directory's machines.csv; a run of unknown machine is left out."""
    listed = engine.machines(results.runs_dir)
    run_names = {
        (tuple(run.facts.get(k) for k in PROTOCOL.cell), run.facts.get("seed")): run.name
        for run in plan("", results.runs_dir)
        if run.trains
    }
    cells: dict[Any, dict[Any, dict[str, Any]]] = {}
    for key, seeds in results.cells.items():
        for seed, record in seeds.items():
            where = record.get("machine") or listed.get(run_names.get((key, seed)))
            if where:
                cells.setdefault(key, {})[(seed, where)] = record
    if not cells:
        return []
    rows = report.compare(lambda res: comparisons(res.runs_dir), True, final="seeds")
    return rows(dataclasses.replace(results, cells=cells))


def notes(runs_dir: str) -> list[str]:
    decided = decision(runs_dir)
    if decided is None:
        return ["the pilot has not settled: the protocol is planned once it has"]
    name, lam, caveat = decided
    mean = gains(runs_dir, (name,))[(name, lam)]["mean"]
    line = f"the pilot chose {name} at lambda {lam:g} (WD - baseline {mean:+.2f} best-10)"
    if caveat:
        line += f"; no candidate reached +{MIN_GAIN:g}: every verdict carries that caveat"
    return [line]


def figures(runs_dir: str) -> list[Any]:
    decided = decision(runs_dir)
    if decided is None:
        return []
    name, lam, _ = decided
    regime = REGIMES[name]
    methods = MAIN_METHODS + (R1_METHODS if name == "r1" else ())
    lambdas = sorted([lam, *(float(f"{lam * f:.4g}") for f in ROBUST_FACTORS)])
    return [
        report.Bars(
            "fig_main.png",
            f"{name}: lr {regime.lr:g}, lambda {lam:g}",
            (("", tuple((m, cell(regime, m, lam)) for m in methods)),),
        ),
        report.Curves(
            "fig_curves.png",
            f"{name}: lr {regime.lr:g}, lambda {lam:g} (band: min-max over seeds)",
            (("", tuple((m, cell(regime, m, lam)) for m in ("baseline", "wd", "lpwd"))),),
        ),
        report.Lines(
            "fig_robust.png",
            f"{name}: WD and LPWD against lambda",
            "lambda",
            tuple((m, tuple((x, cell(regime, m, x)) for x in lambdas)) for m in ("wd", "lpwd")),
            ("baseline (no decay)", cell(regime, "baseline", 0.0)),
            (
                "LPWD - WD",
                tuple((x, cell(regime, "lpwd", x), cell(regime, "wd", x)) for x in lambdas),
            ),
        ),
    ]


RULE_COLUMNS = ("comparison", "claim", "best10_mean", "p", "p_holm", "outcome", "final_top1", "n")
PROTOCOL = engine.Protocol(
    name=name,
    plan=plan,
    parts=("pilot", "pilot_sgdm", "main", "robust"),
    summary=f"{MODEL}, batch {BATCH_SIZE}, the regimes of the README",
    cell=("regime", "optimizer", "method", "lr", "weight_decay"),
    cell_columns=(
        *("regime", "optimizer", "method", "lr", "weight_decay", "d_T", "n"),
        *("best10_mean", "best10_mean_std", "final_top1", "final_top1_std"),
        *("final_train_loss", "final_train_loss_std"),
    ),
    in_cells=lambda r: r["regime"] != "r1_pretrain",
    tables=(
        report.Table(
            "pilot",
            "Pilot: WD - baseline best-10 per candidate, paired by seed",
            pilot_rows,
            ("regime", "weight_decay", "differences", "mean", "complete", "chosen"),
            f"The rule takes the candidate with the largest mean, if it is at least +{MIN_GAIN:.1f}"
            "; only candidates whose every pilot seed has finished count, and it chooses once"
            " every pilot run has finished.",
        ),
        report.Table(
            "comparisons",
            "Named comparisons (Holm-adjusted together; a reading is final once its seeds are in)",
            report.compare(lambda results: comparisons(results.runs_dir), True, final="seeds"),
            RULE_COLUMNS,
        ),
        report.Table(
            "same_machine",
            "The named comparisons over the seeds whose runs share a CPU model",
            same_machine,
            ("comparison", "claim", "best10_mean", "p", "p_holm", "outcome", "n"),
            "A sensitivity check: a run repeats bit for bit only on the same CPU model, so a seed"
            " is left out of a comparison when its runs trained on different ones (machines.csv"
            " in the runs directory; an R1 fine-tune starts from the pretraining of its own"
            " machine). Holm-adjusted together; read once every run has finished.",
        ),
    ),
    figures=figures,
    notes=notes,
)
PROTOCOLS = {name: PROTOCOL}
