"""Figures of the LPWD paper from run outputs, as matplotlib PNGs.

    # Fig. 1: train loss and test top-1 per epoch of several runs (e.g. WD vs LPWD).
    lpwd-plots curves runs/wd runs/lpwd
    # Fig. 2: R_op per epoch of several runs (e.g. WD at several lr / lambda) ...
    lpwd-plots rop runs/wd_*
    # ... or as a heat map of the mean R_op over a sweep's lr x lambda grid.
    lpwd-plots rop_grid runs/sweep --method=wd
    # Fig. 3a: zero-shot weight decay, test top-1 against lambda_s.
    lpwd-plots zero_shot runs/x/zero_shot_decay.json
    # Fig. 4: heat maps of the best-10 mean test top-1 over lr x lambda, one per method (and
    # the difference of two methods) for every dataset / model / optimizer of a sweep.
    lpwd-plots heatmap runs/sweep --diff=lpwd,wd
    # Zhang et al.'s mechanisms: the effective learning rate eta / ||theta||^2 of the
    # scale-invariant layers and the input-output Jacobian norm (--jacobian_probes) per epoch.
    lpwd-plots mechanisms runs/wd runs/lpwd

A run directory is what experiments/cifar.py writes (config.json, metrics.jsonl); a sweep
directory is what experiments/sweep.py writes (results.csv). Figures go to --output_dir, by
default the (first) run's or the sweep's directory.
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
import re
import textwrap
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from lpwd_optax.experiments.writers import read_jsonl

# Config keys that may tell runs apart in a legend, in the order they are named.
LABEL_KEYS = (
    "method",
    "optimizer",
    "learning_rate",
    "weight_decay",
    "dataset",
    "model",
    "batch_size",
    "epochs",
    "seed",
)
SHORT = {"learning_rate": "lr", "weight_decay": "λ", "batch_size": "batch"}
NO_ROP_METHODS = ("baseline", "l2", "adadecay", "adamp")
NO_ROP_METHODS += ("adams",)  # replaces the base optimizer, as adamp does


def dataset_label(dataset: str) -> str:
    """`folder:/a/b/cifar10-jpeg.zip` -> `cifar10-jpeg`; other names unchanged."""
    if dataset.startswith("folder:"):
        base = os.path.basename(dataset.removeprefix("folder:").rstrip("/\\"))
        return os.path.splitext(base)[0] or "folder"
    return dataset


def slug(text: str) -> str:
    """A file-name-safe version of `text`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "figure"


def load_config(run_dir: str) -> dict[str, Any]:
    with open(os.path.join(run_dir, "config.json")) as f:
        return json.load(f)


def _config_or_name(run_dir: str) -> dict[str, Any]:
    """A run's config, or just its directory name when the run was moved away."""
    try:
        return load_config(run_dir)
    except OSError:
        return {"method": os.path.basename(os.path.normpath(run_dir))}


def run_labels(configs: Sequence[dict[str, Any]]) -> list[str]:
    """One legend label per run: the method plus every setting in which the runs differ."""

    def show(key, value):
        value = dataset_label(value) if key == "dataset" else value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return f"{SHORT.get(key, key)}={value:g}"
        return f"{value}"

    varying = [k for k in LABEL_KEYS[1:] if len({json.dumps(c.get(k)) for c in configs}) > 1]
    return [" ".join([c["method"], *(show(k, c.get(k)) for k in varying)]).strip() for c in configs]


def load_history(run_dir: str) -> list[dict[str, Any]]:
    """The per-epoch records of a run."""
    return [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "epoch" in r]


