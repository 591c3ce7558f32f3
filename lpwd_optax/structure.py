"""The layer structure of a model, read from one trace of its forward pass.

A layer is a fact of the forward computation, not of the params' shapes or names. Tracing
`apply_fn(params, *example_args)` with `jax.make_jaxpr` (nothing is computed) shows, for every
param leaf:

- when it is first used, which orders the layers from the input to the output (LPWD's depth);
- whether a `scan` slices it: a leaf of shape `(L, ...)` that `jax.lax.scan` (linen's
  `nn.scan`, NNX's `nnx.scan`, Equinox's and Haiku's stacked-layer recipes) iterates over holds
  `L` layers, one per slice, each at the depth its unrolled twin would have; so does a leaf that
  a loop reads one block at a time (`params["w"][i]`, `jax.tree.map(lambda a: a[i],
  blocks)`): a Python loop, when every use of it takes one entry along that axis, or a
  `fori_loop`, a `while_loop` of known trip count or a scan over `jnp.arange(L)`, whose
  traced counter's values are read from the trace, slice `i` at the step that reads it; each
  loop reads a static range of the stack (`w[2:5]`), its axes merged (`w.reshape(G * B,
  ...)`) or split into groups that inner loops go through (`w.reshape(G, B, ...)`, `w[B * j +
  i]`) the same way, and a leaf a loop reads in a way the trace cannot follow is one layer,
  with a warning;
- what it is: a kernel (it reaches a `dot_general` or `conv_general_dilated` through views:
  casts, reshapes, transposes, reversals, broadcasts, slices, masks, gathers by constant
  indices, or is multiplied one sliced-out tap at a time), an embedding (rows read at indices
  the inputs give), a bias (added), a scale (multiplied whole), or other; and for a kernel,
  which of its axes are contracted (its fan-in: input features and, for a convolution, the
  window) and which index its output units, whatever the library's layout (Flax `(in, out)`
  and `(kh, kw, in, out)`, Equinox `(out, in)` and `(out, in, kh, kw)`, Haiku's `(in, out)`
  and `HWIO`).

`layer_structure` returns all of it as one frozen `LayerStructure`; the per-layer transforms
and diagnostics take it as `layers=` and then work per slice and along the traced axes.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import numbers
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core as jex_core
import numpy as np

from lpwd_optax._common import decays_by_default, leaves_with_paths

ROLES = ("kernel", "embedding", "bias", "scale", "other", "unused")

__all__ = ["ROLES", "LayerStructure", "LeafLayout", "layer_structure"]


# --------------------------------------------------------------------------------------------
# What the structure holds for one leaf


@dataclasses.dataclass(frozen=True, eq=False)
class LeafLayout:
    """One param leaf as the forward pass uses it.

    Attributes:
      path: the "/"-joined key path.
      shape: the leaf's shape.
      role: one of `ROLES`: "kernel" (reaches a `dot_general` / convolution, or is multiplied
        one tap at a time), "embedding" (rows read at indices the inputs give), "bias" (added),
        "scale" (multiplied whole), "other", or "unused".
      stacked_axes: the leaf axes a `scan` iterates over, or a loop (Python or `fori_loop`)
        reads one index of at a time: one layer per slice. Empty for a leaf that is one layer.
      input_axes: a kernel's contracted feature axes (its input channels); an embedding's
        feature axes.
      spatial_axes: a convolution kernel's window axes (contracted too).
      output_axes: the axes that index a kernel's output units (an embedding's rows), plus
        any axis a batched product keeps apart.
      depth: the layer's depth, 1 for the first; for a stacked leaf an int array of the leaf's
        ndim, sized like the stacked axes and 1 elsewhere, so it broadcasts against the leaf.
      decay: whether weight decay applies by default: more than one axis of size > 1 in one
        slice, not a relative position bias table, and not a bias or scale by its role.
    """

    path: str
    shape: tuple[int, ...]
    role: str
    stacked_axes: tuple[int, ...]
    input_axes: tuple[int, ...]
    spatial_axes: tuple[int, ...]
    output_axes: tuple[int, ...]
    depth: Any
    decay: bool

    @property
    def fan_in_axes(self) -> tuple[int, ...]:
        """All contracted axes, `input_axes` and `spatial_axes`, in axis order."""
        return tuple(sorted(self.input_axes + self.spatial_axes))

    @property
    def slice_axes(self) -> tuple[int, ...]:
        """Every axis but the stacked ones: the axes of one layer."""
        return tuple(a for a in range(len(self.shape)) if a not in self.stacked_axes)

    @property
    def has_units(self) -> bool:
        """True when the trace says which axes are fan-in and which index output units."""
        return self.role in ("kernel", "embedding") and bool(self.fan_in_axes)

    @property
    def num_slices(self) -> int:
        return math.prod(self.shape[a] for a in self.stacked_axes)


# --------------------------------------------------------------------------------------------
# The trace: where each param leaf is used, through which views, by which primitive

# Primitives that only re-view a value: their output stands for the same param, with its axes
# mapped (see `_view_axes`); the param counts as used where the view is used.
_IDENTITY_VIEWS = frozenset(
    {
        "bitcast_convert_type",
        "convert_element_type",
        "copy",
        "copy_p",
        "device_put",
        "mesh_cast",
        "optimization_barrier",
        "pvary",
        "reduce_precision",
        "reshard",
        "sharding_constraint",
    }
)
_SHAPE_VIEWS = frozenset(
    {"broadcast_in_dim", "expand_dims", "reshape", "rev", "slice", "squeeze", "transpose"}
)
_BIAS_PRIMITIVES = frozenset({"add", "sub"})
_SCALE_PRIMITIVES = frozenset({"mul", "div"})


@dataclasses.dataclass(frozen=True)
class _Iteration:
    """A scan's iteration in a position: the slice index of a leaf it slices, else 0."""

    level: int


@dataclasses.dataclass(frozen=True)
class _Stacking:
    """Leaf axes `leaf_axes` are read one slice at a time by the steps of the nested scans
    `levels` (outermost first; several axes when a reshape merged them into the one read): the
    slice at row-major index `k` over those axes (of sizes `sizes`) first at the steps
    `steps[k]`, one per level, or None if this use never reads it."""

    levels: tuple[int, ...]
    leaf_axes: tuple[int, ...]
    sizes: tuple[int, ...]
    steps: tuple[tuple[int, ...] | None, ...]

    def step(self, index: dict[int, int]) -> tuple[int, ...] | None:
        """The steps, one per level, that read the slice at `index` (leaf axis -> entry)."""
        if not self.leaf_axes:
            return self.steps[0]  # the leaf whole, read at the one step of its join
        k = np.ravel_multi_index(tuple(index[a] for a in self.leaf_axes), self.sizes)
        return self.steps[int(k)]


@dataclasses.dataclass(frozen=True)
class _Ref:
    """A traced value that is a view of param leaf `leaf`, of shape `leaf_shape`."""

    leaf: int
    leaf_shape: tuple[int, ...]
    axes: tuple[tuple[int, ...], ...]  # per value axis, the leaf axes it spans
    stacking: tuple[_Stacking, ...] = ()
    # Leaf axes a static slice cut down to one entry (a tap of a kernel taken on its own, or
    # one slice of a stacked leaf), and (leaf axis, index) of each entry taken.
    cut: frozenset[int] = frozenset()
    picked: tuple[tuple[int, int], ...] = ()
    # Leaf axes a gather with constant indices rearranged (a Toeplitz matrix of a convolution
    # kernel, a table read by a fixed index): their entries reappear along other value axes.
    rearranged: frozenset[int] = frozenset()
    # Leaf axes a reshape merged from digits out of order (`w.reshape(2, 3, ...)[:, 1:]` merged
    # back holds entries 1, 2, 4, 5): no range and place value say which entry is which.
    scrambled: frozenset[int] = frozenset()
    # Leaf axes narrowed to several of their entries, by a static slice (`w[2:5]`, `w[::2]`) or
    # by a loop (a scan over `w.reshape(G, B, ...)`: step `g` reads entries `g * B` to
    # `g * B + B - 1`): (leaf axis, first, stride), entry `k` of the view being entry
    # `first + stride * k`; `first` is a `_Varying` where a loop moves it.
    ranges: tuple[tuple[int, Any, int], ...] = ()
    # Per value axis, where a reshape split one leaf axis into several value axes (`w.reshape(G,
    # B, ...)`), the place value of the digit it is: entry `k` of it is `k * digit` entries
    # further along the leaf axis (times the stride of `ranges`); 0 elsewhere, () if none is.
    digits: tuple[int, ...] = ()

    def digit(self, k: int) -> int:
        return self.digits[k] if self.digits else 0

    def digit_list(self) -> list[int]:
        return list(self.digits) if self.digits else [0] * len(self.axes)

    def range_of(self, axis: int) -> tuple[Any, int]:
        """(first, stride) of the leaf entries the view holds along leaf axis `axis`."""
        return next(((f, s) for a, f, s in self.ranges if a == axis), (0, 1))

    def splits(self, k: int, shape: Sequence[int]) -> bool:
        """Whether value axis `k` (of a view of shape `shape`) is one digit of a split leaf
        axis: another value axis with several entries spans that same one leaf axis."""
        a = self.axes[k]
        return len(a) == 1 and any(
            j != k and shape[j] > 1 and a[0] in self.axes[j] for j in range(len(shape))
        )

    def slice_entries(self, k: int, shape: Sequence[int]) -> tuple[tuple[int, ...], Any] | None:
        """The slices that value axis `k` of a view of shape `shape` enumerates: `(levels,
        table)`, `table[s1, ..., sm, e]` being the row-major index over the leaf axes it spans
        of its entry `e` at steps `s1, ..., sm` of the loops `levels` that move the view (none
        for a static one). None unless each entry is one slice: an entry of one leaf axis
        (whole, a range of it, or the last digit of a split one), or of several whole ones
        that a reshape merged."""
        leaf_axes, n = self.axes[k], shape[k]
        if (self.rearranged | self.scrambled) & set(leaf_axes):
            return None  # entries in an order that ranges and digits do not record
        narrowed = {a for a, _, _ in self.ranges}
        if len(leaf_axes) == 1:
            a = leaf_axes[0]
            whole = a in narrowed or self.digit(k) or n == self.leaf_shape[a]
            if self.splits(k, shape) or not whole:
                return None  # an entry is a group of slices
            first, stride = self.range_of(a)
            levels, (f,) = _on_grid([first])
            entries = f[..., None] + stride * (self.digit(k) or 1) * np.arange(n)
            if entries.min() < 0 or entries.max() >= self.leaf_shape[a]:
                return None  # digits merged out of order (one of them reversed): not followed
            return levels, entries
        sizes = [self.leaf_shape[a] for a in leaf_axes]
        if not leaf_axes or math.prod(sizes) != n or self.digit(k):
            return None
        # Several whole leaf axes merged, each in order or reversed (`_reversed`).
        ranges = [self.range_of(a) for a in leaf_axes]
        if any(r not in ((0, 1), (m - 1, -1)) for r, m in zip(ranges, sizes)):
            return None
        index = np.unravel_index(np.arange(n), sizes)
        entries = [f + s * i for (f, s), i in zip(ranges, index)]
        return (), np.ravel_multi_index(entries, sizes)


