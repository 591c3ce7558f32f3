"""The `.npz` cache of decoded datasets, keyed on what identifies the source's content.

A key holds each source file's path, size and modification time, so a changed source is never
served from the cache and nothing is read to check it. Files are written atomically, so runs
sharing a cache never read a partial file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

FORMAT = 1  # bump when the cached arrays would change for the same source

Arrays = tuple[np.ndarray, np.ndarray, int]  # images, labels, num_classes


def cache_dir(cache_dir: str | os.PathLike | None, data_dir: str | os.PathLike | None) -> Path:
    """`cache_dir`, else ``$LPWD_OPTAX_CACHE``, else ``<data_dir>/lpwd_optax_cache``, else
    ``$XDG_CACHE_HOME/lpwd_optax`` (``~/.cache/lpwd_optax``)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("LPWD_OPTAX_CACHE"):
        return Path(os.environ["LPWD_OPTAX_CACHE"]).expanduser()
    if data_dir is not None:
        return Path(data_dir).expanduser() / "lpwd_optax_cache"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lpwd_optax"


def file_key(paths: Sequence[Path]) -> list[Any]:
    """What identifies the content of `paths` without reading them: path, size, mtime."""
    key = []
    for p in paths:
        st = p.stat()
        key.append((str(p.resolve()), st.st_size, st.st_mtime_ns))
    return key


def cache_file(cache: Path, label: str, key: Any) -> Path:
    """The file under `cache` for `key`, named ``<label>-<digest>.npz``."""
    digest = hashlib.sha256(repr((FORMAT, key)).encode()).hexdigest()[:16]
    return cache / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}-{digest}.npz"


def load(path: Path) -> Arrays | None:
    """The arrays cached in `path` (saying so in one log line), or None if it is not there."""
    if not path.exists():
        return None
    try:
        with np.load(path) as f:
            arrays = f["images"], f["labels"], int(f["num_classes"])
    except (OSError, KeyError, ValueError) as e:
        logger.warning("ignoring unreadable cache file %s (%s)", path, e)
        return None
    logger.info("%d images from the cache %s", len(arrays[0]), path)
    return arrays


def save(path: Path, arrays: Arrays) -> None:
    """Writes `arrays` to `path` atomically; a failure is logged, not raised."""
    images, labels, num_classes = arrays
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, images=images, labels=labels, num_classes=num_classes)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        logger.warning("could not write cache file %s (%s); continuing without it", path, e)


def cached(cache: Path, label: str, key: Any, build: Callable[[], Arrays]) -> Arrays:
    """Returns `build()` = (images, labels, num_classes), through the cache under `key`."""
    path = cache_file(cache, label, key)
    arrays = load(path)
    if arrays is None:
        logger.info("%s: reading the source once; the arrays will be cached in %s", label, path)
        arrays = build()
        save(path, arrays)
    return arrays