def plot_curves(run_dirs: Sequence[str], out: str) -> None:
    """Fig. 1: train loss (left) and test top-1 (right) against epoch."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.5))
    labels = run_labels([load_config(d) for d in run_dirs])
    for run_dir, label in zip(run_dirs, labels):
        records = load_history(run_dir)
        epochs = [r["epoch"] for r in records]
        ax_loss.plot(epochs, [r["train_loss"] for r in records], label=label)
        ax_acc.plot(epochs, [r["test_top1"] for r in records], label=label)
    ax_loss.set(xlabel="epoch", ylabel="train loss", yscale="log", title="Training loss")
    ax_acc.set(xlabel="epoch", ylabel="test top-1 (%)", title="Test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
    _save(fig, out)


def plot_rop(run_dirs: Sequence[str], out: str) -> list[str]:
    """Fig. 2: mean R_op per epoch of each run. Returns the runs it skipped, with the reason."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    configs = [load_config(d) for d in run_dirs]
    skipped = []
    for run_dir, config, label in zip(run_dirs, configs, run_labels(configs)):
        points = [(r["epoch"], r["rop"]) for r in load_history(run_dir) if r.get("rop") is not None]
        if config["method"] in NO_ROP_METHODS:
            skipped.append(f"{run_dir}: {config['method']} has no decoupled penalty, so no R_op")
        elif not points:
            skipped.append(f"{run_dir}: no finished epoch with an R_op yet")
        else:
            ax.plot(*zip(*points), label=label)
    for line in skipped:
        print(f"skipped {line}")
    ax.set(xlabel="epoch", ylabel="R_op", title="Opposing-penalty rate")
    ax.grid(alpha=0.3)
    if len(skipped) < len(run_dirs):
        ax.legend(fontsize=8)
    _save(fig, out)
    return skipped


def plot_mechanisms(run_dirs: Sequence[str], out: str) -> list[str]:
    """Zhang et al.'s first two mechanisms against the step: the effective learning rate
    eta / ||theta||^2 of the scale-invariant layers (geometric mean over the layers; they span
    orders of magnitude) and the Jacobian norm E ||J_x||_F^2 (one standard error shaded).
    Returns the panels it could not draw for a run, with the reason."""
    fig, (ax_lr, ax_jac) = plt.subplots(1, 2, figsize=(11, 4.5))
    labels = run_labels([load_config(d) for d in run_dirs])
    skipped, layer_counts = [], set()
    for i, (run_dir, label) in enumerate(zip(run_dirs, labels)):
        color, records = f"C{i}", load_history(run_dir)
        lrs = [[v for k, v in r.items() if k.endswith("/effective_lr")] for r in records]
        if records and lrs[0]:
            steps = [r["step"] for r in records]
            ax_lr.plot(steps, np.exp(np.log(lrs).mean(axis=1)), color=color, label=label)
            layer_counts.add(len(lrs[0]))
        else:
            skipped.append(f"{run_dir}: no effective_lr of scale-invariant layers logged")
        points = [r for r in records if r.get("jacobian/norm_sq") is not None]
        if points:
            steps = np.array([r["step"] for r in points])
            mean = np.array([r["jacobian/norm_sq"] for r in points])
            err = np.array([r.get("jacobian/norm_sq_stderr") or 0.0 for r in points])
            ax_jac.plot(steps, mean, color=color, label=label)
            ax_jac.fill_between(steps, mean - err, mean + err, color=color, alpha=0.25)
        else:
            skipped.append(f"{run_dir}: no Jacobian norm (run it with --jacobian_probes)")
    for line in skipped:
        print(f"skipped {line}")
    layers = " or ".join(str(n) for n in sorted(layer_counts)) or "no"
    ax_lr.set(
        xlabel="step",
        ylabel="η / ‖θ‖²  (geometric mean over the layers)",
        yscale="log",
        title=f"Effective learning rate of the {layers} scale-invariant layers",
    )
    ax_jac.set(
        xlabel="step",
        ylabel="E ‖J_x‖²_F  (± 1 standard error)",
        yscale="log",
        title="Input-output Jacobian norm (test images)",
    )
    for ax in (ax_lr, ax_jac):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    _save(fig, out)
    return skipped


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


def _heatmap(ax, lrs, wds, grid, title: str, fmt: str = "{:.4g}", cmap: str = "viridis") -> None:
    image = ax.imshow(grid, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(wds)), [f"{w:g}" for w in wds], rotation=45)
    ax.set_yticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    ax.set(xlabel="λ", ylabel="learning rate")
    ax.set_title("\n".join(textwrap.wrap(title, 40)), fontsize=9)
    for (i, j), v in np.ndenumerate(grid):
        if np.isfinite(v):
            # Dark text on light cells, light text on dark ones (relative luminance).
            r, g, b, _ = image.cmap(image.norm(v))
            color = "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.5 else "white"
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7, color=color)
    ax.figure.colorbar(image, ax=ax)


