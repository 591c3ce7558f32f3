"""The in-memory dataset every source returns, and the errors a source raises."""

from __future__ import annotations

import dataclasses

import numpy as np

IMAGE_SIZE = 32
SPLITS = ("train", "test")


class DataError(ValueError):
    """The data a configuration names is missing or malformed; the message is one line that
    names the path and the problem, so a program can print it instead of a traceback."""


class DataNotFoundError(DataError, FileNotFoundError):
    """The data is not where the configuration says (also a `FileNotFoundError`)."""


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