@dataclasses.dataclass(frozen=True)
class _Use:
    ref: _Ref
    position: tuple[Any, ...]
    primitive: str
    kind: str  # "kernel", "embedding", "bias", "scale", "other"
    input_axes: frozenset[int] = frozenset()
    spatial_axes: frozenset[int] = frozenset()
    output_axes: frozenset[int] = frozenset()
    ambiguous: bool = False


@dataclasses.dataclass(frozen=True)
class _Joined:
    """A traced value made of several param views (`jnp.stack([w1, w2, w3])`, a fused q/k/v
    kernel `jnp.concatenate([wq, wk, wv], 1)`): joined along value axis `axis` of a value of
    shape `shape`, `parts` holding (offset, size, view or None) in order; or, where `axis` is
    None, one step of a scan over such a join, each part a view read at its own steps."""

    axis: int | None
    shape: tuple[int, ...]
    parts: tuple[tuple[int, int, _Ref | None], ...]

    def views(self) -> list[_Ref]:
        return [r for _, _, r in self.parts if r is not None]

    def part_shape(self, size: int) -> tuple[int, ...]:
        if self.axis is None:
            return self.shape
        return (*self.shape[: self.axis], size, *self.shape[self.axis + 1 :])


def _union(groups: Sequence[tuple[int, ...]]) -> frozenset[int]:
    return frozenset(a for g in groups for a in g)


def _reshape_axes(
    axes: tuple[tuple[int, ...], ...],
    digits: Sequence[int],
    old: Sequence[int],
    new: Sequence[int],
) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...], frozenset[int]]:
    """Leaf axes and digits (see `_Ref.digits`) of each new axis, and the leaf axes merged out
    of order (see `_Ref.scrambled`): blocks of old and new axes with equal products are matched
    left to right; a new axis spans the leaf axes of its block's old axes. One old axis of one
    leaf axis split into several makes each new axis a digit of it; the digits of one leaf axis
    merged back in order make one again."""
    old_axes = [(n, a, d) for n, a, d in zip(old, axes, digits) if n != 1]
    out: list[tuple[int, ...]] = [()] * len(new)
    out_digits = [0] * len(new)
    scrambled: set[int] = set()
    new_idx = [i for i, n in enumerate(new) if n != 1]
    i = j = 0
    while i < len(old_axes) and j < len(new_idx):
        block_old, block_new = [i], [j]
        p_old, p_new = old_axes[i][0], new[new_idx[j]]
        while p_old != p_new:
            if p_old < p_new:
                i += 1
                block_old.append(i)
                p_old *= old_axes[i][0]
            else:
                j += 1
                block_new.append(j)
                p_new *= new[new_idx[j]]
        # In the order they are laid out: a merged axis enumerates them row-major.
        spanned = tuple(dict.fromkeys(a for k in block_old for a in old_axes[k][1]))
        for k in block_new:
            out[new_idx[k]] = spanned
        sizes = [new[new_idx[k]] for k in block_new]
        parts = [old_axes[k] for k in block_old]
        if len(spanned) == 1 and len(parts) == 1 and len(sizes) > 1:
            place = parts[0][2] or 1  # a split: each new axis one digit, the last the units
            for k, rest in zip(block_new, range(len(sizes))):
                out_digits[new_idx[k]] = place * math.prod(sizes[rest + 1 :])
        elif len(spanned) == 1 and len(parts) > 1 and len(sizes) == 1:
            # Digits merged back: in order (each place the next one's times its size; all
            # reversed, a reversal) they are one digit again, of the last one's place.
            places = [d for _, _, d in parts]
            in_order = all(
                d != 0 and d == nxt * n for (_, _, d), (n, _, nxt) in itertools.pairwise(parts)
            )
            out_digits[new_idx[block_new[0]]] = places[-1] if in_order else 0
            if not in_order:
                scrambled.update(spanned)
        elif len(parts) == 1 and len(sizes) == 1:
            out_digits[new_idx[block_new[0]]] = parts[0][2]
        i, j = i + 1, j + 1
    return tuple(out), tuple(out_digits), frozenset(scrambled)


def _view_axes(eqn: Any, ref: _Ref, old: Sequence[int] | None = None) -> _Ref:
    """`ref` seen through the view `eqn` (a shape view or identity), of an operand of shape
    `old` (by default the eqn's; a part of a join has its own)."""
    name, params = eqn.primitive.name, eqn.params
    if name in _IDENTITY_VIEWS:
        return ref
    old = tuple(eqn.invars[0].aval.shape if old is None else old)
    axes, digits, scrambled = ref.axes, tuple(ref.digit_list()), ref.scrambled
    if name == "transpose":
        axes = tuple(axes[p] for p in params["permutation"])
        digits = tuple(digits[p] for p in params["permutation"])
    elif name == "broadcast_in_dim":
        out: list[tuple[int, ...]] = [()] * len(params["shape"])
        out_digits = [0] * len(params["shape"])
        for j, d in enumerate(params["broadcast_dimensions"]):
            out[d], out_digits[d] = axes[j], digits[j]
        axes, digits = tuple(out), tuple(out_digits)
    elif name == "squeeze":
        drop = {d % len(axes) for d in params["dimensions"]}
        axes = tuple(a for k, a in enumerate(axes) if k not in drop)
        digits = tuple(d for k, d in enumerate(digits) if k not in drop)
    elif name == "expand_dims":
        out, out_digits = list(axes), list(digits)
        for d in sorted(params["dimensions"]):
            out.insert(d, ())
            out_digits.insert(d, 0)
        axes, digits = tuple(out), tuple(out_digits)
    elif name == "reshape":
        axes, digits, merged = _reshape_axes(axes, digits, old, params["new_sizes"])
        scrambled = scrambled | merged
    elif name == "slice":
        new = eqn.outvars[0].aval.shape
        return _cut(ref, old, new, params["start_indices"], params.get("strides"))
    elif name == "rev":
        return _reversed(ref, old, params["dimensions"])
    return dataclasses.replace(ref, axes=axes, digits=_digits(digits), scrambled=scrambled)


def _reversed(ref: _Ref, shape: Sequence[int], dimensions: Sequence[int]) -> _Ref:
    """`lax.rev` of `ref` (`w[::-1]`, `jnp.flip`; `conv_transpose` flips a kernel's window):
    entry `k` of a reversed axis is entry `n - 1 - k` of the view. A leaf axis's range (or a
    digit's place value) runs backwards from its last entry; several leaf axes merged into
    one are each reversed, as a row-major order reversed is."""
    ranges = {a: (f, s) for a, f, s in ref.ranges}
    digits = ref.digit_list()
    for k in dimensions:
        leaf_axes, n = ref.axes[k], shape[k]
        if n == 1 or not leaf_axes:
            continue
        if len(leaf_axes) > 1:
            if any(a in ranges for a in leaf_axes) or ref.digit(k):
                continue  # a merge of narrowed axes: its order is not followed
            for a in leaf_axes:
                ranges[a] = (ref.leaf_shape[a] - 1, -1)
            continue
        a = leaf_axes[0]
        if ref.splits(k, shape) and not ref.digit(k):
            continue  # split in a way the digits do not record
        first, stride = ranges.get(a, (0, 1))
        last = _shifted(first, stride * (ref.digit(k) or 1), n - 1)
        if ref.digit(k):
            digits[k] = -ref.digit(k)
            ranges[a] = (last, stride)
        else:
            ranges[a] = (last, -stride)
    return dataclasses.replace(
        ref,
        ranges=tuple((a, f, s) for a, (f, s) in ranges.items()),
        digits=_digits(digits),
    )


