"""Parts of a dataset: a range of its classes, and a class-balanced training subset.

Both serve the regimes where weight decay is studied at CPU scale: pretraining on one half of
CIFAR-10's classes and fine-tuning on the other (`select_classes`), and training on a small
balanced subset (`balanced_subset`). Each returns a new :class:`ArrayDataset`; a request the
data cannot meet raises a :class:`DataError` whose message is one line naming the problem.
"""

from __future__ import annotations

import numpy as np

from lpwd_optax.experiments.data.dataset import ArrayDataset, DataError


def parse_classes(text: str) -> tuple[int, ...]:
    """``"0-4"`` -> (0, 1, 2, 3, 4); ``"5-9"``; ``"0,2,4"``; ``"1-3,7"``. Sorted, no repeats.

    Raises:
      DataError: an empty or reversed range, a repeated class, or text that is not numbers.
    """
    classes: list[int] = []
    for part in text.split(","):
        bounds = part.strip().split("-")
        if len(bounds) > 2 or not all(b.strip().isdigit() for b in bounds):
            raise DataError(
                f"--classes: {part.strip()!r} is not a class id or a range like 0-4 (got {text!r})"
            )
        low, high = int(bounds[0]), int(bounds[-1])
        if high < low:
            raise DataError(
                f"--classes: the range {part.strip()!r} is empty (ends before it starts)"
            )
        classes.extend(range(low, high + 1))
    if len(set(classes)) != len(classes):
        raise DataError(f"--classes: a class is named twice in {text!r}")
    return tuple(sorted(classes))


def select_classes(ds: ArrayDataset, classes: tuple[int, ...]) -> ArrayDataset:
    """The examples of `classes` only, relabelled 0..len(classes)-1 in the order given.

    Raises:
      DataError: a class the dataset does not have.
    """
    missing = [c for c in classes if c >= ds.num_classes]
    if missing:
        raise DataError(
            f"--classes: {ds.name} has classes 0-{ds.num_classes - 1}; no class {missing[0]}"
        )
    new_label = np.full(ds.num_classes, -1, np.int32)
    new_label[list(classes)] = np.arange(len(classes), dtype=np.int32)
    keep = new_label[ds.labels] >= 0
    return ArrayDataset(ds.images[keep], new_label[ds.labels[keep]], len(classes), ds.name)


def balanced_subset(ds: ArrayDataset, examples: int, seed: int) -> ArrayDataset:
    """`examples / num_classes` examples of every class, drawn without replacement from `seed`.

    The draw depends on `seed` and the data only, not on the training seed, so every run of a
    cell trains on the same images. The subset keeps the dataset's stored order.

    Raises:
      DataError: `examples` does not split evenly over the classes, or a class has fewer
        examples than its share.
    """
    k = ds.num_classes
    if examples < k or examples % k:
        raise DataError(
            f"--train_examples={examples} must be a positive multiple of the {k} classes "
            f"(the subset is balanced: {examples} / {k} per class)"
        )
    per_class = examples // k
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(k):
        index = np.flatnonzero(ds.labels == c)
        if len(index) < per_class:
            raise DataError(
                f"--train_examples={examples} needs {per_class} examples of class {c}, but "
                f"{ds.name} has {len(index)} ({len(ds)} in all)"
            )
        chosen.append(rng.choice(index, per_class, replace=False))
    keep = np.sort(np.concatenate(chosen))
    return ArrayDataset(ds.images[keep], ds.labels[keep], k, ds.name)
