"""The study's report: per-run summaries, per-cell tables, paired comparisons and figures.

Reads the `summary.json` of every finished run of `experiments.study` and writes, to the results
directory: `runs.csv` and `runs.jsonl` (one line per run, with its per-period history), `cells.csv`,
`comparisons.csv`, `growth.csv` (how a comparison changes across lambda), `rop_grid.csv`,
`zero_shot.csv`, `results.md` (every table) and the figures.
Missing runs are left out and counted, so a partial study still gets a report.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from lpwd_optax.experiments import stats
from lpwd_optax.experiments.study import Protocol, StudyRun, zero_shot_sources

METRICS = {
    "best10_mean": "best-10 test top-1 (%)",
    "final_top1": "final test top-1 (%)",
    "final_train_loss": "final train loss",
}
# (a, b) pairs reported as a - b, per lambda of the strong learning rate.
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
METHOD_ORDER = ("baseline", "l2", "wd", "rwd", "pwd", "lpwd")
COLORS = {
    "baseline": "#555555",
    "l2": "#8c564b",
    "wd": "#d62728",
    "rwd": "#ff7f0e",
    "pwd": "#2ca02c",
    "lpwd": "#1f77b4",
}

Cell = tuple[str, float, float]  # (method, lr, lambda)


def load_runs(runs: Sequence[StudyRun], runs_dir: str) -> list[dict[str, Any]]:
    """One record per finished run: the run's identity and its summary's numbers."""
    records = []
    for run in runs:
        path = os.path.join(runs_dir, run.directory, "summary.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            summary = json.load(f)
        records.append(
            dict(
                part=run.part,
                kind=run.kind,
                method=run.method,
                lr=run.lr,
                weight_decay=run.weight_decay,
                seed=run.seed,
                best10_mean=summary["best10_mean"],
                final_top1=summary["final_top1"],
                best_top1=summary["best_top1"],
                final_train_loss=summary["final_train_loss"],
                mean_rop=summary["mean_rop"],
                steps=summary["steps"],
                wall_time_s=summary["wall_time_s"],
                history=[
                    {k: r[k] for k in ("epoch", "train_loss", "test_top1", "rop")}
                    for r in summary["history"]
                ],
            )
        )
    return records


def by_cell(records: Sequence[dict[str, Any]], kind: str = "train") -> dict[Cell, dict[int, dict]]:
    """{(method, lr, lambda): {seed: record}} for the runs of one kind."""
    cells: dict[Cell, dict[int, dict]] = defaultdict(dict)
    for r in records:
        if r["kind"] == kind:
            cells[(r["method"], r["lr"], r["weight_decay"])][r["seed"]] = r
    return dict(cells)


def cell_rows(cells: dict[Cell, dict[int, dict]]) -> list[dict[str, Any]]:
    rows = []
    for (method, lr, lam), seeds in sorted(cells.items(), key=lambda kv: _cell_order(kv[0])):
        row: dict[str, Any] = dict(method=method, lr=lr, weight_decay=lam, d_T=None)
        steps = next(iter(seeds.values()))["steps"]
        row["d_T"] = lr * lam * steps
        for metric in METRICS:
            s = stats.summarize([r[metric] for r in seeds.values()])
            row.update({f"{metric}": s.mean, f"{metric}_std": s.std})
        row["n"] = len(seeds)
        rows.append(row)
    return rows


def comparison_rows(cells: dict[Cell, dict[int, dict]], protocol: Protocol) -> list[dict[str, Any]]:
    rows = []
    groups = [(protocol.strong_lr, lam, STRONG_COMPARISONS) for lam in protocol.strong_lambdas]
    groups.append((protocol.base_lr, protocol.base_lambda, BASE_COMPARISONS))
    for lr, lam, pairs in groups:
        for a, b in pairs:
            runs_a = cells.get((a, lr, 0.0 if a == "baseline" else lam))
            runs_b = cells.get((b, lr, 0.0 if b == "baseline" else lam))
            if not runs_a or not runs_b:
                continue
            row: dict[str, Any] = dict(comparison=f"{a} - {b}", lr=lr, weight_decay=lam)
            for metric in METRICS:
                _add_difference(
                    row,
                    metric,
                    stats.paired_difference(
                        {s: r[metric] for s, r in runs_a.items()},
                        {s: r[metric] for s, r in runs_b.items()},
                    ),
                )
            if "n" in row:
                rows.append(row)
    return rows


def growth_rows(cells: dict[Cell, dict[int, dict]], protocol: Protocol) -> list[dict[str, Any]]:
    """Per seed, (a - b) at the largest strong lambda minus (a - b) at the smallest."""
    lr = protocol.strong_lr
    low, high = min(protocol.strong_lambdas), max(protocol.strong_lambdas)
    rows = []
    for a, b in GROWTH_COMPARISONS:
        row: dict[str, Any] = dict(comparison=f"{a} - {b}", lr=lr, from_lambda=low, to_lambda=high)
        pair = {
            lam: (cells.get((a, lr, lam), {}), cells.get((b, lr, lam), {})) for lam in (low, high)
        }
        for metric in METRICS:
            at = {
                lam: {s: ra[s][metric] - rb[s][metric] for s in ra.keys() & rb.keys()}
                for lam, (ra, rb) in pair.items()
            }
            _add_difference(row, metric, stats.paired_difference(at[high], at[low]))
        if "n" in row:
            rows.append(row)
    return rows


def _add_difference(row: dict[str, Any], metric: str, diff: stats.Difference | None) -> None:
    if diff is not None:
        row.update(diff.columns(metric))


def rop_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """R_op of the short runs (mean over their steps) and, for reference, of the full runs."""
    rows = []
    for r in records:
        if r["mean_rop"] is None or r["method"] not in ("wd", "rwd", "pwd", "lpwd"):
            continue
        rows.append(
            {k: r[k] for k in ("kind", "method", "lr", "weight_decay", "seed", "steps", "mean_rop")}
        )
    rows.sort(key=lambda r: (r["kind"], r["method"], r["lr"], r["weight_decay"], r["seed"]))
    return rows


def zero_shot_rows(protocol: Protocol, runs_dir: str) -> list[dict[str, Any]]:
    per_lambda: dict[float, list[float]] = defaultdict(list)
    for run in zero_shot_sources(protocol):
        path = os.path.join(runs_dir, run.directory, "zero_shot_decay.json")
        if os.path.exists(path):
            with open(path) as f:
                for r in json.load(f)["results"]:
                    per_lambda[r["lambda_s"]].append(r["top1"])
    rows = []
    for lam, values in sorted(per_lambda.items()):
        s = stats.summarize(values)
        # With no training, 100 steps of d = lambda_s scale every decayed weight by (1 - d)^100.
        rows.append(dict(lambda_s=lam, factor=(1 - lam) ** 100, top1=s.mean, top1_std=s.std, n=s.n))
    return rows


def write_report(
    protocol: Protocol, dataset: str, runs: Sequence[StudyRun], runs_dir: str, results_dir: str
) -> None:
    os.makedirs(results_dir, exist_ok=True)
    records = load_runs(runs, runs_dir)
    cells = by_cell(records)
    tables = dict(
        cells=cell_rows(cells),
        comparisons=comparison_rows(cells, protocol),
        growth=growth_rows(cells, protocol),
        rop_grid=rop_rows(records),
        zero_shot=zero_shot_rows(protocol, runs_dir),
    )
    write_tables(results_dir, records, tables)
    with open(os.path.join(results_dir, "results.md"), "w") as f:
        f.write(results_markdown(protocol, dataset, runs, records, tables))
    plot_curves(protocol, cells, os.path.join(results_dir, "fig_strong_curves.png"))
    plot_ablation(protocol, cells, os.path.join(results_dir, "fig_ablation.png"))
    plot_lambda_sweep(protocol, cells, os.path.join(results_dir, "fig_lambda_sweep.png"))
    plot_rop_grid(tables["rop_grid"], os.path.join(results_dir, "fig_rop_grid.png"))
    plot_zero_shot(tables["zero_shot"], os.path.join(results_dir, "fig_zero_shot.png"))


# ----------------------------------------------------------------------------------------------
# Markdown.


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def results_markdown(
    protocol: Protocol,
    dataset: str,
    runs: Sequence[StudyRun],
    records: Sequence[dict[str, Any]],
    tables: dict[str, list[dict[str, Any]]],
) -> str:
    hours = sum(r["wall_time_s"] for r in records) / 3600
    lines = [
        f"# Study '{protocol.name}': results",
        "",
        f"{len(records)} of {len(runs)} runs finished ({hours:.1f} h of training wall time). "
        f"{protocol.model}, {os.path.basename(dataset)}, Adam, batch {protocol.batch_size}, "
        f"T = {protocol.steps} steps.",
        "",
        "| part | runs finished | wall time (h) |",
        "|---|---|---|",
    ]
    for part in "abcdf":
        done = [r for r in records if r["part"] == part]
        total = sum(r.part == part for r in runs)
        seconds = sum(r["wall_time_s"] for r in done)
        lines.append(f"| {part} | {len(done)} of {total} | {seconds / 3600:.2f} |")
    lines += [
        "",
        "## Cells (mean +- sample std over seeds)",
        "",
        "| method | eta | lambda | d*T | best-10 top-1 | final top-1 | final train loss | n |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in tables["cells"]:
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {r['weight_decay']:g} | {r['d_T']:.3g} | "
            f"{_fmt(r['best10_mean'])} +- {_fmt(r['best10_mean_std'])} | "
            f"{_fmt(r['final_top1'])} +- {_fmt(r['final_top1_std'])} | "
            f"{_fmt(r['final_train_loss'], 3)} +- {_fmt(r['final_train_loss_std'], 3)} | "
            f"{r['n']} |"
        )
    lines += [
        "",
        "## Paired differences (mean over seeds, 95% t-interval; * = interval excludes 0)",
        "",
        "| a - b | eta | lambda | best-10 top-1 | final top-1 | final train loss | n |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in tables["comparisons"]:
        lines.append(
            f"| {r['comparison']} | {r['lr']:g} | {r['weight_decay']:g} | {_intervals(r)} | "
            f"{r['n']} |"
        )
    lines += [
        "",
        "## Change of a paired difference from the smallest to the largest lambda",
        "",
        "Per seed, a - b at the largest lambda minus a - b at the smallest; mean over seeds, 95%",
        "t-interval.",
        "",
        "| a - b | eta | lambda | best-10 top-1 | final top-1 | final train loss | n |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in tables["growth"]:
        lines.append(
            f"| {r['comparison']} | {r['lr']:g} | {r['from_lambda']:g} -> {r['to_lambda']:g} | "
            f"{_intervals(r)} | {r['n']} |"
        )
    lines += [
        "",
        "## Opposing-penalty rate R_op (mean over a run's steps)",
        "",
        "| runs | method | eta | lambda | seed | steps | R_op |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in tables["rop_grid"]:
        lines.append(
            f"| {r['kind']} | {r['method']} | {r['lr']:g} | {r['weight_decay']:g} | {r['seed']} | "
            f"{r['steps']} | {r['mean_rop']:.3g} |"
        )
    lines += [
        "",
        "## Zero-shot decay of the trained baselines (100 steps of d = lambda_s, no training)",
        "",
        "| lambda_s | weight factor (1 - lambda_s)^100 | test top-1 | n |",
        "|---|---|---|---|",
    ]
    for r in tables["zero_shot"]:
        lines.append(
            f"| {r['lambda_s']:g} | {r['factor']:.3g} | {_fmt(r['top1'])} +- "
            f"{_fmt(r['top1_std'])} | {r['n']} |"
        )
    return "\n".join(lines) + "\n"


def _intervals(row: dict[str, Any]) -> str:
    """A difference row as markdown cells, one per metric: `mean [low, high]`, * if significant."""
    cells = []
    for metric in METRICS:
        if metric not in row:
            cells.append("-")
            continue
        digits = 3 if metric == "final_train_loss" else 2
        mark = " *" if row[f"{metric}_significant"] else ""
        cells.append(
            f"{row[metric]:+.{digits}f} [{row[f'{metric}_low']:+.{digits}f}, "
            f"{row[f'{metric}_high']:+.{digits}f}]{mark}"
        )
    return " | ".join(cells)


def write_tables(
    results_dir: str, records: Sequence[dict[str, Any]], tables: dict[str, list[dict[str, Any]]]
) -> None:
    """The study's record and tables: runs.csv, runs.jsonl (each run with its history, what
    `--restore_from` reads back) and one CSV per table."""
    fields = [k for k in (records[0] if records else {}) if k != "history"]
    _write_csv(os.path.join(results_dir, "runs.csv"), records, fields)
    with open(os.path.join(results_dir, "runs.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    for name, rows in tables.items():
        _write_csv(os.path.join(results_dir, f"{name}.csv"), rows)


def _write_csv(path: str, rows: Sequence[dict[str, Any]], fields: Sequence[str] | None = None):
    fields = list(fields or (list(rows[0]) if rows else []))
    for row in rows:  # comparisons may lack a metric in some rows
        fields += [k for k in row if k not in fields]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _cell_order(cell: Cell) -> tuple:
    method, lr, lam = cell
    return (-lr, lam, METHOD_ORDER.index(method) if method in METHOD_ORDER else 99)


# ----------------------------------------------------------------------------------------------
# Figures.


def _save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(protocol: Protocol, cells: dict[Cell, dict[int, dict]], path: str) -> None:
    """Fig. 1 style: train loss and test top-1 over steps, mean with a min-max band over seeds."""
    lambdas = sorted(
        (lam for lam in protocol.strong_lambdas if lam >= protocol.paper_strong_lambda),
        reverse=True,
    )
    fig, axes = plt.subplots(2, len(lambdas), figsize=(5.2 * len(lambdas), 7), squeeze=False)
    for col, lam in enumerate(lambdas):
        for method in ("baseline", "wd", "lpwd"):
            seeds = cells.get((method, protocol.strong_lr, 0.0 if method == "baseline" else lam))
            if not seeds:
                continue
            for row, key in enumerate(("train_loss", "test_top1")):
                curves = [[h[key] for h in r["history"]] for r in seeds.values()]
                length = min(len(c) for c in curves)
                steps = [(i + 1) * protocol.steps_per_period for i in range(length)]
                columns = list(zip(*(c[:length] for c in curves)))
                mean = [sum(v) / len(v) for v in columns]
                ax = axes[row][col]
                ax.plot(steps, mean, color=COLORS[method], label=f"{method} (n={len(curves)})")
                ax.fill_between(
                    steps,
                    [min(v) for v in columns],
                    [max(v) for v in columns],
                    color=COLORS[method],
                    alpha=0.2,
                )
        d_t = protocol.strong_lr * lam * protocol.steps
        axes[0][col].set_title(f"eta={protocol.strong_lr:g}, lambda={lam:g} (d*T={d_t:.2g})")
        axes[0][col].set_ylabel("train loss (period mean)")
        axes[1][col].set_ylabel("test top-1 (%)")
        axes[1][col].set_xlabel("step")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    _save(fig, path)


def plot_ablation(protocol: Protocol, cells: dict[Cell, dict[int, dict]], path: str) -> None:
    """Table 3 style: best-10 top-1 per method, mean with 95% t-intervals, one group per lambda."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    methods = ("baseline", "wd", "rwd", "pwd", "lpwd")
    lambdas = sorted(protocol.strong_lambdas)
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        xs, means, errs = [], [], []
        for j, lam in enumerate(lambdas):
            seeds = cells.get((method, protocol.strong_lr, 0.0 if method == "baseline" else lam))
            if not seeds:
                continue
            values = [r["best10_mean"] for r in seeds.values()]
            s = stats.summarize(values)
            half = stats.t_quantile(0.95, s.n - 1) * s.std / math.sqrt(s.n) if s.n > 1 else 0
            xs.append(j + (i - (len(methods) - 1) / 2) * width)
            means.append(s.mean)
            errs.append(half)
        if xs:
            ax.bar(xs, means, width, yerr=errs, capsize=3, color=COLORS[method], label=method)
    ax.set_xticks(range(len(lambdas)))
    ax.set_xticklabels(
        [f"lambda={lam:g}\nd*T={protocol.strong_lr * lam * protocol.steps:.2g}" for lam in lambdas]
    )
    ax.set_ylabel("best-10 test top-1 (%), mean and 95% CI")
    ax.set_title(f"Ablation at eta={protocol.strong_lr:g} (baseline has no decay)")
    values = [b.get_height() for b in ax.patches]
    if values:
        ax.set_ylim(min(values) - 5, max(values) + 3)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(ncols=5, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    _save(fig, path)


def plot_lambda_sweep(protocol: Protocol, cells: dict[Cell, dict[int, dict]], path: str) -> None:
    """Best-10 top-1 against lambda per method; and PWD - RWD (paired, 95% CI) against lambda."""
    lambdas = sorted(protocol.strong_lambdas)
    with_data = {lam for (m, lr, lam) in cells if lr == protocol.strong_lr and m != "baseline"}
    if len(with_data) < 2:  # a sweep needs two lambdas
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in ("wd", "rwd", "pwd", "lpwd"):
        xs, means, stds = [], [], []
        for lam in lambdas:
            seeds = cells.get((method, protocol.strong_lr, lam))
            if seeds:
                s = stats.summarize([r["best10_mean"] for r in seeds.values()])
                xs.append(lam)
                means.append(s.mean)
                stds.append(0.0 if math.isnan(s.std) else s.std)
        if xs:
            left.errorbar(
                xs, means, yerr=stds, marker="o", capsize=3, color=COLORS[method], label=method
            )
    baseline = cells.get(("baseline", protocol.strong_lr, 0.0))
    if baseline:
        s = stats.summarize([r["best10_mean"] for r in baseline.values()])
        left.axhline(s.mean, color=COLORS["baseline"], linestyle="--", label="baseline (no decay)")
    left.set_xscale("log")
    left.set_xlabel("lambda")
    left.set_ylabel("best-10 test top-1 (%), mean +- std")
    left.set_title(f"lambda sweep at eta={protocol.strong_lr:g}")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    xs, means, lows, highs = [], [], [], []
    for lam in lambdas:
        pwd, rwd = (
            cells.get(("pwd", protocol.strong_lr, lam)),
            cells.get(("rwd", protocol.strong_lr, lam)),
        )
        if pwd and rwd:
            diff = stats.paired_difference(
                {s: r["best10_mean"] for s, r in pwd.items()},
                {s: r["best10_mean"] for s, r in rwd.items()},
            )
            if diff is not None:
                xs.append(lam)
                means.append(diff.mean)
                lows.append(diff.mean - diff.low)
                highs.append(diff.high - diff.mean)
    if xs:
        right.errorbar(xs, means, yerr=[lows, highs], marker="o", capsize=3, color=COLORS["pwd"])
    else:
        right.text(
            0.5,
            0.5,
            "no lambda has two seeds of both PWD and RWD yet",
            transform=right.transAxes,
            ha="center",
            va="center",
        )
    right.axhline(0, color="black", linewidth=0.8)
    right.set_xscale("log")
    right.set_xlabel("lambda")
    right.set_ylabel("PWD - RWD, best-10 top-1 (points)")
    right.set_title("PWD's gain over RWD (paired by seed, 95% CI)")
    right.grid(alpha=0.3)
    _save(fig, path)


def plot_rop_grid(rows: Sequence[dict[str, Any]], path: str) -> None:
    """WD's R_op over the (eta, lambda) grid of the short runs, each cell labelled."""
    wd = [r for r in rows if r["kind"] == "rop" and r["method"] == "wd"]
    if not wd:  # no figure before part d has runs
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    if wd:
        lrs = sorted({r["lr"] for r in wd})
        lams = sorted({r["weight_decay"] for r in wd})
        grid = [[math.nan] * len(lams) for _ in lrs]
        for r in wd:
            grid[lrs.index(r["lr"])][lams.index(r["weight_decay"])] = r["mean_rop"]
        image = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
        finite = [v for row in grid for v in row if not math.isnan(v)]
        middle = (min(finite) + max(finite)) / 2 if finite else 0
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    color = "black" if value > middle else "white"
                    ax.text(j, i, f"{value:.2g}", ha="center", va="center", color=color)
        ax.set_xticks(range(len(lams)))
        ax.set_xticklabels([f"{v:g}" for v in lams])
        ax.set_yticks(range(len(lrs)))
        ax.set_yticklabels([f"{v:g}" for v in lrs])
        fig.colorbar(image, ax=ax, label="R_op")
    ax.set_xlabel("lambda")
    ax.set_ylabel("eta")
    ax.set_title("WD's opposing-penalty rate (short runs, seed 0)")
    _save(fig, path)


def plot_zero_shot(rows: Sequence[dict[str, Any]], path: str) -> None:
    if not rows:  # no figure before part e has run
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    if rows:
        xs = [r["lambda_s"] for r in rows]
        ax.errorbar(
            xs,
            [r["top1"] for r in rows],
            yerr=[0.0 if math.isnan(r["top1_std"]) else r["top1_std"] for r in rows],
            marker="o",
            capsize=3,
        )
        ax.set_xscale("symlog", linthresh=min(x for x in xs if x > 0) if any(xs) else 1e-3)
    ax.set_xlabel("lambda_s (100 decay steps, no training)")
    ax.set_ylabel("test top-1 (%), mean +- std")
    ax.set_title("Zero-shot weight decay of the trained baselines")
    ax.grid(alpha=0.3)
    _save(fig, path)
