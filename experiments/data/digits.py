"""scikit-learn's bundled 8x8 digits as 32x32 RGB images: the offline quick start.

1797 images, no download, bilinearly resized to 32x32 and repeated to RGB, with a fixed
stratified split of 1437 train / 360 test.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

from lpwd_optax.experiments.data.dataset import IMAGE_SIZE, ArrayDataset


def load(split: str) -> ArrayDataset:
    """The ``"train"`` or ``"test"`` split of the digits."""
    table = _digits_table()  # [1797, 65]: 8x8 pixels in 0..16, then the label
    grey = table[:, :64].reshape(-1, 8, 8) * (255.0 / 16.0)
    labels = table[:, 64].astype(np.int32)
    resize = _bilinear_matrix(8, IMAGE_SIZE)
    big = resize @ grey @ resize.T
    images = np.repeat(np.clip(np.rint(big), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    # A fixed stratified split: 36 test images per class (360 in all), the rest train.
    rng = np.random.default_rng(0)
    test = np.zeros(len(labels), bool)
    for c in range(10):
        test[rng.permutation(np.flatnonzero(labels == c))[:36]] = True
    keep = test if split == "test" else ~test
    return ArrayDataset(images[keep], labels[keep], 10, "digits")


def _digits_table() -> np.ndarray:
    """scikit-learn's bundled digits.csv.gz, read directly: importing sklearn takes seconds."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the 'digits' dataset needs scikit-learn: pip install scikit-learn"
        )
    path = Path(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    if not path.exists():  # a future layout: take the slow, public route
        from sklearn.datasets import load_digits

        digits = load_digits()
        return np.concatenate([digits.data, digits.target[:, None]], axis=1)
    with gzip.open(path, "rb") as f:
        values = f.read().replace(b"\n", b",").rstrip(b",").split(b",")
    return np.array(values, np.float64).reshape(-1, 65)


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of 1-D bilinear resizing with half-pixel centers."""
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    weights = np.zeros((n_out, n_in))
    np.add.at(weights, (np.arange(n_out), lo), 1 - frac)
    np.add.at(weights, (np.arange(n_out), hi), frac)
    return weights
