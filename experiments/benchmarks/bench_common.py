"""What the benchmarks share: interleaved timing, the machine description, tables and JSON.

Ratios are what a benchmark on a shared machine can trust: the configurations being compared
are timed round-robin in one process (repeat 1 of every configuration, then repeat 2, ...), so a
burst of load from elsewhere hits all of them alike, and each figure is the median over repeats
after a warm-up. Wall time and this process's CPU time are both recorded; CPU time is less
disturbed by other processes on an oversubscribed machine.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any


def usable_cpus() -> int:
    """CPUs this process may run on (XLA's CPU thread pool is sized from this)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """The machine, the software and the load when the benchmark started."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpus_usable": usable_cpus(),
        "load_average_1_5_15min": load_average(),
        "python": platform.python_version(),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
    }
    for package in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "timm"):
        info[package] = _version(package)
    if "jax" in sys.modules:
        import jax

        info["jax_backend"] = jax.default_backend()
        info["jax_devices"] = [str(d) for d in jax.devices()]
    return info


def random_like(abstract: Any, seed: int, scale: float = 0.02) -> Any:
    """Normal(0, scale) arrays shaped like a pytree of `jax.ShapeDtypeStruct`s.

    Drawn with numpy, so nothing is compiled (jax.random would compile per shape); timings do
    not depend on the values.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: jnp.asarray(scale * rng.standard_normal(x.shape, np.float32), x.dtype),
        abstract,
    )


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def minor_page_faults() -> int:
    """Minor page faults of this process so far: each is a fresh page the kernel zeroed.

    XLA's CPU runtime allocates an executable's temporary buffers on every run, and large
    blocks go back to the OS when freed, so every materialized intermediate is faulted in
    again each step: the fault count measures those buffers without timing noise.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def summarize(samples: Sequence[float]) -> dict[str, float]:
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "n": len(samples),
    }


def time_interleaved(
    runs: Mapping[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    prepare: Mapping[str, Callable[[], Any]] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Times each `runs[name]()` `repeats` times, round-robin over the names (rotated per round).

    Each call must finish its work before returning (block on its results). `prepare[name]()`,
    if given, runs untimed before every call of `runs[name]`. The first `warmup` rounds are
    discarded.

    Returns:
      {name: {"wall_s": [...], "cpu_s": [...]}}, one entry per timed repeat.
    """
    out = {name: {"wall_s": [], "cpu_s": []} for name in runs}
    names = list(runs)
    for round_index in range(warmup + repeats):
        # Rotate the order every round, so that no configuration always follows the same one
        # (a fixed order showed a systematic penalty for the slot after the first).
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            fn = runs[name]
            if prepare is not None and name in prepare:
                prepare[name]()
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if round_index >= warmup:
                out[name]["wall_s"].append(wall)
                out[name]["cpu_s"].append(cpu)
    return out


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table; floats get 3 significant decimals, None prints as '-'."""

    def cell(x: Any) -> str:
        if x is None:
            return "-"
        if isinstance(x, float):
            return f"{x:,.3f}" if abs(x) < 100 else f"{x:,.1f}"
        return str(x)

    text = [[cell(x) for x in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) for i, h in enumerate(headers)]
    lines = [
        "  ".join(h.ljust(w) for h, w in zip(headers, widths)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in text]
    return "\n".join(lines)


def write_json(path: str | os.PathLike, report: Mapping[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(f"wrote {path}")