def _loop_grid(values: Sequence[Any]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The loops that some of `values` (`_Varying` ones) vary with, as levels in nesting order,
    and each loop's number of steps."""
    steps: dict[int, int] = {}
    for v in values:
        if isinstance(v, _Varying):
            steps.update(zip(v.levels, v.values.shape))
    levels = tuple(sorted(steps))
    return levels, tuple(steps[level] for level in levels)


def _on_grid(values: Sequence[Any]) -> tuple[tuple[int, ...], list[np.ndarray]]:
    """Known values, some of them `_Varying`, on the grid of the steps of all their loops
    (levels in nesting order): each an array whose leading axes are those steps."""
    levels, grid = _loop_grid(values)
    steps = dict(zip(levels, grid))
    out = []
    for v in values:
        if isinstance(v, _Varying):
            rest = v.values.shape[len(v.levels) :]
            shape = [steps[level] if level in v.levels else 1 for level in levels]
            out.append(np.broadcast_to(v.values.reshape(*shape, *rest), grid + rest))
        else:
            out.append(np.broadcast_to(np.asarray(v), grid + np.shape(v)))
    return levels, out


def _known(levels: tuple[int, ...], values: Any) -> Any:
    """`values` on the grid of the loops `levels`: a `_Varying`, or a plain value if none."""
    return _Varying(levels, np.asarray(values)) if levels else values


def _shifted(first: Any, step: int, index: Any) -> Any:
    """`first + step * index`, where either may be a `_Varying` (then so is the result)."""
    levels, (f, i) = _on_grid([first, index])
    return _known(levels, f + step * i)


def _digits(digits: Sequence[int]) -> tuple[int, ...]:
    """The `_Ref.digits` field: () when no axis is a digit."""
    return tuple(digits) if any(digits) else ()


def _cut(
    ref: _Ref,
    old: Sequence[int],
    new: Sequence[int],
    starts: Sequence[int],
    strides: Sequence[int] | None = None,
) -> _Ref:
    """A static slice of `ref` from `starts`: the value axes it cuts to one entry, and the
    leaf axes it narrows to a range of entries. One entry of a split leaf axis's digit, or of
    a range a loop moves, is taken by `_take` first."""
    taken = set()
    for axis, (n, m, k) in enumerate(zip(old, new, starts)):
        if n > 1 and m == 1 and (ref.splits(axis, old) or _moves(ref, axis)):
            view = _take(ref, axis, old, int(k))
            if view is not None:
                ref = view
                taken.add(axis)
    cut, picked, ranges = [], [], {a: (f, s) for a, f, s in ref.ranges}
    digits = ref.digit_list()
    for axis, (a, n, m, k, step) in enumerate(
        zip(ref.axes, old, new, starts, strides or [1] * len(old))
    ):
        if axis in taken:
            continue
        if n > 1 and m == 1:
            cut.append(a)
            entries = ref.slice_entries(axis, old)  # one slice taken: an entry of each leaf axis
            if entries is not None:
                slice_index = entries[1][int(k)]
                entry = np.unravel_index(slice_index, [ref.leaf_shape[x] for x in a])
                picked += [(x, int(e)) for x, e in zip(a, entry)]
        elif 1 < m < n and len(a) == 1 and ref.splits(axis, old) and digits[axis]:
            # One digit of a split leaf axis narrowed (`w.reshape(G, B, ...)[:, 1:]`): the
            # leaf range starts `k` of the digit's places further on, and the digit's entries
            # are `step` places apart.
            first, stride = ranges.get(a[0], (0, 1))
            ranges[a[0]] = (_shifted(first, stride * digits[axis], int(k)), stride)
            digits[axis] *= int(step)
        elif 1 < m < n and len(a) == 1 and not ref.splits(axis, old):
            first, stride = ranges.get(a[0], (0, 1))
            stride *= digits[axis] or 1  # the range's stride holds the digit's place now
            digits[axis] = 0
            ranges[a[0]] = (_shifted(first, stride, int(k)), stride * int(step))
    return dataclasses.replace(
        ref,
        cut=ref.cut | _union(cut),
        picked=ref.picked + tuple(picked),
        ranges=tuple((a, f, s) for a, (f, s) in ranges.items()),
        digits=_digits(digits),
    )


def _moves(ref: _Ref, axis: int) -> bool:
    """Whether a loop moves the range of the one leaf axis that value axis `axis` spans."""
    a = ref.axes[axis]
    return len(a) == 1 and isinstance(ref.range_of(a[0])[0], _Varying)


def _take(ref: _Ref, k: int, shape: Sequence[int], index: Any) -> _Ref | None:
    """Value axis `k` of a view of shape `shape` taken at one entry `index` (an int, or a
    `_Varying` where loops choose it) where a loop or a split is involved: a digit of a split
    leaf axis moves the axis's range by `index` digits, and once no other digit is left the
    one slice reached is taken; an entry of a range or axis a loop walks stacks the leaf along
    it (see `_stacking`). The axis is gone from the view (a size-1 axis spanning no leaf axis)
    unless a static slice is taken. An `index` of -1 at some steps: none of the view is read
    there (a scan over a join of several params reads this one at its own steps). None if the
    trace cannot say which slices are read."""
    axes, digits = list(ref.axes), ref.digit_list()
    index_levels, index_values = (
        (index.levels, index.values) if isinstance(index, _Varying) else ((), np.asarray(index))
    )
    consumed = set(ref.axes[k]) - {a for j, x in enumerate(ref.axes) if j != k for a in x}
    ranges = tuple(r for r in ref.ranges if r[0] not in consumed)  # read one slice at a time
    if not ref.splits(k, shape):
        stack = _stacking(ref, k, shape, index_levels, index_values)
        if stack is None:
            return None
        axes[k], digits[k] = (), 0
        return dataclasses.replace(
            ref,
            axes=tuple(axes),
            digits=_digits(digits),
            stacking=(*ref.stacking, stack),
            ranges=ranges,
        )
    a, place = ref.axes[k][0], ref.digit(k)
    if not place or a in ref.rearranged | ref.scrambled or np.any(index_values < 0):
        return None  # split in a way the digits do not record, or read at some steps only
    first, stride = ref.range_of(a)
    moved = _shifted(first, stride * place, index)
    axes[k], digits[k] = (), 0
    view = dataclasses.replace(ref, axes=tuple(axes), digits=tuple(digits))
    if any(j != k and shape[j] > 1 and a in axes[j] for j in range(len(shape))):
        rest = tuple(r for r in ref.ranges if r[0] != a)  # other digits are left
        return dataclasses.replace(view, ranges=(*rest, (a, moved, stride)))
    if not isinstance(moved, _Varying):  # the last digit, statically: one slice picked
        axes[k] = (a,)
        return dataclasses.replace(
            view, axes=tuple(axes), cut=ref.cut | {a}, picked=(*ref.picked, (a, int(moved)))
        )
    if any(set(x.levels) & set(moved.levels) for x in ref.stacking):
        return None
    stack = _stacking_of(moved.levels, (a,), (ref.leaf_shape[a],), moved.values)
    return dataclasses.replace(view, stacking=(*ref.stacking, stack), ranges=ranges)


def _clamped(starts: Sequence[Any], old: Sequence[int], sizes: Sequence[int]) -> list[int]:
    """Start indices clamped into range, as `dynamic_slice` and `gather` clamp them."""
    return [min(max(int(k), 0), n - m) for k, n, m in zip(starts, old, sizes)]


def _gather_starts(eqn: Any, indices: Any) -> np.ndarray | None:
    """The start along every operand axis of a gather that takes one slice at known
    `indices` (`jnp.take(w, 2, axis=0)`), else None."""
    numbers = eqn.params["dimension_numbers"]
    start_map = numbers.start_index_map
    if indices is None or np.size(indices) != len(start_map) or numbers.operand_batching_dims:
        return None
    starts = np.zeros(len(eqn.invars[0].aval.shape), np.int64)
    starts[list(start_map)] = np.ravel(indices)
    return starts


def _gathered(eqn: Any, ref: _Ref, single: bool) -> _Ref:
    """The axes of a gather's output: offset axes keep their leaf axes; the axes the indices
    add span the indexed leaf axes, whose entries are rearranged, unless one slice is taken."""
    numbers = eqn.params["dimension_numbers"]
    dropped = set(numbers.collapsed_slice_dims) | set(numbers.operand_batching_dims)
    kept = [ref.axes[k] for k in range(len(ref.axes)) if k not in dropped]
    kept_digits = [d for k, d in enumerate(ref.digit_list()) if k not in dropped]
    indexed = _union([ref.axes[k] for k in numbers.start_index_map])
    axes: list[tuple[int, ...]] = [() if single else tuple(sorted(indexed))] * len(
        eqn.outvars[0].aval.shape
    )
    digits = [0] * len(axes)
    for position, leaf_axes, digit in zip(numbers.offset_dims, kept, kept_digits):
        axes[position], digits[position] = leaf_axes, digit
    view = dataclasses.replace(ref, axes=tuple(axes), digits=_digits(digits))
    if single:
        return view
    return dataclasses.replace(view, rearranged=ref.rearranged | indexed)


def _gather_view(eqn: Any, ref: _Ref, indices: Any) -> _Ref:
    """A gather of param view `ref` by constant indices: one slice taken at known starts is
    a static slice; else the same entries, rearranged."""
    starts = _gather_starts(eqn, indices)
    if starts is None:
        return _gathered(eqn, ref, single=False)
    old, sizes = eqn.invars[0].aval.shape, eqn.params["slice_sizes"]
    return _gathered(eqn, _cut(ref, old, sizes, _clamped(starts, old, sizes)), single=True)


def _stacking(
    ref: _Ref, k: int, shape: Sequence[int], levels: tuple[int, ...], reads: Any
) -> _Stacking | None:
    """The leaf axes that value axis `k` of a view of shape `shape` spans, read one entry at a
    time by the steps of the nested loops `levels`: entry `reads[s1, ..., sm]` at their steps
    (a loop that moves the view's range adds its level). Each slice is first read at the
    earliest steps. None unless each entry is one slice (see `_Ref.slice_entries`), and no
    loop already stacks another of the leaf's axes."""
    entries = ref.slice_entries(k, shape)
    if entries is None:
        return None
    table_levels, table = entries
    levels, (t, r) = _on_grid([_known(table_levels, table), _known(levels, reads)])
    if not levels or any(set(x.levels) & set(levels) for x in ref.stacking):
        return None
    r = np.asarray(r, np.int64)
    slices = np.take_along_axis(t, np.maximum(r, 0)[..., None], axis=-1)[..., 0]
    slices = np.where(r < 0, -1, slices)  # steps that read none of it
    sizes = tuple(ref.leaf_shape[a] for a in ref.axes[k])
    return _stacking_of(levels, ref.axes[k], sizes, slices)


def _stacking_of(
    levels: tuple[int, ...], leaf_axes: tuple[int, ...], sizes: tuple[int, ...], slices: Any
) -> _Stacking:
    """`slices[s1, ..., sm]`: the slice (row-major over `leaf_axes`) read at those steps, -1
    where none is."""
    steps: list[tuple[int, ...] | None] = [None] * math.prod(sizes)
    for point in np.ndindex(np.shape(slices)):  # row-major: execution order
        slice_index = int(slices[point])
        if slice_index >= 0 and steps[slice_index] is None:
            steps[slice_index] = tuple(int(j) for j in point)
    return _Stacking(levels, leaf_axes, sizes, tuple(steps))


def _loop_cut(
    ref: _Ref,
    old: Sequence[int],
    sizes: Sequence[int],
    starts: Sequence[Any],
) -> _Ref | None:
    """A slice at known starts (`lax.dynamic_index_in_dim(w, 2)`: a static slice), or whose
    starts move with the steps of loops (`w[i]` in a `fori_loop` or in a scan over
    `jnp.arange(L)`; `w[j, i]` or `w[3 * j + i]` in two nested ones): `starts` holds an int or
    a `_Varying` per axis. A moving start that takes one entry is taken by `_take` (the leaf
    axes it walks are stacked, each slice read at the first steps that start at it); one that
    takes several entries of one leaf axis moves that axis's range. None where the trace
    cannot say which slices are read."""
    fixed, static = list(old), []
    view = ref
    for k, start in enumerate(starts):
        top = old[k] - sizes[k]  # starts are clamped into range, as dynamic_slice does
        if not isinstance(start, _Varying):
            static.append(min(max(int(start), 0), top))
            continue
        values = np.clip(start.values, 0, top)
        if np.all(values == values.flat[0]):
            static.append(int(values.flat[0]))  # every step reads the same slice
            continue
        static.append(0)
        moving = _Varying(start.levels, values)
        if sizes[k] == 1:
            view = _take(view, k, old, moving)
            fixed[k] = 1  # not a static cut: the axis is gone from the view
        elif len(view.axes[k]) == 1 and not view.splits(k, old):
            a, place = view.axes[k][0], view.digit(k) or 1
            first, stride = view.range_of(a)
            ranges = {x: (f0, s0) for x, f0, s0 in view.ranges}
            ranges[a] = (_shifted(first, stride * place, moving), stride * place)
            digits = view.digit_list()
            digits[k] = 0
            view = dataclasses.replace(
                view,
                ranges=tuple((x, f0, s0) for x, (f0, s0) in ranges.items()),
                digits=_digits(digits),
            )
            fixed[k] = sizes[k]  # the window keeps its entries
        else:
            return None
        if view is None:
            return None
    return _cut(view, fixed, sizes, static)


_NOT_FOLLOWED = object()  # a view of a join that the trace does not follow


def _join(eqn: Any, refs: list) -> _Joined | None:
    """The join that a `concatenate` or `stack` of param views (and other values) makes;
    None for a join of joins along another axis."""
    stack = eqn.primitive.name == "stack"
    shape = tuple(eqn.outvars[0].aval.shape)
    axis = eqn.params["axis" if stack else "dimension"] % len(shape)
    parts: list[tuple[int, int, _Ref | None]] = []
    offset = 0
    for var, r in zip(eqn.invars, refs):
        if isinstance(r, _Joined):
            if stack or r.axis != axis:
                return None
            parts += [(offset + o, n, x) for o, n, x in r.parts]
            offset += r.shape[axis]
            continue
        if stack and r is not None:  # each operand gets the new axis, of one entry
            d = r.digit_list()
            axes = (*r.axes[:axis], (), *r.axes[axis:])
            r = dataclasses.replace(r, axes=axes, digits=_digits([*d[:axis], 0, *d[axis:]]))
        size = 1 if stack else var.aval.shape[axis]
        parts.append((offset, size, r))
        offset += size
    return _Joined(axis, shape, tuple(parts))


def _joined_view(eqn: Any, joined: _Joined) -> Any:
    """A shape view of a join: a join again, or the one part a slice stays within (a view of
    that param, or None for another value), or `_NOT_FOLLOWED` (the join axis split, merged
    with another or strided)."""
    name, params = eqn.primitive.name, eqn.params
    new_shape = tuple(eqn.outvars[0].aval.shape)
    d = joined.axis
    if d is None:  # a step of a scan over a join: every part has the value's shape
        parts = tuple((o, n, r and _view_axes(eqn, r)) for o, n, r in joined.parts)
        return _Joined(None, new_shape, parts)
    parts = joined.parts
    if name == "transpose":
        new_d = list(params["permutation"]).index(d)
    elif name == "squeeze":
        dims = {x % len(joined.shape) for x in params["dimensions"]}
        if d in dims:  # a stack of one
            ((_, n, r),) = parts
            return r and _view_axes(eqn, r, joined.part_shape(n))
        new_d = d - sum(x < d for x in dims)
    elif name == "expand_dims":
        new_d = d + sum(x <= d + i for i, x in enumerate(sorted(params["dimensions"])))
    elif name == "broadcast_in_dim":
        new_d = params["broadcast_dimensions"][d]
        if new_shape[new_d] != joined.shape[d]:
            return _NOT_FOLLOWED
    elif name == "reshape":
        n_axes = len(joined.shape)
        spans, _, _ = _reshape_axes(
            tuple((k,) for k in range(n_axes)), [0] * n_axes, joined.shape, new_shape
        )
        at = [k for k, a in enumerate(spans) if d in a]
        if len(at) != 1 or spans[at[0]] != (d,):
            return _NOT_FOLLOWED
        new_d = at[0]
    elif name == "rev":
        new_d = d
        if d in params["dimensions"]:  # the parts in reverse order, each reversed
            total = joined.shape[d]
            parts = tuple(sorted((total - o - n, n, r) for o, n, r in parts))
    else:  # a static slice
        return _joined_slice(joined, params, new_shape)

    def part(n: int, r: _Ref | None) -> _Ref | None:
        if r is None:
            return None
        old = joined.part_shape(n)
        if name != "reshape":
            return _view_axes(eqn, r, old)
        new = (*new_shape[:new_d], n, *new_shape[new_d + 1 :])
        axes, digits, merged = _reshape_axes(r.axes, r.digit_list(), old, new)
        return dataclasses.replace(
            r, axes=axes, digits=_digits(digits), scrambled=r.scrambled | merged
        )

    return _Joined(new_d, new_shape, tuple((o, n, part(n, r)) for o, n, r in parts))


def _joined_slice(joined: _Joined, params: dict, new_shape: tuple[int, ...]) -> Any:
    """A static slice of a join: each part it overlaps cut to its share."""
    d, starts = joined.axis, list(params["start_indices"])
    strides = list(params.get("strides") or [1] * len(starts))
    if strides[d] != 1:
        return _NOT_FOLLOWED
    first, last = starts[d], starts[d] + new_shape[d]
    parts = []
    for o, n, r in joined.parts:
        lo, hi = max(first, o), min(last, o + n)
        if lo >= hi:
            continue
        if r is not None:
            part_starts = [*starts[:d], lo - o, *starts[d + 1 :]]
            part_new = (*new_shape[:d], hi - lo, *new_shape[d + 1 :])
            r = _cut(r, joined.part_shape(n), part_new, part_starts, strides)
        parts.append((lo - first, hi - lo, r))
    if len(parts) == 1:
        return parts[0][2]  # within one part: a view of that param alone
    return _Joined(d, new_shape, tuple(parts))


def _loop_starts(eqn: Any, flags: list[Any]) -> list[Any] | None:
    """The start along every operand axis of a `dynamic_slice` or a one-slice `gather`, each
    an int or a `_Varying` where loops move it; None if they are not known."""
    name = eqn.primitive.name
    if name == "dynamic_slice":
        starts = flags[1:]
        return starts if all(_is_value(f) or isinstance(f, _Varying) for f in starts) else None
    if name != "gather" or not isinstance(flags[1], _Varying):
        return None
    indices = flags[1]
    grid = indices.values.shape[: len(indices.levels)]
    per_point = [_gather_starts(eqn, indices.values[p]) for p in np.ndindex(grid)]
    if any(p is None for p in per_point):
        return None
    columns = np.stack(per_point).reshape(*grid, -1)
    return [_Varying(indices.levels, columns[..., a]) for a in range(columns.shape[-1])]


def _parts_at(joined: _Joined, entry: _Varying) -> list[_Ref] | None:
    """Each param's part of a join read one entry along the join axis at a time, entry
    `entry` at the loops' steps: a view stacked on the steps whose entry is in it (a part of
    one entry, at the first of them); parts no step reaches are left out. None if a part's
    entries cannot be mapped to its slices."""
    views = []
    for o, n, r in joined.parts:
        if r is None:
            continue
        local = np.where((entry.values >= o) & (entry.values < o + n), entry.values - o, -1)
        if n == 1:  # a param stacked with others, or one slice of it: read at its first step
            if not np.any(local == 0):
                continue
            point = np.unravel_index(int(np.flatnonzero(local == 0)[0]), local.shape)
            stack = _Stacking(entry.levels, (), (), (tuple(int(j) for j in point),))
            views.append(dataclasses.replace(r, stacking=(*r.stacking, stack)))
            continue
        view = _take(r, joined.axis, joined.part_shape(n), _Varying(entry.levels, local))
        if view is None:
            return None
        views.append(view)
    return views


def _indexed_join(eqn: Any, joined: _Joined, starts: list[Any] | None) -> _Joined | None:
    """One entry of a join along its join axis at a loop's counter (`ws[i]` in a
    `fori_loop` over `ws = jnp.stack([w0, w1, w2])`), the other axes read whole: each
    param's part read at the steps whose entry is in it. None otherwise."""
    if starts is None or joined.axis is None:
        return None
    d, sizes = joined.axis, eqn.params["slice_sizes"]
    moving = starts[d]
    fixed = lambda f: np.unique(f.values if isinstance(f, _Varying) else f).tolist()
    others = [k for k in range(len(starts)) if k != d]
    if (
        not isinstance(moving, _Varying)
        or sizes[d] != 1
        or any(fixed(starts[k]) != [0] or sizes[k] != joined.shape[k] for k in others)
    ):
        return None
    entry = np.clip(moving.values, 0, joined.shape[d] - 1)  # clamped, as dynamic_slice does
    views = _parts_at(joined, _Varying(moving.levels, entry))
    if views is None:
        return None
    if eqn.primitive.name == "gather":
        views = [_gathered(eqn, view, single=True) for view in views]
    parts = [(0, 1, view) for view in views]
    return _Joined(None, tuple(eqn.outvars[0].aval.shape), tuple(parts))


def _scanned_join(joined: _Joined, level: int, length: int, reverse: bool) -> _Joined | None:
    """One step of a scan (at `level`) over a join along its first axis: each param's part
    read at its own steps; or over a step of an outer scan over a join (a scan over a stack
    of stacked params): each part read along its first axis. None if a part's entries cannot
    be mapped to its slices."""
    reads = np.arange(length)[::-1] if reverse else np.arange(length)
    if joined.axis is None:
        steps = [
            r and _take(r, 0, joined.shape, _Varying((level,), reads)) for _, _, r in joined.parts
        ]
        if any(r is not None and v is None for (_, _, r), v in zip(joined.parts, steps)):
            return None
        parts = tuple(
            (0, 1, v and dataclasses.replace(v, axes=v.axes[1:], digits=v.digits[1:]))
            for v in steps
        )
        return _Joined(None, joined.shape[1:], parts)
    views = _parts_at(joined, _Varying((level,), reads)) if joined.axis == 0 else None
    if views is None:
        return None
    parts = [(0, 1, dataclasses.replace(v, axes=v.axes[1:], digits=v.digits[1:])) for v in views]
    return _Joined(None, joined.shape[1:], tuple(parts))


def _kernel_use(
    ref: _Ref,
    position: tuple,
    name: str,
    contracted: Sequence[int],
    spatial: Sequence[int],
    kept: Sequence[int],
) -> _Use:
    axes = ref.axes
    input_axes = _union([axes[k] for k in contracted])
    spatial_axes = _union([axes[k] for k in spatial])
    output_axes = _union([axes[k] for k in kept])
    # A rearranged axis that is contracted was spread over the kept axes by the gather (the
    # output positions of a Toeplitz matrix): it is fan-in, not an output unit.
    output_axes -= (input_axes | spatial_axes) & ref.rearranged
    if not (input_axes | spatial_axes) and ref.cut:
        # What is contracted is one tap of the kernel, cut out alone (a convolution whose
        # window overlaps the input at one position): the cut axes are its window.
        spatial_axes = ref.cut - output_axes
    ambiguous = bool(
        (input_axes | spatial_axes) & output_axes or input_axes & spatial_axes
    ) or not (input_axes | spatial_axes)
    return _Use(ref, position, name, "kernel", input_axes, spatial_axes, output_axes, ambiguous)


def _consumer_use(eqn: Any, operand: int, ref: _Ref, position: tuple) -> _Use:
    """How `eqn` uses the param view `ref` given as its operand number `operand`."""
    name, params = eqn.primitive.name, eqn.params
    ndim = len(ref.axes)
    if name == "dot_general":
        (lc, rc), (lb, rb) = params["dimension_numbers"]
        contracted, batch = (lc, lb) if operand == 0 else (rc, rb)
        kept = [k for k in range(ndim) if k not in contracted]  # batch axes stay apart
        del batch
        return _kernel_use(ref, position, name, contracted, (), kept)
    if name == "conv_general_dilated" and operand == 1:
        spec = params["dimension_numbers"].rhs_spec  # (out feature, in feature, *window)
        return _kernel_use(ref, position, name, (spec[1],), spec[2:], (spec[0],))
    if name in ("gather", "dynamic_slice") and operand == 0:
        # Rows read at an index the inputs give: `jnp.take(table, tokens, axis=0)`, or
        # `table[token]` at a traced scalar (a dynamic slice; so is a decoding loop's lookup
        # of the token it generated). Views at known indices never get here.
        if name == "gather":
            indexed = params["dimension_numbers"].start_index_map
        else:
            sizes, shape = params["slice_sizes"], eqn.invars[0].aval.shape
            indexed = [k for k in range(ndim) if sizes[k] < shape[k]]
        rows = [k for k in range(ndim) if k in indexed]
        features = [k for k in range(ndim) if k not in indexed]
        use = _kernel_use(ref, position, name, features, (), rows)
        return dataclasses.replace(use, kind="embedding")
    if name in _BIAS_PRIMITIVES:
        return _Use(ref, position, name, "bias")
    if name in _SCALE_PRIMITIVES:
        rest = _union(ref.axes) - ref.cut
        if ref.cut and rest:
            # One tap of a kernel (a shifted-sum convolution multiplies each window position
            # on its own and adds them up): a contraction spread over several products.
            spatial_axes = ref.cut
            return _Use(ref, position, name, "kernel", frozenset(), spatial_axes, rest)
        return _Use(ref, position, name, "scale")
    return _Use(ref, position, name, "other")


# Constants of at most this many entries are evaluated, to read static indices; so are the
# values a loop counter takes, in scans of at most this many steps.
_SMALL_CONSTANT = 1024
_UNKNOWN = object()  # a constant whose value is not evaluated
# A value that depends on nothing but the steps of a loop whose steps are not evaluated (a
# counter of a loop whose trip count is an input, or what mixes two loops' counters).
_LOOP = object()


@dataclasses.dataclass(frozen=True, eq=False)
class _Varying:
    """A value that depends on nothing but the steps of the nested scans `levels` (outermost
    first): a `fori_loop`'s counter, a constant `xs`, and what is computed from them, such as
    `2 * j + i` of two nested loops. `values[s1, ..., sm]` is its value at their steps."""

    levels: tuple[int, ...]
    values: np.ndarray

    def at(self, steps: dict[int, int]) -> np.ndarray:
        """The value at the steps `steps` (level -> step) of its levels."""
        return self.values[tuple(steps[level] for level in self.levels)]


def _is_index(dtype: Any) -> bool:
    return np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.bool_)


