"""Run the LPWD paper's hyperparameter grid (Table 2), or any subset, and tabulate the results.

Each cell of the grid (dataset x model x optimizer x method x lr x lambda x seed) is one run of
`experiments.cifar` in its own process and its own directory under --output_dir. The sweep is
resumable: a cell with a summary.json is skipped, and a cell with checkpoints continues from
them (--resume). Cells can run in parallel processes, each optionally pinned to its own GPU.

Afterwards it writes results.csv (one row per cell) and table.md / table.csv in the style of
the paper's Table 1: for every method and column (dataset, model, optimizer), the cell with the
best "mean of the best 10 test top-1" over the lr x lambda grid, as mean +- std.

Examples:

    # The full Table 2 grid for ConvNeXt-T on CIFAR-10 (long: 8 methods x 5 lr x 7 lambda).
    lpwd-sweep --output_dir=runs/table2 --datasets=cifar10

    # A quick subset on the offline digits data, two cells at a time.
    lpwd-sweep --output_dir=runs/mini --methods=wd,lpwd --optimizers=adam \\
        --lrs=1e-3 --weight_decays=0.5,0.05 --parallel_processes=2 -- --preset=quickstart

    # On a cluster: one command per cell, run anywhere; then tabulate the copied-back runs.
    lpwd-sweep --output_dir=runs/table2 --print_commands -- --epochs=100 > commands.txt
    lpwd-sweep --output_dir=runs/table2 --table_only

Arguments after `--` are passed to every run (e.g. --epochs, --preset, --model_overrides).
"""

from __future__ import annotations

if __name__ == "__main__":  # started as a script or as experiments.sweep: see _entry.py
    from lpwd_optax.experiments import _entry

    _entry.run(__file__)

import argparse
import csv
import dataclasses
import itertools
import json
import os
import queue
import re
import shlex
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lpwd_optax.experiments import engine
from lpwd_optax.experiments.config import METHODS, OPTIMIZERS

# The paper's Table 2.
TABLE2_LRS = {"adam": (1e-3, 5e-4, 1e-4, 5e-5, 1e-5), "sgdm": (0.1, 0.05, 0.01, 0.005, 0.001)}
TABLE2_WEIGHT_DECAYS = (0.5, 0.1, 0.05, 0.01, 0.005, 0.001, 0.0005)
BASE_LR = {"adam": 1e-4, "sgdm": 1e-2}
BASE_WEIGHT_DECAY = 1e-2
# Methods without a decay rate: one cell per lr.
NO_RATE_METHODS = ("baseline",)

SUMMARY_FIELDS = (
    "best10_mean",
    "best10_std",
    "best_top1",
    "final_top1",
    "mean_rop",
    "epochs",
    "wall_time_s",
)
RESULT_FIELDS = (
    "dataset",
    "model",
    "optimizer",
    "method",
    "lr",
    "weight_decay",
    "seed",
    "status",
    *SUMMARY_FIELDS,
    "run_dir",
)


@dataclasses.dataclass(frozen=True)
class Cell:
    dataset: str
    model: str
    optimizer: str
    method: str
    lr: float
    weight_decay: float
    seed: int

    @property
    def name(self) -> str:
        dataset = re.sub(r"[^A-Za-z0-9]+", "_", self.dataset.removeprefix("folder:")).strip("_")
        return (
            f"{dataset}-{self.model}-{self.optimizer}-{self.method}-lr{self.lr:g}"
            f"-wd{self.weight_decay:g}-s{self.seed}"
        )

    def flags(self) -> list[str]:
        return [
            f"--dataset={self.dataset}",
            f"--model={self.model}",
            f"--optimizer={self.optimizer}",
            f"--method={self.method}",
            f"--lr={self.lr!r}",
            f"--weight_decay={self.weight_decay!r}",
            f"--seed={self.seed}",
        ]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _names(text: str, allowed: Sequence[str] | None = None) -> list[str]:
    names = [x for x in text.split(",") if x]
    bad = [x for x in names if allowed is not None and x not in allowed]
    if bad:
        raise ValueError(f"unknown {bad}; choose from {list(allowed)}")
    return names


