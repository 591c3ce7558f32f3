"""Figures of the LPWD paper from run outputs, as matplotlib PNGs.

    # Fig. 1: train loss and test top-1 per epoch of several runs (e.g. WD vs LPWD).
    python -m experiments.plots curves runs/wd runs/lpwd --out fig1.png
    # Fig. 2: R_op per epoch of several runs (e.g. WD at several lr / lambda) ...
    python -m experiments.plots rop runs/wd_* --out fig2.png
    # ... or as a heat map of the mean R_op over a sweep's lr x lambda grid.
    python -m experiments.plots rop_grid runs/sweep --method=wd --out fig2_grid.png
    # Fig. 3a: zero-shot weight decay, test top-1 against lambda_s.
    python -m experiments.plots zero_shot runs/x/zero_shot_decay.json --out fig3a.png
    # Fig. 4: heat maps of the best-10 mean test top-1 over lr x lambda, one per method (and
    # the difference of two methods) for every dataset / model / optimizer of a sweep.
    python -m experiments.plots heatmap runs/sweep --out_dir=figs --diff=lpwd,wd

A run directory is what experiments/cifar.py writes (config.json, metrics.jsonl); a sweep
directory is what experiments/sweep.py writes (results.csv).
"""

from __future__ import annotations

if __name__ == "__main__":  # started as a script or as experiments.plots: see _entry.py
    from lpwd_optax.experiments import _entry

    _entry.run(__file__)

import argparse
import csv
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from lpwd_optax.experiments.writers import read_jsonl


def load_history(run_dir: str) -> tuple[str, list[dict[str, Any]]]:
    """(label, per-epoch records) of a run."""
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    label = (
        f"{config['method']} ({config['optimizer']}, lr={config['learning_rate']:g}, "
        f"λ={config['weight_decay']:g})"
    )
    records = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "epoch" in r]
    return label, records


