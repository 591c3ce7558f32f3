"""The LPWD paper's base cell on one accelerator: WD against LPWD, for as many epochs as fit.

ConvNeXt-T (CIFAR stem) from scratch on CIFAR-10, Adam at eta = 1e-4, lambda = 1e-2, batch 512,
constant learning rate (the paper's Table 1 setting, without its ImageNet-21k weights). Each run
is one `experiments.cifar` process with the paper's 100 epochs; the time budget decides how many
of them are trained:

1. WD trains until half the budget is spent, and is stopped there (SIGTERM): its finished
   epochs E are the ones in its metrics.jsonl;
2. LPWD trains exactly E epochs (same seed, so the same initialization and data order), in
   what is left of the budget.

With a constant learning rate, epoch e of a stopped run is epoch e of the 100-epoch run, so the
two are compared epoch by epoch over the epochs both finished. Written to `paper_cell.json`:
per method and epoch the test top-1, the train loss and the training throughput
(steps x batch / epoch wall time, the test-set evaluation included; epoch 1 includes
compilation and is left out of the median); then the mean of the best-10 test top-1 (over all
common epochs when fewer than 10) and the final top-1 of each, and LPWD - WD.

    python -m lpwd_optax.experiments.benchmarks.paper_cell \
        --data ../shared/data/cifar10-jpeg.zip --budget_s 300 --output_dir cell/
    python -m lpwd_optax.experiments.benchmarks.paper_cell --quick --epochs 2   # CPU, digits
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lpwd_optax.experiments.benchmarks import bench_common

METHODS = ("wd", "lpwd")
PAPER_FLAGS = (
    "--model=convnext_tiny_cifar",
    "--optimizer=adam",
    "--lr=1e-4",
    "--weight_decay=1e-2",
    "--batch_size=512",
    "--seed=0",
    "--keep_checkpoints=1",
    "--compilation_cache_dir=none",
    "--no-progress",
)
# Tiny sizes for a check of this program on CPU (digits: 8x8 images, ~1,400 train examples).
QUICK_FLAGS = (
    '--model_overrides={"dims": [8, 16], "depths": [1, 1]}',
    "--batch_size=64",
)
# What a stopped run needs to write its last record and exit after SIGTERM.
GRACE_S = 15


def epochs_finished(run_dir: Path) -> list[dict[str, Any]]:
    """The epoch records (those with a test top-1) of a run's metrics.jsonl, in order."""
    path = run_dir / "metrics.jsonl"
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the last line of a stopped run may be cut short
                continue
            if "test_top1" in record:
                records.append(record)
    return records


def run_for(command: Sequence[str], limit_s: float, log: Path) -> tuple[int | None, float]:
    """Runs `command` until it exits or `limit_s` passes (then SIGTERM, then SIGKILL).

    Returns the exit code (None when it was stopped) and the wall time.
    """
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        try:
            rc: int | None = proc.wait(timeout=max(limit_s, 1.0))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            rc = None
    return rc, time.monotonic() - start


def _throughput(record: dict[str, Any], steps: int, batch: int) -> float | None:
    seconds = record.get("epoch_time_s")
    return steps * batch / seconds if seconds else None