def build_grid(
    *,
    datasets: Sequence[str],
    models: Sequence[str],
    optimizers: Sequence[str],
    methods: Sequence[str],
    lrs: str,
    weight_decays: str,
    seeds: Sequence[int],
) -> list[Cell]:
    """All cells. `lrs`/`weight_decays`: 'table2', 'base' or a comma-separated list."""
    cells = []
    for dataset, model, optimizer, method, seed in itertools.product(
        datasets, models, optimizers, methods, seeds
    ):
        lr_values = {"table2": TABLE2_LRS[optimizer], "base": (BASE_LR[optimizer],)}.get(lrs)
        lr_values = _floats(lrs) if lr_values is None else lr_values
        wd_values = {"table2": TABLE2_WEIGHT_DECAYS, "base": (BASE_WEIGHT_DECAY,)}.get(
            weight_decays
        )
        wd_values = _floats(weight_decays) if wd_values is None else wd_values
        if method in NO_RATE_METHODS:
            wd_values = (0.0,)
        for lr, wd in itertools.product(lr_values, wd_values):
            cells.append(Cell(dataset, model, optimizer, method, lr, wd, seed))
    return cells


def cell_done(run_dir: str) -> bool:
    return engine.is_finished(os.path.dirname(run_dir), os.path.basename(run_dir))


def cell_run(cell: Cell, extra_flags: Sequence[str] = ()) -> engine.Run:
    """The cell as one run of the study engine. The cell's own flags come after the shared
    ones, so the grid always wins."""
    return engine.Run("", cell.name, (*extra_flags, *cell.flags(), "--no-progress"))


def cell_command(
    cell: Cell,
    output_dir: str,
    extra_flags: Sequence[str] = (),
    *,
    program: Sequence[str] | None = None,
) -> list[str]:
    """The training program's command line for one cell (resuming when it has checkpoints)."""
    return engine.command(cell_run(cell, extra_flags), os.path.abspath(output_dir), program)


def run_cell(
    cell: Cell, output_dir: str, extra_flags: Sequence[str], env: dict[str, str]
) -> tuple[Cell, int, float]:
    """Runs (or resumes) one cell in a subprocess; its output goes to <run_dir>/log.txt."""
    code, seconds = engine.launch(cell_run(cell, extra_flags), os.path.abspath(output_dir), env)
    return cell, code, seconds


def run_sweep(
    cells: Sequence[Cell],
    output_dir: str,
    extra_flags: Sequence[str] = (),
    *,
    parallel_processes: int = 1,
    gpus: Sequence[str] = (),
) -> dict[str, int]:
    """Runs every unfinished cell; returns counts of done/skipped/failed cells."""
    todo = [c for c in cells if not cell_done(os.path.join(output_dir, c.name))]
    counts = dict(skipped=len(cells) - len(todo), done=0, failed=0)
    print(f"{len(cells)} cells: {counts['skipped']} finished, {len(todo)} to run", flush=True)
    free_gpus: queue.Queue[str | None] = queue.Queue()
    for i in range(parallel_processes):
        free_gpus.put(gpus[i % len(gpus)] if gpus else None)

    def work(cell: Cell) -> tuple[Cell, int, float]:
        gpu = free_gpus.get()
        env = dict(os.environ)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        try:
            return run_cell(cell, output_dir, extra_flags, env)
        finally:
            free_gpus.put(gpu)

    with ThreadPoolExecutor(max_workers=parallel_processes) as pool:
        for cell, code, seconds in pool.map(work, todo):
            status = "ok" if code == 0 else f"FAILED (exit {code}, see log.txt)"
            counts["done" if code == 0 else "failed"] += 1
            print(f"[{cell.name}] {status} in {seconds:.0f} s", flush=True)
    return counts


def _row(summary: dict[str, Any], run_dir: str) -> dict[str, Any]:
    config = summary["config"]
    row = {k: config[k] for k in ("dataset", "model", "optimizer", "method", "seed")}
    row.update(lr=config["learning_rate"], weight_decay=config["weight_decay"], run_dir=run_dir)
    row.update({k: summary[k] for k in SUMMARY_FIELDS}, status="ok")
    if row["method"] in NO_RATE_METHODS:
        row["weight_decay"] = 0.0
    return row


def collect(cells: Sequence[Cell], output_dir: str) -> list[dict[str, Any]]:
    """One row per cell with its summary's numbers (status 'missing' when not finished)."""
    rows = []
    for cell in cells:
        run_dir = os.path.join(output_dir, cell.name)
        path = os.path.join(run_dir, "summary.json")
        if os.path.exists(path):
            with open(path) as f:
                rows.append({**dataclasses.asdict(cell), **_row(json.load(f), run_dir)})
        else:
            rows.append({**dataclasses.asdict(cell), "run_dir": run_dir, "status": "missing"})
    return rows


def collect_run_dirs(output_dir: str) -> list[dict[str, Any]]:
    """One row per finished run found anywhere under `output_dir`, whatever made it."""
    rows = []
    for root, _, files in sorted(os.walk(output_dir)):
        if "summary.json" in files:
            with open(os.path.join(root, "summary.json")) as f:
                rows.append(_row(json.load(f), root))
    return rows