def plot_curves(run_dirs: Sequence[str], out: str) -> None:
    """Fig. 1: train loss (left) and test top-1 (right) against epoch."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for run_dir in run_dirs:
        label, records = load_history(run_dir)
        epochs = [r["epoch"] for r in records]
        ax_loss.plot(epochs, [r["train_loss"] for r in records], label=label)
        ax_acc.plot(epochs, [r["test_top1"] for r in records], label=label)
    ax_loss.set(xlabel="epoch", ylabel="train loss", yscale="log", title="Training loss")
    ax_acc.set(xlabel="epoch", ylabel="test top-1 (%)", title="Test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
    _save(fig, out)


def plot_rop(run_dirs: Sequence[str], out: str) -> None:
    """Fig. 2: mean R_op per epoch of each run."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for run_dir in run_dirs:
        label, records = load_history(run_dir)
        points = [(r["epoch"], r["rop"]) for r in records if r.get("rop") is not None]
        if points:
            ax.plot(*zip(*points), label=label)
    ax.set(xlabel="epoch", ylabel="R_op", title="Opposing-penalty rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, out)


def load_results(sweep_dir: str) -> list[dict[str, Any]]:
    with open(os.path.join(sweep_dir, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in ("lr", "weight_decay", "best10_mean", "mean_rop"):
            row[key] = float(row[key]) if row.get(key) not in (None, "") else math.nan
    return [r for r in rows if r["status"] == "ok"]


def _grid(
    rows: Sequence[dict[str, Any]], value: str
) -> tuple[list[float], list[float], np.ndarray]:
    lrs = sorted({r["lr"] for r in rows}, reverse=True)
    wds = sorted({r["weight_decay"] for r in rows}, reverse=True)
    grid = np.full((len(lrs), len(wds)), np.nan)
    for r in rows:
        grid[lrs.index(r["lr"]), wds.index(r["weight_decay"])] = r[value]
    return lrs, wds, grid


def _heatmap(ax, lrs, wds, grid, title: str, fmt: str = "{:.2f}", cmap: str = "viridis") -> None:
    image = ax.imshow(grid, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(wds)), [f"{w:g}" for w in wds], rotation=45)
    ax.set_yticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    ax.set(xlabel="λ", ylabel="learning rate", title=title)
    for (i, j), v in np.ndenumerate(grid):
        if np.isfinite(v):
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7, color="w")
    ax.figure.colorbar(image, ax=ax)


def _columns(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    columns: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        columns.setdefault(f"{r['dataset']}-{r['model']}-{r['optimizer']}", []).append(r)
    return columns


def plot_rop_grid(sweep_dir: str, method: str, out: str) -> None:
    """Fig. 2 as a grid: mean R_op of `method` over lr x lambda (one panel per column)."""
    columns = _columns([r for r in load_results(sweep_dir) if r["method"] == method])
    if not columns:
        raise ValueError(f"no finished {method} cells in {sweep_dir}")
    fig, axes = plt.subplots(1, len(columns), figsize=(6 * len(columns), 4.5), squeeze=False)
    for ax, (column, rows) in zip(axes[0], columns.items()):
        _heatmap(ax, *_grid(rows, "mean_rop"), f"R_op of {method}: {column}", "{:.3f}", "magma")
    _save(fig, out)


def plot_heatmaps(sweep_dir: str, out_dir: str, diff: Sequence[str] = ()) -> list[str]:
    """Fig. 4: best-10 mean test top-1 over lr x lambda per method, per column of the sweep."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for column, rows in _columns(load_results(sweep_dir)).items():
        methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "baseline"]
        panels = [(m, _grid([r for r in rows if r["method"] == m], "best10_mean")) for m in methods]
        if len(diff) == 2 and diff[0] in methods and diff[1] in methods:
            a, b = dict(panels)[diff[0]], dict(panels)[diff[1]]
            if a[0] == b[0] and a[1] == b[1]:
                panels.append((f"{diff[0]} - {diff[1]}", (a[0], a[1], a[2] - b[2])))
        if not panels:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
        for ax, (name, grid) in zip(axes[0], panels):
            cmap = "RdBu" if " - " in name else "viridis"
            _heatmap(ax, *grid, f"{name}", cmap=cmap)
        fig.suptitle(f"best-10 mean test top-1: {column}")
        path = os.path.join(out_dir, f"heatmap_{column}.png")
        _save(fig, path)
        written.append(path)
    return written


def plot_zero_shot(paths: Sequence[str], out: str) -> None:
    """Fig. 3a: test top-1 after 100 decay-only steps against lambda_s."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for path in paths:
        with open(path) as f:
            result = json.load(f)
        xs = [r["lambda_s"] for r in result["results"]]
        ax.plot(xs, [r["top1"] for r in result["results"]], "o-", label=result["run_dir"])
    ax.set(xlabel="λ_s", ylabel="test top-1 (%)", title="Zero-shot weight decay")
    ax.set_xscale("symlog", linthresh=1e-4)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, out)


def _save(fig, out: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"wrote {out}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="figure", required=True)
    p = sub.add_parser("curves", help="Fig. 1: loss and accuracy curves of runs.")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", default="fig1_curves.png")
    p = sub.add_parser("rop", help="Fig. 2: R_op per epoch of runs.")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", default="fig2_rop.png")
    p = sub.add_parser("rop_grid", help="Fig. 2: mean R_op over a sweep's lr x lambda grid.")
    p.add_argument("sweep_dir")
    p.add_argument("--method", default="wd")
    p.add_argument("--out", default="fig2_rop_grid.png")
    p = sub.add_parser("zero_shot", help="Fig. 3a: zero-shot weight decay.")
    p.add_argument("results", nargs="+", help="zero_shot_decay.json files.")
    p.add_argument("--out", default="fig3a_zero_shot.png")
    p = sub.add_parser("heatmap", help="Fig. 4: accuracy heat maps over lr x lambda.")
    p.add_argument("sweep_dir")
    p.add_argument("--out_dir", default="figs")
    p.add_argument("--diff", default="lpwd,wd", help="Also plot method A - method B.")
    args = parser.parse_args(argv)

    if args.figure == "curves":
        plot_curves(args.run_dirs, args.out)
    elif args.figure == "rop":
        plot_rop(args.run_dirs, args.out)
    elif args.figure == "rop_grid":
        plot_rop_grid(args.sweep_dir, args.method, args.out)
    elif args.figure == "zero_shot":
        plot_zero_shot(args.results, args.out)
    else:
        plot_heatmaps(args.sweep_dir, args.out_dir, [m for m in args.diff.split(",") if m])
    return 0
