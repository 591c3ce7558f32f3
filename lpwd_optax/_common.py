"""What every regularizer shares: rates, the learning-rate coupling, masks, and one builder.

A regularizer here is a rule for one param leaf (its equation). Everything around it lives in
this module: the values of `rate` / `learning_rate` are checked when the transform is built
(a per-leaf rate's bound `d_0 < 1` with the params, on the leaves it decays); `mask` and
per-leaf rates are resolved into trees shaped like the params (checked at `init` and resolved
again, at trace time, in `update`); and `leafwise_transform` turns a leaf
rule into an `optax.GradientTransformation` whose state is a step count, or nothing when no
hyperparameter depends on the step.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, TypeAlias

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

Schedule: TypeAlias = Callable[[chex.Numeric], chex.Numeric]
ScalarOrSchedule: TypeAlias = float | chex.Numeric | Schedule
# A rate is one scalar or schedule for every leaf, or a pytree of them shaped like the params.
Rate: TypeAlias = ScalarOrSchedule | Any
MaskOrFn: TypeAlias = Any | Callable[[optax.Params], Any] | None

# Leaves whose path contains one of these names are never decayed by default (timm's rule).
NO_DECAY_NAMES = ("relative_position_bias_table",)


# --------------------------------------------------------------------------------------------
# Paths


def path_str(path: Sequence[Any]) -> str:
    """Joins a pytree key path with "/": `(DictKey('a'), SequenceKey(0), ...)` -> `"a/0/..."`.

    `jax.tree_util.keystr(path, simple=True, separator="/")`, except that a trailing
    `GetAttrKey('value')`, which `nnx.Variable` adds, is dropped, so an `nnx.State` and a linen
    params dict with the same modules give the same strings.

    Args:
      path: a key path from `jax.tree_util.tree_flatten_with_path`, or plain names and ints.

    Returns:
      The "/"-joined key names.

    Example:
      >>> import jax
      >>> params = {"stages": [{"conv": {"kernel": 0.0}}]}
      >>> path, _ = jax.tree_util.tree_flatten_with_path(params)[0][0]
      >>> path_str(path)
      'stages/0/conv/kernel'
    """
    path = tuple(path)
    if path and path[-1] == jax.tree_util.GetAttrKey("value"):
        path = path[:-1]
    return jax.tree_util.keystr(path, simple=True, separator="/")


def leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(path_str(p), leaf) for p, leaf in flat]


# --------------------------------------------------------------------------------------------
# Structure checks


def is_function(x: Any) -> bool:
    """A schedule or a mask function: callable AND a pytree leaf.

    A callable pytree (an Equinox Module, an `nnx.Variable`) given as a rate, mask, label or
    group tree is a tree, not a function: its leaves are what count. That holds for a node
    with no leaves too (`eqx.nn.Identity`, a module with only static fields), which a tree
    built from the params keeps where the params have it: it is a node, as in the params,
    not one leaf.

    Args:
      x: anything given as a rate, mask, label or group.

    Returns:
      True when `x` is to be called (a schedule or a mask function), False for a tree.

    Example:
      >>> import optax
      >>> is_function(optax.constant_schedule(0.1)), is_function({"w": 0.1})
      (True, False)
    """
    if not callable(x):
        return False
    treedef = jax.tree_util.tree_structure(x)
    # A leaf is one node holding one leaf; a childless pytree node is one node holding none.
    return treedef.num_nodes == 1 and treedef.num_leaves == 1


def _is_scalar_or_schedule(x: Any) -> bool:
    if is_function(x) or isinstance(x, numbers.Number):
        return True
    return isinstance(x, (jax.Array, np.ndarray, np.generic)) and np.ndim(x) == 0


def _is_rate_value(x: Any) -> bool:
    # One leaf's rate: a scalar, a schedule, or an array that broadcasts against the leaf
    # (per-slice rates of a stacked leaf, from `layerwise_schedule`).
    return _is_scalar_or_schedule(x) or isinstance(x, (jax.Array, np.ndarray))


def _is_rate_leaf(x: Any) -> bool:
    # Schedules are leaves; NNX Variables are callable too, but they are pytree nodes. None is
    # no leaf, as everywhere in jax.
    return is_function(x)


def flatten_like_params(tree: Any, params: Any, what: str) -> list[Any]:
    """Leaves of `tree` in params' leaf order; a ValueError names the first mismatching path.

    Trees match when their leaf paths match ("/"-joined names), so a plain dict mask fits an
    `nnx.State` of the same layout.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, _is_rate_leaf)
    tree_paths = [path_str(p) for p, _ in flat]
    param_paths = [p for p, _ in leaves_with_paths(params)]
    if tree_paths == param_paths:
        return [leaf for _, leaf in flat]
    for i, (pp, tp) in enumerate(zip(param_paths, tree_paths)):
        if pp != tp:
            raise ValueError(
                f"{what} does not match the params: leaf {i} is '{tp}' in the {what} but "
                f"'{pp}' in the params."
            )
    longer, name = (
        (param_paths, "params") if len(param_paths) > len(tree_paths) else (tree_paths, what)
    )
    first_extra = longer[min(len(param_paths), len(tree_paths))]
    raise ValueError(
        f"{what} does not match the params: '{first_extra}' is in the {name} only "
        f"({len(tree_paths)} leaves in the {what}, {len(param_paths)} in the params)."
    )