def _is_value(flag: Any) -> bool:
    return (
        flag is not None
        and flag is not _UNKNOWN
        and flag is not _LOOP
        and not isinstance(flag, _Varying)
    )


def _evaluate(eqn: Any, values: Sequence[Any]) -> list[Any] | None:
    """The outputs of an equation whose inputs are all known small constants (the index
    arithmetic `jnp.take` and `lax.dynamic_index_in_dim` wrap around a static index), step
    by step where some of them vary with one scan's steps."""
    if any(v is _UNKNOWN or v is _LOOP for v in values):
        return None
    levels, grid = _loop_grid(values)
    if levels:
        if not all(_is_index(v.aval.dtype) for v in eqn.outvars):
            return None  # only index arithmetic is followed step by step
        if math.prod(grid) > _SMALL_CONSTANT:
            return None
        per_point = []
        for point in np.ndindex(grid):
            at = dict(zip(levels, point))
            outs = _evaluate(eqn, [v.at(at) if isinstance(v, _Varying) else v for v in values])
            if outs is None:
                return None
            per_point.append(outs)
        return [
            _Varying(levels, np.stack(o).reshape(grid + np.shape(o[0]))) for o in zip(*per_point)
        ]
    if any(math.prod(v.aval.shape) > _SMALL_CONSTANT for v in [*eqn.invars, *eqn.outvars]):
        return None
    try:
        with jax.ensure_compile_time_eval():
            closed = eqn.params.get("jaxpr")
            if isinstance(closed, jex_core.ClosedJaxpr) and eqn.primitive.name in ("jit", "pjit"):
                outs = jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *values)
            elif any(_as_jaxpr(p) is not None for p in eqn.params.values()):
                return None  # another call-like primitive: not evaluated
            else:
                outs = eqn.primitive.bind(*values, **eqn.params)
                outs = outs if eqn.primitive.multiple_results else [outs]
            return [np.asarray(o) for o in outs]
    except Exception:  # anything not evaluable here stays an unknown constant
        return None


