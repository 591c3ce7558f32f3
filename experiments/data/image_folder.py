"""Image folders: a directory or a .zip laid out as train/<class>/*.jpg and test/<class>/*.jpg.

A zip may wrap this layout in one top-level folder, and is read with `zipfile` (zip64, data
descriptors, stored/deflated/bzip2/lzma members; member CRCs are checked). Class names sorted
alphabetically give the label ids. Images are decoded once with PIL, in a process pool when
there are many, and both splits are cached together; the first decode logs its progress and
where the cache goes. Images that are not 32x32 are resized to 32x32 (bicubic, antialiased) and
a warning says how many; greyscale, palette and RGBA images are converted to RGB.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import io
import logging
import math
import multiprocessing
import os
import sys
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from lpwd_optax.experiments.data import cache as cache_lib
from lpwd_optax.experiments.data.dataset import (
    IMAGE_SIZE,
    SPLITS,
    ArrayDataset,
    DataError,
    DataNotFoundError,
)

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")
LAYOUT = "train/<class>/*.jpg and test/<class>/*.jpg"

_PARALLEL_DECODE_MIN = 2048  # below this, a process pool costs more than it saves
_READABLE_ZIP_METHODS = (
    zipfile.ZIP_STORED,
    zipfile.ZIP_DEFLATED,
    zipfile.ZIP_BZIP2,
    zipfile.ZIP_LZMA,
)


@dataclasses.dataclass(frozen=True)
class _FolderIndex:
    """The images of an image-folder source: member names and labels per split."""

    path: Path
    is_zip: bool
    classes: tuple[str, ...]
    members: dict[str, list[str]]  # split -> paths relative to the directory, or zip names
    labels: dict[str, np.ndarray]  # split -> int32 label ids


def load(name: str, split: str, cache: Path) -> ArrayDataset:
    """One split of the image folder ``name = "folder:<directory or .zip>"``."""
    path = Path(name.removeprefix("folder:")).expanduser()
    index = None
    if path.is_file():  # a zip: its size and mtime stand for its content, no listing needed
        key = cache_lib.file_key([path])
    else:
        index = _folder_index(path)
        key = cache_lib.file_key([path / m for members in index.members.values() for m in members])
    cache_file = lambda s: cache_lib.cache_file(cache, f"{path.name}-{s}", ("folder", s, key))
    arrays = cache_lib.load(cache_file(split))
    if arrays is None:
        index = index or _folder_index(path)
        if split not in index.members:
            raise DataNotFoundError(
                f"image folder {path} has no '{split}/' folder with class sub-folders of images "
                f"(found: {sorted(index.members)}); expected {LAYOUT}"
            )
        counts = ", ".join(f"{len(m)} {s}" for s, m in index.members.items())
        logger.info(
            "%s: decoding its images (%s) once; they will be cached in %s",
            path,
            counts,
            " and ".join(str(cache_file(s)) for s in index.members),
        )
        # Decode every split in one pass (one listing, one worker pool), cache each.
        decoded = _decode_images(path, [m for ms in index.members.values() for m in ms])
        start = 0
        for s, members in index.members.items():
            images = decoded[start : start + len(members)]
            start += len(members)
            cache_lib.save(cache_file(s), (images, index.labels[s], len(index.classes)))
            if s == split:  # a copy: a view would keep the other splits alive
                arrays = (images.copy(), index.labels[s], len(index.classes))
    return ArrayDataset(*arrays, name)


def _folder_index(path: Path) -> _FolderIndex:
    if not path.exists():
        raise DataNotFoundError(
            f"image folder {path} does not exist; pass a directory or .zip holding {LAYOUT}"
        )
    is_zip = path.is_file()
    if is_zip:
        names = _zip_members(path)
    else:
        names = []
        for split in SPLITS:
            for dirpath, dirnames, filenames in os.walk(path / split, followlinks=True):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                rel = Path(dirpath).relative_to(path).as_posix()
                names.extend(f"{rel}/{f}" for f in filenames)
    # A zip may wrap the layout in one folder (a zipped `cifar10/` holding train/ and test/).
    tops = {n.split("/", 1)[0] for n in names if "/" in n and not n.startswith("__MACOSX")}
    prefix = tops.pop() + "/" if is_zip and len(tops) == 1 and not tops & set(SPLITS) else ""
    by_split: dict[str, list[tuple[str, str]]] = {}  # split -> [(class, member name)]
    for name in names:
        parts = name.removeprefix(prefix).split("/")
        if (
            name.startswith(prefix)
            and len(parts) >= 3
            and parts[0] in SPLITS
            and not any(p.startswith(".") for p in parts)
            and name.lower().endswith(IMAGE_EXTENSIONS)
        ):
            by_split.setdefault(parts[0], []).append((parts[1], name))
    if not by_split:
        raise DataError(
            f"image folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)}) under "
            "train/<class>/ or test/<class>/"
        )
    classes = tuple(sorted({c for items in by_split.values() for c, _ in items}))
    label_of = {c: i for i, c in enumerate(classes)}
    for items in by_split.values():
        items.sort(key=lambda item: item[1])  # by name: the order does not depend on the zip's
    return _FolderIndex(
        path=path,
        is_zip=is_zip,
        classes=classes,
        members={s: [name for _, name in items] for s, items in by_split.items()},
        labels={
            s: np.array([label_of[c] for c, _ in items], np.int32) for s, items in by_split.items()
        },
    )


def _zip_members(path: Path) -> list[str]:
    """The names of the files in the zip `path`, checked to be readable."""
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path} is neither a directory nor a .zip file")
    try:
        with zipfile.ZipFile(path) as archive:
            infos = [info for info in archive.infolist() if not info.is_dir()]
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path} is not a readable .zip file ({e})") from None
    for info in infos:
        if info.flag_bits & 0x1:
            raise DataError(f"{path}: {info.filename} is encrypted")
        if info.compress_type not in _READABLE_ZIP_METHODS:
            raise DataError(
                f"{path}: {info.filename} uses zip compression method {info.compress_type}; "
                "re-create the zip with stored or deflated members"
            )
    return [info.filename for info in infos]


def _decode_images(path: str | os.PathLike, members: Sequence[str]) -> np.ndarray:
    """Decodes image files to uint8 [N, 32, 32, 3] RGB, in parallel processes when many.

    Args:
      path: a directory or a .zip file.
      members: paths relative to the directory, or names in the zip.

    Returns:
      The images in the order of `members`; any not 32x32 are resized (a warning counts them).
    """
    path = str(path)
    workers = min(len(os.sched_getaffinity(0)), 8)
    size = max(256, math.ceil(len(members) / (workers * 8)))
    chunks = [list(members[i : i + size]) for i in range(0, len(members), size)]
    parts = None
    if len(members) >= _PARALLEL_DECODE_MIN and workers > 1 and _can_spawn():
        # spawn: forking a process that runs JAX's threads is unsafe.
        pool = concurrent.futures.ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(path,),
        )
        try:
            with pool:
                results = pool.map(_decode_chunk, [path] * len(chunks), chunks)
                parts = _collect(results, path, len(members), f"{workers} processes")
        except concurrent.futures.process.BrokenProcessPool as e:
            logger.warning("image decoding workers failed (%s); decoding in this process", e)
    if parts is None:
        with _opened(path) as read:
            results = (_decode(path, chunk, read) for chunk in chunks)
            parts = _collect(results, path, len(members), "1 process")
    if not parts:
        return np.empty((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
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


def _collect(results: Iterable[tuple[np.ndarray, int]], path: str, total: int, how: str):
    """Gathers decoded chunks in order, logging progress about every tenth of `total`."""
    parts, done, start = [], 0, time.perf_counter()
    every = max(total // 10, 1)
    next_report = every
    for part in results:
        parts.append(part)
        done += len(part[0])
        if done >= next_report or done == total:
            logger.info(
                "%s: decoded %d/%d images (%.0f%%) in %.1fs with %s",
                path,
                done,
                total,
                100 * done / total,
                time.perf_counter() - start,
                how,
            )
            next_report = (done // every + 1) * every
    return parts


def _can_spawn() -> bool:
    """Whether spawned workers can re-import __main__ (they cannot for `python - < script`)."""
    main_file = getattr(sys.modules["__main__"], "__file__", None)
    return main_file is None or os.path.exists(main_file)


@contextlib.contextmanager
def _opened(path: str) -> Iterator[Callable[[str], bytes]]:
    """A function returning the bytes of a member of the directory or zip `path`."""
    if os.path.isdir(path):
        yield lambda member: Path(path, member).read_bytes()
        return
    with zipfile.ZipFile(path) as archive:
        yield archive.read


# In a decoding worker process: (path, reader) of the zip it opened once, so that each chunk
# does not parse the zip's central directory again. Closed when the worker exits.
_worker_source: tuple[str, Callable[[str], bytes]] | None = None


def _start_worker(path: str) -> None:
    global _worker_source
    if not os.path.isdir(path):
        _worker_source = (path, zipfile.ZipFile(path).read)


def _decode_chunk(path: str, members: list[str]) -> tuple[np.ndarray, int]:
    """Decodes `members` of the directory or zip `path`; returns (images, number resized)."""
    if _worker_source is not None and _worker_source[0] == path:
        return _decode(path, members, _worker_source[1])
    with _opened(path) as read:
        return _decode(path, members, read)


def _decode(path: str, members: list[str], read: Callable[[str], bytes]) -> tuple[np.ndarray, int]:
    from PIL import Image

    out = np.empty((len(members), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    resized = 0
    for i, member in enumerate(members):
        try:
            image = Image.open(io.BytesIO(read(member)))
            if image.mode != "RGB":
                image = image.convert("RGB")
            if image.size != (IMAGE_SIZE, IMAGE_SIZE):
                image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
                resized += 1
            out[i] = np.asarray(image)
        except Exception as e:
            raise DataError(f"cannot decode image {member} in {path}: {e}") from e
    return out, resized