def require_params(params: Any, transform: str) -> None:
    if params is None:
        raise ValueError(
            f"{transform} needs the current params: call `update(updates, state, params)` "
            "(in an optax.chain, pass params to the chain's update)."
        )


# --------------------------------------------------------------------------------------------
# Masks


def default_decay_mask(params: optax.Params) -> Any:
    """timm's no-decay rule: decay leaves with more than one axis of size > 1, except relative
    position bias tables.

    Biases, normalization scales and layer-scale gammas (one axis, or Haiku's `(1, 1, 1, C)`
    BatchNorm scale and offset) are not decayed. For stacked layers use
    `layer_structure(...).decay_mask`, which applies the same rule to one slice.

    Args:
      params: a pytree of arrays (a linen params dict or an `nnx.State`).

    Returns:
      A pytree of Python bools shaped like `params`.
    """

    keep = lambda path, leaf: decays_by_default(path_str(path), np.shape(leaf))
    return jax.tree_util.tree_map_with_path(keep, params)


def decays_by_default(path: str, shape: Sequence[int], stacked: Sequence[int] = ()) -> bool:
    """The default decay rule on one layer: more than one axis of size > 1 (outside the
    `stacked` axes, which index layers), and no name of `NO_DECAY_NAMES` in the path."""
    ndim = sum(1 for a, n in enumerate(shape) if n > 1 and a not in stacked)
    return bool(ndim > 1 and not any(n in path for n in NO_DECAY_NAMES))


# --------------------------------------------------------------------------------------------
# Rates and the per-step decay d_t, checked once when a transform is built


def check_scalar_rate(
    value: Any, name: str, *, upper: float | None = None, array: bool = False
) -> None:
    """Raise if a concrete `value` is negative (or >= `upper`); traced values are skipped.

    With `array`, `value` may be an array (per-slice rates) and every entry is checked."""
    if isinstance(value, jax.core.Tracer):
        return
    try:
        values = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:  # not a number
        raise TypeError(f"{name} must be a scalar, got {type(value).__name__}.") from e
    if values.ndim and not array:
        raise TypeError(f"{name} must be a scalar, got an array of shape {values.shape}.")
    bad = values[~np.isfinite(values) | (values < 0)]
    if bad.size:
        raise ValueError(f"{name} must be a finite number >= 0, got {float(bad.ravel()[0])}.")
    if upper is not None and values.size and float(values.max()) >= upper:
        raise ValueError(f"{name} must be < {upper}, got {float(values.max())}.")


def _value_at(x: ScalarOrSchedule, step: chex.Numeric) -> chex.Numeric:
    return x(step) if is_function(x) else x


def decay_at(
    rate: ScalarOrSchedule, learning_rate: ScalarOrSchedule | None, step: chex.Numeric
) -> chex.Numeric:
    """`d_t`: one leaf's rate at `step`, times the learning rate at `step` when there is one."""
    d = _value_at(rate, step)
    return d if learning_rate is None else d * _value_at(learning_rate, step)


def rate_leaves(rate: Rate) -> list[tuple[str, ScalarOrSchedule]]:
    """(path, rate) for a per-leaf rate tree, or `[("", rate)]` for one scalar or schedule."""
    if _is_scalar_or_schedule(rate):
        return [("", rate)]
    flat, _ = jax.tree_util.tree_flatten_with_path(rate, _is_rate_leaf)
    return [(path_str(p), r) for p, r in flat]


def is_scheduled(rate: Rate | None, learning_rate: ScalarOrSchedule | None = None) -> bool:
    """True when the learning rate or any leaf's rate is a schedule: `d_t` depends on t."""
    rates = [] if rate is None else [r for _, r in rate_leaves(rate)]
    return any(is_function(x) for x in [*rates, learning_rate])