def _function_of(
    jaxpr: jex_core.Jaxpr, out: int, var: Any, known: dict
) -> Callable[[Any], Any] | None:
    """Output `out` of `jaxpr` as a function of its input `var` alone, the inputs in `known`
    held at their values (a loop counter's update, or a `while_loop`'s test of it); None if it
    needs any other input. The function returns None where a step cannot be evaluated."""
    target = jaxpr.outvars[out]
    literal = lambda v: isinstance(v, jex_core.Literal)
    needed, wanted = [], set() if literal(target) else {target}
    for eqn in reversed(jaxpr.eqns):
        if any(o in wanted for o in eqn.outvars):
            needed.append(eqn)
            wanted.update(v for v in eqn.invars if not literal(v))
    needed.reverse()
    produced = {o for eqn in needed for o in eqn.outvars}
    if any(v not in produced and v is not var and v not in known for v in wanted):
        return None

    def f(x: Any) -> Any:
        env = {**known, var: x}
        for eqn in needed:
            outs = _evaluate(eqn, [v.val if literal(v) else env[v] for v in eqn.invars])
            if outs is None:
                return None
            env.update(zip(eqn.outvars, outs))
        return np.asarray(target.val if literal(target) else env[target])

    return f


def _is_counter(var: Any, init: Any) -> bool:
    return _is_value(init) and var.aval.shape == () and np.issubdtype(var.aval.dtype, np.integer)


def _counter_values(
    update: Callable[[Any], Any] | None,
    init: Any,
    length: int | None = None,
    test: Callable[[Any], Any] | None = None,
) -> np.ndarray | None:
    """The values a loop counter takes, step by step, from `init`: `length` steps, or (a
    `while_loop`) as long as `test` holds, at most `_SMALL_CONSTANT`; None if unknown."""
    if update is None:
        return None
    values, x = [], np.asarray(init)
    while len(values) < (length if length is not None else _SMALL_CONSTANT + 1):
        if test is not None:
            going = test(x)
            if going is None:
                return None
            if not bool(going):
                break
        values.append(x)
        x = update(x)
        if x is None and (length is None or len(values) < length):
            return None
    if length is None and len(values) > _SMALL_CONSTANT:
        return None  # not evaluated this far
    return np.stack(values) if values else None


def _as_jaxpr(x: Any) -> jex_core.Jaxpr | None:
    if isinstance(x, jex_core.ClosedJaxpr):
        return x.jaxpr
    if isinstance(x, jex_core.Jaxpr):
        return x
    return None