def summarize(runs: dict[str, list[dict[str, Any]]], steps: int, batch: int) -> dict[str, Any]:
    """Per-epoch figures of each method over the epochs both finished, and LPWD - WD."""
    common = min(len(records) for records in runs.values())
    summary: dict[str, Any] = {"epochs_compared": common, "methods": {}}
    for method, records in runs.items():
        top1 = [r["test_top1"] for r in records[:common]]
        speeds = [_throughput(r, steps, batch) for r in records]
        later = [s for s in speeds[1:] if s is not None]
        summary["methods"][method] = {
            "epochs": [
                {
                    "epoch": r["epoch"],
                    "test_top1": r["test_top1"],
                    "train_loss": r["train_loss"],
                    "epoch_time_s": r.get("epoch_time_s"),
                    "images_per_s": s,
                }
                for r, s in zip(records, speeds)
            ],
            "images_per_s_median": statistics.median(later) if later else None,
            "best10_top1": statistics.mean(sorted(top1)[-10:]) if top1 else None,
            "final_top1": top1[-1] if top1 else None,
        }
    if common:
        wd, lpwd = (summary["methods"][m] for m in METHODS)
        summary["lpwd_minus_wd"] = {
            "best10_top1": lpwd["best10_top1"] - wd["best10_top1"],
            "final_top1": lpwd["final_top1"] - wd["final_top1"],
            "per_epoch_top1": [
                b["test_top1"] - a["test_top1"]
                for a, b in zip(wd["epochs"][:common], lpwd["epochs"][:common])
            ],
        }
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="CIFAR-10 image-folder zip or folder (default: digits)")
    parser.add_argument("--budget_s", type=float, default=300.0, help="both runs together")
    parser.add_argument("--output_dir", default="paper_cell", help="runs and paper_cell.json")
    parser.add_argument("--quick", action="store_true", help="CPU-sized model and batch")
    parser.add_argument(
        "--epochs",
        type=int,
        default=100,
        help="WD trains at most this many epochs (default 100, the paper's; with the constant "
        "learning rate, fewer are the first epochs of the same run)",
    )
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    if args.budget_s < 2 * GRACE_S:
        parser.error(f"--budget_s must be at least {2 * GRACE_S}, got {args.budget_s:g}")
    if args.data is not None and not Path(args.data).exists():
        parser.error(f"--data: no such file or folder: {args.data}")

    out = Path(args.output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    dataset = f"folder:{Path(args.data).resolve()}" if args.data else "digits"
    flags = [*PAPER_FLAGS, *(QUICK_FLAGS if args.quick else ()), f"--dataset={dataset}"]
    batch = int(next(f for f in reversed(flags) if f.startswith("--batch_size=")).split("=")[1])
    program = [sys.executable, "-m", "lpwd_optax.experiments.cifar"]

    start = time.monotonic()
    report: dict[str, Any] = {
        "machine": bench_common.machine_info(),
        "flags": flags,
        "budget_s": args.budget_s,
        "runs": {},
    }
    epochs = args.epochs
    finished: dict[str, list[dict[str, Any]]] = {}
    for i, method in enumerate(METHODS):
        left = args.budget_s - (time.monotonic() - start)
        # WD stops halfway so that LPWD has the same time for the same epochs.
        limit = left / 2 if i == 0 else left
        run_dir = out / method
        command = [
            *program,
            *flags,
            f"--method={method}",
            f"--epochs={epochs}",
            f"--output_dir={run_dir}",
        ]
        print(f"{method}: up to {epochs} epochs in {limit:.0f} s", flush=True)
        rc, wall = run_for(command, limit - GRACE_S, out / f"{method}.log")
        records = finished[method] = epochs_finished(run_dir)
        report["runs"][method] = {
            "command": command,
            "exit_code": rc,
            "stopped_at_limit": rc is None,
            "wall_s": wall,
            "epochs_finished": len(records),
        }
        print(f"{method}: {len(records)} epochs in {wall:.0f} s (exit {rc})", flush=True)
        if rc not in (None, 0):
            print((out / f"{method}.log").read_text()[-3000:], file=sys.stderr)
        if i == 0:
            epochs = len(records)
            if epochs == 0:
                break

    if len(finished) == len(METHODS):
        steps = finished[METHODS[0]][0]["step"]  # the first epoch record's step count
        report.update(summarize(finished, steps, batch))
        rows = []
        for method in METHODS:
            m = report["methods"][method]
            rows.append(
                [
                    method,
                    len(m["epochs"]),
                    m["best10_top1"],
                    m["final_top1"],
                    m["images_per_s_median"],
                ]
            )
        print(
            bench_common.format_table(
                ["method", "epochs", "best-10 top-1", "final top-1", "images/s (median)"], rows
            )
        )
        diff = report.get("lpwd_minus_wd")
        if diff:
            print(
                f"LPWD - WD over {report['epochs_compared']} epochs: best-10 "
                f"{diff['best10_top1']:+.2f}, final {diff['final_top1']:+.2f}"
            )
    report["finished"] = bool(report.get("epochs_compared"))
    report["wall_s"] = time.monotonic() - start
    bench_common.write_json(out / "paper_cell.json", report)
    return report


if __name__ == "__main__":
    report = main()
    sys.exit(0 if report["finished"] else 1)
