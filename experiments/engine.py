"""The study engine: a protocol is data; one runner trains its runs, resumably.

A study is a `Protocol`: its plan of runs (`plan(dataset, runs_dir)`, every run in priority
order), what a cell is (the facts its runs share, seeds apart), its tables, comparisons and
verdict rules, and its figures (`experiments/report.py` writes them for any protocol). Each
protocol is one module under `experiments/protocols/`; `lpwd-study --protocol=NAME` runs it.

A run is one process of the training program (`experiments.cifar`, or another program of
this folder, e.g. zero-shot decay of a trained run) with fixed flags, in its own directory under
the study's runs directory. A plan may read finished runs (a pilot's choice, a pretrained
checkpoint), so the runner plans again after each run. A run is finished when its directory
holds its output (summary.json); one that was stopped continues from its checkpoints
(`--resume`); one whose loss stopped being finite is not run again.

A study outlives its runs directory through its committed report: `restore` writes each run
recorded in a report's runs.jsonl back as that run's summary.json, so the runner skips it and
the report is rebuilt from the same numbers. A protocol may `Reuse` the runs of another study
that it would otherwise train again, from that study's runs.jsonl.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

DIVERGED = "non-finite loss or gradients"  # the training program's message when it stops
# A run's record (runs.jsonl): its part and facts, these numbers of its summary, its history.
SUMMARY_FIELDS = (
    "best10_mean",
    "final_top1",
    "best_top1",
    "final_train_loss",
    "mean_rop",
    "steps",
    "wall_time_s",
)
HISTORY_FIELDS = ("epoch", "train_loss", "test_top1", "rop")
# Where each run trained (columns run, cpu, ...), for runs whose summary predates its `machine`,
# kept in the runs directory by whoever ran them; --restore_from brings it back from beside the
# runs.jsonl it reads.
MACHINES = "machines.csv"


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a study.

    Attributes:
      part: the protocol's part the run belongs to (runs are selected by part).
      name: its directory relative to the runs directory, e.g. "pilot/r2-wd-lr0.001-wd0.05-s0".
      flags: the program's flags (for the training program without --output_dir and --resume).
      facts: what the report groups and pairs by (method, lr, weight_decay, seed, ...).
      needs: names of runs that must have finished first (a pretrained checkpoint).
      program: the program of this folder it runs, `lpwd_optax.experiments.<program>`.
      output: the file in its directory whose presence means it has finished.
    """

    part: str
    name: str
    flags: tuple[str, ...]
    facts: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False, compare=False)
    needs: tuple[str, ...] = ()
    program: str = "cifar"
    output: str = "summary.json"

    @property
    def trains(self) -> bool:
        return self.program == "cifar"

    @property
    def log(self) -> str:
        return "log.txt" if self.trains else f"{os.path.splitext(self.output)[0]}_log.txt"

    @property
    def key(self) -> tuple[str, str]:
        return (self.name, self.program)

    def flag(self, name: str) -> str | None:
        """The value of --name (the last one given), or None."""
        values = [f.split("=", 1)[1] for f in self.flags if f.startswith(f"--{name}=")]
        return values[-1] if values else None

    @property
    def steps(self) -> int | None:
        """Its training steps when the flags fix them (--epochs and --steps_per_epoch)."""
        epochs, per_epoch = self.flag("epochs"), self.flag("steps_per_epoch")
        return int(epochs) * int(per_epoch) if epochs and per_epoch else None