class _Walker:
    """Walks a jaxpr in execution order, following param views into calls and scans."""

    def __init__(self) -> None:
        self.counter = 0
        self.levels = 0
        self.uses: list[_Use] = []
        # Leaves read one slice at a time in a way the trace cannot follow: leaf -> how.
        self.unfollowed: dict[int, str] = {}

    def walk(
        self,
        jaxpr: Any,
        ins: list[_Ref | None],
        prefix: tuple,
        constant_ins: Sequence[Any] | None = None,
        const_values: Sequence[Any] = (),
    ) -> list[_Ref | None]:
        """`constant_ins`: per invar, None if it depends on the params or inputs, else its
        value (`_UNKNOWN` if not evaluated); `const_values`: the constvars' values."""
        env = {v: r for v, r in zip(jaxpr.invars, ins) if r is not None}
        read = lambda v: None if isinstance(v, jex_core.Literal) else env.get(v)
        # Values that depend on neither the params nor the inputs (numpy constants the model
        # closes over, and what is computed from them alone), with their values where known.
        constant: dict[Any, Any] = {v: _UNKNOWN for v in jaxpr.constvars}
        constant.update(zip(jaxpr.constvars, const_values))
        constant.update((v, c) for v, c in zip(jaxpr.invars, constant_ins or ()) if c is not None)
        value = lambda v: v.val if isinstance(v, jex_core.Literal) else constant.get(v)
        for eqn in jaxpr.eqns:
            position = (*prefix, self.counter)
            self.counter += 1
            flags = [value(v) for v in eqn.invars]
            if all(f is not None for f in flags):
                outs = _evaluate(eqn, flags)
                if outs is None:
                    loop = any(f is _LOOP or isinstance(f, _Varying) for f in flags)
                    outs = [_LOOP if loop else _UNKNOWN] * len(eqn.outvars)
                constant.update(zip(eqn.outvars, outs))
                continue
            refs = [read(v) for v in eqn.invars]
            if all(r is None for r in refs):
                continue  # nothing of ours flows in, so nothing inside can use a param
            name = eqn.primitive.name
            if name in ("concatenate", "stack") or any(isinstance(r, _Joined) for r in refs):
                outs = self._joined(eqn, refs, position, flags)
                if outs is not None:  # else a loop or call, which passes joins on
                    env.update((v, r) for v, r in zip(eqn.outvars, outs) if r is not None)
                    continue
            if name in _IDENTITY_VIEWS or name in _SHAPE_VIEWS:
                for v, r in zip(eqn.outvars, refs):
                    if r is not None:
                        env[v] = _view_axes(eqn, r)
                continue
            view = self._loop_view(eqn, refs, flags)  # a dynamic slice at known starts too
            if view is not None:
                env[eqn.outvars[0]] = view
                continue
            if self._unfollowed_read(eqn, refs, flags):
                self.uses.append(_Use(refs[0], position, name, "other"))
                continue
            if name == "gather" and refs[0] is not None and flags[1] is not None:
                # Not a lookup by the inputs: a view of the param.
                indices = flags[1] if _is_value(flags[1]) else None
                env[eqn.outvars[0]] = _gather_view(eqn, refs[0], indices)
                continue
            cases = [r for r in refs[1:] if r is not None]
            if name == "select_n" and refs[0] is None and len(cases) == 1:
                env[eqn.outvars[0]] = cases[0]  # the param's entries where chosen (a mask)
                continue
            if name == "scan":
                outs = self._scan(eqn, refs, position, flags)
            elif name == "while" and self._while(eqn, refs, position, flags):
                outs = [None] * len(eqn.outvars)
            else:
                outs = self._call(eqn, refs, position, flags)
            for v, r in zip(eqn.outvars, outs):
                if r is not None:
                    env[v] = r
        return [read(v) for v in jaxpr.outvars]

    def _consume(self, eqn: Any, operand: int, ref: _Ref | _Joined, position: tuple) -> None:
        """Records how `eqn` uses its operand `ref`; each part of a join as that param alone
        (the q, k and v kernels of a fused product are each a kernel)."""
        for view in ref.views() if isinstance(ref, _Joined) else [ref]:
            self.uses.append(_consumer_use(eqn, operand, view, position))

    def _joined(self, eqn: Any, refs: list, position: tuple, flags: list[Any]) -> list | None:
        """An eqn that joins param views (`concatenate`, `stack`) or reads a join: a view of
        it; one slice at a loop's counter, which is not followed; else a use of each part.
        None for a scan, a loop or a call, which pass the join on."""
        name = eqn.primitive.name
        if name in ("scan", "while") or any(
            _as_jaxpr(x) is not None
            for value in eqn.params.values()
            for x in (value if isinstance(value, (tuple, list)) else (value,))
        ):
            return None
        out: Any = None
        if name in ("concatenate", "stack"):
            out = _join(eqn, refs)
        elif name in _IDENTITY_VIEWS:
            return list(refs)
        elif name in _SHAPE_VIEWS:
            out = _joined_view(eqn, refs[0])
            if out is _NOT_FOLLOWED:
                how = "joined with other params (a concatenate or stack), then reshaped or "
                how += "strided in a way the trace does not follow"
                self._unfollow(eqn, refs[0], position, how)
                return [None]
            return [out]
        elif name in ("dynamic_slice", "gather") and isinstance(refs[0], _Joined):
            step = _indexed_join(eqn, refs[0], _loop_starts(eqn, flags))
            if step is not None:
                return [step]
            starts = flags[1:] if name == "dynamic_slice" else flags[1:2]
            if any(f is _LOOP or isinstance(f, _Varying) for f in starts):
                how = "one slice at a time, at a loop's counter, of a stack joined from several"
                self._unfollow(eqn, refs[0], position, how + " params")
                return [None]
        if out is not None:
            return [out]
        for k, r in enumerate(refs):
            if r is not None:
                self._consume(eqn, k, r, position)
        return [None] * len(eqn.outvars)

    def _unfollow(self, eqn: Any, joined: _Joined, position: tuple, how: str) -> None:
        for view in joined.views():
            self.uses.append(_Use(view, position, eqn.primitive.name, "other"))
            self.unfollowed.setdefault(view.leaf, how)

    def _loop_view(self, eqn: Any, refs: list, flags: list[Any]) -> _Ref | None:
        """A `dynamic_slice` of a param at known or moving starts, or a one-slice `gather` of
        it whose start moves with a scan's steps: see `_loop_cut`."""
        ref = refs[0]
        starts = None if ref is None else _loop_starts(eqn, flags)
        if starts is None:
            return None
        old, sizes = eqn.invars[0].aval.shape, eqn.params["slice_sizes"]
        view = _loop_cut(ref, old, sizes, starts)
        if view is None or eqn.primitive.name == "dynamic_slice":
            return view
        return _gathered(eqn, view, single=True)

    def _unfollowed_read(self, eqn: Any, refs: list, flags: list[Any]) -> bool:
        """A `dynamic_slice` or `gather` of a param at a loop counter that `_loop_view` could
        not map to slices (recorded in `unfollowed`): the leaf is read whole."""
        name, ref = eqn.primitive.name, refs[0]
        if ref is None or name not in ("dynamic_slice", "gather"):
            return False
        starts = flags[1:] if name == "dynamic_slice" else flags[1:2]
        if not any(f is _LOOP or isinstance(f, _Varying) for f in starts):
            return False
        how = (
            "one slice at a time at an index the trace cannot follow (a loop whose trip count "
            f"is an input, or over {_SMALL_CONSTANT} steps, nested loops' steps counted together)"
        )
        self.unfollowed.setdefault(ref.leaf, how)
        return True

    def _while(self, eqn: Any, refs: list, position: tuple, flags: list[Any]) -> bool:
        """A `while_loop` whose test reads one integer counter of known start and update (a
        hand-written loop over blocks, `i < L`) runs a known number of steps: its body is
        walked as a scan's, the counters' values known at every step. False if it is not."""
        params = eqn.params
        nc, nb = params["cond_nconsts"], params["body_nconsts"]
        cond, body = params["cond_jaxpr"].jaxpr, params["body_jaxpr"].jaxpr
        init = flags[nc + nb :]
        if any(refs[:nc]) or any(refs[nc + nb :]) or not init:
            return False  # a param tested or carried by the loop: not a loop over blocks
        known_cond = {v: f for v, f in zip(cond.invars[:nc], flags[:nc]) if _is_value(f)}
        known_body = {v: f for v, f in zip(body.invars[:nb], flags[nc:]) if _is_value(f)}
        for k, f in enumerate(init):  # a carry the body passes on unchanged (fori_loop's bound)
            if _is_value(f) and body.outvars[k] is body.invars[nb + k]:
                known_cond[cond.invars[nc + k]] = known_body[body.invars[nb + k]] = f
        update = lambda c: _function_of(body, c, body.invars[nb + c], known_body)
        tests = [
            (c, _function_of(cond, 0, cond.invars[nc + c], known_cond))
            for c in range(len(init))
            if _is_counter(cond.invars[nc + c], init[c])
        ]
        tests = [(c, test) for c, test in tests if test is not None]
        if len(tests) != 1:
            return False
        c, test = tests[0]
        values = _counter_values(update(c), init[c], test=test)
        if values is None:
            return False
        level = self.levels
        self.levels += 1
        inner_flags = list(flags[nc : nc + nb])
        for k, f in enumerate(init):
            var = body.invars[nb + k]
            counter = values if k == c else None
            if counter is None and _is_counter(var, f):
                counter = _counter_values(update(k), f, len(values))
            inner_flags.append(None if counter is None else _Varying((level,), counter))
        self.walk(body, refs[nc:], (*position, _Iteration(level)), inner_flags)
        return True

    def _call(self, eqn: Any, refs: list, position: tuple, flags: list[Any]) -> list:
        name = eqn.primitive.name
        if name == "while":
            nc, nb = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
            body = eqn.params["body_jaxpr"].jaxpr
            known = {v: f for v, f in zip(body.invars[:nb], flags[nc:]) if _is_value(f)}
            # The loop changes its carry; a counter (known start, an update that needs
            # nothing else) takes values the trace does not say.
            carried = [
                _LOOP if _is_counter(var, f) and _function_of(body, k, var, known) else None
                for k, (var, f) in enumerate(zip(body.invars[nb:], flags[nc + nb :]))
            ]
            subs = [
                (
                    eqn.params["cond_jaxpr"].jaxpr,
                    refs[:nc] + refs[nc + nb :],
                    flags[:nc] + carried,
                    False,
                ),
                (eqn.params["body_jaxpr"].jaxpr, refs[nc:], flags[nc : nc + nb] + carried, True),
            ]
        else:
            subs = []
            for value in eqn.params.values():
                for x in value if isinstance(value, (tuple, list)) else (value,):
                    jaxpr = _as_jaxpr(x)
                    if jaxpr is None:
                        continue
                    # Call-like primitives (jit, remat, custom_jvp/vjp, shard_map) pass their
                    # operands 1:1; cond's branches get all operands but the branch index.
                    k = len(jaxpr.invars)
                    inner = refs[len(refs) - k :] if k <= len(refs) else [None] * k
                    inner_flags = flags[len(flags) - k :] if k <= len(flags) else [None] * k
                    outs_match = len(jaxpr.outvars) == len(eqn.outvars)
                    subs.append((jaxpr, inner, inner_flags, outs_match))
        passed = set()
        outs: list = [None] * len(eqn.outvars)
        for inner, inner_refs, inner_flags, outs_match in subs:
            passed.update(id(r) for r in inner_refs if r is not None)
            inner_outs = self.walk(inner, inner_refs, position[:-1], inner_flags)
            if outs_match:
                outs = [o if o is not None else i for o, i in zip(outs, inner_outs)]
        for k, r in enumerate(refs):
            if r is not None and id(r) not in passed:
                self._consume(eqn, k, r, position)
        return outs

    def _scan(self, eqn: Any, refs: list, position: tuple, flags: list[Any]) -> list:
        params = eqn.params
        first_xs = params["num_consts"] + params["num_carry"]
        level = self.levels
        self.levels += 1
        inner: list[_Ref | None] = []
        for k, r in enumerate(refs):
            if r is None or k < first_xs:
                inner.append(r)  # consts (and a carry's initial value): the whole leaf
                continue
            if isinstance(r, _Joined):
                step = _scanned_join(r, level, params["length"], params["reverse"])
                if step is None:
                    how = "in a scan over params joined (a concatenate or stack) in a way the "
                    self._unfollow(eqn, r, position, how + "trace does not follow")
                inner.append(step)
                continue
            if not r.axes[0]:  # broadcast, then scanned
                inner.append(dataclasses.replace(r, axes=r.axes[1:], digits=r.digits[1:]))
                continue
            n = params["length"]
            reads = np.arange(n)[::-1] if params["reverse"] else np.arange(n)
            view = _take(r, 0, eqn.invars[k].aval.shape, _Varying((level,), reads))
            if view is None:  # a step's entry is not one slice, nor a group of them in order
                self.uses.append(_Use(r, position, "scan", "other"))
                how = "in a scan whose steps read slices the trace cannot map to the leaf"
                self.unfollowed.setdefault(r.leaf, how)
                inner.append(None)
                continue
            inner.append(dataclasses.replace(view, axes=view.axes[1:], digits=view.digits[1:]))
        body = params["jaxpr"].jaxpr
        n, consts = params["length"], params["num_consts"]
        known = {v: f for v, f in zip(body.invars[:consts], flags) if _is_value(f)}
        # Consts are the same at every step. A carry changes, but an integer counter of known
        # start whose update needs nothing else takes known values, step by step; so does a
        # known constant xs, sliced one step at a time.
        inner_flags: list[Any] = list(flags[:consts])
        for k in range(consts, len(flags)):
            f, var = flags[k], body.invars[k]
            if f is None:
                inner_flags.append(None)
            elif k >= first_xs:
                steps = f[::-1] if params["reverse"] else f
                small = _is_value(f) and n <= _SMALL_CONSTANT
                inner_flags.append(_Varying((level,), np.asarray(steps)) if small else _LOOP)
            elif _is_counter(var, f) and (update := _function_of(body, k - consts, var, known)):
                values = _counter_values(update, f, n) if n <= _SMALL_CONSTANT else None
                inner_flags.append(_LOOP if values is None else _Varying((level,), values))
            else:
                inner_flags.append(None)
        self.walk(body, inner, (*position, _Iteration(level)), inner_flags)
        return [None] * len(eqn.outvars)


