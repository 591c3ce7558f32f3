"""The public object: `LayerStructure` (one `LeafLayout` per param leaf, printable as a table),
`layer_structure` that builds it from one trace, and the helpers the transforms that take
`layers=` share."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from lpwd_optax._common import leaves_with_paths
from lpwd_optax.structure import depth, roles, trace
from lpwd_optax.structure.depth import natural_path_key
from lpwd_optax.structure.roles import LeafLayout
from lpwd_optax.structure.walker import Walker


def analyse_jaxpr(
    closed: Any,
    flat: list[tuple[str, Any]],
    *,
    caller: str,
    group_of: Callable[[str], Any] | None = None,
) -> list[LeafLayout]:
    """The walk: a `LeafLayout` per leaf of `flat` ((path, leaf), the jaxpr's first inputs)."""
    shapes = [tuple(int(n) for n in np.shape(leaf)) for _, leaf in flat]
    walker = Walker()
    program = walker.walk_forward(closed, shapes)
    if walker.exits:
        leaves = sorted(walker.exits)
        names = ", ".join(flat[i][0] for i in leaves[:3])
        where = ", ".join(f"{flat[i][0]} at {walker.exits[i]}" for i in leaves[:3])
        warnings.warn(
            f"{caller}: apply_fn reads {len(leaves)} params (e.g. {names}) through a view no "
            f"affine index map describes ({where}: a gathered order read one entry at a time, "
            "an index whose steps the trace does not count, or a group of slices per step). "
            "Each is read whole, as one layer; loop a static number of times over whole "
            "slices to get one layer per slice.",
            stacklevel=4,
        )
    by_leaf: list[list[tuple[int, roles.Use]]] = [[] for _ in flat]
    for order, use in enumerate(walker.uses):
        by_leaf[use.view.leaf].append((order, use))
    layouts = [
        roles.leaf_layout(path, shape, uses)
        for (path, _), shape, uses in zip(flat, shapes, by_leaf)
    ]
    found = depth.depths(program, walker.inputs, walker.uses, layouts, group_of, caller)
    return [dataclasses.replace(x, depth=d) for x, d in zip(layouts, found)]


def analyse(
    params: Any,
    apply_fn: Callable,
    example_args: tuple,
    example_kwargs: dict,
    *,
    caller: str,
    group_of: Callable[[str], Any] | None = None,
) -> list[LeafLayout]:
    """One trace and its walk: a `LeafLayout` per param leaf, in the params' leaf order.

    `group_of(path)`, where given, makes each group of leaves one layer (a stacked leaf's
    slices still separate layers)."""
    flat = leaves_with_paths(params)
    trace.check_params(flat, apply_fn, caller)
    closed = trace.trace_forward(params, apply_fn, example_args, example_kwargs, caller)
    return analyse_jaxpr(closed, flat, caller=caller, group_of=group_of)


def axes_str(axes: tuple[int, ...]) -> str:
    return ",".join(map(str, axes)) if axes else "-"


def depth_str(depth: Any) -> str:
    """`3`, or for a stacked leaf its slices' depths as `first..last` (with the step when the
    slices are evenly spaced)."""
    values = np.ravel(depth)
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
    `roles`, `stacked_axes`, `fan_in_axes`, `output_axes`) are trees with the params' structure.
    `str(structure)` is a table, one row per leaf.

    Attributes:
      leaves: one `LeafLayout` per param leaf, in the params' leaf order.
      treedef: the params' tree structure.
    """

    leaves: tuple[LeafLayout, ...]
    treedef: Any = dataclasses.field(repr=False)

    def _tree(self, values: Sequence[Any]) -> Any:
        return jax.tree_util.tree_unflatten(self.treedef, list(values))

    @property
    def depths(self) -> Any:
        """Depth of every leaf: an int, or an int array over a stacked leaf's slices."""
        return self._tree(x.depth for x in self.leaves)

    @property
    def decay_mask(self) -> Any:
        """Python bools: True where weight decay applies by default (see `LeafLayout.decay`)."""
        return self._tree(x.decay for x in self.leaves)

    @property
    def roles(self) -> Any:
        return self._tree(x.role for x in self.leaves)

    @property
    def stacked_axes(self) -> Any:
        return self._tree(x.stacked_axes for x in self.leaves)

    @property
    def fan_in_axes(self) -> Any:
        return self._tree(x.fan_in_axes for x in self.leaves)

    @property
    def output_axes(self) -> Any:
        return self._tree(x.output_axes for x in self.leaves)

    @property
    def num_layers(self) -> int:
        return max(int(np.max(x.depth)) for x in self.leaves)

    def mask(self, roles: Sequence[str] = ("kernel",), *, decayed: bool = True) -> Any:
        """Python bools: the leaves whose role is in `roles` (and that decay by default)."""
        return self._tree(x.role in roles and (x.decay or not decayed) for x in self.leaves)

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
        order = sorted(
            self.leaves,
            key=lambda x: (int(np.min(x.depth)), natural_path_key(x.path.split("/"))),
        )
        body = [
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
            for x in order
        ]
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
    `jax.ShapeDtypeStruct`s, other example values are passed as they are), and one walk reads
    for every param leaf, by the rule the `lpwd_optax.structure` package states: its role
    ("kernel", "embedding", "bias", "scale", "other" or "unused"); its stacked axes, one layer
    per slice, where a scan (linen `nn.scan`, `nnx.scan`, `jax.lax.scan`, `hk.layer_stack`) or
    a loop (Python, `fori_loop`, a counted `while_loop`) reads it slice by slice through any
    view; a kernel's fan-in and output axes, as the product contracts them, in any library's
    layout; its depth, the number of layers on the longest path from the input (parallel
    layers share one, a slice has its unrolled twin's); and whether it decays by default
    (more than one axis of size > 1 in a slice, not a position bias table, not a bias or a
    scale). A leaf read in a way no affine index map describes is one layer, with a warning.

    Args:
      params: a pytree of arrays or `jax.ShapeDtypeStruct`s: a linen params dict, an
        `nnx.State`, a Haiku params dict, or the arrays of an Equinox module
        (`eqx.filter(model, eqx.is_array)`).
      apply_fn: `apply_fn(params, *example_args, **example_kwargs)`, the pure forward pass.
      *example_args: example inputs.
      **example_kwargs: example keyword inputs.

    Returns:
      A `LayerStructure`; pass it as `layers=` to the per-layer transforms and diagnostics,
      its `depths` to `layerwise_schedule`, its `decay_mask` as a `mask`.

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


def check_layers(layers: Any, where: str) -> None:
    if layers is not None and not isinstance(layers, LayerStructure):
        raise TypeError(
            f"{where}: layers must be a LayerStructure (from lpwd_optax.layer_structure), got "
            f"{type(layers).__name__}."
        )


def layouts(layers: LayerStructure | None, params: Any, where: str) -> list[LeafLayout | None]:
    """One `LeafLayout` per param leaf (None everywhere without `layers`); a ValueError names
    the first leaf that `layers` was not built for."""
    if layers is None:
        return [None] * len(jax.tree.leaves(params))
    check_layers(layers, where)
    return layers.layouts_for(params, where)


def params_check(layers: LayerStructure | None, where: str) -> Callable[[Any], None] | None:
    """A `check_params` hook: raises when the params are not those `layers` was built for."""
    if layers is None:
        return None
    return lambda params: layouts(layers, params, where) and None


def default_mask(layers: LayerStructure | None, mask: Any, roles: Sequence[str] | None = None):
    """`mask` if given; else, with `layers`, its decay mask (restricted to `roles`); else None
    (the transform's own default)."""
    if mask is not None or layers is None:
        return mask
    return layers.decay_mask if roles is None else layers.mask(roles)


def slice_axes(layout: LeafLayout | None, ndim: int) -> tuple[int, ...]:
    """The axes of one layer of a leaf: every axis but its stacked ones (all without layers)."""
    return tuple(range(ndim)) if layout is None else layout.slice_axes
