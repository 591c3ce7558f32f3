"""The controls study's report: runs, cells, the named comparisons with Holm's adjustment.

Reads every finished run of `experiments.controls` (reused first-study runs included) and writes
to the results directory: `runs.csv` and `runs.jsonl` (one line per run, with its history),
`cells.csv`, `comparisons.csv` (the verdict rules' comparisons: paired 95% t-interval, paired
t-test p-value and Holm's adjustment across all of them; plus descriptive ones, unadjusted),
`results.md` and the figures. Missing runs are left out and counted.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from lpwd_optax.experiments import controls, stats
from lpwd_optax.experiments.study_report import write_tables

METRICS = {
    "best10_mean": "best-10 test top-1 (%)",
    "final_top1": "final test top-1 (%)",
    "final_train_loss": "final train loss",
}
VERDICT_METRIC = "best10_mean"
Cell = tuple[str, str, float, float]  # (optimizer, method, lr, lambda)


def cell_key(record: dict[str, Any]) -> Cell:
    return (record["optimizer"], record["method"], record["lr"], record["weight_decay"])


def by_cell(records: Sequence[dict[str, Any]]) -> dict[Cell, dict[int, dict[str, Any]]]:
    cells: dict[Cell, dict[int, dict[str, Any]]] = defaultdict(dict)
    for r in records:  # the pilot's run at part h's lr is that cell's seed 0
        cells[cell_key(r)][r["seed"]] = r
    return dict(cells)


def adam_cell(p: controls.ControlsProtocol, method: str, lam: float) -> Cell:
    return ("adam", method, p.adam_lr, 0.0 if method == "baseline" else lam)


def sgd_cell(p: controls.ControlsProtocol, method: str, lr: float) -> Cell:
    decoupled, coupled = p.lambdas_at(lr)
    kind = dict(controls.PART_H)[method]
    return ("sgdm", method, lr, {"none": 0.0, "decoupled": decoupled, "coupled": coupled}[kind])


def named_comparisons(p: controls.ControlsProtocol, lr: float | None) -> list[dict[str, Any]]:
    """The comparisons of the verdict rules (Holm-adjusted together), in README order.

    `claim` is the side the rule asks for: "> 0" (a beats b) or "none" (a - b is not shown,
    i.e. its unadjusted 95% interval contains 0).
    """
    lam, paper = p.strong_lambda, p.paper_lambda
    rows = [
        ("g", "LPWD - WD", adam_cell(p, "lpwd", lam), adam_cell(p, "wd", lam), "> 0"),
        ("g", "lwd - WD", adam_cell(p, "lwd", lam), adam_cell(p, "wd", lam), "> 0"),
        ("g", "LPWD - lwd", adam_cell(p, "lpwd", lam), adam_cell(p, "lwd", lam), "none"),
        (
            "g",
            "LPWD - lpwd_reversed",
            adam_cell(p, "lpwd", lam),
            adam_cell(p, "lpwd_reversed", lam),
            "> 0",
        ),
        (
            "g",
            "LPWD - lpwd_shuffled",
            adam_cell(p, "lpwd", lam),
            adam_cell(p, "lpwd_shuffled", lam),
            "> 0",
        ),
        (
            "g",
            "LPWD - wd_matched",
            adam_cell(p, "lpwd", lam),
            adam_cell(p, "wd_matched", lam),
            "> 0",
        ),
        (
            "g",
            "LPWD - WD (lambda 0.5)",
            adam_cell(p, "lpwd", paper),
            adam_cell(p, "wd", paper),
            "> 0",
        ),
    ]
    if lr is not None:
        rows += [
            ("h", "AdaDecay - WD", sgd_cell(p, "adadecay", lr), sgd_cell(p, "wd", lr), "> 0"),
            ("h", "WRS - WD", sgd_cell(p, "wrs", lr), sgd_cell(p, "wd", lr), ">= 0"),
            ("h", "SGDP+WRS - WD", sgd_cell(p, "wrs+adamp", lr), sgd_cell(p, "wd", lr), "> 0"),
            ("h", "SGDP+WRS - WRS", sgd_cell(p, "wrs+adamp", lr), sgd_cell(p, "wrs", lr), "> 0"),
            ("h", "SGDP+WRS - SGDP", sgd_cell(p, "wrs+adamp", lr), sgd_cell(p, "adamp", lr), "> 0"),
        ]
    planned = {"g": len(p.seeds), "h": len(p.sgd_seeds)}
    return [
        dict(part=part, comparison=c, a=a, b=b, claim=claim, n_planned=planned[part])
        for part, c, a, b, claim in rows
    ]


def family_size(p: controls.ControlsProtocol) -> int:
    """How many named comparisons Holm's adjustment runs over once part h's lr is known."""
    return len(named_comparisons(p, p.pilot_lrs[0]))


def descriptive_comparisons(p: controls.ControlsProtocol, lr: float | None):
    """Comparisons reported for context, not part of a verdict (not adjusted)."""
    lam = p.strong_lambda
    rows = [
        ("g", "WD - baseline", adam_cell(p, "wd", lam), adam_cell(p, "baseline", lam)),
        ("g", "LPWD - baseline", adam_cell(p, "lpwd", lam), adam_cell(p, "baseline", lam)),
        ("g", "wd_matched - WD", adam_cell(p, "wd_matched", lam), adam_cell(p, "wd", lam)),
        ("g", "lwd - wd_matched", adam_cell(p, "lwd", lam), adam_cell(p, "wd_matched", lam)),
    ]
    if lr is not None:
        rows += [
            ("h", "WD - baseline", sgd_cell(p, "wd", lr), sgd_cell(p, "baseline", lr)),
            ("h", "WRS - WRS(IC)", sgd_cell(p, "wrs", lr), sgd_cell(p, "wrs_ic", lr)),
            ("h", "SGDP - WD", sgd_cell(p, "adamp", lr), sgd_cell(p, "wd", lr)),
        ]
    return [dict(part=part, comparison=c, a=a, b=b, claim="-") for part, c, a, b in rows]


def comparison_rows(
    cells: dict[Cell, dict[int, dict[str, Any]]],
    named: list[dict],
    descriptive: list[dict],
    family: int | None = None,
) -> list[dict[str, Any]]:
    """Each comparison's paired difference per metric; for the named ones the verdict metric's
    t-test p-value, its Holm adjustment across the named comparisons that have data, the
    reading, and whether that reading is final (`is_final`; `family`: the number of named
    comparisons once all are planned, default `len(named)`)."""
    rows = []
    for spec, is_named in [(c, True) for c in named] + [(c, False) for c in descriptive]:
        runs_a, runs_b = cells.get(spec["a"], {}), cells.get(spec["b"], {})
        row: dict[str, Any] = dict(
            part=spec["part"],
            comparison=spec["comparison"],
            claim=spec["claim"],
            named=is_named,
            optimizer=spec["a"][0],
            lr=spec["a"][2],
            weight_decay_a=spec["a"][3],
            weight_decay_b=spec["b"][3],
        )
        for metric in METRICS:
            diff = stats.paired_difference(
                {s: r[metric] for s, r in runs_a.items()},
                {s: r[metric] for s, r in runs_b.items()},
            )
            if diff is not None:
                row.update(diff.columns(metric))
        test = stats.paired_t_test(
            {s: r[VERDICT_METRIC] for s, r in runs_a.items()},
            {s: r[VERDICT_METRIC] for s, r in runs_b.items()},
        )
        if test is not None:
            row.update(t=test.t, p=test.p)
        if is_named:
            row["n_planned"] = spec["n_planned"]
        if "n" in row:
            rows.append(row)
    tested = [r for r in rows if r["named"] and "p" in r]
    family = len(named) if family is None else family
    complete = len(tested) == family and all(r["n"] >= r["n_planned"] for r in tested)
    for row, adjusted in zip(tested, stats.holm([r["p"] for r in tested])):
        row["p_holm"] = adjusted
        row["outcome"] = outcome(row)
        row["final"] = complete or is_final(row, family)
    return rows


def is_final(row: dict[str, Any], family: int) -> bool:
    """Whether a named comparison's reading holds whatever the comparisons still missing or
    incomplete turn out to be: it has all its seeds, and its Holm-adjusted p stays on the same
    side of 0.05 for any p-values of the others. That adjusted p lies between the raw p (the
    comparison ranked last) and `family` times it (ranked first), so a reading of "holds" or
    "shown negative" is final when `family * p < 0.05`, and "not shown" when `p >= 0.05`; a
    "none" rule reads the unadjusted interval, final once the seeds are in."""
    if row["n"] < row["n_planned"]:
        return False
    if row["claim"] == "none":
        return True
    if row["p_holm"] < 0.05:
        return family * row["p"] < 0.05
    return row["p"] >= 0.05


def outcome(row: dict[str, Any]) -> str:
    """The verdict rule's reading of one named comparison (best-10)."""
    low, high = row[f"{VERDICT_METRIC}_low"], row[f"{VERDICT_METRIC}_high"]
    if row["claim"] == "none":
        return (
            "not shown (interval contains 0)" if low <= 0 <= high else "shown (interval excludes 0)"
        )
    shown = row["p_holm"] < 0.05
    positive = row[VERDICT_METRIC] > 0
    if shown and positive:
        return "holds"
    if shown:
        return "does not hold (shown negative)"
    return "not shown"


