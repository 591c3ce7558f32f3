"""Layer-wise rates for LPWD: the depth of every parameter and a rate that grows with it.

LPWD gives the leaves of layer `i` (of `n`, counted from the input) the rate
`lambda_i = rate * max_scale * i / n`, so shallow layers are decayed little and deep layers much.

`depth_labels` finds the labels once, outside the training step, either from the forward pass
(`layer_structure(...).depths`, the dataflow's depths; works for any model) or from the param
paths alone (one layer per module, in the natural order of their paths, optionally grouped by
regex rules). `layerwise_schedule` turns the labels into per-leaf rates for `pre_weight_decay`
(or any transform taking a rate tree), and `depth_table` prints what LPWD will do.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import jax
import numpy as np

from lpwd_optax import structure
from lpwd_optax._common import (
    Schedule,
    flatten_like_params,
    is_function,
    leaves_with_paths,
    path_str,
)

# A rule maps a "/"-joined leaf path to a group: a number, a tuple of numbers, None (the regex's
# groups read as ints) or a callable `re.Match -> number | tuple`.
GroupSpec: TypeAlias = float | tuple[float, ...] | Callable[[re.Match], Any] | None
Rules: TypeAlias = Sequence[tuple[str | re.Pattern, GroupSpec]]

__all__ = ["depth_labels", "depth_table", "layerwise_schedule", "path_str"]


def _flat_params(params: Any) -> list[tuple[str, Any]]:
    if params is None:
        raise ValueError("params is None; pass the model's params (a pytree of arrays).")
    flat = leaves_with_paths(params)
    if not flat:
        raise ValueError("params has no leaves.")
    return flat


def _match_structure(tree: Any, params: Any, what: str, *, allow_scalar: bool = False) -> list:
    """Leaves of `tree` in the params' leaf order; a mismatch names the first differing path."""
    if allow_scalar and (tree is None or is_function(tree) or isinstance(tree, numbers.Number)):
        return [tree] * jax.tree_util.tree_structure(params).num_leaves
    return flatten_like_params(tree, params, what)


# --------------------------------------------------------------------------------------------
# Rules (path mode, and grouping in forward mode)


def _as_group_key(value: Any, where: str) -> tuple[float, ...]:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, tuple) and all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value
    ):
        return value
    raise TypeError(f"{where}: a group must be a number or a tuple of numbers, got {value!r}.")


def _compile_rules(rules: Rules) -> list[tuple[re.Pattern, GroupSpec]]:
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
        raise TypeError("rules must be a sequence of (regex, group) pairs.")
    compiled = []
    for rule in rules:
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
            raise TypeError(f"each rule must be a (regex, group) pair, got {rule!r}.")
        pattern, group = rule
        try:
            compiled.append((re.compile(pattern), group))
        except (re.error, TypeError) as e:
            raise ValueError(f"rule {pattern!r} is not a valid regex: {e}") from e
    return compiled


def _rule_key(path: str, rules: list[tuple[re.Pattern, GroupSpec]]) -> tuple[float, ...]:
    for pattern, group in rules:
        m = pattern.search(path)
        if m is None:
            continue
        where = f"rule {pattern.pattern!r} on '{path}'"
        if group is None:
            try:
                return tuple(int(g) for g in m.groups())
            except (TypeError, ValueError) as e:
                raise ValueError(f"{where}: group None needs all regex groups to be ints.") from e
        if callable(group):
            group = group(m)
        return _as_group_key(group, where)
    raise ValueError(
        f"no rule matches the param '{path}'; add a rule for it (a catch-all such as "
        "(r'.*', float('inf')) puts unmatched params last)."
    )


# --------------------------------------------------------------------------------------------
# Public API