def check_rate(
    rate: Rate,
    learning_rate: ScalarOrSchedule | None,
    transform: str,
    *,
    max_decay: float | None,
    strict: bool,
) -> None:
    """Validate every concrete value once: rates >= 0 and `d_0` below `max_decay`.

    Schedules are checked at step 0; traced values (under `optax.inject_hyperparams`) are
    skipped. Errors name the leaf of a per-leaf rate tree.
    """
    if learning_rate is not None:
        check_scalar_rate(_value_at(learning_rate, 0), f"{transform} learning_rate")
    for path, r in rate_leaves(rate):
        where = f"{transform} rate" + (f" at '{path}'" if path else "")
        if not (_is_rate_value(r) if path else _is_scalar_or_schedule(r)):
            raise TypeError(f"{where} must be a scalar or a schedule, got {type(r).__name__}.")
        check_scalar_rate(_value_at(r, 0), where, array=bool(path))
        if not path:  # a per-leaf rate's bound is checked at init, on decayed leaves only
            check_decay_bound(transform, decay_at(r, learning_rate, 0), max_decay, strict)


def check_decay_bound(where: str, d: Any, max_decay: float | None, strict: bool) -> None:
    """Raise if a concrete per-step decay `d` at step 0 is above (or at) `max_decay`."""
    if max_decay is None or isinstance(d, jax.core.Tracer):
        return
    d = float(np.max(np.asarray(d)))
    if d > max_decay or (strict and d == max_decay):
        bound = "<" if strict else "<="
        raise ValueError(
            f"{where}: the per-step decay d_t = rate * learning_rate is {d} at step 0; it "
            f"must be {bound} {max_decay} (a larger decay flips the sign of the weights"
            f"{' or divides by zero' if strict else ''})."
        )


# --------------------------------------------------------------------------------------------
# One resolution of mask, rates and other per-leaf trees, shaped like the params


class Resolved(NamedTuple):
    """Per-leaf hyperparameters as trees with the params' structure."""

    mask: Any  # Python bools
    rate: Any  # a scalar or schedule per leaf (None where the transform takes no rate)
    extra: dict[str, Any]  # other per-leaf trees a transform asked for (e.g. AdaDecay's groups)