def _columns(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    columns: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        key = f"{dataset_label(r['dataset'])} {r['model']} {r['optimizer']}"
        columns.setdefault(key, []).append(r)
    return columns


def plot_rop_grid(sweep_dir: str, method: str, out: str) -> None:
    """Fig. 2 as a grid: mean R_op of `method` over lr x lambda (one panel per column)."""
    columns = _columns([r for r in load_results(sweep_dir) if r["method"] == method])
    if not columns:
        raise ValueError(f"no finished {method} cells in {sweep_dir}")
    fig, axes = plt.subplots(1, len(columns), figsize=(6 * len(columns), 4.5), squeeze=False)
    for ax, (column, rows) in zip(axes[0], columns.items()):
        _heatmap(ax, *_grid(rows, "mean_rop"), f"R_op of {method}: {column}", "{:.3g}", "magma")
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
        path = os.path.join(out_dir, f"heatmap_{slug(column)}.png")
        _save(fig, path)
        written.append(path)
    return written


def plot_zero_shot(paths: Sequence[str], out: str) -> None:
    """Fig. 3a: test top-1 after 100 decay-only steps against lambda_s."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    results = []
    for path in paths:
        with open(path) as f:
            results.append(json.load(f))
    labels = run_labels([_config_or_name(r["run_dir"]) for r in results])
    for result, label in zip(results, labels):
        xs = [r["lambda_s"] for r in result["results"]]
        ax.plot(xs, [r["top1"] for r in result["results"]], "o-", label=label)
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
    output_help = "Directory for the figure; default: the (first) run's or sweep's directory."
    p = sub.add_parser("curves", help="Fig. 1: loss and accuracy curves of runs.")
    p.add_argument("run_dirs", nargs="+")
    p = sub.add_parser("rop", help="Fig. 2: R_op per epoch of runs.")
    p.add_argument("run_dirs", nargs="+")
    p = sub.add_parser("rop_grid", help="Fig. 2: mean R_op over a sweep's lr x lambda grid.")
    p.add_argument("sweep_dir")
    p.add_argument("--method", default="wd")
    p = sub.add_parser("zero_shot", help="Fig. 3a: zero-shot weight decay.")
    p.add_argument("results", nargs="+", help="zero_shot_decay.json files.")
    p = sub.add_parser(
        "mechanisms", help="Effective learning rate and Jacobian norm of runs (Zhang et al.)."
    )
    p.add_argument("run_dirs", nargs="+")
    p = sub.add_parser("heatmap", help="Fig. 4: accuracy heat maps over lr x lambda.")
    p.add_argument("sweep_dir")
    p.add_argument("--diff", default="lpwd,wd", help="Also plot method A - method B.")
    for p in sub.choices.values():
        p.add_argument("--output_dir", default=None, help=output_help)
    args = parser.parse_args(argv)

    inputs = getattr(args, "run_dirs", None) or [getattr(args, "sweep_dir", None)]
    if args.figure == "zero_shot":
        inputs = [os.path.dirname(os.path.abspath(args.results[0]))]
    out_dir = args.output_dir or inputs[0]
    if args.figure == "curves":
        plot_curves(args.run_dirs, os.path.join(out_dir, "fig1_curves.png"))
    elif args.figure == "rop":
        plot_rop(args.run_dirs, os.path.join(out_dir, "fig2_rop.png"))
    elif args.figure == "rop_grid":
        plot_rop_grid(
            args.sweep_dir, args.method, os.path.join(out_dir, f"fig2_rop_grid_{args.method}.png")
        )
    elif args.figure == "mechanisms":
        plot_mechanisms(args.run_dirs, os.path.join(out_dir, "mechanisms.png"))
    elif args.figure == "zero_shot":
        plot_zero_shot(args.results, os.path.join(out_dir, "fig3a_zero_shot.png"))
    else:
        plot_heatmaps(args.sweep_dir, out_dir, [m for m in args.diff.split(",") if m])
    return 0
