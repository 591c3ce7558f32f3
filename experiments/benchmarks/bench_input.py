"""Input-pipeline benchmark: the images/s `experiments.data.batches` delivers.

For each dataset: the time to load it (for an image folder also the one-time decode into the
cache), then the images/s of training batches (shuffle, flip, normalize, per-process slice),
produced on demand (``prefetch=0``) and through the background thread (``prefetch=2``),
median over repeats after a warm-up. Compare with the training step's images/s on the same
machine (`bench_train_step`, or its `--with-input` option); the target is >= 5x.

  python -m lpwd_optax.experiments.benchmarks.bench_input \
      --folder ../shared/data/cifar10-jpeg.zip --out bench_input.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from lpwd_optax.experiments import data


def images_per_second(ds, batch_size: int, prefetch: int, repeats: int, min_images: int):
    """Median images/s (wall clock, and per CPU-second of this process) over `repeats` timed
    passes of at least `min_images` each."""
    epochs = math.ceil(min_images / (data.num_batches(ds, batch_size) * batch_size))
    rates, cpu_rates = [], []
    for repeat in range(repeats + 1):  # the first pass warms up
        start, cpu_start, seen = time.perf_counter(), time.process_time(), 0
        for e in range(epochs):
            batches = data.batches(
                ds, batch_size, seed=0, epoch=repeat * epochs + e, prefetch=prefetch
            )
            for batch in batches:
                seen += len(batch["label"])
        if repeat:
            rates.append(seen / (time.perf_counter() - start))
            cpu_rates.append(seen / (time.process_time() - cpu_start))
    return statistics.median(rates), statistics.median(cpu_rates)


def bench(name: str, args, cache_dir: Path) -> dict:
    result = {"dataset": name}
    start = time.perf_counter()
    ds = data.load_dataset(name, split="train", cache_dir=cache_dir)
    result["first_load_s"] = time.perf_counter() - start  # a folder: decode + cache both splits
    if name.startswith("folder:"):
        start = time.perf_counter()
        data.load_dataset(name, split="train", cache_dir=cache_dir)
        result["cached_load_s"] = time.perf_counter() - start
    result["num_images"] = len(ds)
    for prefetch in (0, 2):
        rate, cpu_rate = images_per_second(
            ds, args.batch_size, prefetch, args.repeats, args.min_images
        )
        result[f"images_per_s_prefetch{prefetch}"] = rate
        result[f"images_per_cpu_s_prefetch{prefetch}"] = cpu_rate  # robust on a shared machine
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", help="also benchmark folder:<this path>, e.g. the CIFAR zip")
    parser.add_argument("--batch-size", type=int, default=512, help="global batch size")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes (median)")
    parser.add_argument("--min-images", type=int, default=50_000, help="images per pass")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()

    names = ["digits"] + ([f"folder:{args.folder}"] if args.folder else [])
    with tempfile.TemporaryDirectory() as cache_dir:  # cold: the decode is part of the figure
        results = [bench(name, args, Path(cache_dir)) for name in names]
    report = {
        "benchmark": "input_pipeline",
        "batch_size": args.batch_size,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus_usable": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
        "results": results,
    }
    for r in results:
        line = f"{r['dataset']}: {r['num_images']} images, first load {r['first_load_s']:.2f} s"
        if "cached_load_s" in r:
            line += f" (cached: {r['cached_load_s']:.2f} s)"
        print(
            f"{line}; batches of {args.batch_size}: "
            f"{r['images_per_s_prefetch0']:,.0f} images/s on demand, "
            f"{r['images_per_s_prefetch2']:,.0f} images/s with prefetch "
            f"({r['images_per_cpu_s_prefetch0']:,.0f} images per CPU-second)"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
