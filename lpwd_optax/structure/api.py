"""The public object: `LayerStructure` (one `LeafLayout` per param leaf, printable as a table),
`layer_structure` that builds it from one trace, `LayerStructure.from_shapes` that builds it
from the shapes alone, and the helpers every transform that takes `layers=` shares."""

from __future__ import annotations

import dataclasses
import numbers
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from lpwd_optax._common import leaves_with_paths, path_str
from lpwd_optax.structure import depth, roles, trace
from lpwd_optax.structure.paths import natural_path_key, path_depths
from lpwd_optax.structure.roles import LeafLayout
from lpwd_optax.structure.shapes import shape_layout
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
) -> LayerStructure:
    """One trace and its walk: the `LayerStructure` of `params` (`layer_structure`'s, and
    `depth_labels`' with `rules`).

    `group_of(path)`, where given, makes each group of leaves one layer (a stacked leaf's
    slices still separate layers)."""
    flat = leaves_with_paths(params)
    trace.check_params(flat, apply_fn, caller)
    closed = trace.trace_forward(params, apply_fn, example_args, example_kwargs, caller)
    layouts = analyse_jaxpr(closed, flat, caller=caller, group_of=group_of)
    return LayerStructure(tuple(layouts), jax.tree_util.tree_structure(params))


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

    Build it with `layer_structure` (from the forward pass) or `LayerStructure.from_shapes`
    (from the shapes alone, what the transforms use without `layers=`). The params-shaped
    properties (`depths`, `decay_mask`,
    `roles`, `stacked_axes`, `fan_in_axes`, `output_axes`) are trees with the params' structure.
    `str(structure)` is a table, one row per leaf.

    Attributes:
      leaves: one `LeafLayout` per param leaf, in the params' leaf order.
      treedef: the params' tree structure.
    """

    leaves: tuple[LeafLayout, ...]
    treedef: Any = dataclasses.field(repr=False)

    @classmethod
    def from_shapes(cls, params: Any) -> LayerStructure:
        """The layer structure the param shapes alone give: what every transform and
        diagnostic uses without `layers=`.

        No trace: every leaf with two axes or more is a kernel in Flax's layout (the output
        units on the last axis, the input features on the one before, any axes before those a
        window), every other leaf is "other"; each leaf is one layer, nothing is stacked; the
        layers are numbered in the natural order of their module paths (`depth_labels(params)`)
        and the decay mask is `default_decay_mask`'s.

        Args:
          params: a pytree of arrays or `jax.ShapeDtypeStruct`s.

        Returns:
          A `LayerStructure` of `params`.

        Example:
          >>> import jax.numpy as jnp, lpwd_optax
          >>> params = {"conv": {"kernel": jnp.zeros((3, 3, 4, 8)), "bias": jnp.zeros(8)},
          ...           "head": {"kernel": jnp.zeros((8, 2))}}
          >>> print(lpwd_optax.LayerStructure.from_shapes(params))
          depth  path         shape         role    stacked  fan-in  out  decay
              1  conv/bias    (8,)          other   -        -       -    no
              1  conv/kernel  (3, 3, 4, 8)  kernel  -        0,1,2   3    yes
              2  head/kernel  (8, 2)        kernel  -        0       1    yes
          2 layers from 3 leaves.
        """
        flat = leaves_with_paths(params)
        depths = path_depths([path for path, _ in flat])
        leaves = tuple(shape_layout(p, np.shape(x), d) for (p, x), d in zip(flat, depths))
        return cls(leaves, jax.tree_util.tree_structure(params))

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
        return max((int(np.max(x.depth)) for x in self.leaves), default=0)

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
            key=lambda x: (int(np.min(x.depth)), natural_path_key(x.path)),
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
    return analyse(params, apply_fn, example_args, example_kwargs, caller="layer_structure")


# --------------------------------------------------------------------------------------------
# For the transforms that take `layers=`


def check_layers(layers: Any, where: str) -> None:
    if layers is not None and not isinstance(layers, LayerStructure):
        raise TypeError(
            f"{where}: layers must be a LayerStructure (from lpwd_optax.layer_structure), got "
            f"{type(layers).__name__}."
        )


def layouts(layers: LayerStructure | None, params: Any, where: str) -> list[LeafLayout]:
    """One `LeafLayout` per param leaf: `layers`' (a ValueError names the first leaf it was not
    built for), or without `layers` those of `LayerStructure.from_shapes(params)`."""
    if layers is None:
        return list(LayerStructure.from_shapes(params).leaves)
    check_layers(layers, where)
    return layers.layouts_for(params, where)


class LayerArguments(NamedTuple):
    """A transform's `layers=` and `mask=`, resolved once when the transform is built."""

    mask: Any  # the mask to resolve on the params: the user's, else the structure's default
    layouts: Callable[[Any], list[LeafLayout]]  # params -> a LeafLayout per leaf, checked


def resolve_layers(
    layers: LayerStructure | None,
    mask: Any,
    where: str,
    *,
    roles: Sequence[str] | None = None,
) -> LayerArguments:
    """`layers` and `mask` as every transform that takes `layers=` uses them.

    The params' structure is `layers`, checked against the params each time `layouts(params)`
    is called (at `init` and at every update), or without `layers`
    `LayerStructure.from_shapes(params)`: no other rule decides what a layer is. The mask is
    `mask` when given, else that structure's decay mask, restricted to the leaves whose role
    is in `roles` where given.

    Args:
      layers: a `LayerStructure` or None; anything else is a TypeError naming `where`.
      mask: the transform's `mask` argument (a tree, a callable or None).
      where: the transform's name, for error messages.
      roles: the roles the default mask selects (None: every decayed leaf).

    Returns:
      A `LayerArguments`: the mask to resolve on the params and `layouts(params)`.
    """
    check_layers(layers, where)

    def default(structure: LayerStructure) -> Any:
        return structure.decay_mask if roles is None else structure.mask(roles)

    if mask is None and layers is not None:
        mask = default(layers)
    elif mask is None:
        mask = lambda params: default(LayerStructure.from_shapes(params))
    return LayerArguments(mask, lambda params: layouts(layers, params, where))


# --------------------------------------------------------------------------------------------
# Depth labels given as a tree


def check_depths(depths: Any) -> tuple[list[Any], Any]:
    """The leaves of a tree of depth labels (ints >= 1, or int arrays over a stacked leaf's
    slices, as `depth_labels` gives) and its tree structure; a TypeError or ValueError names
    the first bad leaf."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(depths)
    if not flat:
        raise ValueError("depths has no leaves; pass the output of depth_labels.")
    out = []
    for path, d in flat:
        where = f"depth at '{path_str(path)}'"
        if isinstance(d, (np.ndarray, jax.Array)) and np.ndim(d):  # a stacked leaf's slices
            d = np.asarray(d)
            if not np.issubdtype(d.dtype, np.integer):
                raise TypeError(f"{where} must hold ints (from depth_labels), got {d.dtype}.")
            if d.min() < 1:
                raise ValueError(f"{where} must be >= 1, got {int(d.min())}.")
            out.append(d.astype(np.int64))
            continue
        if isinstance(d, bool) or not isinstance(d, numbers.Integral):
            raise TypeError(f"{where} must be an int (from depth_labels), got {d!r}.")
        if d < 1:
            raise ValueError(f"{where} must be >= 1, got {d}.")
        out.append(int(d))
    return out, treedef
