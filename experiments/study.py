r"""Run or resume a study of fixed protocol, then write its report.

A study is a protocol (`experiments/protocols/<name>.py`, run by `experiments/engine.py`): its
runs in priority order, its cells, comparisons and verdict rules. Every run is one process of
the training program (flags only, so the study does not depend on the training program's
internals) in its own directory under --output_dir. Finished runs are skipped and interrupted
ones continue from their checkpoints, so the same command resumes the study after a restart.
The report (`experiments/report.py`) is written from whatever has finished.

    # What would run, and how long it should take:
    lpwd-study --protocol=cpu --data=../shared/data/cifar10-jpeg.zip \
        --output_dir=~/lpwd_runs/cifar10_cpu --dry_run
    # Run (or resume) it, then write the tables and figures:
    lpwd-study --protocol=cpu --data=../shared/data/cifar10-jpeg.zip \
        --output_dir=~/lpwd_runs/cifar10_cpu --results_dir=~/lpwd_runs/cifar10_cpu/results
    # Only the report, from whatever has finished:
    lpwd-study ... --report_only
    # A study's committed record brings its finished runs back into an empty runs directory:
    lpwd-study --protocol=controls --output_dir=/tmp/controls --report_only \
        --restore_from=experiments/results/cifar10_cpu_controls/runs.jsonl \
        --reuse_from=experiments/results/cifar10_cpu/runs.jsonl

Protocols: cpu (the LPWD paper's claims, parts a-f), controls (what in LPWD helps, and the
AdaDecay, WRS and AdamP papers' claims; parts p, g1, h, g2, g3; reuses the first study's seeds
via --reuse_from), regimes (does LPWD help where weight decay helps: a pilot, then the protocol
in the regime it chooses), and tiny, controls_tiny: minute-scale versions for tests.
"""

from __future__ import annotations

if __name__ == "__main__":  # started as a script or as experiments.study: see _entry.py
    from lpwd_optax.experiments import _entry

    _entry.run(__file__)

import argparse
import os
import sys
from collections.abc import Sequence

from lpwd_optax.experiments import engine, report
from lpwd_optax.experiments.protocols import protocols


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--protocol", default="cpu", choices=sorted(protocols()), help="The study to run."
    )
    parser.add_argument(
        "--data",
        default=None,
        help="CIFAR-10 as an image folder or zip (e.g. ../shared/data/cifar10-jpeg.zip); "
        "default: the 'cifar10' dataset of tensorflow-datasets ('digits' for the tiny "
        "protocols).",
    )
    parser.add_argument(
        "--output_dir", required=True, help="Where the runs go (outside the repository)."
    )
    parser.add_argument(
        "--results_dir",
        default=None,
        help="Where the tables and figures go; default output_dir/results.",
    )
    parser.add_argument(
        "--parts",
        default=None,
        help="Which parts to run, comma-separated (e.g. 'p,g1'; for one-letter parts also "
        "'ab'); default all.",
    )
    parser.add_argument(
        "--reuse_from",
        default=None,
        help="controls: the first study's runs.jsonl (experiments/results/cifar10_cpu/), whose "
        "seeds the protocol reuses instead of training them again.",
    )
    parser.add_argument(
        "--restore_from",
        default=None,
        help="A report's runs.jsonl of this protocol (e.g. the committed "
        "experiments/results/cifar10_cpu_controls/runs.jsonl): its trained runs missing from "
        "--output_dir are written back as finished, so a study survives the loss of its runs "
        "directory.",
    )
    parser.add_argument("--dry_run", action="store_true", help="Print the plan and exit.")
    parser.add_argument(
        "--report_only", action="store_true", help="Only write the report from finished runs."
    )
    parser.add_argument("--no_report", action="store_true", help="Run, but write no report.")
    return parser


def dataset_name(protocol: engine.Protocol, data: str | None) -> str:
    if data is None:
        return "digits" if protocol.name.endswith("tiny") else "cifar10"
    return f"folder:{os.path.abspath(os.path.expanduser(data))}"


def parse_parts(protocol: engine.Protocol, text: str | None) -> list[str] | None:
    """'p,g1' -> ['p', 'g1']; 'ab' -> ['a', 'b'] where every part is one letter."""
    if not text:
        return None
    parts = text.split(",") if "," in text or text in protocol.parts else list(text)
    unknown = [p for p in parts if p not in protocol.parts]
    if unknown:
        raise ValueError(f"--parts: {unknown} are not parts of '{protocol.name}': {protocol.parts}")
    return parts


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    protocol = protocols()[args.protocol]
    dataset = dataset_name(protocol, args.data)
    runs_dir = os.path.abspath(os.path.expanduser(args.output_dir))
    results_dir = os.path.expanduser(args.results_dir or os.path.join(runs_dir, "results"))
    try:
        parts = parse_parts(protocol, args.parts)
        if args.restore_from and not args.dry_run:
            os.makedirs(runs_dir, exist_ok=True)
            restored = engine.restore(protocol, runs_dir, args.restore_from)
            print(f"restored {restored} finished runs from {args.restore_from}", flush=True)
        if args.report_only and args.reuse_from and protocol.reuse and not args.dry_run:
            # A study that runs writes the reused records first; a report alone needs them too.
            os.makedirs(runs_dir, exist_ok=True)
            runs = protocol.plan(dataset, runs_dir)
            engine.write_reused(protocol, runs, runs_dir, args.reuse_from)
        print(engine.describe(protocol, dataset, runs_dir), flush=True)
        if args.dry_run:
            return 0
        failed = 0
        if not args.report_only:
            os.makedirs(runs_dir, exist_ok=True)
            failed = engine.run_all(protocol, dataset, runs_dir, parts, args.reuse_from)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if not args.no_report:
        report.write_report(protocol, dataset, runs_dir, results_dir)
        print(f"wrote the report to {results_dir}", flush=True)
    return 1 if failed else 0
