"""The report of any study: its runs, cells, comparisons with their verdicts, tables, figures.

A protocol (`engine.Protocol`) says what to report; this module writes it, the same way for
every study, to the results directory:

- `runs.csv` and `runs.jsonl`: one record per finished run (`engine.records`) with its
  per-evaluation history; runs.jsonl is also the study's record (`--restore_from`).
- `cells.csv`: per cell (the runs that differ only by seed) the mean and sample std over seeds
  of each metric, and n.
- one CSV per `Table` of the protocol: comparisons (`compare`: `Comparison`s of two cells, or of
  two differences of cells, paired by seed, with 95% t-intervals; with `t_tests`, paired
  t-tests, and for the comparisons with a verdict rule Holm's adjustment across them and the
  reading the rule gives), per-run tables (`per_run`) or any rows the protocol computes.
- `results.md`: every table, and the figures (`Curves`, `Bars`, `Lines`, `Grid`, `Points`).

Missing runs are left out and counted, so a partial study still gets a report.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import textwrap
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lpwd_optax.experiments import engine, stats

METRICS = {
    "best10_mean": "best-10 test top-1 (%)",
    "final_top1": "final test top-1 (%)",
    "final_train_loss": "final train loss",
}
VERDICT_METRIC = "best10_mean"  # what the verdict rules read
Key = tuple  # a cell: the values of the protocol's cell facts, in order
Side = Any  # a cell's Key, or (Key, Key): per seed, the first cell minus the second


@dataclasses.dataclass(frozen=True)
class Comparison:
    """`a - b` per seed, paired by seed, for every metric.

    Attributes:
      a, b: a cell's key, or a pair of keys (a difference per seed: a difference of
        differences, e.g. how PWD - RWD changes from one lambda to another).
      columns: the row's leading columns (its name, lr, lambda, ...).
      rule: the verdict rule on best-10: "> 0" (a beats b), ">= 0", "< 0" (b beats a), or
        "none" (a - b is not shown: its unadjusted 95% interval contains 0); None: reported for
        context. A rule holds when Holm's adjusted p is below 0.05 with the claimed sign.
      seeds: how many seeds the protocol plans for it (a reading is final once it has them).
    """

    a: Side
    b: Side
    columns: Mapping[str, Any]
    rule: str | None = None
    seeds: int | None = None


@dataclasses.dataclass
class Results:
    """What the tables and figures are built from."""

    protocol: engine.Protocol
    dataset: str
    runs_dir: str
    records: list[dict[str, Any]]
    cells: dict[Key, dict[int, dict[str, Any]]]
    tables: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)


Rows = Callable[[Results], list[dict[str, Any]]]


@dataclasses.dataclass(frozen=True)
class Table:
    """One table of the report: `<name>.csv` and a section of results.md.

    Attributes:
      name: the CSV's name.
      title: the section's title.
      rows: Results -> the rows (`compare`, `per_run`, or the protocol's own).
      markdown: the columns results.md shows (default all); a metric shows its interval, or
        mean +- std, when the row has them; "outcome" shows the verdict's reading.
      text: a paragraph under the title.
    """

    name: str
    title: str
    rows: Rows
    markdown: tuple[str, ...] = ()
    text: str = ""


# ----------------------------------------------------------------------------------------------
# Cells and comparisons


def by_cell(protocol: engine.Protocol, records: Sequence[dict[str, Any]]):
    """{cell key: {seed: record}} of the records the protocol puts in cells."""
    cells: dict[Key, dict[int, dict[str, Any]]] = defaultdict(dict)
    for r in records:
        if protocol.in_cells is None or protocol.in_cells(r):
            cells[tuple(r.get(k) for k in protocol.cell)][r["seed"]] = r
    return dict(cells)


def cell_rows(results: Results) -> list[dict[str, Any]]:
    protocol = results.protocol
    order = protocol.cell_order or (lambda key: key)
    rows = []
    for key, seeds in sorted(results.cells.items(), key=lambda kv: order(kv[0])):
        facts = dict(zip(protocol.cell, key))
        values: dict[str, Any] = dict(facts, n=len(seeds))
        values["d_T"] = facts["lr"] * facts["weight_decay"] * next(iter(seeds.values()))["steps"]
        values["reused"] = sum(bool(r.get("reused")) for r in seeds.values())
        for metric in METRICS:
            s = stats.summarize([r[metric] for r in seeds.values()])
            values.update({metric: s.mean, f"{metric}_std": s.std})
        rows.append({c: values[c] for c in protocol.cell_columns})
    return rows


def _per_seed(cells, side: Side, metric: str) -> dict[int, float]:
    if side and isinstance(side[0], tuple):  # a difference of two cells
        a, b = (cells.get(k, {}) for k in side)
        return {s: a[s][metric] - b[s][metric] for s in a.keys() & b.keys()}
    return {s: r[metric] for s, r in cells.get(side, {}).items()}


def compare(
    comparisons: Sequence[Comparison] | Callable[[Results], Sequence[Comparison]],
    t_tests: bool = False,
    family: int | None = None,
    final: str = "holm",
) -> Rows:
    """Rows of paired differences, one per comparison with two shared seeds.

    Args:
      comparisons: the comparisons, or Results -> them (when a pilot decides some).
      t_tests: add the paired t-test (t, p) on best-10 to every row; the rows with a verdict
        rule also get `n_planned`, Holm's adjusted p across all of them that have data
        (`p_holm`), the rule's reading (`outcome`) and whether it is final (`final`).
      family: how many comparisons have a rule once every part is planned (default: those
        given), for whether a reading is final.
      final: when a reading is final: "holm" (`is_final`), or "seeds" (once its seeds are in).
    """

    def rows(results: Results) -> list[dict[str, Any]]:
        specs = comparisons(results) if callable(comparisons) else comparisons
        out, ruled = [], []
        for spec in specs:
            a = {m: _per_seed(results.cells, spec.a, m) for m in METRICS}
            b = {m: _per_seed(results.cells, spec.b, m) for m in METRICS}
            row = dict(spec.columns)
            for metric in METRICS:
                diff = stats.paired_difference(a[metric], b[metric])
                if diff is not None:
                    row.update(diff.columns(metric))
            if t_tests:
                test = stats.paired_t_test(a[VERDICT_METRIC], b[VERDICT_METRIC])
                if test is not None:
                    row.update(t=test.t, p=test.p)
                if spec.rule is not None:
                    row["n_planned"] = spec.seeds
            if "n" in row:
                out.append(row)
                if t_tests and spec.rule is not None and "p" in row:
                    ruled.append((row, spec.rule))
        size = len([s for s in specs if s.rule is not None]) if family is None else family
        complete = len(ruled) == size and all(r["n"] >= r["n_planned"] for r, _ in ruled)
        for (row, rule), adjusted in zip(ruled, stats.holm([r["p"] for r, _ in ruled])):
            row["p_holm"] = adjusted
            row["outcome"] = outcome(row, rule)
            seeds_in = row["n"] >= row["n_planned"]
            row["final"] = seeds_in if final == "seeds" else complete or is_final(row, rule, size)
        return out

    return rows


def outcome(row: dict[str, Any], rule: str) -> str:
    """The verdict rule's reading of one comparison (best-10)."""
    low, high = row[f"{VERDICT_METRIC}_low"], row[f"{VERDICT_METRIC}_high"]
    if rule == "none":
        return (
            "not shown (interval contains 0)" if low <= 0 <= high else "shown (interval excludes 0)"
        )
    if row["p_holm"] >= 0.05:
        return "not shown"
    positive = row[VERDICT_METRIC] > 0
    if rule == "< 0":
        return "does not hold (shown positive)" if positive else "holds"
    return "holds" if positive else "does not hold (shown negative)"


def is_final(row: dict[str, Any], rule: str, family: int) -> bool:
    """Whether a reading holds whatever the comparisons still missing or incomplete turn out
    to be: it has all its seeds, and its Holm-adjusted p stays on the same side of 0.05 for any
    p-values of the others. That adjusted p lies between the raw p (the comparison ranked
    last) and `family` times it (ranked first), so "holds" or "shown negative" is final when
    `family * p < 0.05`, and "not shown" when `p >= 0.05`; a "none" rule reads the unadjusted
    interval, final once the seeds are in."""
    if row["n"] < row["n_planned"]:
        return False
    if rule == "none":
        return True
    if row["p_holm"] < 0.05:
        return family * row["p"] < 0.05
    return row["p"] >= 0.05


def per_run(
    where: Callable[[dict[str, Any]], bool], columns: Sequence[str], order: Sequence[str] = ()
) -> Rows:
    """Rows of the runs `where` selects: these columns of their records, sorted by `order`
    (default: plan order)."""

    def rows(results: Results) -> list[dict[str, Any]]:
        out = [{c: r[c] for c in columns} for r in results.records if where(r)]
        if order:
            out.sort(key=lambda r: tuple(r[c] for c in order))
        return out

    return rows


# ----------------------------------------------------------------------------------------------
# Writing it


def build(protocol: engine.Protocol, dataset: str, runs_dir: str) -> Results:
    """Every table of the report, from the finished runs."""
    records = engine.records(protocol, runs_dir)
    results = Results(protocol, dataset, runs_dir, records, by_cell(protocol, records))
    results.tables["cells"] = cell_rows(results)
    for table in protocol.tables:
        results.tables[table.name] = table.rows(results)
    return results


def write_report(
    protocol: engine.Protocol, dataset: str, runs_dir: str, results_dir: str
) -> dict[str, list[dict[str, Any]]]:
    """Writes the tables, results.md and the figures; returns the tables."""
    os.makedirs(results_dir, exist_ok=True)
    results = build(protocol, dataset, runs_dir)
    write_tables(results_dir, results.records, results.tables)
    with open(os.path.join(results_dir, "results.md"), "w") as f:
        f.write(markdown(results))
    figures = protocol.figures(runs_dir) if callable(protocol.figures) else protocol.figures
    for figure in figures:
        draw(figure, results, os.path.join(results_dir, figure.file))
    return results.tables


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


# ----------------------------------------------------------------------------------------------
# results.md

HEADERS = {
    "lr": "eta",
    "weight_decay": "lambda",
    "weight_decay_a": "lambda a",
    "weight_decay_b": "lambda b",
    "d_T": "d*T",
    "best10_mean": "best-10 top-1",
    "final_top1": "final top-1",
    "final_train_loss": "final train loss",
    "comparison": "a - b",
    "claim": "rule",
    "p_holm": "p (Holm)",
    "outcome": "reading",
    "mean_rop": "R_op",
    "kind": "runs",
    "from_lambda": "from lambda",
    "to_lambda": "to lambda",
    "factor": "weight factor (1 - lambda_s)^100",
    "top1": "test top-1",
}
FORMATS = {"d_T": ".3g", "mean_rop": ".3g", "factor": ".3g", "p": ".4f", "p_holm": ".4f"}
FORMATS.update(t=".2f", mean="+.2f")


def _digits(column: str) -> int:
    return 3 if column.endswith("loss") else 2


def _fmt(value: Any, spec: str = "g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def md_value(row: dict[str, Any], column: str) -> str:
    """One cell of a markdown table: an interval `mean [low, high]` (* if it excludes 0), a
    `mean +- std`, a verdict's reading, or the value."""
    d = _digits(column)
    if f"{column}_low" in row:
        mark = " *" if row[f"{column}_significant"] else ""
        return f"{row[column]:+.{d}f} [{row[f'{column}_low']:+.{d}f}, {row[f'{column}_high']:+.{d}f}]{mark}"  # noqa: E501
    if f"{column}_std" in row:
        return f"{_fmt(row[column], f'.{d}f')} +- {_fmt(row[f'{column}_std'], f'.{d}f')}"
    if column == "outcome":
        if "outcome" not in row:
            return "-"
        return f"{row['outcome']} ({'final' if row['final'] else 'provisional'})"
    spec = FORMATS.get(column, f".{d}f" if column in METRICS else "g")
    return _fmt(row.get(column), spec)


def md_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[str]:
    if not rows:
        return ["(no run has data for it yet)"]
    lines = [
        "| " + " | ".join(HEADERS.get(c, c) for c in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(md_value(r, c) for c in columns) + " |" for r in rows]
    return lines


def markdown(results: Results) -> str:
    protocol, records = results.protocol, results.records
    runs = protocol.plan("", results.runs_dir)
    planned = [r for r in runs if r.trains]
    trained = [r for r in records if not r.get("reused")]
    hours = sum(r["wall_time_s"] or 0 for r in trained) / 3600
    done = f"{len(records)} of {len(planned)} planned runs finished"
    if protocol.reuse is not None:
        reused = len(records) - len(trained)
        done += f" ({reused} reused from {protocol.reuse.study}; {len(trained)} trained, "
    else:
        done += " ("
    lines = [
        f"# Study '{protocol.name}': results",
        "",
        f"{done}{hours:.1f} h of training wall time). {protocol.summary}; data "
        f"{os.path.basename(results.dataset)}.",
        "",
        "| part | runs finished | wall time of the trained runs (h) |",
        "|---|---|---|",
    ]
    for part in protocol.parts:
        total = sum(r.part == part for r in planned)
        if not total and any(r.part == part for r in runs):
            continue  # a part of other programs' runs (zero-shot decay)
        finished = [r for r in records if r["part"] == part]
        seconds = sum(r["wall_time_s"] or 0 for r in finished if not r.get("reused"))
        lines.append(f"| {part} | {len(finished)} of {total} | {seconds / 3600:.2f} |")
    diverged = [r.name for r in planned if engine.has_diverged(results.runs_dir, r)]
    if diverged:
        lines += ["", f"Diverged (non-finite loss; not run again): {', '.join(diverged)}."]
    notes = protocol.notes(results.runs_dir) if protocol.notes else []
    lines += ["", *notes] if notes else []
    sections = [("cells", "Cells (mean +- sample std over seeds)", protocol.cell_columns, "")]
    sections += [(t.name, t.title, t.markdown, t.text) for t in protocol.tables]
    for name, title, columns, text in sections:
        rows = results.tables[name]
        columns = columns or (list(rows[0]) if rows else [])
        if name == "cells":
            columns = [c for c in columns if not c.endswith("_std")]
        lines += ["", f"## {title}", ""] + ([text, ""] if text else []) + md_table(rows, columns)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Figures: each kind is drawn from the cells (or a table) it names, and skipped while it has no
# data.

Entry = tuple[str, Key]  # (label, cell)


@dataclasses.dataclass(frozen=True)
class Curves:
    """Train loss (top row) and test top-1 (bottom row) against the step, one column per
    panel: each entry's mean over seeds with a min-max band."""

    file: str
    title: str
    panels: tuple[tuple[str, tuple[Entry, ...]], ...]


@dataclasses.dataclass(frozen=True)
class Bars:
    """Best-10 per cell, mean and 95% t-interval over seeds, in groups."""

    file: str
    title: str
    groups: tuple[tuple[str, tuple[Entry, ...]], ...]


@dataclasses.dataclass(frozen=True)
class Lines:
    """Best-10 (mean +- std over seeds) against x per series, a reference cell as a level,
    and beside it a paired difference (95% interval) against x; drawn once two x have data."""

    file: str
    title: str
    xlabel: str
    series: tuple[tuple[str, tuple[tuple[float, Key], ...]], ...]
    reference: Entry | None = None
    difference: tuple[str, tuple[tuple[float, Key, Key], ...]] | None = None


@dataclasses.dataclass(frozen=True)
class Grid:
    """A heat map of one column of a table's rows (those matching `where`) over two others."""

    file: str
    title: str
    table: str
    rows: str
    columns: str
    value: str
    where: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Points:
    """One column of a table against another, with an error column."""

    file: str
    title: str
    table: str
    x: str
    y: str
    error: str
    xlabel: str
    ylabel: str


COLORS = {
    "baseline": "#555555",
    "l2": "#8c564b",
    "wd": "#d62728",
    "rwd": "#ff7f0e",
    "pwd": "#2ca02c",
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


def _color(results: Results, key: Key, index: int) -> str:
    method = dict(zip(results.protocol.cell, key)).get("method")
    return COLORS.get(method, f"C{index % 10}")


def _mean_interval(seeds: dict[int, dict[str, Any]], metric: str) -> tuple[float, float, int]:
    s = stats.summarize([r[metric] for r in seeds.values()])
    half = stats.t_quantile(0.95, s.n - 1) * s.std / math.sqrt(s.n) if s.n > 1 else 0.0
    return s.mean, half, s.n


def draw(figure: Any, results: Results, path: str) -> bool:
    """Draws `figure` to `path`; False (and nothing written) while it has no data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = DRAW[type(figure)](figure, results, plt)
    if fig is None:
        return False
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _curves(spec: Curves, results: Results, plt):
    panels = [
        (title, [(label, key) for label, key in entries if results.cells.get(key)])
        for title, entries in spec.panels
    ]
    if not any(entries for _, entries in panels):
        return None
    width = max(7.0, 5.2 * len(panels))
    fig, axes = plt.subplots(2, len(panels), figsize=(width, 7), squeeze=False)
    for col, (title, entries) in enumerate(panels):
        for i, (label, key) in enumerate(entries):
            seeds = list(results.cells[key].values())
            color = _color(results, key, i)
            for row, metric in enumerate(("train_loss", "test_top1")):
                curves = [[h[metric] for h in r["history"]] for r in seeds]
                length = min(len(c) for c in curves)
                per_eval = seeds[0]["steps"] / seeds[0]["history"][-1]["epoch"]
                steps = [h["epoch"] * per_eval for h in seeds[0]["history"][:length]]
                columns = list(zip(*(c[:length] for c in curves)))
                ax = axes[row][col]
                mean = [sum(v) / len(v) for v in columns]
                ax.plot(steps, mean, color=color, label=f"{label} (n={len(curves)})")
                lows, highs = [min(v) for v in columns], [max(v) for v in columns]
                ax.fill_between(steps, lows, highs, color=color, alpha=0.2)
        axes[0][col].set_title(title, fontsize=10)
        axes[0][col].set_ylabel("train loss (period mean)")
        axes[1][col].set_ylabel("test top-1 (%)")
        axes[1][col].set_xlabel("step")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.suptitle("\n".join(textwrap.wrap(spec.title, int(width * 12))), fontsize=10)
    return fig


def _bars(spec: Bars, results: Results, plt):
    groups = [
        (title, [(label, key) for label, key in entries if results.cells.get(key)])
        for title, entries in spec.groups
    ]
    if not any(entries for _, entries in groups):
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / max(len(entries) for _, entries in groups)
    tops, bottoms, labelled = [], [], set()
    for g, (_, entries) in enumerate(groups):
        for i, (label, key) in enumerate(entries):
            mean, half, n = _mean_interval(results.cells[key], "best10_mean")
            x = g + (i - (len(entries) - 1) / 2) * width if len(groups) > 1 else i
            shown = label if len(groups) > 1 and label not in labelled else None
            labelled.add(label)
            color = _color(results, key, i)
            ax.bar(
                x,
                mean,
                width if len(groups) > 1 else 0.7,
                yerr=half,
                capsize=3,
                color=color,
                label=shown,
            )
            ax.text(
                x,
                mean + half + 0.2,
                f"{mean:.2f}\nn={n}",
                ha="center",
                va="bottom",
                fontsize=6 if len(groups) > 1 else 7,
            )
            tops.append(mean + half)
            bottoms.append(mean - half)
    if len(groups) > 1:
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([title for title, _ in groups])
        ax.legend(
            ncols=5, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False
        )
    else:
        entries = groups[0][1]
        ax.set_xticks(range(len(entries)))
        ax.set_xticklabels([label for label, _ in entries], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(min(bottoms) - 3, max(tops) + 3)
    ax.set_ylabel("best-10 test top-1 (%), mean and 95% CI")
    ax.set_title(spec.title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _lines(spec: Lines, results: Results, plt):
    cells = results.cells
    with_data = {x for _, points in spec.series for x, key in points if cells.get(key)}
    if len(with_data) < 2:
        return None
    panels = 2 if spec.difference else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
    left = axes[0][0]
    for i, (label, points) in enumerate(spec.series):
        xs, means, stds, color = [], [], [], None
        for x, key in points:
            if cells.get(key):
                s = stats.summarize([r["best10_mean"] for r in cells[key].values()])
                xs.append(x)
                means.append(s.mean)
                stds.append(0.0 if math.isnan(s.std) else s.std)
                color = _color(results, key, i)
        if xs:
            left.errorbar(xs, means, yerr=stds, marker="o", capsize=3, color=color, label=label)
    if spec.reference and cells.get(spec.reference[1]):
        label, key = spec.reference
        s = stats.summarize([r["best10_mean"] for r in cells[key].values()])
        left.axhline(s.mean, color=_color(results, key, 0), linestyle="--", label=label)
    ticks = sorted({x for _, points in spec.series for x, _ in points})
    for ax in axes[0]:
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
        ax.minorticks_off()
    left.set(xlabel=spec.xlabel, ylabel="best-10 test top-1 (%), mean +- std")
    left.set_title(spec.title, fontsize=10)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    if spec.difference:
        label, points = spec.difference
        right = axes[0][1]
        xs, means, lows, highs = [], [], [], []
        for x, a, b in points:
            diff = stats.paired_difference(
                _per_seed(cells, a, "best10_mean"), _per_seed(cells, b, "best10_mean")
            )
            if diff is not None:
                xs.append(x)
                means.append(diff.mean)
                lows.append(diff.mean - diff.low)
                highs.append(diff.high - diff.mean)
        if xs:
            color = _color(results, points[0][1], 0)
            right.errorbar(xs, means, yerr=[lows, highs], marker="o", capsize=3, color=color)
        else:
            right.text(
                0.5,
                0.5,
                "no x has two seeds of both yet",
                transform=right.transAxes,
                ha="center",
                va="center",
            )
        right.axhline(0, color="black", linewidth=0.8)
        right.set(xlabel=spec.xlabel, ylabel=f"{label}, best-10 top-1 (points)")
        right.set_title(f"{label} (paired by seed, 95% CI)", fontsize=10)
        right.grid(alpha=0.3)
    return fig


def _grid(spec: Grid, results: Results, plt):
    rows = [
        r
        for r in results.tables.get(spec.table, [])
        if all(r.get(k) == v for k, v in spec.where.items()) and r[spec.value] is not None
    ]
    if not rows:
        return None
    ys, xs = sorted({r[spec.rows] for r in rows}), sorted({r[spec.columns] for r in rows})
    grid = [[math.nan] * len(xs) for _ in ys]
    for r in rows:
        grid[ys.index(r[spec.rows])][xs.index(r[spec.columns])] = r[spec.value]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    image = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
    finite = [v for row in grid for v in row if not math.isnan(v)]
    middle = (min(finite) + max(finite)) / 2
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if not math.isnan(value):
                color = "black" if value > middle else "white"
                ax.text(j, i, f"{value:.2g}", ha="center", va="center", color=color)
    ax.set_xticks(range(len(xs)), [f"{v:g}" for v in xs])
    ax.set_yticks(range(len(ys)), [f"{v:g}" for v in ys])
    fig.colorbar(image, ax=ax, label=HEADERS.get(spec.value, spec.value))
    ax.set(xlabel=HEADERS.get(spec.columns, spec.columns), ylabel=HEADERS.get(spec.rows, spec.rows))
    ax.set_title(spec.title, fontsize=10)
    return fig


def _points(spec: Points, results: Results, plt):
    rows = results.tables.get(spec.table, [])
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r[spec.x] for r in rows]
    errors = [0.0 if math.isnan(r[spec.error]) else r[spec.error] for r in rows]
    ax.errorbar(xs, [r[spec.y] for r in rows], yerr=errors, marker="o", capsize=3)
    positive = [x for x in xs if x > 0]
    ax.set_xscale("symlog", linthresh=min(positive) if positive else 1e-3)
    ax.set(xlabel=spec.xlabel, ylabel=spec.ylabel)
    ax.set_title(spec.title, fontsize=10)
    ax.grid(alpha=0.3)
    return fig


DRAW = {Curves: _curves, Bars: _bars, Lines: _lines, Grid: _grid, Points: _points}