def depth_labels(
    params: Any,
    apply_fn: Callable[..., Any] | None = None,
    *example_args: Any,
    rules: Rules | None = None,
    **example_kwargs: Any,
) -> Any:
    """Depth label `i in {1..n}` of every param leaf: 1 for the first layer, n for the last.

    Two ways to find the layers:

    - Forward pass (`apply_fn` given): `layer_structure(params, apply_fn, *example_args,
      **example_kwargs).depths`, from one trace with `jax.make_jaxpr` (nothing is computed).
      Each layer's label is one more than the deepest layer its input depends on; parallel
      layers (q, k, v) share a label, two kernels in sequence get two even in one module; a
      bias or scale takes its layer's label; with `rules`, each group is one layer. A leaf
      that a scan or a loop reads slice by slice (linen `nn.scan`, `nnx.scan`, `jax.lax.scan`
      over stacked arrays) holds one layer per slice, at the depth its unrolled twin's layer
      would have: its label is an int array over its stacked axes, of the leaf's ndim (size 1
      on the other axes, so that rates built from it broadcast). Params that `apply_fn` never
      uses (e.g. a head it skips) all get the last label `n`, and a warning.
    - Paths (`apply_fn=None`): `LayerStructure.from_shapes(params).depths`. A layer is one
      module, i.e. all leaves whose paths differ only in the last key share a label, and the
      layers are numbered in natural sort order of their "/"-joined paths (`blocks_9` <
      `blocks_10`, `stages/1` < `stages/10`); with `rules`, each group is one layer, numbered
      in the order of the group values.

    `rules` is a list of `(regex, group)` pairs; each leaf takes the group of the first regex
    found (`re.search`) in its "/"-joined path. `group` is a number, a tuple of numbers,
    `None` (the regex's groups read as ints) or a callable `re.Match -> number | tuple`. A
    leaf no rule matches is an error. `lpwd_optax.models` has presets for its models,
    `convnext_rules` and `swin_rules` (timm's `group_matcher` grouping).

    Example arrays in `example_args` / `example_kwargs` may be `jax.ShapeDtypeStruct`; other
    values (`train=False`, `rng=None`) are passed to `apply_fn` unchanged.

    Args:
      params: a pytree of arrays or `jax.ShapeDtypeStruct`s: a linen params dict (with or
        without the `{"params": ...}` collection) or an `nnx.State`.
      apply_fn: optional `apply_fn(params, *example_args, **example_kwargs)`, the model's pure
        forward function. Without it, labels come from the paths.
      *example_args: example inputs for `apply_fn`.
      rules: optional sequence of `(regex, group)` pairs, see above.
      **example_kwargs: example keyword inputs for `apply_fn`.

    Returns:
      A pytree with the structure of `params` whose leaves are Python ints in `1..n` (int
      arrays for stacked leaves), every value in `1..n` used.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from lpwd_optax.layerwise import depth_labels
      >>> class MLP(nn.Module):
      ...   @nn.compact
      ...   def __call__(self, x):
      ...     x = nn.relu(nn.Dense(8, name="z_in")(x))  # names sort against call order
      ...     return nn.Dense(2, name="a_out")(x)
      >>> model = MLP()
      >>> x = jnp.ones((1, 4))
      >>> params = model.init(jax.random.key(0), x)
      >>> depth_labels(params, model.apply, x)["params"]
      {'a_out': {'bias': 2, 'kernel': 2}, 'z_in': {'bias': 1, 'kernel': 1}}
      >>> depth_labels(params)["params"]["a_out"]["kernel"]  # from the paths alone
      1
      >>> depth_labels({"stem": {"w": 0}, "head": {"w": 0}}, rules=[("stem", 0), ("head", 1)])
      {'head': {'w': 2}, 'stem': {'w': 1}}

    References:
      "Layer-wise Pre-Weight Decay", ICLR 2024 submission (LPWD).
    """
    flat = _flat_params(params)
    group_of = None
    if rules is not None:
        compiled = _compile_rules(rules)
        group_of = lambda path: _rule_key(path, compiled)
    if apply_fn is not None:
        return structure.analyse(
            params, apply_fn, example_args, example_kwargs, caller="depth_labels", group_of=group_of
        ).depths
    if example_args or example_kwargs:
        raise TypeError("example inputs were given without an apply_fn.")
    if group_of is None:
        return structure.LayerStructure.from_shapes(params).depths
    labels = structure.path_depths([path for path, _ in flat], group_of)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), labels)


def _scaled(schedule: Schedule, scale: float) -> Schedule:
    def scaled_schedule(step):
        return schedule(step) * scale

    scaled_schedule.scale = scale  # lets depth_table and users see the layer's multiplier
    return scaled_schedule