def cell_rows(cells: dict[Cell, dict[int, dict[str, Any]]], steps: int) -> list[dict[str, Any]]:
    rows = []
    for (optimizer, method, lr, lam), seeds in sorted(cells.items()):
        row: dict[str, Any] = dict(
            optimizer=optimizer,
            method=method,
            lr=lr,
            weight_decay=lam,
            d_T=lr * lam * steps,
            n=len(seeds),
            reused=sum(bool(r["reused"]) for r in seeds.values()),
        )
        for metric in METRICS:
            s = stats.summarize([r[metric] for r in seeds.values()])
            row.update({metric: s.mean, f"{metric}_std": s.std})
        rows.append(row)
    return rows


def write_report(
    p: controls.ControlsProtocol, dataset: str, runs_dir: str, results_dir: str
) -> dict[str, list[dict[str, Any]]]:
    os.makedirs(results_dir, exist_ok=True)
    records = controls.records(p, runs_dir)
    lr = controls.chosen_lr(p, runs_dir)
    cells = by_cell(records)
    tables = dict(
        cells=cell_rows(cells, p.steps),
        comparisons=comparison_rows(
            cells, named_comparisons(p, lr), descriptive_comparisons(p, lr), family_size(p)
        ),
        pilot=[
            {k: r[k] for k in ("lr", "best10_mean", "final_top1", "final_train_loss")}
            for r in records
            if r["part"] == "p"
        ],
    )
    write_tables(results_dir, records, tables)
    with open(os.path.join(results_dir, "results.md"), "w") as f:
        f.write(results_markdown(p, dataset, runs_dir, records, tables, lr))
    plot_control_bars(p, cells, os.path.join(results_dir, "fig_controls.png"))
    if lr is not None:
        plot_part_h(p, cells, lr, os.path.join(results_dir, "fig_part_h.png"))
    plot_curves(p, cells, os.path.join(results_dir, "fig_lpwd_lwd_wd_curves.png"))
    return tables


