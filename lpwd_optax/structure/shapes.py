"""The layout param shapes alone give, where no trace has read the params: Flax's.

A leaf with two axes or more is a kernel laid out as Flax lays them out: its last axis indexes
the output units, the one before it the input features, any axes before those the window (a
convolution's `(kh, kw, in, out)`, a depthwise one's `(kh, kw, 1, C)`, a Dense's `(in, out)`).
Any other leaf (a bias, a norm's scale, a scalar) is "other". Every leaf is one layer, nothing
is stacked, and a leaf decays by the default rule (`decays_by_default`: more than one axis of
size > 1, so Haiku's `(1, 1, 1, C)` BatchNorm scale is a kernel by its shape that does not
decay). An Equinox `(out, in)` kernel is read as `(in, out)` here: its true axes come from
`layer_structure`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lpwd_optax._common import decays_by_default
from lpwd_optax.structure.roles import LeafLayout


def shape_layout(path: str, shape: Sequence[int], depth: Any) -> LeafLayout:
    """The layout of the leaf at `path` of `shape`, at `depth`, by Flax's layout."""
    shape = tuple(int(n) for n in shape)
    ndim = len(shape)
    decay = decays_by_default(path, shape)
    if ndim < 2:
        return LeafLayout(path, shape, "other", (), (), (), (), depth, decay)
    window = tuple(range(ndim - 2))
    return LeafLayout(path, shape, "kernel", (), (ndim - 2,), window, (ndim - 1,), depth, decay)