@dataclasses.dataclass(frozen=True)
class Reuse:
    """Runs a protocol takes from another study's runs.jsonl (`--reuse_from`) instead of
    training them again: each selected run's one record there that has its `match` facts, the
    values of `where` (a missing field counts as that value) and its steps."""

    study: str  # e.g. "the first study"
    selects: Callable[[Run], bool]
    match: tuple[str, ...] = ("method", "lr", "weight_decay", "seed")
    where: Mapping[str, Any] = dataclasses.field(default_factory=lambda: {"kind": "train"})


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Everything fixed about a study before it runs: its runs, and how they are reported.

    Attributes:
      name: `--protocol=<name>`.
      plan: (dataset, runs_dir) -> every run in priority order.
      parts: the parts in priority order (`--parts` selects among them).
      summary: one line on the setting (model, optimizer, batch, budget).
      cell: the facts that make a cell: the runs that differ only by seed.
      cell_columns: cells.csv's columns: cell facts, d_T (lr * lambda * steps), n, reused and
        each metric with its sample std (`<metric>_std`).
      cell_order: sort key of a cell's fact values (default: the values themselves).
      in_cells: which runs' records make up cells (default all).
      tables: the report's further tables (`report.Table`), each a CSV and a results.md section.
      figures: the report's figures (`report.Curves`, `Bars`, `Lines`, `Grid`, `Points`), or
        runs_dir -> them (when a pilot decides what they show).
      notes: runs_dir -> lines on what the runs so far decided (a pilot's choice).
      reuse: runs taken from another study instead of trained.
      seconds_per_step, seconds_per_eval: for the time estimate of runs whose flags fix their
        steps (None: no estimate).
    """

    name: str
    plan: Callable[[str, str], list[Run]]
    parts: tuple[str, ...]
    summary: str
    cell: tuple[str, ...] = ("method", "lr", "weight_decay")
    cell_columns: tuple[str, ...] = ()
    cell_order: Callable[[tuple], Any] | None = None
    in_cells: Callable[[dict[str, Any]], bool] | None = None
    tables: Sequence[Any] = ()
    figures: Sequence[Any] | Callable[[str], Sequence[Any]] = ()
    notes: Callable[[str], list[str]] | None = None
    reuse: Reuse | None = None
    seconds_per_step: float | None = None
    seconds_per_eval: float = 0.0


# ----------------------------------------------------------------------------------------------
# The state of a run


def summary(runs_dir: str, run: Run | str) -> dict[str, Any] | None:
    """The run's summary.json, or None while it has not finished."""
    name = run if isinstance(run, str) else run.name
    path = os.path.join(runs_dir, name, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def is_finished(runs_dir: str, run: Run | str) -> bool:
    """Its output exists and, for a training Run, covers the epochs its flags ask for (a run
    planned again with more --epochs continues from its last checkpoint)."""
    if isinstance(run, str):
        return os.path.exists(os.path.join(runs_dir, run, "summary.json"))
    if not run.trains:
        return os.path.exists(os.path.join(runs_dir, run.name, run.output))
    done = summary(runs_dir, run)
    epochs = run.flag("epochs")
    return done is not None and (epochs is None or done.get("epochs", 0) >= int(epochs))


def has_diverged(runs_dir: str, run: Run) -> bool:
    """The run stopped because its loss or gradients stopped being finite (its log says so);
    resuming it would only repeat that."""
    if is_finished(runs_dir, run):
        return False
    path = os.path.join(runs_dir, run.name, run.log)
    if not os.path.exists(path):
        return False
    with open(path, errors="replace") as f:
        return DIVERGED in f.read()


def command(run: Run, runs_dir: str, program: Sequence[str] | None = None) -> list[str]:
    """The run's command line; a training run resumes when it has checkpoints."""
    program = list(program or (sys.executable, "-m", f"lpwd_optax.experiments.{run.program}"))
    if not run.trains:
        return [*program, *run.flags]
    run_dir = os.path.join(runs_dir, run.name)
    resume = os.path.isdir(os.path.join(run_dir, "checkpoints"))
    return [*program, *run.flags, f"--output_dir={run_dir}", *(["--resume"] if resume else [])]


def launch(run: Run, runs_dir: str, env: Mapping[str, str] | None = None) -> tuple[int, float]:
    """Runs (or resumes) one run in its own process; (exit code, seconds). Output: its log."""
    run_dir = os.path.join(runs_dir, run.name)
    os.makedirs(run_dir, exist_ok=True)
    line = command(run, runs_dir)
    start = time.time()
    with open(os.path.join(run_dir, run.log), "a") as log:
        log.write(f"$ {' '.join(line)}\n")
        log.flush()
        code = subprocess.call(line, stdout=log, stderr=subprocess.STDOUT, env=env)
    return code, time.time() - start


def duration(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


def expected_seconds(protocol: Protocol, run: Run) -> float | None:
    """About how long the run takes, from its steps and evaluations (None if unknown)."""
    if protocol.seconds_per_step is None or run.steps is None:
        return None
    evaluations = 0 if run.flag("eval_steps") else int(run.flag("epochs"))
    return 30 + run.steps * protocol.seconds_per_step + evaluations * protocol.seconds_per_eval


# ----------------------------------------------------------------------------------------------
# Running


def has_weights(runs_dir: str, name: str) -> bool:
    """A finished run that trained here, not one written back from a record (restored or
    reused): only such a run has checkpoints and final weights for a run that needs them."""
    done = summary(runs_dir, name)
    return done is not None and not done.get("restored_from") and not done.get("reused_from")


def is_blocked(runs_dir: str, run: Run) -> bool:
    """It needs a run that was written back from a record, and so has no weights to start from."""
    return any(is_finished(runs_dir, n) and not has_weights(runs_dir, n) for n in run.needs)


def pending(runs: Sequence[Run], runs_dir: str, failed: set = frozenset()) -> list[Run]:
    """The runs still to run, in plan order: not finished, not diverged, not failed here
    (by `Run.key`), and every run they need finished here."""
    return [
        r
        for r in runs
        if not is_finished(runs_dir, r)
        and not has_diverged(runs_dir, r)
        and r.key not in failed
        and all(has_weights(runs_dir, n) for n in r.needs)
    ]


def run_all(
    protocol: Protocol,
    dataset: str,
    runs_dir: str,
    parts: Sequence[str] | None = None,
    reuse_from: str | None = None,
    log: Callable[[str], None] | None = None,
) -> int:
    """Runs every pending run of the selected parts, planning again after each run (and
    writing the reused runs of the plan first); returns the number that failed."""
    log = log or (lambda line: print(line, flush=True))
    failed: set[tuple[str, str]] = set()
    done = 0
    while True:
        runs = [r for r in protocol.plan(dataset, runs_dir) if parts is None or r.part in parts]
        if protocol.reuse is not None:
            write_reused(protocol, runs, runs_dir, reuse_from)
        todo = pending(runs, runs_dir, failed)
        if not todo:
            return len(failed)
        run = todo[0]
        start = time.time()
        code, seconds = launch(run, runs_dir)
        done += 1
        result = summary(runs_dir, run) if code == 0 and run.trains else None
        best = f", best-10 {result['best10_mean']:.2f}" if result else ""
        status = "ok" if code == 0 else f"FAILED (exit {code}, see its {run.log})"
        what = "" if run.trains else f" ({run.program})"
        log(
            f"[{done}, {len(todo) - 1} left] part {run.part} {run.name}{what}: {status} in "
            f"{duration(seconds)}{best} ({time.strftime('%H:%M', time.localtime(start))} start)"
        )
        if code != 0:
            failed.add(run.key)


def describe(protocol: Protocol, dataset: str, runs_dir: str) -> str:
    """What the plan holds, part by part: finished, reused, still to run, about how long."""
    runs = protocol.plan(dataset, runs_dir)
    lines = [f"study '{protocol.name}': {protocol.summary}; data {dataset}"]

    def estimate(todo):
        seconds = [expected_seconds(protocol, r) for r in todo]
        if not todo or None in seconds:
            return ""
        return f" (about {duration(sum(seconds))})"

    for part in protocol.parts:
        total = [r for r in runs if r.part == part]
        reused = [r for r in total if is_reused(protocol, r)]
        todo = [r for r in total if not is_finished(runs_dir, r) and r not in reused]
        blocked = [r for r in todo if is_blocked(runs_dir, r)]
        todo = [r for r in todo if r not in blocked]
        finished = len(total) - len(todo) - len(blocked) - len(reused)
        lines.append(
            f"  part {part}: {len(total)} runs"
            + (f" ({len(reused)} reused from {protocol.reuse.study})" if protocol.reuse else "")
            + f", {finished} finished, {len(todo)} to run{estimate(todo)}"
            + (
                f", {len(blocked)} cannot run (what they need was restored, without weights)"
                if blocked
                else ""
            )
        )
    diverged = [r.name for r in runs if r.trains and has_diverged(runs_dir, r)]
    if diverged:
        lines.append(f"  diverged (not run again): {', '.join(diverged)}")
    lines += [f"  {note}" for note in (protocol.notes(runs_dir) if protocol.notes else [])]
    todo = [
        r
        for r in runs
        if not is_finished(runs_dir, r)
        and not is_reused(protocol, r)
        and not is_blocked(runs_dir, r)
    ]
    lines.append(f"total to run: {len(todo)} of {len(runs)} runs{estimate(todo)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Records: what the report reads, what a study's runs.jsonl keeps, and what restores a study


def records(protocol: Protocol, runs_dir: str) -> list[dict[str, Any]]:
    """One record per finished training run, in plan order: its part and facts (and whether
    it was reused), its summary's numbers and its per-evaluation history."""
    out = []
    for run in protocol.plan("", runs_dir):
        done = summary(runs_dir, run) if run.trains else None
        if done is None:
            continue
        record = {"part": run.part, **run.facts}
        if protocol.reuse is not None:
            record["reused"] = bool(done.get("reused_from"))
        record.update({k: done.get(k) for k in SUMMARY_FIELDS})
        if "machine" in done:  # summaries written before the field have none
            record["machine"] = done["machine"]
        record["history"] = [{k: h.get(k) for k in HISTORY_FIELDS} for h in done["history"]]
        out.append(record)
    return out


def _read_jsonl(path: str, flag: str) -> list[dict[str, Any]]:
    if not os.path.exists(os.path.expanduser(path)):
        raise FileNotFoundError(f"{flag}: no such file: {path}")
    with open(os.path.expanduser(path)) as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_summary(runs_dir: str, run: Run, result: dict[str, Any]) -> None:
    """A record written back as the run's summary.json; a record has no `epochs`, which
    `is_finished` compares with the run's --epochs: its history's last epoch is that."""
    if "epochs" not in result and result.get("history"):
        result = {**result, "epochs": result["history"][-1]["epoch"]}
    directory = os.path.join(runs_dir, run.name)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "summary.json"), "w") as f:
        json.dump(result, f, indent=2)


def is_reused(protocol: Protocol, run: Run) -> bool:
    return protocol.reuse is not None and run.trains and protocol.reuse.selects(run)


def write_reused(
    protocol: Protocol, runs: Sequence[Run], runs_dir: str, reuse_from: str | None
) -> int:
    """Writes each reused run's record from the other study as its summary.json (marked
    `reused_from`); returns how many. ValueError when one is missing or ambiguous there."""
    todo = [r for r in runs if is_reused(protocol, r) and not is_finished(runs_dir, r)]
    if not todo:
        return 0
    spec = protocol.reuse
    if reuse_from is None:
        seeds = sorted({r.facts["seed"] for r in runs if is_reused(protocol, r)})
        raise ValueError(
            f"the protocol reuses {spec.study}'s seeds {seeds}: pass --reuse_from=<"
            f"{spec.study}'s runs.jsonl>"
        )
    found = _read_jsonl(reuse_from, "--reuse_from")
    for run in todo:
        matches = [
            r
            for r in found
            if all(r.get(k, v) == v for k, v in spec.where.items())
            and all(r[k] == run.facts[k] for k in spec.match)
            and r["steps"] == run.steps
        ]
        if len(matches) != 1:
            raise ValueError(
                f"{reuse_from} has {len(matches)} records of {run.name} with {run.steps} "
                "steps; expected exactly one"
            )
        _write_summary(runs_dir, run, {**matches[0], "reused_from": os.path.abspath(reuse_from)})
    return len(todo)


def _facts_key(facts: Mapping[str, Any], names: Sequence[str]) -> tuple:
    def norm(v):
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    return tuple((k, norm(facts.get(k))) for k in names)


def restore(protocol: Protocol, runs_dir: str, restore_from: str) -> int:
    """Writes each trained run recorded in a report's runs.jsonl whose directory has no
    summary.json back as its summary.json (marked `restored_from`), and a machines.csv beside
    the file into a runs directory that has none; returns how many runs it restored.

    Reused records are left to `write_reused`. A record that matches no planned run, two records of
    one run, or one with other steps than its run's is an error: the file is not this
    protocol's report.
    """
    path = os.path.expanduser(restore_from)
    left: dict[tuple, dict[str, Any]] = {}
    names: tuple[str, ...] = ()
    for record in _read_jsonl(restore_from, "--restore_from"):
        if record.get("reused"):
            continue
        names = names or _fact_names(protocol, runs_dir)
        key = _facts_key(record, names)
        if key in left:
            raise ValueError(f"{restore_from} has two records of {dict(key)}")
        left[key] = record
    restored = 0
    while left:  # a pilot's records may decide what else is planned: plan again
        planned = {_facts_key(r.facts, names): r for r in protocol.plan("", runs_dir) if r.trains}
        found = [k for k in left if k in planned]
        if not found:
            raise ValueError(
                f"{restore_from} records {len(left)} runs the protocol '{protocol.name}' does "
                f"not plan, e.g. {dict(sorted(left)[0])}"
            )
        for key in found:
            record, run = left.pop(key), planned[key]
            if run.steps is not None and record.get("steps") != run.steps:
                raise ValueError(
                    f"{restore_from}: a record of {dict(key)} has {record.get('steps')} steps; "
                    f"the protocol '{protocol.name}' has {run.steps}"
                )
            if is_finished(runs_dir, run):
                continue
            result = {k: v for k, v in record.items() if k not in ("part", "reused")}
            _write_summary(runs_dir, run, {**result, "restored_from": os.path.abspath(path)})
            restored += 1
    beside = os.path.join(os.path.dirname(path), MACHINES)
    if os.path.exists(beside) and not os.path.exists(os.path.join(runs_dir, MACHINES)):
        os.makedirs(runs_dir, exist_ok=True)
        shutil.copyfile(beside, os.path.join(runs_dir, MACHINES))
    return restored


def machines(runs_dir: str) -> dict[str, str]:
    """{run directory: the CPU it trained on}, from the runs directory's machines.csv (empty
    without one): for runs whose summary has no `machine`."""
    path = os.path.join(runs_dir, MACHINES)
    if not os.path.exists(path):
        return {}
    with open(path, newline="") as f:
        return {row["run"]: row["cpu"] for row in csv.DictReader(f)}


def _fact_names(protocol: Protocol, runs_dir: str) -> tuple[str, ...]:
    """The facts that tell the protocol's training runs apart."""
    names: dict[str, None] = {}
    for run in protocol.plan("", runs_dir):
        if run.trains:
            names.update(dict.fromkeys(run.facts))
    return tuple(names)