def _is_traceable_input(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def _trace_uses(
    params: Any, apply_fn: Callable, example_args: tuple, example_kwargs: dict, caller: str
) -> tuple[list[_Use], dict[int, str]]:
    # Arrays and ShapeDtypeStructs are traced; everything else (train=False, None, strings, an
    # rng object) is closed over as is, so Python branching on it keeps working.
    leaves, treedef = jax.tree_util.tree_flatten((example_args, example_kwargs))
    dynamic = [i for i, x in enumerate(leaves) if _is_traceable_input(x)]

    def forward(params, dynamic_leaves):
        full = list(leaves)
        for i, x in zip(dynamic, dynamic_leaves):
            full[i] = x
        args, kwargs = jax.tree_util.tree_unflatten(treedef, full)
        return apply_fn(params, *args, **kwargs)

    try:
        closed = jax.make_jaxpr(forward)(params, [leaves[i] for i in dynamic])
    except Exception as e:
        name = getattr(apply_fn, "__name__", type(apply_fn).__name__)
        raise ValueError(
            f"{caller} could not trace apply_fn {name}(params, *example_args, "
            f"**example_kwargs): {type(e).__name__}: {e}. Check that the example inputs have "
            "the shapes and dtypes the model expects."
        ) from e
    n_leaves = len(jax.tree.leaves(params))
    invars = closed.jaxpr.invars
    if len(invars) != n_leaves + len(dynamic):
        raise RuntimeError(
            f"{caller}: traced {len(invars)} inputs, expected {n_leaves} params + "
            f"{len(dynamic)} example arrays."
        )
    shapes = [np.shape(x) for x in jax.tree.leaves(params)]
    refs: list[_Ref | None] = [
        _Ref(i, s, tuple((a,) for a in range(len(s)))) for i, s in enumerate(shapes)
    ]
    walker = _Walker()
    const_values = [
        np.asarray(c) if np.size(c) <= _SMALL_CONSTANT else _UNKNOWN for c in closed.consts
    ]
    walker.walk(closed.jaxpr, refs + [None] * len(dynamic), (), None, const_values)
    # A group of slices that a loop moves along the stack (a scan over `w.reshape(G, B, ...)`
    # whose steps use each group whole), or one slice of a view whose entries are in an order
    # the trace does not record (`w[perm][i]` for a constant `perm`): which slice is at which
    # depth is not one answer.
    uses = []
    for u in walker.uses:
        picked = {a for a, _ in u.ref.picked}
        how = None
        if (u.ref.rearranged | u.ref.scrambled) & (u.ref.cut - picked):
            how = "one slice at a time of a view whose order the trace does not record"
        elif any(isinstance(first, _Varying) for _, first, _ in u.ref.ranges):
            how = "a group of slices at a time (a loop over groups of the stack) and uses it whole"
        if how is not None:
            walker.unfollowed.setdefault(u.ref.leaf, how)
            whole = _Ref(
                u.ref.leaf, u.ref.leaf_shape, tuple((a,) for a in range(len(u.ref.leaf_shape)))
            )
            u = _Use(whole, u.position, u.primitive, "other")
        uses.append(u)
    return uses, walker.unfollowed


# --------------------------------------------------------------------------------------------
# From uses to per-slice first uses, roles and axes


def _concrete(
    position: tuple, stacking: tuple[_Stacking, ...], index: dict[int, int]
) -> tuple | None:
    """The position at which a use reads slice `index`, or None if it never reads it."""
    by_level = {level: (s, k) for s in stacking for k, level in enumerate(s.levels)}
    out = []
    for p in position:
        if isinstance(p, _Iteration):
            if p.level not in by_level:
                out.append(0)  # a leaf the scan does not slice is used from its first step
                continue
            s, k = by_level[p.level]
            steps = s.step(index)
            if steps is None:
                return None
            out.append(steps[k])
        else:
            out.append(p)
    return tuple(out)


_ROLE_PRIORITY = ("embedding", "kernel", "scale", "bias", "other")


def _leaf_layout(
    path: str, shape: tuple[int, ...], uses: list[_Use], order: Sequence[int]
) -> LeafLayout:
    """`order`: the trace order (eqn counter) of every use of every leaf, sorted."""
    if not uses:
        return LeafLayout(path, shape, "unused", (), (), (), (), 0, decays_by_default(path, shape))
    scanned = {a for u in uses for s in u.ref.stacking for a in s.leaf_axes}
    indexed = _indexed_axes(uses, order)
    stacked = tuple(sorted(scanned | indexed))
    if indexed:  # a product of one slice of a stacked leaf multiplies it whole: a scale
        uses = [
            _Use(u.ref, u.position, u.primitive, "scale")
            if u.primitive in _SCALE_PRIMITIVES and u.kind == "kernel" and u.spatial_axes <= indexed
            else u
            for u in uses
        ]
    role = next(k for k in _ROLE_PRIORITY if any(u.kind == k for u in uses))
    input_axes = spatial_axes = output_axes = ()
    if role in ("kernel", "embedding"):
        use = next(u for u in uses if u.kind == role)
        if not use.ambiguous:
            free = lambda axes: tuple(sorted(a for a in axes if a not in stacked))
            input_axes = free(use.input_axes)
            spatial_axes = free(use.spatial_axes)
            output_axes = free(use.output_axes)
            # A size-1 axis that a reshape or squeeze dropped before the product (a depthwise
            # kernel's input channel, in its matmul and shifted-sum forms) is fan-in, as the
            # convolution reads it; it adds no entry to any norm.
            placed = set(input_axes + spatial_axes + output_axes + stacked)
            dropped = [a for a, n in enumerate(shape) if n == 1 and a not in placed]
            input_axes = tuple(sorted(input_axes + tuple(dropped)))
    # The shape rule on one slice, and never what the trace shows is only added or multiplied
    # (a DenseGeneral's (heads, head_dim) bias has two axes, and is still a bias).
    decay = decays_by_default(path, shape, stacked) and role not in ("bias", "scale")
    return LeafLayout(path, shape, role, stacked, input_axes, spatial_axes, output_axes, 0, decay)


def _indexed_axes(uses: list[_Use], order: Sequence[int]) -> set[int]:
    """The leaf axes a Python loop indexes (`w[i]`): every use takes one static entry along
    the axis, and at least two entries are used. Each slice is then its own layer, unless the
    products of single entries along the axis follow one another with no other param used in
    between: those are the taps of one kernel (a convolution as a sum of shifted products)."""
    axes = set.intersection(*({a for a, _ in u.ref.picked} for u in uses))
    for u in uses:
        axes -= u.input_axes | u.output_axes
    between = lambda c1, c2: bisect.bisect_left(order, c2) - bisect.bisect_right(order, c1)
    out = set()
    for axis in axes:
        seq = sorted((u.position[-1], dict(u.ref.picked)[axis]) for u in uses)
        changes = [(c1, c2) for (c1, k1), (c2, k2) in itertools.pairwise(seq) if k1 != k2]
        if not changes:
            continue  # one entry used: not a stack
        taps = any(axis in u.spatial_axes for u in uses)
        if not taps or all(between(c1, c2) > 0 for c1, c2 in changes):
            out.add(axis)
    return out


def _slice_indices(shape: tuple[int, ...], stacked: tuple[int, ...]):
    for combo in itertools.product(*(range(shape[a]) for a in stacked)):
        yield dict(zip(stacked, combo)), combo


def _first_uses(layout: LeafLayout, uses: list[_Use]) -> dict[tuple[int, ...], tuple]:
    """Slice index (over the stacked axes) -> first position, in execution order, it is used."""
    first = {}
    for index, combo in _slice_indices(layout.shape, layout.stacked_axes):
        positions = [
            _concrete(u.position, u.ref.stacking, index)
            for u in uses
            if all(index.get(a, k) == k for a, k in u.ref.picked)  # a use of another slice
        ]
        first[combo] = min((p for p in positions if p is not None), default=None)
    return first


def _module_of(path: str) -> tuple[str, ...]:
    names = tuple(path.split("/"))
    return names[:-1]


def _natural_key(name: str) -> tuple[Any, ...]:
    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))


def natural_path_key(path: Sequence[str]) -> tuple[Any, ...]:
    """Sort key of a path: per component, digit runs compare as numbers (`blocks_9` <
    `blocks_10`), and a module's children stay together."""
    return tuple(_natural_key(name) for name in path)


def _rank_layers(
    layouts: list[LeafLayout],
    uses_by_leaf: list[list[_Use]],
    group_of: Callable[[int, LeafLayout], Any],
    caller: str,
) -> list[Any]:
    """Depth of every leaf (an int, or an int array over its stacked axes): layers ranked by
    their first use, ties by group key; unused layers all get the last depth, with a warning."""
    first: dict[Any, tuple] = {}
    members: dict[Any, list[tuple[int, tuple[int, ...]]]] = {}
    for i, (layout, uses) in enumerate(zip(layouts, uses_by_leaf)):
        per_slice = _first_uses(layout, uses) if uses else {(): None}
        for combo, pos in per_slice.items():
            group = (group_of(i, layout), combo)
            members.setdefault(group, []).append((i, combo))
            if pos is not None:
                first[group] = min(first.get(group, pos), pos)
    if not first:
        raise ValueError(
            f"{caller}: apply_fn used none of the params in its forward pass; check that it "
            "reads them from its first argument."
        )
    order = sorted(first, key=lambda g: (first[g], g))
    rank = {g: k + 1 for k, g in enumerate(order)}
    unused = sorted((g for g in members if g not in first), key=str)
    if unused:
        # A leaf, or one slice of a stacked leaf (`blocks/w[3]`) a loop never reads.
        index = lambda combo: f"[{','.join(map(str, combo))}]" if combo else ""
        name = lambda i, combo: layouts[i].path + index(combo)
        names = sorted(
            {name(i, combo) for g in unused for i, combo in members[g]}, key=_natural_key
        )
        warnings.warn(
            f"{caller}: apply_fn never used {len(names)} params (e.g. "
            f"{', '.join(names[:3])}); they get the last label {len(order) + 1}.",
            stacklevel=3,
        )
        rank.update({g: len(order) + 1 for g in unused})
    depths: list[Any] = [None] * len(layouts)
    for group, slices in members.items():
        for i, combo in slices:
            layout = layouts[i]
            if not layout.stacked_axes:
                depths[i] = rank[group]
                continue
            if depths[i] is None:
                size = [
                    layout.shape[a] if a in layout.stacked_axes else 1
                    for a in range(len(layout.shape))
                ]
                depths[i] = np.zeros(size, np.int64)
            index = [0] * len(layout.shape)
            for a, k in zip(layout.stacked_axes, combo):
                index[a] = k
            depths[i][tuple(index)] = rank[group]
    return depths


def analyse(
    params: Any,
    apply_fn: Callable,
    example_args: tuple,
    example_kwargs: dict,
    *,
    caller: str,
    group_of: Callable[[str], Any] | None = None,
) -> list[LeafLayout]:
    """One trace: a `LeafLayout` per param leaf, in the params' leaf order.

    `group_of(path)` gives the layer a leaf belongs to (default: its module, the path without
    the last key); a stacked leaf's slices are separate layers."""
    flat = leaves_with_paths(params)
    if not flat:
        raise ValueError(f"{caller}: params has no leaves.")
    if not callable(apply_fn):
        raise TypeError(f"{caller}: apply_fn must be callable, got {type(apply_fn).__name__}.")
    for path, leaf in flat:
        if not (_is_traceable_input(leaf) or isinstance(leaf, (numbers.Number, jax.core.Tracer))):
            raise TypeError(
                f"{caller}: the param leaf '{path}' is a {type(leaf).__name__}, not an array; "
                "pass only the arrays (for Equinox, eqx.filter(model, eqx.is_array))."
            )
    uses, unfollowed = _trace_uses(params, apply_fn, example_args, example_kwargs, caller)
    if unfollowed:
        names = [flat[i][0] for i in sorted(unfollowed)]
        warnings.warn(
            f"{caller}: apply_fn reads {len(names)} params (e.g. {', '.join(names[:3])}) "
            f"{unfollowed[min(unfollowed)]}. Each is read as one layer; loop a static number "
            "of times over whole slices to get one layer per slice.",
            stacklevel=3,
        )
    by_leaf: list[list[_Use]] = [[] for _ in flat]
    for u in uses:
        by_leaf[u.ref.leaf].append(u)
    order = sorted(u.position[-1] for u in uses)
    layouts = [
        _leaf_layout(path, tuple(int(n) for n in np.shape(leaf)), u, order)
        for (path, leaf), u in zip(flat, by_leaf)
    ]
    if group_of is None:
        group = lambda i, layout: ("module", natural_path_key(_module_of(layout.path)))
    else:
        group = lambda i, layout: ("rule", group_of(layout.path))
    depths = _rank_layers(layouts, by_leaf, group, caller)
    return [dataclasses.replace(lay, depth=d) for lay, d in zip(layouts, depths)]


# --------------------------------------------------------------------------------------------
# The public object


def axes_str(axes: tuple[int, ...]) -> str:
    return ",".join(map(str, axes)) if axes else "-"


def depth_str(depth: Any) -> str:
    """`3`, or for a stacked leaf its slices' depths as `first..last` (with the step when the
    slices are evenly spaced)."""
    if np.ndim(depth) == 0:
        return str(int(depth))
    values = np.asarray(depth).ravel()
    if values.size == 1:
        return str(int(values[0]))
    steps = np.diff(values)
    if np.all(steps == steps[0]) and steps[0] != 0:
        step = f" step {int(steps[0])}" if abs(int(steps[0])) != 1 else ""
        return f"{int(values[0])}..{int(values[-1])}{step}"
    return f"{int(values.min())}..{int(values.max())} (uneven)"


