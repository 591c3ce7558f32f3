"""Datasets for the CIFAR experiments: in-memory uint8 arrays and a fast batch iterator.

``load_dataset(name)`` returns an :class:`ArrayDataset` of 32x32 RGB uint8 images:

* ``"cifar10"``, ``"cifar100"``: through tensorflow-datasets, without TensorFlow. Looked up in
  this order under ``data_dir`` (default: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``):

  1. data TFDS already prepared (``<data_dir>/cifar10/3.0.2/``), in array_record format (read
     with ``builder.as_data_source``) or TFRecord format (read by a small reader here, so data
     prepared by ``tfds.load`` on another machine can simply be copied over);
  2. the original archives from https://www.cs.toronto.edu/~kriz/cifar.html placed by hand:
     ``cifar-10-binary.tar.gz``, ``cifar-10-python.tar.gz`` (CIFAR-100: ``cifar-100-*``) or
     their extracted folders, in ``<data_dir>``, ``<data_dir>/downloads`` or
     ``<data_dir>/downloads/manual``;
  3. with ``download=True``, the binary archive fetched into ``<data_dir>/downloads/manual``
     and checked against its published SHA-256.

  When none works, the error says what to place where (or to use ``folder:...``).
* ``"digits"``: scikit-learn's bundled 8x8 digits (1797 images, no download), bilinearly
  resized to 32x32 and repeated to RGB; a fixed stratified split of 1437 train / 360 test.
  The offline quick start.
* ``"folder:<path>"``: a directory or a ``.zip`` laid out as ``train/<class>/*.jpg`` and
  ``test/<class>/*.jpg`` (a zip may wrap this in one top-level folder). Class names sorted
  alphabetically give the label ids. Images are decoded once with PIL in a process pool and
  cached. Images that are not 32x32 are resized to 32x32 (bicubic, antialiased) and a warning
  says how many; greyscale, palette and RGBA images are converted to RGB.

Decoded CIFAR and folder datasets are cached as ``.npz`` files keyed on the source's path, size
and modification time, in ``cache_dir`` (default ``$LPWD_OPTAX_CACHE``, else
``<data_dir>/lpwd_optax_cache`` when ``data_dir`` is given, else ``~/.cache/lpwd_optax``).

``batches(ds, global_batch_size, seed=..., epoch=...)`` yields normalized float32 batches:
ImageNet mean/std normalization, a random horizontal flip with p=0.5 in training, an order
shuffled deterministically in ``(seed, epoch)`` (so a resumed run sees the same batches), each
process's slice of the global batch, and a background thread that keeps ``prefetch`` batches
ready. The shuffle and flips are drawn per epoch for the whole dataset, so the global batch does
not depend on the number of processes.

Example::

  from lpwd_optax.experiments import data

  train = data.load_dataset("digits", split="train")
  for epoch in range(2):
    for batch in data.batches(train, 128, seed=0, epoch=epoch):
      batch["image"]  # float32 [128, 32, 32, 3]; batch["label"]: int32 [128]
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import gzip
import hashlib
import importlib.util
import io
import logging
import math
import multiprocessing
import os
import pickle
import queue
import re
import struct
import sys
import tarfile
import threading
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

logger = logging.getLogger(__name__)

IMAGE_SIZE = 32
SPLITS = ("train", "test")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")

# x_normalized = (x / 255 - mean) / std = x * scale + shift, per channel. Tiled over a whole
# image so numpy's inner loop runs over 3072 values rather than 3 (5x faster).
_SCALE = np.tile(1.0 / (255.0 * np.asarray(IMAGENET_STD)), IMAGE_SIZE**2).astype(np.float32)
_SHIFT = np.tile(-np.asarray(IMAGENET_MEAN) / np.asarray(IMAGENET_STD), IMAGE_SIZE**2).astype(
    np.float32
)
_PIXEL = np.dtype((np.void, 3))  # an RGB pixel as one element: flips copy 3-byte items (2x)

_CACHE_FORMAT = 1  # bump when the cached arrays would change for the same source
_PARALLEL_DECODE_MIN = 2048  # below this, a process pool costs more than it saves


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
    """A labelled image dataset held in memory.

    Attributes:
      images: uint8 [N, 32, 32, 3], RGB.
      labels: int32 [N], in ``[0, num_classes)``.
      num_classes: number of classes.
      name: the name it was loaded under, e.g. ``"cifar10"`` or ``"folder:/data/x.zip"``.
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise ValueError(
                f"images must be uint8 [N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3], got "
                f"{self.images.dtype} {self.images.shape}"
            )
        if self.labels.dtype != np.int32 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"labels must be int32 [{len(self.images)}], got {self.labels.dtype} "
                f"{self.labels.shape}"
            )

    def __len__(self) -> int:
        return len(self.labels)


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    split: str = "train",
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> ArrayDataset:
    """Loads one split of a dataset into memory (see the module docstring for the sources).

    Args:
      name: ``"cifar10"``, ``"cifar100"``, ``"digits"`` or ``"folder:<directory or .zip>"``.
      data_dir: TFDS data directory for CIFAR; also where the cache goes when given.
      split: ``"train"`` or ``"test"``.
      cache_dir: where decoded arrays are cached (see the module docstring for the default).
      download: for CIFAR, whether to download the archive when no local copy is found.

    Returns:
      An :class:`ArrayDataset`.

    Raises:
      FileNotFoundError: the data is not on disk (and could not be downloaded); the message
        says what to place where.
      ValueError: an unknown name or split, or a malformed source.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    cache = _cache_dir(cache_dir, data_dir)
    if name == "digits":
        return _load_digits(split)
    if name in _CIFAR:
        return _load_cifar(name, split, data_dir, cache, download)
    if name.startswith("folder:"):
        return _load_folder(name, split, cache)
    raise ValueError(
        f"unknown dataset {name!r}; use 'cifar10', 'cifar100', 'digits' or "
        "'folder:<directory or .zip with train/<class>/*.jpg and test/<class>/*.jpg>'"
    )


def num_batches(ds: ArrayDataset, global_batch_size: int, drop_remainder: bool = True) -> int:
    """Number of global batches `batches` yields for one epoch of `ds`."""
    if drop_remainder:
        return len(ds) // global_batch_size
    return math.ceil(len(ds) / global_batch_size)


def batches(
    ds: ArrayDataset,
    global_batch_size: int,
    *,
    seed: int,
    epoch: int,
    train: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    drop_remainder: bool = True,
    prefetch: int = 2,
    start_batch: int = 0,
) -> BatchIterator:
    """Iterates over one epoch of `ds` as normalized batches.

    Global batch ``b`` holds positions ``[b * B, (b + 1) * B)`` of the epoch's order (a
    permutation drawn from ``(seed, epoch)`` in training, the stored order otherwise);
    process ``p`` of ``P`` gets positions ``[b * B + p * B // P, b * B + (p + 1) * B // P)``.
    A final partial batch (``drop_remainder=False``) is split as evenly as possible, so
    the processes' slices may then differ in size by one.

    Args:
      ds: the dataset.
      global_batch_size: examples per step over all processes; divisible by `process_count`.
      seed: shuffling and flip seed (used when `train`).
      epoch: epoch number; each epoch gets its own order and flips.
      train: shuffle and flip horizontally with p=0.5; otherwise keep the order, no flips.
      process_index: this process's index, e.g. ``jax.process_index()``.
      process_count: number of processes, e.g. ``jax.process_count()``.
      drop_remainder: drop the last partial global batch.
      prefetch: batches kept ready by a background thread; 0 makes them on demand.
      start_batch: skip the epoch's first global batches (to resume mid-epoch).

    Returns:
      An iterator (with ``len``) of dicts ``image``: float32 [B_local, 32, 32, 3] normalized
      with ImageNet mean/std, and ``label``: int32 [B_local].
    """
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"need 0 <= process_index < process_count, got {process_index=}, {process_count=}"
        )
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by "
            f"process_count={process_count}"
        )
    total = num_batches(ds, global_batch_size, drop_remainder)
    if total == 0 and len(ds):
        raise ValueError(
            f"{ds.name} has {len(ds)} examples, fewer than one global batch of "
            f"{global_batch_size}; lower the batch size or pass drop_remainder=False"
        )
    if not 0 <= start_batch <= total:
        raise ValueError(f"start_batch must be in [0, {total}], got {start_batch}")
    order, flips = _epoch_plan(len(ds), seed, epoch) if train else (None, None)
    source = _iterate(
        ds, order, flips, global_batch_size, process_index, process_count, range(start_batch, total)
    )
    return BatchIterator(source, total - start_batch, prefetch)


def _epoch_plan(n: int, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """The epoch's example order and, per position in it, whether to flip."""
    rng = np.random.default_rng([seed, epoch])
    return rng.permutation(n), rng.random(n) < 0.5


def _iterate(ds, order, flips, batch_size, process_index, process_count, batch_ids):
    n = len(ds)
    for b in batch_ids:
        start = b * batch_size
        size = min(batch_size, n - start)
        lo = start + process_index * size // process_count
        hi = start + (process_index + 1) * size // process_count
        if order is None:
            images, labels = ds.images[lo:hi], ds.labels[lo:hi]
        else:
            idx = order[lo:hi]
            images, labels = ds.images[idx], ds.labels[idx]
            flipped = np.flatnonzero(flips[lo:hi])
            pixels = images.view(_PIXEL)[..., 0]  # [B, H, W]
            pixels[flipped] = pixels[flipped, :, ::-1]
        yield {"image": _normalize(images), "label": np.array(labels, np.int32)}


def _normalize(images: np.ndarray) -> np.ndarray:
    out = np.empty(images.shape, np.float32)
    rows = out.reshape(len(images), _SCALE.size)
    np.multiply(images.reshape(len(images), _SCALE.size), _SCALE, out=rows)
    rows += _SHIFT
    return out


class BatchIterator:
    """Iterator over batches, produced ahead by a background thread when ``prefetch > 0``.

    ``len()`` is the number of batches left. ``close()`` (also on garbage collection) stops the
    thread; an exception raised while producing a batch is re-raised by ``next()``.
    """

    def __init__(self, source: Iterator[dict[str, np.ndarray]], length: int, prefetch: int):
        self._remaining = length
        self._source = source
        self._queue = None
        if prefetch > 0:
            self._queue = queue.Queue(maxsize=prefetch)
            self._stop = threading.Event()
            # The thread holds no reference to `self`, so dropping the iterator closes it.
            self._thread = threading.Thread(
                target=_produce,
                args=(source, self._queue, self._stop),
                daemon=True,
                name="lpwd_optax-prefetch",
            )
            self._thread.start()

    def __iter__(self) -> BatchIterator:
        return self

    def __len__(self) -> int:
        return self._remaining

    def __next__(self) -> dict[str, np.ndarray]:
        if self._remaining == 0:
            raise StopIteration
        if self._queue is None:
            item = next(self._source)
        else:
            item = self._queue.get()
            if isinstance(item, _Failure):
                self._remaining = 0
                raise item.error
        self._remaining -= 1
        return item

    def close(self) -> None:
        self._remaining = 0
        if self._queue is not None:
            self._stop.set()

    def __del__(self):
        self.close()


@dataclasses.dataclass
class _Failure:
    error: BaseException


def _produce(source, out: queue.Queue, stop: threading.Event) -> None:
    try:
        for item in source:
            if not _put(out, item, stop):
                return
    except BaseException as e:  # handed to the consumer, which re-raises it
        _put(out, _Failure(e), stop)


def _put(out: queue.Queue, item, stop: threading.Event) -> bool:
    """Puts `item` unless the consumer stopped first; returns whether it was put."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            pass
    return False


# ----------------------------------------------------------------------------- digits


def _load_digits(split: str) -> ArrayDataset:
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


# ----------------------------------------------------------------------------- caching


def _cache_dir(cache_dir, data_dir) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("LPWD_OPTAX_CACHE"):
        return Path(os.environ["LPWD_OPTAX_CACHE"]).expanduser()
    if data_dir is not None:
        return Path(data_dir).expanduser() / "lpwd_optax_cache"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lpwd_optax"


def _file_key(paths: Sequence[Path]) -> list[Any]:
    """What identifies the content of `paths` without reading them: path, size, mtime."""
    key = []
    for p in paths:
        st = p.stat()
        key.append((str(p.resolve()), st.st_size, st.st_mtime_ns))
    return key


Arrays = tuple[np.ndarray, np.ndarray, int]  # images, labels, num_classes


def _cache_file(cache: Path, label: str, key: Any) -> Path:
    digest = hashlib.sha256(repr((_CACHE_FORMAT, key)).encode()).hexdigest()[:16]
    return cache / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}-{digest}.npz"


def _cache_load(path: Path) -> Arrays | None:
    if not path.exists():
        return None
    try:
        with np.load(path) as f:
            return f["images"], f["labels"], int(f["num_classes"])
    except (OSError, KeyError, ValueError) as e:
        logger.warning("ignoring unreadable cache file %s (%s)", path, e)
        return None


def _cache_save(path: Path, arrays: Arrays) -> None:
    images, labels, num_classes = arrays
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, images=images, labels=labels, num_classes=num_classes)
        os.replace(tmp, path)  # atomic, so concurrent runs never read a partial file
    except OSError as e:
        tmp.unlink(missing_ok=True)
        logger.warning("could not write cache file %s (%s); continuing without it", path, e)


def _cached(cache: Path, label: str, key: Any, build) -> Arrays:
    """Returns `build()` = (images, labels, num_classes), through an .npz cache under `key`."""
    path = _cache_file(cache, label, key)
    arrays = _cache_load(path)
    if arrays is None:
        arrays = build()
        _cache_save(path, arrays)
    return arrays


# ----------------------------------------------------------------------------- CIFAR


@dataclasses.dataclass(frozen=True)
class _CifarFiles:
    num_classes: int
    url: str
    sha256: str
    binary_dir: str
    binary_files: dict[str, tuple[str, ...]]
    label_bytes: int  # the fine label is the last of these bytes
    python_dir: str
    python_files: dict[str, tuple[str, ...]]
    python_label_key: bytes

    @property
    def binary_archive(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def python_archive(self) -> str:
        return self.binary_archive.replace("-binary", "-python")


_CIFAR = {
    "cifar10": _CifarFiles(
        num_classes=10,
        url="https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
        sha256="c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
        binary_dir="cifar-10-batches-bin",
        binary_files={
            "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
            "test": ("test_batch.bin",),
        },
        label_bytes=1,
        python_dir="cifar-10-batches-py",
        python_files={
            "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
            "test": ("test_batch",),
        },
        python_label_key=b"labels",
    ),
    "cifar100": _CifarFiles(
        num_classes=100,
        url="https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
        sha256="58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec",
        binary_dir="cifar-100-binary",
        binary_files={"train": ("train.bin",), "test": ("test.bin",)},
        label_bytes=2,
        python_dir="cifar-100-python",
        python_files={"train": ("train",), "test": ("test",)},
        python_label_key=b"fine_labels",
    ),
}


def _tfds_root(data_dir) -> Path:
    if data_dir is not None:
        return Path(data_dir).expanduser()
    return Path(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser()


def _load_cifar(name, split, data_dir, cache, download) -> ArrayDataset:
    spec = _CIFAR[name]
    root = _tfds_root(data_dir)
    arrays = _from_tfds(name, split, root, cache)
    if arrays is None:
        found = _find_cifar_files(spec, root)
        if found is None and download:
            found = _download_cifar(name, spec, root)
        if found is None:
            raise FileNotFoundError(_cifar_missing_message(name, spec, root, download))
        files = sorted(found.iterdir()) if found.is_dir() else [found]
        arrays = _cached(
            cache,
            f"{name}-{split}",
            ("cifar", name, split, _file_key(files)),
            lambda: (*_read_cifar_files(spec, found, split), spec.num_classes),
        )
    images, labels, num_classes = arrays
    return ArrayDataset(images, labels, num_classes, name)


def _from_tfds(name, split, root, cache):
    """(images, labels, num_classes) from TFDS-prepared data under `root`, else None."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:  # the original archives can still be read without it
        logger.info("tensorflow-datasets is not installed; looking for CIFAR archives only")
        return None

    builder = tfds.builder(name, data_dir=str(root))
    try:
        source = builder.as_data_source(split=split)
    except NotImplementedError:  # not prepared, or prepared as TFRecord (no random access)
        if not builder.is_prepared():
            return None
        source = _TFRecordSource(builder, split)
    num_classes = builder.info.features["label"].num_classes
    info_file = Path(builder.data_dir) / "dataset_info.json"
    if not info_file.exists():  # e.g. tfds.testing.mock_data: nothing on disk to cache
        return (*_read_records(source), num_classes)
    key = ("tfds", name, split, _file_key([info_file]))
    return _cached(cache, f"{name}-{split}", key, lambda: (*_read_records(source), num_classes))


def _read_records(source: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    images = np.empty((len(source), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    labels = np.empty((len(source),), np.int32)
    for i in range(len(source)):
        example = source[i]
        images[i] = example["image"]
        labels[i] = example["label"]
    return images, labels


class _TFRecordSource:
    """Random-access view of a TFDS split stored as TFRecord files, read without TensorFlow.

    A TFRecord file is a sequence of frames: uint64 length, uint32 CRC of the length, the
    serialized example, uint32 CRC of the example (CRCs not checked here).
    """

    def __init__(self, builder, split: str):
        self._features = builder.info.features
        self._records = []
        for path in builder.info.splits[split].filepaths:
            data = Path(path).read_bytes()
            pos = 0
            while pos < len(data):
                (length,) = struct.unpack_from("<Q", data, pos)
                self._records.append(data[pos + 12 : pos + 12 + length])
                pos += 16 + length

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._features.deserialize_example_np(self._records[index])


def _find_cifar_files(spec: _CifarFiles, root: Path) -> Path | None:
    """A hand-placed original archive (or its extracted folder) under `root`, else None."""
    for folder in (root, root / "downloads", root / "downloads" / "manual"):
        for candidate in (
            spec.binary_dir,
            spec.python_dir,
            spec.binary_archive,
            spec.python_archive,
        ):
            if (folder / candidate).exists():
                return folder / candidate
    return None


def _read_cifar_files(spec: _CifarFiles, path: Path, split: str):
    """Parses the original CIFAR release (binary or python version, archive or folder)."""
    is_binary = path.name in (spec.binary_dir, spec.binary_archive)
    wanted = spec.binary_files[split] if is_binary else spec.python_files[split]
    if path.is_dir():
        blobs = {f: (path / f).read_bytes() for f in wanted if (path / f).exists()}
    else:
        blobs = {}
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in wanted:
                    blobs[base] = tar.extractfile(member).read()
    missing = [f for f in wanted if f not in blobs]
    if missing:
        raise ValueError(f"{path} lacks {missing}; is it a complete CIFAR download?")
    images, labels = [], []
    for f in wanted:
        if is_binary:
            rows = np.frombuffer(blobs[f], np.uint8).reshape(-1, spec.label_bytes + 3072)
            labels.append(rows[:, spec.label_bytes - 1])
            pixels = rows[:, spec.label_bytes :]
        else:
            batch = pickle.loads(blobs[f], encoding="bytes")  # the official python release
            labels.append(np.asarray(batch[spec.python_label_key]))
            pixels = np.asarray(batch[b"data"], np.uint8)
        images.append(pixels.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels).astype(np.int32)


def _download_cifar(name: str, spec: _CifarFiles, root: Path) -> Path | None:
    dest = root / "downloads" / "manual" / spec.binary_archive
    logger.info("downloading %s from %s to %s", name, spec.url, dest)
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(spec.url, timeout=30) as response:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    f.write(chunk)
    except (urllib.error.URLError, OSError) as e:
        tmp.unlink(missing_ok=True)
        logger.warning("could not download %s: %s", spec.url, e)
        return None
    if digest.hexdigest() != spec.sha256:
        tmp.unlink(missing_ok=True)
        raise ValueError(
            f"{spec.url} downloaded with SHA-256 {digest.hexdigest()}, expected {spec.sha256}"
        )
    os.replace(tmp, dest)
    return dest


def _cifar_missing_message(name: str, spec: _CifarFiles, root: Path, download: bool) -> str:
    folder_hint = (
        "use the CIFAR-10 JPEG copy shipped with this project, dataset name "
        "'folder:../shared/data/cifar10-jpeg.zip' (path from the project root)"
        if name == "cifar10"
        else "use an image folder, dataset name 'folder:<dir or .zip with train/<class>/*.jpg "
        "and test/<class>/*.jpg>'"
    )
    return (
        f"{name} was not found under data_dir={root}"
        f"{' and could not be downloaded' if download else ' (and download=False)'}. Either\n"
        f"  * {folder_hint}, or\n"
        f"  * place {spec.binary_archive} or {spec.python_archive} (from "
        f"https://www.cs.toronto.edu/~kriz/cifar.html) in {root / 'downloads' / 'manual'}, or\n"
        f"  * copy a TFDS-prepared {name} folder (e.g. ~/tensorflow_datasets/{name}/ from a "
        f"machine that ran tfds.load('{name}')) to {root / name}, or\n"
        "  * run once with network access (download=True)."
    )


# ----------------------------------------------------------------------------- image folders


class _ZipMember(NamedTuple):
    """Where a zip member's bytes lie, so workers read them without parsing the zip again."""

    name: str
    offset: int  # of the member's local header
    size: int  # compressed size
    method: int  # zipfile.ZIP_STORED or ZIP_DEFLATED


Member = str | _ZipMember  # a path relative to a directory source, or a zip member


@dataclasses.dataclass(frozen=True)
class _FolderIndex:
    """The images of an image-folder source: members and labels per split."""

    path: Path
    is_zip: bool
    classes: tuple[str, ...]
    members: dict[str, list[Member]]
    labels: dict[str, np.ndarray]  # split -> int32 label ids


def _member_name(member: Member) -> str:
    return member.name if isinstance(member, _ZipMember) else member


def _load_folder(name: str, split: str, cache: Path) -> ArrayDataset:
    path = Path(name.removeprefix("folder:")).expanduser()
    index = None
    if path.is_file():  # a zip: its size and mtime stand for its content, no listing needed
        key = _file_key([path])
    else:
        index = _folder_index(path)
        key = _file_key([path / m for members in index.members.values() for m in members])
    cache_file = lambda s: _cache_file(cache, f"{path.name}-{s}", ("folder", s, key))
    arrays = _cache_load(cache_file(split))
    if arrays is None:
        index = index or _folder_index(path)
        if split not in index.members:
            raise FileNotFoundError(
                f"{path} has no '{split}/' folder with class sub-folders of images "
                f"(found: {sorted(index.members)}); expected train/<class>/*.jpg and "
                "test/<class>/*.jpg"
            )
        # Decode every split in one pass (one listing, one worker pool), cache each.
        decoded = _decode_images(path, [m for ms in index.members.values() for m in ms])
        start = 0
        for s, members in index.members.items():
            images = decoded[start : start + len(members)]
            start += len(members)
            _cache_save(cache_file(s), (images, index.labels[s], len(index.classes)))
            if s == split:  # a copy: a view would keep the other splits alive
                arrays = (images.copy(), index.labels[s], len(index.classes))
    return ArrayDataset(*arrays, name)


def _folder_index(path: Path) -> _FolderIndex:
    if not path.exists():
        raise FileNotFoundError(
            f"image folder {path} does not exist; pass a directory or .zip holding "
            "train/<class>/*.jpg and test/<class>/*.jpg"
        )
    is_zip = path.is_file()
    if is_zip:
        members = _zip_members(path)
    else:
        members = []
        for split in SPLITS:
            for dirpath, dirnames, filenames in os.walk(path / split, followlinks=True):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                rel = Path(dirpath).relative_to(path).as_posix()
                members.extend(f"{rel}/{f}" for f in filenames)
    # A zip may wrap the layout in one folder (a zipped `cifar10/` holding train/ and test/).
    names = [_member_name(m) for m in members]
    tops = {n.split("/", 1)[0] for n in names if "/" in n and not n.startswith("__MACOSX")}
    prefix = tops.pop() + "/" if is_zip and len(tops) == 1 and not tops & set(SPLITS) else ""
    by_split: dict[str, list[tuple[str, str, Member]]] = {}
    for name, member in zip(names, members):
        parts = name.removeprefix(prefix).split("/")
        if (
            name.startswith(prefix)
            and len(parts) >= 3
            and parts[0] in SPLITS
            and not any(p.startswith(".") for p in parts)
            and name.lower().endswith(IMAGE_EXTENSIONS)
        ):
            by_split.setdefault(parts[0], []).append((parts[1], name, member))
    if not by_split:
        raise ValueError(
            f"image folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)}) under "
            "train/<class>/ or test/<class>/"
        )
    classes = tuple(sorted({c for items in by_split.values() for c, _, _ in items}))
    label_of = {c: i for i, c in enumerate(classes)}
    for items in by_split.values():
        items.sort(key=lambda item: item[1])  # by name: the order does not depend on the zip's
    return _FolderIndex(
        path=path,
        is_zip=is_zip,
        classes=classes,
        members={s: [m for _, _, m in items] for s, items in by_split.items()},
        labels={
            s: np.array([label_of[c] for c, _, _ in items], np.int32)
            for s, items in by_split.items()
        },
    )


def _zip_members(path: Path) -> list[_ZipMember]:
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is neither a directory nor a .zip file")
    members = []
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if info.is_dir():
                continue
            if info.flag_bits & 0x1:
                raise ValueError(f"{path}: {info.filename} is encrypted")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise ValueError(
                    f"{path}: {info.filename} uses zip compression method "
                    f"{info.compress_type}; re-create the zip with stored or deflated members"
                )
            members.append(
                _ZipMember(
                    info.filename, info.header_offset, info.compress_size, info.compress_type
                )
            )
    return members


def _decode_images(path: str | os.PathLike, members: Sequence[Member]) -> np.ndarray:
    """Decodes image files to uint8 [N, 32, 32, 3] RGB, in parallel processes when many.

    Args:
      path: a directory, or a .zip file when `members` are `_ZipMember`s.
      members: paths relative to the directory, or zip members.

    Returns:
      The images in the order of `members`; any not 32x32 are resized (a warning counts them).
    """
    workers = min(len(os.sched_getaffinity(0)), 8)
    parts = []
    if len(members) >= _PARALLEL_DECODE_MIN and workers > 1 and _can_spawn():
        size = max(256, math.ceil(len(members) / (workers * 8)))
        chunks = [list(members[i : i + size]) for i in range(0, len(members), size)]
        # spawn: forking a process that runs JAX's threads is unsafe.
        try:
            with concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn")
            ) as pool:
                parts = list(pool.map(_decode_chunk, [str(path)] * len(chunks), chunks))
        except concurrent.futures.process.BrokenProcessPool as e:
            logger.warning("image decoding workers failed (%s); decoding in this process", e)
            parts = []
    if not parts:
        parts = [_decode_chunk(str(path), list(members))]
    images = parts[0][0] if len(parts) == 1 else np.concatenate([p[0] for p in parts])
    resized = sum(p[1] for p in parts)
    if resized:
        logger.warning(
            "%s: resized %d of %d images to %dx%d",
            path,
            resized,
            len(members),
            IMAGE_SIZE,
            IMAGE_SIZE,
        )
    return images


def _can_spawn() -> bool:
    """Whether spawned workers can re-import __main__ (they cannot for `python - < script`)."""
    main_file = getattr(sys.modules["__main__"], "__file__", None)
    return main_file is None or os.path.exists(main_file)


def _decode_chunk(path: str, members: list[Member]) -> tuple[np.ndarray, int]:
    """Decodes `members` of the directory or zip `path`; returns (images, number resized)."""
    from PIL import Image

    out = np.empty((len(members), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    resized = 0
    is_zip = bool(members) and isinstance(members[0], _ZipMember)
    with open(path, "rb") if is_zip else contextlib.nullcontext() as archive:
        for i, member in enumerate(members):
            try:
                if is_zip:
                    encoded = _read_zip_member(archive, member)
                else:
                    encoded = (Path(path) / member).read_bytes()
                image = Image.open(io.BytesIO(encoded))
                if image.mode != "RGB":
                    image = image.convert("RGB")
                if image.size != (IMAGE_SIZE, IMAGE_SIZE):
                    image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
                    resized += 1
                out[i] = np.asarray(image)
            except Exception as e:
                name = _member_name(member)
                raise ValueError(f"cannot decode image {name} in {path}: {e}") from e
    return out, resized


def _read_zip_member(archive, member: _ZipMember) -> bytes:
    # Local header: 30 fixed bytes, the last 4 being the name and extra-field lengths.
    archive.seek(member.offset)
    header = archive.read(30)
    if header[:4] != b"PK\x03\x04":
        raise ValueError("bad zip local header")
    name_len, extra_len = struct.unpack_from("<HH", header, 26)
    archive.seek(member.offset + 30 + name_len + extra_len)
    raw = archive.read(member.size)
    if member.method == zipfile.ZIP_DEFLATED:
        return zlib.decompress(raw, -15)
    return raw