def best_per_method(rows: Sequence[dict[str, Any]]) -> tuple[list[str], dict[tuple, dict]]:
    """Columns (dataset/model/optimizer) and, per (method, column), the best finished row."""
    columns: list[str] = []
    best: dict[tuple, dict] = {}
    for row in rows:
        column = f"{row['dataset']} {row['model']} {row['optimizer']}"
        if column not in columns:
            columns.append(column)
        if row["status"] != "ok":
            continue
        key = (row["method"], column)
        if key not in best or row["best10_mean"] > best[key]["best10_mean"]:
            best[key] = row
    return columns, best


def table_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Table 1 style: methods x columns, 'mean +- std (lr, lambda)' of the best cell."""
    columns, best = best_per_method(rows)
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    lines = [
        "| method | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for method in methods:
        cells = []
        for column in columns:
            row = best.get((method, column))
            cells.append(
                "-"
                if row is None
                else f"{row['best10_mean']:.2f} +- {row['best10_std']:.2f} "
                f"(lr {row['lr']:g}, λ {row['weight_decay']:g})"
            )
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(rows: Sequence[dict[str, Any]], output_dir: str) -> None:
    with open(os.path.join(output_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    _, best = best_per_method(rows)
    with open(os.path.join(output_dir, "table.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "column", "best10_mean", "best10_std", "lr", "weight_decay"])
        for (method, column), row in best.items():
            writer.writerow(
                [
                    method,
                    column,
                    row["best10_mean"],
                    row["best10_std"],
                    row["lr"],
                    row["weight_decay"],
                ]
            )
    with open(os.path.join(output_dir, "table.md"), "w") as f:
        f.write(table_markdown(rows))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", required=True, help="One sub-directory per cell.")
    parser.add_argument("--datasets", default="cifar10", help="Comma-separated datasets.")
    parser.add_argument("--models", default="convnext_tiny_cifar", help="Comma-separated models.")
    parser.add_argument("--optimizers", default="adam,sgdm", help="Comma-separated: adam,sgdm.")
    parser.add_argument(
        "--methods",
        default="baseline,l2,wd,lpwd",
        help=f"Comma-separated methods from {','.join(METHODS)} (Table 1: baseline,l2,wd,lpwd).",
    )
    parser.add_argument(
        "--lrs",
        default="table2",
        help="'table2' (the paper's 5 rates per optimizer), 'base' (1e-4 Adam / 1e-2 SGDM) "
        "or a comma-separated list.",
    )
    parser.add_argument(
        "--weight_decays",
        default="table2",
        help="'table2' (the paper's 7 rates), 'base' (1e-2) or a comma-separated list.",
    )
    parser.add_argument("--seeds", default="0", help="Comma-separated seeds.")
    parser.add_argument("--parallel_processes", type=int, default=1, help="Cells run at once.")
    parser.add_argument(
        "--gpus",
        default="",
        help="Comma-separated GPU ids; each process gets one (CUDA_VISIBLE_DEVICES), round robin.",
    )
    parser.add_argument("--dry_run", action="store_true", help="List the cells and exit.")
    parser.add_argument(
        "--print_commands",
        action="store_true",
        help="Print one lpwd-cifar command line per unfinished cell and exit (for a cluster's "
        "job array or xargs -P); then aggregate with --table_only.",
    )
    parser.add_argument(
        "--table_only",
        action="store_true",
        help="Only (re)write the tables, from every finished run directory under --output_dir "
        "(also ones made elsewhere and copied in).",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = build_parser().parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    cells = build_grid(
        datasets=_names(args.datasets),
        models=_names(args.models),
        optimizers=_names(args.optimizers, OPTIMIZERS),
        methods=_names(args.methods, METHODS),
        lrs=args.lrs,
        weight_decays=args.weight_decays,
        seeds=[int(s) for s in _names(args.seeds)],
    )
    os.makedirs(args.output_dir, exist_ok=True)
    if args.dry_run:
        for cell in cells:
            print(cell.name)
        return 0
    if args.print_commands:
        for cell in cells:
            if not cell_done(os.path.join(args.output_dir, cell.name)):
                print(
                    shlex.join(cell_command(cell, args.output_dir, extra, program=["lpwd-cifar"]))
                )
        return 0
    if args.table_only:
        rows = collect_run_dirs(args.output_dir)
        write_results(rows, args.output_dir)
        print(table_markdown(rows), end="")
        return 0
    counts = run_sweep(
        cells,
        args.output_dir,
        extra,
        parallel_processes=args.parallel_processes,
        gpus=_names(args.gpus),
    )
    rows = collect(cells, args.output_dir)
    write_results(rows, args.output_dir)
    print(table_markdown(rows), end="")
    return 1 if counts["failed"] else 0