@dataclasses.dataclass(frozen=True, eq=False)
class LayerStructure:
    """Every param leaf's role, stacking, kernel axes, depth and default decay, from one trace.

    Build it with `layer_structure`. The params-shaped properties (`depths`, `decay_mask`,
    `roles`, `stacked_axes`, `fan_in_axes`, `output_axes`) are trees with the params' structure;
    `leaves` holds one `LeafLayout` per leaf in the params' leaf order. `str(structure)` is a
    table, one row per leaf.

    Attributes:
      leaves: one `LeafLayout` per param leaf, in the params' leaf order.
      treedef: the params' tree structure.
    """

    leaves: tuple[LeafLayout, ...]
    treedef: Any = dataclasses.field(repr=False)

    def _tree(self, field: str) -> Any:
        return jax.tree_util.tree_unflatten(self.treedef, [getattr(x, field) for x in self.leaves])

    @property
    def depths(self) -> Any:
        """Depth of every leaf: an int, or an int array over a stacked leaf's slices."""
        return self._tree("depth")

    @property
    def decay_mask(self) -> Any:
        """Python bools: True where weight decay applies by default (see `LeafLayout.decay`)."""
        return self._tree("decay")

    @property
    def roles(self) -> Any:
        return self._tree("role")

    @property
    def stacked_axes(self) -> Any:
        return self._tree("stacked_axes")

    @property
    def fan_in_axes(self) -> Any:
        return jax.tree_util.tree_unflatten(self.treedef, [x.fan_in_axes for x in self.leaves])

    @property
    def output_axes(self) -> Any:
        return self._tree("output_axes")

    @property
    def num_layers(self) -> int:
        return max(int(np.max(x.depth)) for x in self.leaves)

    def mask(self, roles: Sequence[str] = ("kernel",), *, decayed: bool = True) -> Any:
        """Python bools: the leaves whose role is in `roles` (and that decay by default)."""
        keep = [x.role in roles and (x.decay or not decayed) for x in self.leaves]
        return jax.tree_util.tree_unflatten(self.treedef, keep)

    def layouts_for(self, params: Any, where: str) -> list[LeafLayout]:
        """The layouts in `params`' leaf order; a ValueError names the first leaf whose path or
        shape differs from those this structure was built for."""
        flat = leaves_with_paths(params)
        if len(flat) != len(self.leaves):
            raise ValueError(
                f"{where}: layers= was built for {len(self.leaves)} param leaves, the params "
                f"have {len(flat)}; build it with layer_structure on these params."
            )
        for (path, leaf), layout in zip(flat, self.leaves):
            shape = tuple(int(n) for n in np.shape(leaf))
            if path != layout.path or shape != layout.shape:
                raise ValueError(
                    f"{where}: layers= was built for other params: leaf '{path}' {shape} is "
                    f"'{layout.path}' {layout.shape} in the layer structure."
                )
        return list(self.leaves)

    def table(self) -> str:
        header = ("depth", "path", "shape", "role", "stacked", "fan-in", "out", "decay")
        rows = []
        for x in self.leaves:
            rows.append(
                (
                    depth_str(x.depth),
                    x.path,
                    str(x.shape),
                    x.role,
                    axes_str(x.stacked_axes),
                    axes_str(x.fan_in_axes),
                    axes_str(x.output_axes),
                    "yes" if x.decay else "no",
                )
            )
        order = sorted(
            range(len(rows)),
            key=lambda i: (
                int(np.min(self.leaves[i].depth)),
                natural_path_key(self.leaves[i].path.split("/")),
            ),
        )
        body = [rows[i] for i in order]
        widths = [max(len(r[c]) for r in [header, *body]) for c in range(len(header))]
        line = lambda r: "  ".join(
            [r[0].rjust(widths[0])] + [c.ljust(w) for c, w in zip(r[1:], widths[1:])]
        ).rstrip()
        stacked = [x for x in self.leaves if x.stacked_axes]
        footer = f"{self.num_layers} layers from {len(self.leaves)} leaves"
        if stacked:
            slices = max(x.num_slices for x in stacked)
            footer += f"; {len(stacked)} stacked leaves ({slices} slices each at most)"
        return "\n".join([line(header), *(line(r) for r in body), footer + "."])

    def __str__(self) -> str:
        return self.table()


def layer_structure(
    params: Any, apply_fn: Callable[..., Any], *example_args: Any, **example_kwargs: Any
) -> LayerStructure:
    """The layer structure of a model, from one trace of `apply_fn(params, *example_args)`.

    `jax.make_jaxpr` traces the forward pass (nothing is computed; example arrays may be
    `jax.ShapeDtypeStruct`s, other example values are passed as they are). For every param
    leaf it records:

    - its role: "kernel" if it reaches a `dot_general` or `conv_general_dilated` through views
      (casts, reshapes, transposes, reversals as in a transposed convolution, broadcasts,
      slices, `where` masks, gathers by constant indices, as in a Toeplitz-matrix
      convolution) or is multiplied one sliced-out tap at a
      time (a shifted-sum convolution); "embedding" if its rows are gathered or sliced at
      indices that depend on the inputs (`table[tokens]`, `table[token]` at a traced scalar,
      a decoding loop's lookup of the token it generated); "bias" if added (a table read by
      a constant index and added, such as a relative position bias, included); "scale" if
      multiplied whole; "other"; or "unused";
    - its stacked axes: a leaf sliced by a `scan` (linen `nn.scan`, NNX `nnx.scan`, Equinox's
      `jax.lax.scan` over `eqx.filter_vmap`-built layers, Haiku's `hk.layer_stack`) is one
      layer per slice; `jit`, `remat`, `vmap`, `cond` and custom derivatives inside are
      followed. So is a leaf a Python loop reads one block at a time (`w[i]`, `jnp.take(w,
      i, axis=0)`, `lax.dynamic_index_in_dim(w, i)`), when every use takes one entry along
      the axis: single entries multiplied one after another with no other param used in
      between are the taps of one kernel instead. And so is a leaf a `fori_loop`, a
      `while_loop` that tests its counter against known values, or a scan over
      `jnp.arange(L)` reads at its counter: the counter's value at every step is read from the
      trace, so `w[L - 1 - i]` stacks the blocks in reverse, and nested loops' counters
      combine (`w[B * j + i]`). Each loop reads a static range or stride of the stack
      (`w[2:5]`, `w[::2]`, `w[::-1]`), stacked axes merged by a reshape
      (`w.reshape(G * B, ...)`) and
      groups of blocks split off by one (a scan over `w.reshape(G, B, ...)` whose steps loop
      over their group, or over `lax.dynamic_slice_in_dim(w, B * j, B)`) slice by slice too.
      A trip count that is an input or over 1024 steps (nested loops' steps counted
      together), or a group used whole by one product, is not followed: the leaf stays one
      layer, role "other", and a warning names it;
    - a kernel's axes as the product contracts them: `input_axes` and `spatial_axes` (its
      fan-in) and `output_axes` (one output unit per index), for any library's layout;
    - its depth: layers (a module's leaves, or one slice of them) ranked by first use, 1 for
      the first; a stacked slice gets the depth its unrolled twin would have;
    - its default decay: more than one axis of size > 1 in one slice (so a stacked `(L, C)`
      bias and Haiku's `(1, 1, 1, C)` BatchNorm scale are not decayed), not a relative
      position bias table, and not a leaf whose role is bias or scale (a `(heads, head_dim)`
      attention bias); on a model with no such bias, `default_decay_mask` of its unrolled twin.

    Args:
      params: a pytree of arrays or `jax.ShapeDtypeStruct`s: a linen params dict, an
        `nnx.State`, a Haiku params dict, or the arrays of an Equinox module
        (`eqx.filter(model, eqx.is_array)`).
      apply_fn: `apply_fn(params, *example_args, **example_kwargs)`, the pure forward pass.
      *example_args: example inputs.
      **example_kwargs: example keyword inputs.

    Returns:
      A `LayerStructure`; pass it as `layers=` to the per-layer transforms and diagnostics,
      and its `depths` to `layerwise_schedule`, its `decay_mask` as a `mask`.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, lpwd_optax
      >>> class Block(nn.Module):
      ...   @nn.compact
      ...   def __call__(self, x, _):
      ...     return x + nn.Dense(4)(nn.LayerNorm()(x)), None
      >>> class Net(nn.Module):
      ...   @nn.compact
      ...   def __call__(self, x):
      ...     blocks = nn.scan(Block, variable_axes={"params": 0},
      ...                      split_rngs={"params": True}, length=3)
      ...     return nn.Dense(2, name="head")(blocks(name="blocks")(x, None)[0])
      >>> x = jnp.ones((1, 4))
      >>> params = Net().init(jax.random.key(0), x)["params"]
      >>> layers = lpwd_optax.layer_structure(params, lambda p, x: Net().apply({"params": p}, x), x)
      >>> layers.depths["blocks"]["Dense_0"]["kernel"].ravel().tolist()
      [2, 4, 6]
      >>> layers.fan_in_axes["blocks"]["Dense_0"]["kernel"], layers.decay_mask["blocks"]["Dense_0"]
      ((1,), {'bias': False, 'kernel': True})
    """
    layouts = analyse(params, apply_fn, example_args, example_kwargs, caller="layer_structure")
    return LayerStructure(tuple(layouts), jax.tree_util.tree_structure(params))


# --------------------------------------------------------------------------------------------
# For the transforms that take `layers=`


def layouts(layers: LayerStructure | None, params: Any, where: str) -> list[LeafLayout | None]:
    """One `LeafLayout` per param leaf (None everywhere without `layers`); a ValueError names
    the first leaf that `layers` was not built for."""
    if layers is None:
        return [None] * len(jax.tree.leaves(params))
    if not isinstance(layers, LayerStructure):
        raise TypeError(
            f"{where}: layers must be a LayerStructure (from lpwd_optax.layer_structure), got "
            f"{type(layers).__name__}."
        )
    return layers.layouts_for(params, where)


def params_check(layers: LayerStructure | None, where: str) -> Callable[[Any], None] | None:
    """A `check_params` hook: raises when the params are not those `layers` was built for."""
    if layers is None:
        return None
    return lambda params: layouts(layers, params, where) and None


def check_layers(layers: Any, where: str) -> None:
    if layers is not None and not isinstance(layers, LayerStructure):
        raise TypeError(
            f"{where}: layers must be a LayerStructure (from lpwd_optax.layer_structure), got "
            f"{type(layers).__name__}."
        )


def default_mask(layers: LayerStructure | None, mask: Any, roles: Sequence[str] | None = None):
    """`mask` if given; else, with `layers`, its decay mask (restricted to `roles`); else None
    (the transform's own default)."""
    if mask is not None or layers is None:
        return mask
    return layers.decay_mask if roles is None else layers.mask(roles)


def slice_axes(layout: LeafLayout | None, ndim: int) -> tuple[int, ...]:
    """The axes of one layer of a leaf: every axis but its stacked ones (all without layers)."""
    return tuple(range(ndim)) if layout is None else layout.slice_axes
