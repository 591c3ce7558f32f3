"""Roles: what each use makes a leaf, and the leaf's axes, stacking and default decay.

A use is a primitive that reads a param view without being a view itself. A product that
contracts some of the leaf's axes (`dot_general`, a convolution's kernel) makes it a kernel:
those axes are its fan-in, the others index its output units. A product that contracts none
of them (a one-axis einsum, a vmapped dot) scales each entry by one input entry, as a
multiplication does: a scale. Rows read at an index the inputs give make an embedding; an
addition a bias; anything else "other". A leaf axis no use spans, read at different entries
by different steps or uses, stacks layers; unless single entries are multiplied one after
another with no other param read in between: the taps of one kernel (a shifted-sum
convolution), its window.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from lpwd_optax._common import decays_by_default
from lpwd_optax.structure.views import View

ROLES = ("kernel", "embedding", "bias", "scale", "other", "unused")
_PRIORITY = ("embedding", "kernel", "scale", "bias", "other")


@dataclasses.dataclass(frozen=True, eq=False)
class LeafLayout:
    """One param leaf as the forward pass uses it.

    Attributes:
      path: the "/"-joined key path.
      shape: the leaf's shape.
      role: one of `ROLES`: "kernel", "embedding", "bias", "scale", "other" or "unused".
      stacked_axes: the axes whose slices are separate layers (a scan or a loop reads one
        slice at a time). Empty for a leaf that is one layer.
      input_axes: a kernel's contracted feature axes; an embedding's feature axes.
      spatial_axes: a convolution kernel's window axes (contracted too).
      output_axes: the axes that index a kernel's output units (an embedding's rows).
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
        return int(np.prod([self.shape[a] for a in self.stacked_axes]))


@dataclasses.dataclass(frozen=True, eq=False)
class Use:
    """A primitive reading `view` of a leaf: `kind` is the role it gives, the axes are leaf
    axes; `whole` where the view has no affine map and the leaf is read whole."""

    view: View
    primitive: str
    kind: str
    input_axes: frozenset[int] = frozenset()
    spatial_axes: frozenset[int] = frozenset()
    output_axes: frozenset[int] = frozenset()
    whole: bool = False


def _product(view: View, name: str, contracted: Sequence[int], window: Sequence[int], kept):
    fan_in, spatial = view.spanned(contracted), view.spanned(window)
    if not fan_in | spatial:
        return Use(view, name, "scale")
    # An opaque axis kept apart also spans the contracted leaf axes it was gathered from
    # (the output positions of a Toeplitz matrix): those are fan-in.
    out = frozenset(
        a
        for k in kept
        for a in view.spans(k)
        if not (isinstance(view.axes[k], frozenset) and a in fan_in | spatial)
    )
    return Use(view, name, "kernel", fan_in, spatial, out)


def use_of(eqn: Any, k: int, view: View, is_data: Sequence[bool]) -> Use:
    """How `eqn` uses `view`, its operand `k` (`is_data`: which operands are data)."""
    name, params = eqn.primitive.name, eqn.params
    if name == "dot_general":
        (lc, rc), _ = params["dimension_numbers"]
        contracted = lc if k == 0 else rc
        kept = [j for j in range(len(view.shape)) if j not in contracted]
        return _product(view, name, contracted, (), kept)
    if name == "conv_general_dilated" and k == 1:
        spec = params["dimension_numbers"].rhs_spec  # (out feature, in feature, *window)
        return _product(view, name, (spec[1],), spec[2:], (spec[0],))
    if name in ("gather", "dynamic_slice") and k == 0 and any(is_data[1:]):
        if name == "gather":
            rows = params["dimension_numbers"].start_index_map
        else:
            rows = [j for j, n in enumerate(params["slice_sizes"]) if n < view.shape[j]]
        features = [j for j in range(len(view.shape)) if j not in rows]
        return Use(view, name, "embedding", view.spanned(features), frozenset(), view.spanned(rows))
    kind = {"add": "bias", "sub": "bias", "mul": "scale", "div": "scale"}.get(name, "other")
    return Use(view, name, kind)


def _varies(values: np.ndarray) -> bool:
    return len(np.unique(values)) > 1


def leaf_layout(path: str, shape: tuple[int, ...], uses: Sequence[tuple[int, Use]]) -> LeafLayout:
    """A leaf's layout from its uses (`(order, use)` in execution order), depth left 0."""
    if not uses or any(u.whole for _, u in uses):
        role = "other" if uses else "unused"
        return LeafLayout(path, shape, role, (), (), (), (), 0, decays_by_default(path, shape))
    spanned = frozenset().union(*(u.view.spanned() for _, u in uses))
    free = [a for a, n in enumerate(shape) if n > 1 and a not in spanned]
    entries = [u.view.entries() for _, u in uses] if free else []
    read = [(order, u, e) for (order, u), e in zip(uses, entries) if len(e)]
    scanned = {a for a in free for _, _, e in read if _varies(e[:, a])}
    indexed = {a for a in free if a not in scanned and _varies([e[0, a] for _, _, e in read])}
    stacked = scanned | indexed
    window = set()
    if any(u.kind == "scale" for _, u in uses):
        # Entries multiplied on their own are taps of a kernel's window; unless every change
        # of entry has another param read in between: one layer per slice (a loop's blocks).
        separated = lambda a: all(
            o2 - o1 > 1
            for (o1, _, e1), (o2, _, e2) in itertools.pairwise(read)
            if e1[0, a] != e2[0, a]
        )
        window = {a for a in free if a not in scanned and not (a in indexed and separated(a))}
        stacked -= window
    stacked = tuple(sorted(stacked))
    inputs = spatial = outputs = ()
    if window:
        role = "kernel"
        first = next(u for _, u in uses if u.kind == "scale")
        use = Use(
            first.view,
            first.primitive,
            "kernel",
            frozenset(),
            frozenset(window),
            first.view.spanned(),
        )
    else:
        role = next(k for k in _PRIORITY if any(u.kind == k for _, u in uses))
        use = next(u for _, u in uses if u.kind == role)
    if role in ("kernel", "embedding"):
        fan_in = use.input_axes | use.spatial_axes
        ambiguous = not fan_in or fan_in & use.output_axes or use.input_axes & use.spatial_axes
        if not ambiguous:
            free_of = lambda axes: tuple(sorted(a for a in axes if a not in stacked))
            inputs, spatial = free_of(use.input_axes), free_of(use.spatial_axes)
            outputs = free_of(use.output_axes)
            # A size-1 axis the product never sees (a depthwise kernel's input channel) is
            # fan-in, as the convolution reads it; it adds no entry to any norm.
            placed = set(inputs + spatial + outputs + stacked)
            dropped = tuple(a for a, n in enumerate(shape) if n == 1 and a not in placed)
            inputs = tuple(sorted(inputs + dropped))
    decay = decays_by_default(path, shape, stacked) and role not in ("bias", "scale")
    return LeafLayout(path, shape, role, stacked, inputs, spatial, outputs, 0, decay)