def layerwise_schedule(depths: Any, rate: float | Schedule, *, max_scale: float = 2.0) -> Any:
    """Per-leaf LPWD rates that grow linearly with depth, up to `max_scale * rate`.

    .. math::
      \\lambda_i = \\lambda \\cdot s_{max} \\cdot \\frac{i}{n}

    for a leaf at depth `i` of `n = max(depths)` (paper eq. 9 with its choice
    `max_i lambda_i = 2 lambda`, i.e. `max_scale = 2`). The shallowest layer gets
    `s_max * rate / n`, the deepest `s_max * rate`; with `max_scale = 2` the mean over evenly
    spread layers is about `rate`, so the rate keeps its usual meaning.

    The rate may be traced: build the rates inside the factory that
    `optax.inject_hyperparams` wraps, and a new `rate` takes effect at the next update
    without recompiling (the depths stay fixed; only `rate` is a hyperparameter; see the
    last example).

    Args:
      depths: a pytree of ints >= 1, typically `depth_labels(params, ...)`.
      rate: lambda, a float >= 0, a scalar array (traced under `optax.inject_hyperparams`)
        or a schedule `step -> float` (a traced rate's or a schedule's values are not
        checked here; the transform that uses the rates checks them where they are
        concrete).
      max_scale: the ratio of the deepest layer's rate to `rate`, > 0.

    Returns:
      A pytree shaped like `depths`: float leaves if `rate` is a float (traced scalars if it
      is traced), else schedule leaves `step -> rate(step) * max_scale * i / n`. Pass it as
      the `rate` of `pre_weight_decay` (or of any transform here that takes a per-leaf rate
      tree).

    Example:
      >>> from lpwd_optax.layerwise import layerwise_schedule
      >>> layerwise_schedule({"a": 1, "b": 2, "c": 4}, 0.1)
      {'a': 0.05, 'b': 0.1, 'c': 0.2}
      >>> rates = layerwise_schedule({"a": 1, "b": 2}, lambda step: 0.1 / (1 + step))
      >>> round(rates["b"](1), 6)
      0.1
      >>> import jax, jax.numpy as jnp, optax, lpwd_optax
      >>> depths = {"a": 1, "b": 2}
      >>> opt = optax.inject_hyperparams(
      ...     lambda rate: lpwd_optax.weight_decay(layerwise_schedule(depths, rate))
      ... )(rate=0.1)
      >>> params = {"a": jnp.ones((2, 2)), "b": jnp.ones((2, 2))}
      >>> state = opt.init(params)
      >>> state.hyperparams["rate"] = jnp.full_like(state.hyperparams["rate"], 0.2)
      >>> updates, state = jax.jit(opt.update)(jax.tree.map(jnp.zeros_like, params), state, params)
      >>> [round(float(updates[k][0, 0]), 6) for k in "ab"]  # -0.2 * 2 * i / 2 * theta
      [-0.2, -0.4]

    References:
      "Layer-wise Pre-Weight Decay", ICLR 2024 submission (LPWD), eq. 9.
    """
    flat, treedef = structure.check_depths(depths)
    if isinstance(max_scale, bool) or not isinstance(max_scale, numbers.Real):
        raise TypeError(f"max_scale must be a number, got {max_scale!r}.")
    if not (math.isfinite(max_scale) and max_scale > 0):
        raise ValueError(f"max_scale must be a finite number > 0, got {max_scale}.")
    if not callable(rate):
        if isinstance(rate, bool) or not (
            isinstance(rate, numbers.Real) or (hasattr(rate, "dtype") and np.ndim(rate) == 0)
        ):
            raise TypeError(f"rate must be a float >= 0 or a schedule, got {rate!r}.")
        # A traced rate (optax.inject_hyperparams under jit) stays traced: the transform
        # that uses the rates checks their values where they are concrete.
        if not isinstance(rate, jax.core.Tracer):
            rate = float(rate)
            if not (math.isfinite(rate) and rate >= 0):
                raise ValueError(f"rate must be a finite number >= 0, got {rate}.")
    n = max(int(np.max(i)) for i in flat)
    scales = [max_scale * i / n for i in flat]  # an array for a stacked leaf's slices
    if callable(rate):
        leaves = [_scaled(rate, s) for s in scales]
    else:
        leaves = [rate * s for s in scales]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _format_rate(r: Any) -> str:
    if r is None:
        return "-"
    if is_function(r):
        try:
            return _format_value(r(0)) + " (t=0)"
        except Exception:
            return "schedule"
    return _format_value(r)


