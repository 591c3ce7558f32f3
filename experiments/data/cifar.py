"""CIFAR-10 and CIFAR-100 through tensorflow-datasets (without TensorFlow) or the original files.

Looked up in this order under ``data_dir`` (default: ``$TFDS_DATA_DIR`` or
``~/tensorflow_datasets``):

1. data TFDS already prepared (``<data_dir>/cifar10/3.0.2/``), in array_record format (read
   with ``builder.as_data_source``) or TFRecord format (read by `tfrecord`, so data prepared by
   ``tfds.load`` on another machine can simply be copied over);
2. the original archives from https://www.cs.toronto.edu/~kriz/cifar.html placed by hand:
   ``cifar-10-binary.tar.gz``, ``cifar-10-python.tar.gz`` (CIFAR-100: ``cifar-100-*``) or their
   extracted folders, in ``<data_dir>``, ``<data_dir>/downloads`` or
   ``<data_dir>/downloads/manual``. The "python" release is a set of pickles: it is read by an
   unpickler that admits only what those files hold (dicts, lists, bytes, ints, numpy arrays);
3. with ``download=True``, the binary archive fetched into ``<data_dir>/downloads/manual`` and
   checked against its published SHA-256.

When none works, the error says what to place where (or to use ``folder:...``).
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import io
import logging
import os
import pickle
import tarfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lpwd_optax.experiments.data import cache as cache_lib
from lpwd_optax.experiments.data import tfrecord
from lpwd_optax.experiments.data.dataset import (
    IMAGE_SIZE,
    ArrayDataset,
    DataError,
    DataNotFoundError,
)

logger = logging.getLogger(__name__)


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


CIFAR = {
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


def load(
    name: str, split: str, data_dir: str | os.PathLike | None, cache: Path, download: bool
) -> ArrayDataset:
    """One split of ``"cifar10"`` or ``"cifar100"`` (see the module docstring for the sources)."""
    spec = CIFAR[name]
    root = _tfds_root(data_dir)
    arrays = _from_tfds(name, split, root, cache)
    if arrays is None:
        found = _find_cifar_files(spec, root)
        if found is None and download:
            found = _download(name, spec, root)
        if found is None:
            raise DataNotFoundError(_missing_message(name, spec, root, download))
        files = sorted(found.iterdir()) if found.is_dir() else [found]
        arrays = cache_lib.cached(
            cache,
            f"{name}-{split}",
            ("cifar", name, split, cache_lib.file_key(files)),
            lambda: (*_read_cifar_files(spec, found, split), spec.num_classes),
        )
    images, labels, num_classes = arrays
    return ArrayDataset(images, labels, num_classes, name)


def _tfds_root(data_dir) -> Path:
    if data_dir is not None:
        return Path(data_dir).expanduser()
    return Path(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser()


# ----------------------------------------------------------------------------- TFDS


def _from_tfds(name, split, root, cache) -> cache_lib.Arrays | None:
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
        return (*_read_examples(source), num_classes)
    key = ("tfds", name, split, cache_lib.file_key([info_file]))
    return cache_lib.cached(
        cache, f"{name}-{split}", key, lambda: (*_read_examples(source), num_classes)
    )


def _read_examples(source: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    images = np.empty((len(source), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    labels = np.empty((len(source),), np.int32)
    for i in range(len(source)):
        example = source[i]
        images[i] = example["image"]
        labels[i] = example["label"]
    return images, labels


class _TFRecordSource:
    """Random-access view of a TFDS split stored as TFRecord files (checksums verified)."""

    def __init__(self, builder, split: str):
        self._features = builder.info.features
        self._records = [
            record
            for path in builder.info.splits[split].filepaths
            for record in tfrecord.read_records(path)
        ]

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._features.deserialize_example_np(self._records[index])


# ----------------------------------------------------------------------------- original files


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
        raise DataError(f"{path} lacks {missing}; is it a complete CIFAR download?")
    images, labels = [], []
    for f in wanted:
        if is_binary:
            rows = np.frombuffer(blobs[f], np.uint8).reshape(-1, spec.label_bytes + 3072)
            labels.append(rows[:, spec.label_bytes - 1])
            pixels = rows[:, spec.label_bytes :]
        else:
            batch = load_python_batch(blobs[f], f"{path}/{f}")
            labels.append(np.asarray(batch[spec.python_label_key]))
            pixels = np.asarray(batch[b"data"], np.uint8)
        images.append(pixels.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels).astype(np.int32)


def _latin1_encode(text: str, encoding: str) -> bytes:
    """How Python 3 pickles bytes at protocol 2: ``_codecs.encode(text, "latin1")``."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, encoding)


def _numpy_pickle_globals() -> dict[tuple[str, str], Any]:
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core to numpy._core
    reconstruct, frombuffer = core.multiarray._reconstruct, core.numeric._frombuffer
    return {
        # The release (Python 2, numpy 1.x) pickles its uint8 arrays as
        # _reconstruct(ndarray, (0,), b"b") followed by their state, which holds a dtype.
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # A copy re-pickled by Python 3: bytes at protocol 2, arrays at protocol 5.
        ("_codecs", "encode"): _latin1_encode,
        ("numpy.core.numeric", "_frombuffer"): frombuffer,
        ("numpy._core.numeric", "_frombuffer"): frombuffer,
    }


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR "python" batch, refusing every global it does not need.

    Everything else in such a file (dicts, lists, bytes, ints) is built by pickle's own opcodes;
    a global is how a pickle reaches code, so refusing all others means nothing else is run.
    """

    _allowed = _numpy_pickle_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def load_python_batch(blob: bytes, where: str) -> dict[bytes, Any]:
    """One batch file of the CIFAR "python" release: a dict with b"data", b"labels", ...

    Raises:
      DataError: the file needs anything a CIFAR batch does not hold (for example a function
        to call), or is not a pickled dict; nothing in it is run.
    """
    try:
        batch = _CifarUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise DataError(f"{where} is not a CIFAR python batch: {e}") from None
    if not isinstance(batch, dict):
        raise DataError(f"{where} is not a CIFAR python batch: holds {type(batch).__name__}")
    return batch


def _download(name: str, spec: _CifarFiles, root: Path) -> Path | None:
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
        raise DataError(
            f"{spec.url} downloaded with SHA-256 {digest.hexdigest()}, expected {spec.sha256}"
        )
    os.replace(tmp, dest)
    return dest


def _missing_message(name: str, spec: _CifarFiles, root: Path, download: bool) -> str:
    """One line: what is missing and the three ways to provide it."""
    fetched = "could not be downloaded" if download else "download=False"
    return (
        f"{name} was not found under data_dir={root} ({fetched}): put {spec.binary_archive} or "
        f"{spec.python_archive} in {root / 'downloads' / 'manual'}, or a TFDS-prepared {name} "
        f"folder in {root / name}, or pass --dataset=folder:<directory or .zip with "
        "train/<class>/ and test/<class>/ images>"
    )