def resolve(
    params: Any,
    transform: str,
    *,
    mask: MaskOrFn,
    rate: Rate | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Resolved:
    """Mask, rate and `extra` trees shaped like `params`; a ValueError names a mismatch.

    `mask=None` means `default_decay_mask`; a callable mask is called on `params`. A scalar or
    schedule `rate` applies to every leaf.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    paths = [p for p, _ in leaves_with_paths(params)]
    if mask is None:
        mask = default_decay_mask
    if is_function(mask):
        mask = mask(params)
    masks = []
    for path, m in zip(paths, flatten_like_params(mask, params, f"{transform} mask")):
        if isinstance(m, jax.core.Tracer):
            raise TypeError(
                f"{transform} mask at '{path}' is a traced value; a mask must hold Python or "
                "numpy bools (with optax.inject_hyperparams, pass static_args=('mask',))."
            )
        masks.append(bool(m))
    if rate is None or _is_scalar_or_schedule(rate):
        rates = [rate] * len(leaves)
    else:
        rates = flatten_like_params(rate, params, f"{transform} rate tree")
    trees = {
        name: treedef.unflatten(flatten_like_params(tree, params, f"{transform} {name}"))
        for name, tree in (extra or {}).items()
        if tree is not None
    }
    return Resolved(treedef.unflatten(masks), treedef.unflatten(rates), trees)


def checked_resolution(
    params: Any,
    transform: str,
    *,
    mask: MaskOrFn,
    rate: Rate | None = None,
    learning_rate: ScalarOrSchedule | None = None,
    max_decay: float | None = None,
    strict: bool = True,
    extra: Mapping[str, Any] | None = None,
    check_leaf: Callable[[str, Any], None] | None = None,
) -> Resolved:
    """`resolve`, after checking that there are params, then each decayed leaf's per-leaf
    rate bound `d_0 < max_decay` and `check_leaf(path, param)` on every masked leaf."""
    require_params(params, transform)
    resolved = resolve(params, transform, mask=mask, rate=rate, extra=extra)
    per_leaf_rate = rate is not None and not _is_scalar_or_schedule(rate)
    leaves = zip(
        leaves_with_paths(params),
        jax.tree.leaves(resolved.mask),
        jax.tree_util.tree_structure(params).flatten_up_to(resolved.rate)
        if per_leaf_rate
        else jax.tree.leaves(params),
    )
    for (path, p), m, r in leaves:
        if m and per_leaf_rate:
            d = decay_at(r, learning_rate, 0)
            check_decay_bound(f"{transform} at '{path}'", d, max_decay, strict)
        if m and check_leaf is not None:
            check_leaf(path, p)
    return resolved


def map_masked(
    rule: Callable[..., chex.Array], updates: Any, params: Any, mask: Any, *per_leaf: Any
) -> Any:
    """`rule(update, param, *per_leaf)` on masked leaves, cast to the update's dtype; other
    leaves pass through."""

    def leaf(u, p, m, *args):
        return rule(u, p, *args).astype(u.dtype) if m else u

    return jax.tree.map(leaf, updates, params, mask, *per_leaf)


# --------------------------------------------------------------------------------------------
# The step count


class CountState(NamedTuple):
    """State of the transforms that need nothing but the step count."""

    count: chex.Array  # shape=(), dtype=jnp.int32: the 0-based index of the next update


def init_count() -> chex.Array:
    return jnp.zeros([], jnp.int32)


def init_step_state(needs_count: bool) -> CountState | optax.EmptyState:
    """A step count when the transform's hyperparameters depend on the step, else no state."""
    return CountState(count=init_count()) if needs_count else optax.EmptyState()


def step_and_advance(
    state: CountState | optax.EmptyState,
) -> tuple[chex.Numeric, CountState | optax.EmptyState]:
    """(this update's step, the next state); a stateless transform's step is always 0."""
    if isinstance(state, CountState):
        return state.count, CountState(count=optax.safe_increment(state.count))
    return 0, state


# --------------------------------------------------------------------------------------------
# The leaf-wise builder


def leafwise_transform(
    transform: str,
    rule: Callable[..., chex.Array],
    *,
    mask: MaskOrFn,
    rate: Rate | None = None,
    learning_rate: ScalarOrSchedule | None = None,
    step_offset: int = 0,
    max_decay: float | None = None,
    strict: bool = True,
    extra: Mapping[str, Any] | None = None,
    leaf_inputs: Callable[[Any, Any, Resolved], Any] | None = None,
    applies_at: Callable[[chex.Numeric], chex.Array] | None = None,
    check_leaf: Callable[[str, Any], None] | None = None,
    check_params: Callable[[Any], None] | None = None,
) -> optax.GradientTransformation:
    """A transform that applies `rule` to every masked leaf: `rule(update, param, d[, x])`.

    Args:
      transform: the public name, for error messages.
      rule: the regularizer's equation for one leaf.
      mask: which leaves `rule` sees; the others pass through unchanged.
      rate: lambda (scalar, schedule or per-leaf tree). `d` is the leaf's decay
        `rate(t) * learning_rate(t)` at `t = count + step_offset`; None when there is no rate.
      learning_rate: eta, a scalar or a schedule, or None (then `d = rate(t)`).
      step_offset: PWD decays one step ahead.
      max_decay, strict: `d_0 < max_decay` (`<=` when not strict), checked at construction.
      extra: other per-leaf trees to check against the params (resolved into `Resolved.extra`).
      leaf_inputs: `(updates, params, resolved) -> tree` of one more argument `x` per leaf,
        computed before the leaf rules run (statistics shared by a group of leaves).
      applies_at: `step -> bool`; on other steps the updates pass through (one conditional).
      check_leaf: `(path, param)` raises for a masked leaf the rule cannot take.
      check_params: `params` raises for params the transform was not built for (a layer
        structure of other params), at `init` and at every update.

    Returns:
      An `optax.GradientTransformation` whose state is the step count when a rate, the
      learning rate or `applies_at` depends on the step, and `optax.EmptyState()` otherwise.
    """
    if rate is not None:
        check_rate(rate, learning_rate, transform, max_decay=max_decay, strict=strict)
    counted = is_scheduled(rate, learning_rate) or applies_at is not None

    def resolved_for(params):
        resolved = checked_resolution(
            params,
            transform,
            mask=mask,
            rate=rate,
            learning_rate=learning_rate,
            max_decay=max_decay,
            strict=strict,
            extra=extra,
            check_leaf=check_leaf,
        )
        if check_params is not None:
            check_params(params)
        return resolved

    def init_fn(params):
        # optax.tree_utils.tree_map_params inits with a placeholder tree that has no leaves:
        # there is nothing to check the mask and rate trees against.
        if params is None or jax.tree.leaves(params):
            resolved_for(params)
        return init_step_state(counted)

    def update_fn(updates, state, params=None):
        resolved = resolved_for(params)
        step, state = step_and_advance(state)
        decay = jax.tree.map(
            lambda r: decay_at(r, learning_rate, step + step_offset), resolved.rate
        )
        per_leaf = [decay]
        if leaf_inputs is not None:
            per_leaf.append(leaf_inputs(updates, params, resolved))

        def apply(updates):
            return map_masked(rule, updates, params, resolved.mask, *per_leaf)

        if applies_at is None:
            return apply(updates), state
        return jax.lax.cond(applies_at(step), apply, lambda u: u, updates), state

    return optax.GradientTransformation(init_fn, update_fn)
