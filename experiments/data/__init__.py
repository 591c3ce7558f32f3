"""Datasets for the CIFAR experiments: in-memory uint8 arrays and a fast batch iterator.

``load_dataset(name)`` returns an :class:`ArrayDataset` of 32x32 RGB uint8 images from one of
these sources, each a module here:

* ``"cifar10"``, ``"cifar100"`` (`cifar`): data prepared by tensorflow-datasets (read without
  TensorFlow; TFRecord files through `tfrecord`, which checks every record's CRCs), or the
  original archives placed by hand or downloaded.
* ``"digits"`` (`digits`): scikit-learn's bundled 8x8 digits, resized to 32x32 RGB; a fixed
  split of 1437 train / 360 test, no download. The offline quick start.
* ``"folder:<path>"`` (`image_folder`): a directory or a ``.zip`` laid out as
  ``train/<class>/*.jpg`` and ``test/<class>/*.jpg``; class names sorted give the label ids.

Decoded CIFAR and folder datasets are cached as ``.npz`` files (`cache`) keyed on the source's
path, size and modification time, in ``cache_dir`` (default ``$LPWD_OPTAX_CACHE``, else
``<data_dir>/lpwd_optax_cache`` when ``data_dir`` is given, else ``~/.cache/lpwd_optax``).
A data path that is missing or malformed raises a :class:`DataError` (a ``ValueError``) whose
message is one line naming the path and the problem.

``select_classes(ds, parse_classes("5-9"))`` keeps a range of classes (relabelled from 0) and
``balanced_subset(ds, n, seed)`` draws ``n / num_classes`` examples of every class (`subset`).

``batches(ds, global_batch_size, seed=..., epoch=...)`` (`pipeline`) yields normalized float32
batches: ImageNet mean/std normalization, a random horizontal flip with p=0.5 in training, an
order shuffled deterministically in ``(seed, epoch)`` (so a resumed run sees the same batches),
each process's slice of the global batch, and a background thread that keeps ``prefetch``
batches ready.

Example::

  from lpwd_optax.experiments import data

  train = data.load_dataset("digits", split="train")
  for epoch in range(2):
    for batch in data.batches(train, 128, seed=0, epoch=epoch):
      batch["image"]  # float32 [128, 32, 32, 3]; batch["label"]: int32 [128]
"""

from __future__ import annotations

import os

from lpwd_optax.experiments.data import cache, cifar, digits, image_folder
from lpwd_optax.experiments.data.dataset import (
    IMAGE_SIZE,
    SPLITS,
    ArrayDataset,
    DataError,
    DataNotFoundError,
)
from lpwd_optax.experiments.data.image_folder import IMAGE_EXTENSIONS
from lpwd_optax.experiments.data.pipeline import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BatchIterator,
    batches,
    num_batches,
)
from lpwd_optax.experiments.data.subset import balanced_subset, parse_classes, select_classes

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "IMAGE_SIZE",
    "SPLITS",
    "ArrayDataset",
    "BatchIterator",
    "DataError",
    "DataNotFoundError",
    "balanced_subset",
    "batches",
    "load_dataset",
    "num_batches",
    "parse_classes",
    "select_classes",
]


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    split: str = "train",
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> ArrayDataset:
    """Loads one split of a dataset into memory (see the package docstring for the sources).

    Args:
      name: ``"cifar10"``, ``"cifar100"``, ``"digits"`` or ``"folder:<directory or .zip>"``.
      data_dir: TFDS data directory for CIFAR; also where the cache goes when given.
      split: ``"train"`` or ``"test"``.
      cache_dir: where decoded arrays are cached (see the package docstring for the default).
      download: for CIFAR, whether to download the archive when no local copy is found.

    Returns:
      An :class:`ArrayDataset`.

    Raises:
      DataNotFoundError: the data is not on disk (and could not be downloaded); the message
        says what to place where. Also a ``FileNotFoundError``.
      DataError: a malformed source (an empty folder, a file that is not a zip, a corrupted
        record, ...).
      ValueError: an unknown name or split.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    cache_path = cache.cache_dir(cache_dir, data_dir)
    if name == "digits":
        return digits.load(split)
    if name in cifar.CIFAR:
        return cifar.load(name, split, data_dir, cache_path, download)
    if name.startswith("folder:"):
        return image_folder.load(name, split, cache_path)
    raise ValueError(
        f"unknown dataset {name!r}; use 'cifar10', 'cifar100', 'digits' or "
        f"'folder:<directory or .zip with {image_folder.LAYOUT}>'"
    )
