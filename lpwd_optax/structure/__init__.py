"""The layer structure of a model, read from one trace of its forward pass.

The rule. Tracing `apply_fn(params, *example_args)` gives a jaxpr. Walking it once, every
value computed from a param leaf `w` without arithmetic is a view of `w`: its entry at index
`i` is `w`'s entry at flat (row-major) index

    leaf_index = offset + sum over the digits d of i: stride_d * d,

one affine map of the digits of the value's index (an axis is one digit, or several where a
reshape merged axes whose strides numpy's no-copy rule cannot fuse). Every view is a change of
strides and offset: a transpose permutes them, a broadcast adds zero strides, a squeeze drops
size-1 axes, a slice moves the offset and multiplies a stride by its step, a reversal negates
the strides, a reshape regroups the digits (numpy's rule fusing those it can), and an entry
taken at a loop's counter (`w[i]`, a scan's step) moves the offset with the steps. Casts,
masks by constants and elementwise arithmetic with constants (`1 + scale`) keep the map. A
join (`concatenate`, `stack`) is a list of such views, one per piece. A gather by constant
indices leaves opaque axes, of which only the leaf axes they span are known. Reading one entry
of an opaque axis, an index whose steps the trace does not count (over 1024, or an input), or
a group of slices per step is the one exit: the leaf is read whole, as one layer, and one
warning names it and the primitive.

What the rule gives. A primitive that reads a view without being one is a use: a product
that contracts some of the leaf's axes makes it a kernel (those axes its fan-in, the rest its
output units), a product or multiplication that contracts none a scale, rows read at an
index the inputs give an embedding, an addition a bias. A leaf axis no use spans, read at
different entries by different steps or uses, holds one layer per slice (`stacked_axes`),
unless single entries are multiplied one after another (a shifted-sum convolution's taps).
Depth is a fact of the dataflow: each layer is one more than the deepest layer its input
depends on, so parallel projections (q, k, v) share a depth and sequential ones do not, in one
module or several; a bias or scale takes its layer's depth.

Without a trace. `LayerStructure.from_shapes(params)` reads the shapes alone, in Flax's
layout: a leaf with two axes or more is a kernel with its output units on the last axis, each
leaf one layer, the layers in the natural order of their module paths. Every transform and
diagnostic that takes `layers=` uses it when none is given (`resolve_layers`); no other code
decides what a layer is.

Modules: `views` (the rule), `counters` (loop counters), `walker` (the jaxpr walk), `roles`
(uses to roles and axes), `depth` (dataflow depth), `trace` (the one trace), `paths` (a leaf's
module, natural order, the order of paths), `shapes` (the layout from a shape), `api` (the
public `LayerStructure`, `layer_structure` and the helpers for `layers=`).
"""

# The public names, and the helpers the transforms that take `layers=` share.
from lpwd_optax.structure.api import (  # noqa: F401
    LayerArguments,
    LayerStructure,
    analyse,
    analyse_jaxpr,
    axes_str,
    check_depths,
    check_layers,
    depth_str,
    layer_structure,
    layouts,
    resolve_layers,
)
from lpwd_optax.structure.paths import module_path, natural_path_key, path_depths  # noqa: F401
from lpwd_optax.structure.roles import ROLES, LeafLayout

__all__ = ["ROLES", "LayerStructure", "LeafLayout", "layer_structure"]

# The examples that live in the modules of this package run with the package's doctests.
__test__ = {
    "layer_structure": layer_structure,
    "LayerStructure": LayerStructure,
    "LayerStructure.from_shapes": LayerStructure.from_shapes,
}