def _format_value(r: Any) -> str:
    values = np.asarray(r, np.float64)
    if values.size > 1 and values.min() != values.max():
        return f"{values.min():.4g}..{values.max():.4g}"
    return f"{float(values.ravel()[0]):.4g}"


def _per_depth(label: Any, rate: Any) -> list[tuple[int, str]]:
    """(depth, formatted rate) for every slice of a leaf."""
    if np.ndim(label) == 0:
        return [(int(label), _format_rate(rate))]
    if is_function(rate):
        try:
            rate = rate(0)
        except Exception:
            return [(int(d), "schedule") for d in np.ravel(label)]
    rates = np.broadcast_to(np.asarray(rate, np.float64), np.shape(label))
    return [(int(d), f"{float(v):.4g}") for d, v in zip(np.ravel(label), rates.ravel())]


def depth_table(
    params: Any, labels: Any, rates: Any = None, *, layers: structure.LayerStructure | None = None
) -> str:
    """A printable table of every param leaf's path, shape, depth label and rate.

    Rows are sorted by label, then by natural path order, so the table reads from the input
    layer (label 1, smallest LPWD rate) to the output layer (label n, largest rate); a footer
    says how the rates grow with depth. Schedules are shown by their value at step 0.

    Args:
      params: the params pytree (arrays or `jax.ShapeDtypeStruct`s).
      labels: the matching pytree of depth labels, from `depth_labels`.
      rates: optional per-leaf rates (a pytree shaped like `params`, e.g. from
        `layerwise_schedule`), or one float or schedule for every leaf.
      layers: optional `LayerStructure` of the params: adds each leaf's role and stacked
        axes. A stacked leaf is one row whatever its number of slices: its labels read
        `first..last` (with the step between slices) and its rates `min..max`.

    Returns:
      The table as a string.

    Example:
      >>> import numpy as np
      >>> from lpwd_optax.layerwise import depth_table, layerwise_schedule
      >>> params = {"in": {"kernel": np.zeros((4, 8))}, "out": {"kernel": np.zeros((8, 2))}}
      >>> labels = {"in": {"kernel": 1}, "out": {"kernel": 2}}
      >>> print(depth_table(params, labels, layerwise_schedule(labels, 0.1)))
      label  path        shape   rate
          1  in/kernel   (4, 8)  0.1
          2  out/kernel  (8, 2)  0.2
      2 layers; rate 0.1 at depth 1 (shallowest) up to 0.2 at depth 2 (deepest).

    References:
      "Layer-wise Pre-Weight Decay", ICLR 2024 submission (LPWD).
    """
    flat = _flat_params(params)
    label_list = _match_structure(labels, params, "labels")
    rate_list = _match_structure(rates, params, "rates", allow_scalar=True)
    layouts = structure.layouts(layers, params, "depth_table")
    rows = []
    for (path, _), label, r, layout in zip(flat, label_list, rate_list, layouts):
        extra = () if layers is None else (layout.role, structure.axes_str(layout.stacked_axes))
        key = structure.natural_path_key(path)
        rows.append((int(np.min(label)), key, path, str(layout.shape), r, label, extra))
    rows.sort(key=lambda row: (row[0], row[1]))
    header = ("label", "path", "shape")
    header += ("role", "stacked") if layers is not None else ()
    header += ("rate",) if rates is not None else ()
    body = [
        (structure.depth_str(label), path, shape, *extra)
        + ((_format_rate(r),) if rates is not None else ())
        for _, _, path, shape, r, label, extra in rows
    ]
    widths = [max(len(row[c]) for row in [header, *body]) for c in range(len(header))]

    def line(row):
        cells = [row[0].rjust(widths[0])] + [c.ljust(w) for c, w in zip(row[1:], widths[1:])]
        return "  ".join(cells).rstrip()

    lines = [line(header), *(line(row) for row in body)]
    n = max(int(np.max(label)) for *_, label, _ in rows)
    if rates is not None:
        by_label: dict[int, str] = {}
        for _, _, _, _, r, label, _ in rows:
            for depth, rate in _per_depth(label, r):
                by_label.setdefault(depth, rate)
        lines.append(
            f"{n} layers; rate {by_label[min(by_label)]} at depth {min(by_label)} (shallowest) "
            f"up to {by_label[max(by_label)]} at depth {max(by_label)} (deepest)."
        )
    else:
        lines.append(f"{n} layers.")
    return "\n".join(lines)
