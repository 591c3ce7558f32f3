"""Metric writers (JSONL, TensorBoard, console) behind one `write_scalars(step, scalars)` call.

The idea is CLU's `metric_writers`: the training loop calls one writer; what happens to the
numbers (a JSON line per record, TensorBoard events, a log line) is decided once, when the
writer is created. Only process 0 writes files; other processes get a writer that does nothing.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from tqdm import tqdm

Scalars = Mapping[str, Any]


class MetricWriter(Protocol):
    def write_scalars(self, step: int, scalars: Scalars) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


def _jsonable(value: Any) -> Any:
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN: an undefined metric (e.g. R_op of L2) is null
    return value


class JsonlWriter:
    """One JSON object per `write_scalars` call: `{"step": ..., **scalars}`."""

    def __init__(self, path: str, *, keep_up_to_step: int | None = None):
        """Opens `path` for appending; on resume, drops records after `keep_up_to_step`."""
        self.path = path
        if keep_up_to_step is not None and os.path.exists(path):
            kept = [r for r in read_jsonl(path) if r.get("step", 0) <= keep_up_to_step]
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
        elif keep_up_to_step is None and os.path.exists(path):
            os.remove(path)
        self._file = open(path, "a")

    def write_scalars(self, step: int, scalars: Scalars) -> None:
        record = {"step": int(step), **{k: _jsonable(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(record) + "\n")

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardWriter:
    """Scalars as TensorBoard events (tensorboardX); non-finite values are skipped."""

    def __init__(self, logdir: str, *, purge_step: int | None = None):
        """`purge_step`: on resume, events at this step and later are dropped (a run restored
        from an older checkpoint rewrites them), so TensorBoard shows no duplicate points."""
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(logdir, purge_step=purge_step)

    def write_scalars(self, step: int, scalars: Scalars) -> None:
        for key, value in scalars.items():
            value = _jsonable(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, int(step))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MultiWriter:
    def __init__(self, writers: Sequence[MetricWriter]):
        self.writers = list(writers)

    def write_scalars(self, step: int, scalars: Scalars) -> None:
        for w in self.writers:
            w.write_scalars(step, scalars)

    def flush(self) -> None:
        for w in self.writers:
            w.flush()

    def close(self) -> None:
        for w in self.writers:
            w.close()


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """All records of a JSONL file (a torn last line, from a kill mid-write, is skipped)."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class ConsoleWriter:
    """The run's lines for a person: one per epoch, and one per logging interval when no
    progress bar shows the steps (output piped to a file)."""

    def __init__(self, epochs: int, print_fn: Callable[[str], None], step_lines: bool):
        self.epochs, self.print_fn, self.step_lines = epochs, print_fn, step_lines

    def write_scalars(self, step: int, scalars: Scalars) -> None:
        if "test_top1" in scalars:
            rop = scalars.get("rop")
            rop_text = "" if rop is None or not math.isfinite(rop) else f", R_op {rop:.4g}"
            self.print_fn(
                f"epoch {scalars['epoch']}/{self.epochs}: train loss "
                f"{scalars['train_loss']:.4f}, test top-1 {scalars['test_top1']:.2f}%"
                f"{rop_text} ({scalars['epoch_time_s']:.1f} s)"
            )
        elif self.step_lines and "train/loss" in scalars:
            self.print_fn(
                f"step {step} (epoch {scalars['train/epoch']}/{self.epochs}): loss "
                f"{scalars['train/loss']:.4f}, train top-1 {scalars['train/top1']:.2f}%"
            )

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class Progress:
    """A progress bar on a terminal: the epoch and loss at every step, then the evaluation's
    batches. Disabled (and every line printed plainly) when output goes to a file."""

    def __init__(self, total: int, initial: int, steps_per_epoch: int, enabled: bool):
        self.steps_per_epoch, self.epochs = steps_per_epoch, total // steps_per_epoch
        self.bar = tqdm(
            total=total, initial=initial, unit="step", dynamic_ncols=True, disable=not enabled
        )

    def train_step(self, step: int, loss: float) -> None:
        """After `step` steps (1-based); `loss` is the latest known loss."""
        epoch = (step - 1) // self.steps_per_epoch + 1
        self.bar.set_description(f"epoch {epoch}/{self.epochs}", refresh=False)
        self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self.bar.update(1)

    def evaluation(self, batches: Iterable[Any], total: int) -> Iterator[Any]:
        for i, batch in enumerate(batches, 1):
            self.bar.set_postfix_str(f"evaluating {i}/{total}")
            yield batch

    def print(self, text: str) -> None:
        if self.bar.disable:
            print(text, flush=True)
        else:
            tqdm.write(text)

    def close(self) -> None:
        self.bar.close()
