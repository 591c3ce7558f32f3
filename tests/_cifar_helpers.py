"""Shared set-up of the training-program tests: the tiniest model and a compilation cache."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence

import jax
import numpy as np
from PIL import Image

# One ConvNeXt stage with one block of 8 channels and a 3x3 depthwise kernel: compiles in
# seconds, trains on digits well enough to see the loss fall.
TINY_OVERRIDES = {"dims": [8], "depths": [1], "kernel_size": 3}
TINY_MODEL_FLAGS = [
    "--model=convnext_atto_cifar",
    f"--model_overrides={json.dumps(TINY_OVERRIDES)}",
]


def enable_compilation_cache(directory: str) -> None:
    """A persistent compilation cache for this test session: identical programs (the same
    model, method and shapes in several tests) compile once."""
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    try:  # JAX decides once per process whether the cache is used; make it look again.
        from jax._src import compilation_cache

        compilation_cache.reset_cache()
    except (ImportError, AttributeError):
        pass


def run_flags(output_dir, cache_dir, *extra: str) -> list[str]:
    """Flags of a quick run of experiments.cifar on digits with the tiny model."""
    return [
        *TINY_MODEL_FLAGS,
        "--dataset=digits",
        "--optimizer=adam",
        "--lr=1e-2",
        "--weight_decay=0.5",
        "--batch_size=64",
        "--steps_per_epoch=4",
        "--eval_batch_size=128",
        "--log_every_steps=2",
        "--no-progress",
        f"--compilation_cache_dir={cache_dir}",
        f"--output_dir={output_dir}",
        *extra,
    ]


def write_image_folder(root, num_classes: int = 3, train: int = 24, test: int = 16) -> str:
    """A CIFAR-format image folder (train/<class>/*.png, test/<class>/*.png) of 32x32 images
    whose classes differ in mean colour, so a model can learn them."""
    rng = np.random.default_rng(0)
    for split, per_class in (("train", train), ("test", test)):
        for c in range(num_classes):
            folder = os.path.join(root, split, f"class_{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                base = np.zeros(3)
                base[c % 3] = 180
                pixels = np.clip(base + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"{i:04d}.png"))
    return str(root)


def read_params(run_dir) -> dict[str, np.ndarray]:
    with np.load(os.path.join(run_dir, "final_params.npz")) as f:
        return {k: f[k] for k in f.files}


def copy_run(src, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def max_abs_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def flags_for(names: Sequence[str]) -> set[str]:
    return {f"--{n}" for n in names}