# ----------------------------------------------------------------------------------------------
# Markdown.


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _interval(row: dict[str, Any], metric: str) -> str:
    if metric not in row:
        return "-"
    digits = 3 if metric == "final_train_loss" else 2
    mark = " *" if row[f"{metric}_significant"] else ""
    return (
        f"{row[metric]:+.{digits}f} [{row[f'{metric}_low']:+.{digits}f}, "
        f"{row[f'{metric}_high']:+.{digits}f}]{mark}"
    )


def results_markdown(p, dataset, runs_dir, records, tables, lr) -> str:
    planned = controls.plan(p, runs_dir)
    trained = [r for r in records if not r["reused"]]
    hours = sum(r["wall_time_s"] or 0 for r in trained) / 3600
    lines = [
        f"# Study '{p.name}': results",
        "",
        f"{len(records)} of {len(planned)} planned runs finished "
        f"({sum(r['reused'] for r in records)} reused from the first study; "
        f"{len(trained)} trained, {hours:.1f} h of training wall time). {p.model}, "
        f"{os.path.basename(dataset)}, batch {p.batch_size}, T = {p.steps} steps.",
        "",
        "| part | runs finished | wall time of the trained runs (h) |",
        "|---|---|---|",
    ]
    for part in ("p", "g1", "h", "g2", "g3"):
        done = [r for r in records if r["part"] == part]
        total = sum(r.part == part for r in planned)
        seconds = sum(r["wall_time_s"] or 0 for r in done if not r["reused"])
        lines.append(f"| {part} | {len(done)} of {total} | {seconds / 3600:.2f} |")
    diverged = [r.name for r in planned if controls.has_diverged(runs_dir, r)]
    if diverged:
        lines += ["", f"Diverged (non-finite loss; not run again): {', '.join(diverged)}."]
    lines += ["", "## SGD-momentum pilot (baseline, seed 0)", ""]
    lines += ["| lr | best-10 top-1 | final top-1 | final train loss |", "|---|---|---|---|"]
    for r in tables["pilot"]:
        lines.append(
            f"| {r['lr']:g} | {_fmt(r['best10_mean'])} | {_fmt(r['final_top1'])} | "
            f"{_fmt(r['final_train_loss'], 3)} |"
        )
    lines.append("")
    lines.append(f"Part h's lr: {lr:g}." if lr is not None else "The pilot has not finished.")
    lines += [
        "",
        "## Cells (mean +- sample std over seeds)",
        "",
        "| optimizer | method | eta | lambda | d*T | best-10 top-1 | final top-1 | "
        "final train loss | n (reused) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in tables["cells"]:
        lines.append(
            f"| {r['optimizer']} | {r['method']} | {r['lr']:g} | {r['weight_decay']:g} | "
            f"{r['d_T']:.3g} | {_fmt(r['best10_mean'])} +- {_fmt(r['best10_mean_std'])} | "
            f"{_fmt(r['final_top1'])} +- {_fmt(r['final_top1_std'])} | "
            f"{_fmt(r['final_train_loss'], 3)} +- {_fmt(r['final_train_loss_std'], 3)} | "
            f"{r['n']} ({r['reused']}) |"
        )
    lines += [
        "",
        "## Named comparisons (the verdict rules; best-10 decides)",
        "",
        "Mean over seeds of the paired difference with its 95% t-interval (* = excludes 0); the",
        "paired t-test's p-value on best-10 and its Holm adjustment across every named comparison",
        "that has data. A reading is final when no outcome of the comparisons still to come can",
        f"change it: all its seeds are in, and Holm's p over all {family_size(p)} named "
        "comparisons, which lies",
        f"between p and {family_size(p)} p, is on the same side of 0.05 either way; else it is "
        "provisional.",
        "",
        "| part | a - b | rule | best-10 | p | p (Holm) | reading | final top-1 | "
        "final train loss | n |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in tables["comparisons"]:
        if r["named"]:
            lines.append(
                f"| {r['part']} | {r['comparison']} | {r['claim']} | "
                f"{_interval(r, 'best10_mean')} | {_fmt(r.get('p'), 4)} | "
                f"{_fmt(r.get('p_holm'), 4)} | {_reading(r)} | "
                f"{_interval(r, 'final_top1')} | {_interval(r, 'final_train_loss')} | {r['n']} |"
            )
    lines += [
        "",
        "## Other comparisons (context; not adjusted, no verdict)",
        "",
        "| part | a - b | best-10 | final top-1 | final train loss | n |",
        "|---|---|---|---|---|---|",
    ]
    if not any(not r["named"] for r in tables["comparisons"]):
        lines.append("| none has data yet | | | | | |")
    for r in tables["comparisons"]:
        if not r["named"]:
            lines.append(
                f"| {r['part']} | {r['comparison']} | {_interval(r, 'best10_mean')} | "
                f"{_interval(r, 'final_top1')} | {_interval(r, 'final_train_loss')} | {r['n']} |"
            )
    return "\n".join(lines) + "\n"


def _reading(row: dict[str, Any]) -> str:
    if "outcome" not in row:
        return "-"
    return f"{row['outcome']} ({'final' if row['final'] else 'provisional'})"


# ----------------------------------------------------------------------------------------------
# Figures.

COLORS = {
    "baseline": "#555555",
    "wd": "#d62728",
    "lpwd": "#1f77b4",
    "lwd": "#17becf",
    "lpwd_reversed": "#9467bd",
    "lpwd_shuffled": "#e377c2",
    "wd_matched": "#ff7f0e",
    "adadecay": "#8c564b",
    "wrs": "#2ca02c",
    "wrs_ic": "#98df8a",
    "adamp": "#bcbd22",
    "wrs+adamp": "#7f7f7f",
}
LABELS = {
    "wd": "WD",
    "wrs": "WRS",
    "adamp": "SGDP",
    "wrs+adamp": "SGDP+WRS",
    "wrs_ic": "WRS(IC)",
    "adadecay": "AdaDecay",
}


def _mean_ci(seeds: dict[int, dict[str, Any]], metric: str) -> tuple[float, float, int]:
    s = stats.summarize([r[metric] for r in seeds.values()])
    half = stats.t_quantile(0.95, s.n - 1) * s.std / math.sqrt(s.n) if s.n > 1 else 0.0
    return s.mean, half, s.n


def _bars(ax, entries, title):
    """entries: (label, color, seeds) with data; bars of the best-10 mean and 95% CI."""
    xs = range(len(entries))
    means, halves = [], []
    for i, (_, color, seeds) in enumerate(entries):
        mean, half, n = _mean_ci(seeds, "best10_mean")
        means.append(mean)
        halves.append(half)
        ax.bar(i, mean, 0.7, yerr=half, capsize=4, color=color)
        ax.text(i, mean + half + 0.2, f"{mean:.2f}\nn={n}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([e[0] for e in entries], rotation=30, ha="right", fontsize=8)
    if means:
        ax.set_ylim(min(m - h for m, h in zip(means, halves)) - 3, max(means) + max(halves) + 3)
    ax.set_ylabel("best-10 test top-1 (%), mean and 95% CI")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)


def plot_control_bars(p, cells, path: str) -> None:
    """Part g: baseline, WD, LPWD and the four controls at lambda 2 (95% t-intervals)."""
    entries = [
        (m, COLORS[m], cells[adam_cell(p, m, p.strong_lambda)])
        for m in ("baseline", "wd", "wd_matched", "lwd", "lpwd", "lpwd_reversed", "lpwd_shuffled")
        if cells.get(adam_cell(p, m, p.strong_lambda))
    ]
    if not entries:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    _bars(ax, entries, f"Part g: Adam, eta={p.adam_lr:g}, lambda={p.strong_lambda:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_part_h(p, cells, lr: float, path: str) -> None:
    entries = [
        (LABELS.get(m, m), COLORS[m], cells[sgd_cell(p, m, lr)])
        for m, _ in controls.PART_H
        if cells.get(sgd_cell(p, m, lr))
    ]
    if not entries:
        return
    decoupled, _ = p.lambdas_at(lr)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    _bars(
        ax,
        entries,
        f"Part h: SGD-momentum {p.momentum:g}, eta={lr:g}, d*T={lr * decoupled * p.steps:.2g}",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(p, cells, path: str) -> None:
    """Train loss and test top-1 over steps of LPWD, lwd and WD at lambda 2: mean over seeds
    with a min-max band."""
    present = [m for m in ("wd", "lwd", "lpwd") if cells.get(adam_cell(p, m, p.strong_lambda))]
    if not present:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in present:
        seeds = cells[adam_cell(p, method, p.strong_lambda)]
        for ax, key in zip(axes, ("train_loss", "test_top1")):
            curves = [[h[key] for h in r["history"]] for r in seeds.values()]
            length = min(len(c) for c in curves)
            steps = [(i + 1) * p.steps_per_period for i in range(length)]
            columns = list(zip(*(c[:length] for c in curves)))
            ax.plot(
                steps,
                [sum(v) / len(v) for v in columns],
                color=COLORS[method],
                label=f"{method} (n={len(curves)})",
            )
            ax.fill_between(
                steps,
                [min(v) for v in columns],
                [max(v) for v in columns],
                color=COLORS[method],
                alpha=0.2,
            )
    axes[0].set_ylabel("train loss (period mean)")
    axes[1].set_ylabel("test top-1 (%)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"LPWD vs lwd vs WD, Adam eta={p.adam_lr:g}, lambda={p.strong_lambda:g} "
        "(band: min-max over seeds)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
