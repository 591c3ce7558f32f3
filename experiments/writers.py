"""Metric writers (JSONL, TensorBoard, log) behind one `write_scalars(step, scalars)` call.

The idea is CLU's `metric_writers`: the training loop calls one writer; what happens to the
numbers (a JSON line per record, TensorBoard events, a log line) is decided once, when the
writer is created. Only process 0 writes files; other processes get a writer that does nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

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

    def __init__(self, logdir: str):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(logdir)

    def write_scalars(self, step: int, scalars: Scalars) -> None:
        for key, value in scalars.items():
            value = _jsonable(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, int(step))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class LoggingWriter:
    """A log line per record, with only the keys in `keys` (all when None)."""

    def __init__(self, keys: Sequence[str] | None = None):
        self.keys = keys

    def write_scalars(self, step: int, scalars: Scalars) -> None:
        items = [
            (k, _jsonable(v)) for k, v in scalars.items() if self.keys is None or k in self.keys
        ]
        text = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in items)
        logging.info("[%d] %s", step, text)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


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
