"""The batch pipeline: an epoch's shuffled, flipped, normalized batches, prefetched by a thread.

The shuffle and flips are drawn per epoch for the whole dataset from ``(seed, epoch)``, so a
resumed run sees the same batches and the global batch does not depend on the number of
processes; each process takes its slice of every global batch.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import threading
from collections.abc import Iterator

import numpy as np

from lpwd_optax.experiments.data.dataset import IMAGE_SIZE, ArrayDataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# x_normalized = (x / 255 - mean) / std = x * scale + shift, per channel. Tiled over a whole
# image so numpy's inner loop runs over 3072 values rather than 3 (5x faster).
_SCALE = np.tile(1.0 / (255.0 * np.asarray(IMAGENET_STD)), IMAGE_SIZE**2).astype(np.float32)
_SHIFT = np.tile(-np.asarray(IMAGENET_MEAN) / np.asarray(IMAGENET_STD), IMAGE_SIZE**2).astype(
    np.float32
)
_PIXEL = np.dtype((np.void, 3))  # an RGB pixel as one element: flips copy 3-byte items (2x)


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
