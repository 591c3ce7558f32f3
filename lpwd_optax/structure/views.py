"""Views: how the forward pass reads a param leaf, as one affine map from index to index.

A value computed from a leaf without arithmetic holds, at value index `i`, the leaf's entry
at flat (row-major) index `offset + sum(stride * digit)`: each value axis is a number written
in one or more digits (a reshape that merges axes numpy could not fuse leaves several), each
digit with its stride, and the offset may move with loop steps (a `counters.Steps`). Every
view primitive is a small change of digits and offset. An axis a gather by constant indices
built has no such map: it is opaque, and only the leaf axes it spans are known, enough for
fan-in and output axes but not for reading one entry of it. A join (`concatenate`, `stack`)
is `Pieces`: a list of views.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lpwd_optax.structure.counters import Steps, on_grid, steps_of

NOT_READ = -1  # the offset of a piece of a join at a step that reads another piece


@functools.cache
def row_major(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(math.prod(shape[a + 1 :]) for a in range(len(shape)))


@functools.cache
def _digit_spans(leaf_shape: tuple[int, ...], size: int, stride: int) -> frozenset[int]:
    """The leaf axes whose entry changes as a digit walks its `size` steps of `stride`."""
    step, reach = abs(stride), abs(stride) * (size - 1)
    return frozenset(
        a
        for a, (m, s) in enumerate(zip(leaf_shape, row_major(leaf_shape)))
        if m > 1 and step and s * m > step and reach >= s
    )


@functools.cache
def _axis_spans(leaf_shape: tuple[int, ...], digits: tuple[tuple[int, int], ...]) -> frozenset[int]:
    """The leaf axes that an axis of `digits` walks along."""
    return frozenset().union(*(_digit_spans(leaf_shape, n, s) for n, s in digits))


@dataclasses.dataclass(frozen=True)
class View:
    """Value entry `i` is leaf entry `offset + sum(stride * digit)`: `axes[k]` holds value
    axis `k`'s digits, `(size, stride)` outermost first (none for an axis of size 1), or,
    for an opaque axis, the frozenset of leaf axes it spans."""

    leaf: int
    leaf_shape: tuple[int, ...]
    shape: tuple[int, ...]
    axes: tuple[Any, ...]
    offset: Any = 0

    @classmethod
    def of_leaf(cls, leaf: int, shape: tuple[int, ...]) -> View:
        axes = tuple(((n, s),) if n > 1 else () for n, s in zip(shape, row_major(shape)))
        return cls(leaf, shape, shape, axes)

    def spans(self, k: int) -> frozenset[int]:
        """The leaf axes that value axis `k` walks along."""
        axis = self.axes[k]
        if isinstance(axis, frozenset):
            return axis
        return _axis_spans(self.leaf_shape, axis)

    def spanned(self, axes: Sequence[int] | None = None) -> frozenset[int]:
        ks = range(len(self.shape)) if axes is None else axes
        return frozenset().union(*(self.spans(k) for k in ks))

    def entries(self) -> np.ndarray:
        """The leaf index of value index 0 at each step that reads the view (one row each)."""
        if self.leaf_shape and not isinstance(self.offset, Steps) and self.offset >= 0:
            return np.array([np.unravel_index(self.offset, self.leaf_shape)], np.int64)
        offsets = np.ravel(self.offset.values if isinstance(self.offset, Steps) else self.offset)
        read = offsets[offsets >= 0]
        if not read.size or not self.leaf_shape:
            return np.zeros((read.size, len(self.leaf_shape)), np.int64)
        return np.stack(np.unravel_index(read, self.leaf_shape), -1)


def _moved(offset: Any, index: Any, digits: Sequence[tuple[int, int]]) -> Any:
    """`offset` moved to entry `index` (an int or `Steps`) of an axis of `digits`; NOT_READ
    stays so, and an index NOT_READ makes it so."""
    sizes, strides = [n for n, _ in digits] or [1], [s for _, s in digits] or [0]
    if not isinstance(offset, Steps) and not isinstance(index, Steps):
        if NOT_READ in (offset, index):
            return NOT_READ
        places = np.unravel_index(int(index), sizes)
        return int(offset + sum(int(p) * s for p, s in zip(places, strides)))
    levels, (o, i) = on_grid([offset, index])
    places = np.unravel_index(np.maximum(i, 0), sizes)
    moved = o + sum((p * s for p, s in zip(places, strides)), np.zeros_like(o))
    return steps_of(levels, np.where((o == NOT_READ) | (i == NOT_READ), NOT_READ, moved))


def _with(view: View, shape: Sequence[int], axes: Sequence[Any], offset: Any = None) -> View:
    offset = view.offset if offset is None else offset
    return View(view.leaf, view.leaf_shape, tuple(shape), tuple(axes), offset)


def transpose(view: View, perm: Sequence[int]) -> View:
    return _with(view, [view.shape[p] for p in perm], [view.axes[p] for p in perm])


def broadcast(view: View, shape: Sequence[int], dims: Sequence[int]) -> View:
    axes: list[Any] = [((n, 0),) if n > 1 else () for n in shape]
    for j, d in enumerate(dims):
        if view.shape[j] == shape[d]:
            axes[d] = view.axes[j]
    return _with(view, shape, axes)


def squeeze(view: View, dims: Sequence[int]) -> View:
    drop = {d % len(view.shape) for d in dims}
    keep = [k for k in range(len(view.shape)) if k not in drop]
    return _with(view, [view.shape[k] for k in keep], [view.axes[k] for k in keep])


def rev(view: View, dims: Sequence[int]) -> View:
    """Every digit of a reversed axis runs backwards from its last entry."""
    axes, offset = list(view.axes), view.offset
    for k in dims:
        if not isinstance(axes[k], frozenset):
            offset = _moved(offset, view.shape[k] - 1, axes[k])
            axes[k] = tuple((n, -s) for n, s in axes[k])
    return _with(view, view.shape, axes, offset)


def _fused(digits: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """numpy's no-copy rule: neighbouring digits whose outer stride is the inner one times
    its size are one digit."""
    out: list[tuple[int, int]] = []
    for n, s in digits:
        if n > 1 and out and out[-1][1] == s * n:
            out[-1] = (out[-1][0] * n, s)
        elif n > 1:
            out.append((n, s))
    return tuple(out)


def _regrouped(digits: list[tuple[int, int]], sizes: Sequence[int]) -> list[Any] | None:
    """`digits` (row-major) cut into axes of `sizes`, a digit split where an axis ends inside
    it; None where such an axis size does not divide the digit."""
    out = []
    for size in sizes:
        axis = []
        while size > 1:
            n, s = digits.pop(0)
            if size % n and n % size:
                return None
            if n > size:  # the axis takes the digit's outer part
                digits.insert(0, (n // size, s))
                n, s = size, s * (n // size)
            axis.append((n, s))
            size //= n
        out.append(_fused(axis))
    return out


def reshape(view: View, shape: Sequence[int]) -> View:
    """Blocks of old and new axes with equal products are matched left to right, and each
    block's digits regrouped into its new axes; a block with an opaque axis, or whose digits
    the new sizes cut unevenly, is opaque."""
    old = [k for k, n in enumerate(view.shape) if n != 1]
    new = [j for j, n in enumerate(shape) if n != 1]
    axes: list[Any] = [()] * len(shape)
    i = j = 0
    while i < len(old) and j < len(new):
        block_old, block_new = [old[i]], [new[j]]
        p_old, p_new = view.shape[old[i]], shape[new[j]]
        while p_old != p_new:
            if p_old < p_new:
                i += 1
                block_old.append(old[i])
                p_old *= view.shape[old[i]]
            else:
                j += 1
                block_new.append(new[j])
                p_new *= shape[new[j]]
        digits = [view.axes[k] for k in block_old]
        grouped = None
        if not any(isinstance(d, frozenset) for d in digits):
            flat = [d for axis in digits for d in axis]
            grouped = _regrouped(flat, [shape[k] for k in block_new])
        for n, k in enumerate(block_new):
            axes[k] = view.spanned(block_old) if grouped is None else grouped[n]
        i, j = i + 1, j + 1
    return _with(view, shape, axes)


def window(
    view: View, starts: Sequence[Any], sizes: Sequence[int], steps: Sequence[int] | None = None
) -> View | None:
    """`sizes` entries from `starts` (ints, or `Steps` that loops move), every `steps`-th.
    An axis of several digits keeps whole runs of its outer digit, or one entry, or becomes
    opaque. None where one entry of an opaque axis is read: its place is not known."""
    axes, offset = [], view.offset
    for k, (start, size) in enumerate(zip(starts, sizes)):
        axis, step, moving = view.axes[k], steps[k] if steps else 1, isinstance(start, Steps)
        inner = 1 if isinstance(axis, frozenset) else math.prod(n for n, _ in axis[1:])
        if size == view.shape[k] and not moving:
            axes.append(axis)
        elif isinstance(axis, frozenset):
            if size == 1 or moving:
                return None
            axes.append(axis)
        elif size == 1:
            offset = _moved(offset, start, axis)
            axes.append(())
        elif inner == 1 or not (moving or start % inner or size % inner or step != 1):
            (outer, stride), rest = axis[0], axis[1:]
            offset = _moved(offset, start if inner == 1 else start // inner, ((outer, stride),))
            axes.append(_fused([(size // inner, stride * step), *rest]))
        elif moving:
            return None
        else:
            axes.append(view.spans(k))
    return _with(view, sizes, axes, offset)


def gathered(view: View, dimension_numbers: Any, out_shape: Sequence[int]) -> View:
    """A gather by constant indices (a table read at a fixed index, a Toeplitz matrix built
    from a kernel's taps): the axes the indices make, and any slice of an indexed axis, are
    opaque, spanning the indexed leaf axes; the other sliced axes keep their digits."""
    dn = dimension_numbers
    indexed = {*dn.start_index_map, *dn.operand_batching_dims}
    dropped = {*dn.collapsed_slice_dims, *dn.operand_batching_dims}
    kept = [k for k in range(len(view.shape)) if k not in dropped]
    axes: list[Any] = [view.spanned(indexed)] * len(out_shape)
    for position, k in zip(dn.offset_dims, kept):
        axes[position] = view.spans(k) if k in indexed else view.axes[k]
    axes = [() if n == 1 or a == frozenset() else a for a, n in zip(axes, out_shape)]
    return _with(view, out_shape, axes)


# --------------------------------------------------------------------------------------------
# Joins: a value made of several views


@dataclasses.dataclass(frozen=True)
class Pieces:
    """Views joined along value axis `axis`, `parts` holding `(start, size, view)` (view None
    for a part that is no param); or, where `axis` is None, each part the whole value, read
    at its own steps (a plain view is one such part)."""

    axis: int | None
    shape: tuple[int, ...]
    parts: tuple[tuple[int, int, View | None], ...]

    @classmethod
    def of(cls, view: View) -> Pieces:
        return cls(None, view.shape, ((0, 0, view),))

    def views(self) -> list[View]:
        return [v for _, _, v in self.parts if v is not None]


def _part_shape(shape: Sequence[int], axis: int | None, size: int) -> tuple[int, ...]:
    return tuple(shape) if axis is None else (*shape[:axis], size, *shape[axis + 1 :])


def _map(
    pieces: Pieces, shape: Sequence[int], axis: int | None, f: Callable[[View, int], View | None]
) -> Pieces | None:
    """Each part's view through `f(view, part size)`; None if one has no view."""
    parts = []
    for start, size, view in pieces.parts:
        if view is not None and (view := f(view, size)) is None:
            return None
        parts.append((start, size, view))
    return Pieces(axis, tuple(shape), tuple(parts))


def through(name: str, params: dict, pieces: Pieces, shape: tuple[int, ...]) -> Pieces | None:
    """`pieces` through the shape primitive `name` (output shape `shape`); None where no view
    describes the result (the join axis merged with another, or strided)."""
    d = pieces.axis
    if name == "transpose":
        perm = params["permutation"]
        e = None if d is None else list(perm).index(d)
        return _map(pieces, shape, e, lambda v, n: transpose(v, perm))
    if name == "broadcast_in_dim":
        dims = params["broadcast_dimensions"]
        e = None if d is None else dims[d]
        if e is not None and shape[e] != pieces.shape[d]:
            return None
        return _map(pieces, shape, e, lambda v, n: broadcast(v, _part_shape(shape, e, n), dims))
    if name == "squeeze":
        dims = {x % len(pieces.shape) for x in params["dimensions"]}
        e = None if d is None or d in dims else d - sum(x < d for x in dims)
        return _map(pieces, shape, e, lambda v, n: squeeze(v, dims))
    if name == "reshape":
        e = None
        if d is not None:  # the join axis must stay one axis, after the same product
            before, n = math.prod(pieces.shape[:d]), pieces.shape[d]
            e = next(
                (e for e, m in enumerate(shape) if m == n and math.prod(shape[:e]) == before), None
            )
            if e is None:
                return None
        return _map(pieces, shape, e, lambda v, n: reshape(v, _part_shape(shape, e, n)))
    if name == "rev":
        out = _map(pieces, shape, d, lambda v, n: rev(v, params["dimensions"]))
        if out is None or d not in params["dimensions"]:
            return out
        total = pieces.shape[d]
        return Pieces(d, shape, tuple(sorted((total - s - n, n, v) for s, n, v in out.parts)))
    return window_of(pieces, params["start_indices"], shape, params.get("strides"))  # slice


def window_of(
    pieces: Pieces, starts: Sequence[Any], sizes: Sequence[int], steps: Sequence[int] | None = None
) -> Pieces | None:
    """A window of a join: each part it overlaps cut to its share; one entry of the join
    axis at a moving start is each part read at the steps that reach it."""
    d = pieces.axis
    if d is None or (sizes[d] == pieces.shape[d] and not isinstance(starts[d], Steps)):
        fit = lambda v, n: window(v, starts, _part_shape(sizes, d, n), steps)
        return _map(pieces, sizes, d, fit)
    if (steps and steps[d] != 1) or (isinstance(starts[d], Steps) and sizes[d] != 1):
        return None
    moving = starts[d].values if isinstance(starts[d], Steps) else None
    first, last = (0, 1) if moving is not None else (int(starts[d]), int(starts[d]) + sizes[d])
    parts = []
    for start, size, view in pieces.parts:
        if moving is not None:  # at a step, the part's entry is the counter's, or none
            local = np.where((moving >= start) & (moving < start + size), moving - start, -1)
            lo, hi, at = start, start + 1, Steps(starts[d].levels, local)
            if not np.any(local >= 0):
                continue
        else:
            lo, hi = max(first, start), min(last, start + size)
            at = lo - start
            if lo >= hi:
                continue
        if view is not None:
            local_starts = [at if k == d else s for k, s in enumerate(starts)]
            view = window(view, local_starts, _part_shape(sizes, d, hi - lo), steps)
            if view is None:
                return None
        parts.append((lo - first, hi - lo, view))
    if moving is not None or len(parts) == 1:
        return Pieces(None, tuple(sizes), tuple((0, 0, v) for _, _, v in parts if v))
    return Pieces(d, tuple(sizes), tuple(parts))


def take_of(pieces: Pieces, k: int, index: Any) -> Pieces | None:
    """Entry `index` (an int or `Steps`) of value axis `k`, the axis removed: a scan's step,
    or `w[i]` at a loop's counter."""
    sizes = [1 if j == k else n for j, n in enumerate(pieces.shape)]
    moved = window_of(pieces, [index if j == k else 0 for j in range(len(sizes))], sizes)
    if moved is None:
        return None
    shape = pieces.shape[:k] + pieces.shape[k + 1 :]
    axis = moved.axis if moved.axis is None or moved.axis < k else moved.axis - 1
    return _map(moved, shape, axis, lambda v, n: squeeze(v, [k]))


def join(
    operands: Sequence[Pieces | None],
    sizes: Sequence[int],
    axis: int,
    shape: tuple[int, ...],
    stack: bool,
) -> Pieces | None:
    """`concatenate` (or `stack`) along `axis` of views and other values (None)."""
    parts, offset = [], 0
    for value, size in zip(operands, sizes):
        if value is None:
            parts.append((offset, size, None))
        elif value.axis == axis and not stack:
            parts += [(offset + s, n, v) for s, n, v in value.parts]
        elif value.axis is None and len(value.parts) == 1:
            view = value.parts[0][2]
            if stack:  # the operand gets the new axis, of one entry
                dims = [j + (j >= axis) for j in range(len(view.shape))]
                view = broadcast(view, _part_shape(shape, axis, 1), dims)
            parts.append((offset, size, view))
        else:
            return None
        offset += size
    return Pieces(axis, shape, tuple(parts))
