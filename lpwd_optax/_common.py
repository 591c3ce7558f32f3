"""What every regularizer shares: rates, the learning-rate coupling, masks, and validation.

Each transform in this package keeps its own code to its defining equation; everything else
(how `rate` / `learning_rate` / `mask` are given, how they are checked against the params, how
a per-leaf decay `d_t` is computed) lives here, resolved once per update.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
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
# Paths


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path: Sequence[Any]) -> str:
    """Joins a pytree key path with "/": `(DictKey('a'), SequenceKey(0), ...)` -> `"a/0/..."`.

    A trailing `GetAttrKey('value')`, which `nnx.Variable` adds, is dropped, so an `nnx.State`
    and a linen params dict with the same modules give the same strings.

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
    names = [_key_name(k) for k in path]
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
        names = names[:-1]
    return "/".join(names)


def leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(path_str(p), leaf) for p, leaf in flat]


# --------------------------------------------------------------------------------------------
# Structure checks


def _is_scalar_or_schedule(x: Any) -> bool:
    if callable(x) or isinstance(x, numbers.Number):
        return True
    return isinstance(x, (jax.Array, np.ndarray, np.generic)) and np.ndim(x) == 0


def _is_rate_leaf(x: Any) -> bool:
    # Schedules are leaves; NNX Variables are callable too, but they are pytree nodes.
    if x is None:
        return True
    return callable(x) and jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(x))


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
    """timm's no-decay rule: decay leaves with ndim > 1, except relative position bias tables.

    Biases, normalization scales and layer-scale gammas (ndim <= 1) are not decayed.

    Args:
      params: a pytree of arrays (a linen params dict or an `nnx.State`).

    Returns:
      A pytree of Python bools shaped like `params`.
    """

    def keep(path, leaf):
        name = path_str(path)
        return bool(np.ndim(leaf) > 1 and not any(n in name for n in NO_DECAY_NAMES))

    return jax.tree_util.tree_map_with_path(keep, params)


def resolve_mask(mask: MaskOrFn, params: Any, transform: str) -> list[bool]:
    """Per-leaf bools in params' leaf order; `None` means `default_decay_mask`."""
    if mask is None:
        mask = default_decay_mask
    if callable(mask):
        mask = mask(params)
    flat = flatten_like_params(mask, params, f"{transform} mask")
    out = []
    for (path, _), m in zip(leaves_with_paths(params), flat):
        if isinstance(m, jax.core.Tracer):
            raise TypeError(
                f"{transform} mask at '{path}' is a traced value; a mask must hold Python or "
                "numpy bools (with optax.inject_hyperparams, pass static_args=('mask',))."
            )
        out.append(bool(m))
    return out


# --------------------------------------------------------------------------------------------
# Rates and the per-step decay d_t


def _concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_scalar_rate(value: Any, name: str, *, upper: float | None = None) -> None:
    """Raise if a concrete `value` is negative (or >= `upper`); traced values are skipped."""
    if not _concrete(value):
        return
    try:
        v = float(np.asarray(value))
    except TypeError as e:  # not a scalar
        raise TypeError(f"{name} must be a scalar, got {type(value).__name__}.") from e
    if not np.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {v}.")
    if upper is not None and v >= upper:
        raise ValueError(f"{name} must be < {upper}, got {v}.")


def _value_at(x: ScalarOrSchedule, count: chex.Numeric) -> chex.Numeric:
    return x(count) if callable(x) else x


class DecaySpec(NamedTuple):
    """A validated (rate, learning_rate) pair: `d_t = rate(t) * learning_rate(t)`."""

    rate: Rate
    learning_rate: ScalarOrSchedule | None
    transform: str
    max_decay: float | None  # None: no upper bound on d_t
    strict: bool  # d_t < max_decay (True) or d_t <= max_decay (False)

    def per_leaf_rates(self, params: Any) -> list[ScalarOrSchedule]:
        if _is_scalar_or_schedule(self.rate):
            return [self.rate] * len(jax.tree_util.tree_leaves(params))
        rates = flatten_like_params(self.rate, params, f"{self.transform} rate tree")
        for (path, _), r in zip(leaves_with_paths(params), rates):
            if not _is_scalar_or_schedule(r):
                raise TypeError(
                    f"{self.transform} rate at '{path}' must be a scalar or a schedule, got "
                    f"{type(r).__name__}."
                )
            if not callable(r):
                check_scalar_rate(r, f"{self.transform} rate at '{path}'")
        return rates

    def is_constant(self, params: Any) -> bool:
        """True when no leaf's rate and not the learning rate is a schedule: `d_t` ignores t."""
        schedules = [*self.per_leaf_rates(params), self.learning_rate]
        return not any(callable(x) for x in schedules)

    def decay(self, rate: ScalarOrSchedule, count: chex.Numeric) -> chex.Numeric:
        """`d_t` for one leaf's rate at step `count`."""
        d = _value_at(rate, count)
        if self.learning_rate is not None:
            d = d * _value_at(self.learning_rate, count)
        return d


def make_decay_spec(
    rate: Rate,
    learning_rate: ScalarOrSchedule | None,
    transform: str,
    *,
    max_decay: float | None = 1.0,
    strict: bool = True,
) -> DecaySpec:
    """Validate what can be validated at construction (concrete scalars, schedules at step 0)."""
    spec = DecaySpec(rate, learning_rate, transform, max_decay, strict)
    if learning_rate is not None:
        lr0 = _value_at(learning_rate, 0)
        check_scalar_rate(lr0, f"{transform} learning_rate")
    if _is_scalar_or_schedule(rate):
        check_scalar_rate(_value_at(rate, 0), f"{transform} rate")
        check_decay_below_max(spec, rate, 0, transform)
    return spec


def check_decay_below_max(spec: DecaySpec, rate: ScalarOrSchedule, count: int, where: str):
    if spec.max_decay is None:
        return
    d = spec.decay(rate, count)
    if not _concrete(d):
        return
    d = float(np.asarray(d))
    if d > spec.max_decay or (spec.strict and d == spec.max_decay):
        bound = "<" if spec.strict else "<="
        raise ValueError(
            f"{where}: the per-step decay d_t = rate * learning_rate is {d} at step {count}; "
            f"it must be {bound} {spec.max_decay} (a larger decay flips the sign of the weights"
            f"{'' if not spec.strict else ' or divides by zero'})."
        )


def check_against_params(spec: DecaySpec, mask: MaskOrFn, params: Any) -> None:
    """All structure checks a decoupled transform runs once, at init."""
    resolve_mask(mask, params, spec.transform)
    for (path, _), r in zip(leaves_with_paths(params), spec.per_leaf_rates(params)):
        check_decay_below_max(spec, r, 0, f"{spec.transform} at '{path}'")


# --------------------------------------------------------------------------------------------
# The shared decoupled-transform builder


LeafRule: TypeAlias = Callable[..., chex.Array]


def decoupled_transform(
    rule: LeafRule,
    rate: Rate,
    learning_rate: ScalarOrSchedule | None,
    mask: MaskOrFn,
    transform: str,
    *,
    step_offset: int = 0,
    max_decay: float | None = 1.0,
    strict: bool = True,
) -> optax.GradientTransformation:
    """Build a transform that applies `rule(update, param, d)` to every masked leaf.

    `d` is the leaf's per-step decay at step `count + step_offset` (PWD looks one step ahead).
    Unmasked leaves pass their update through. The result is cast to the update's dtype.
    `max_decay`/`strict` bound `d_t` (checked for concrete values at construction and init).
    The state is the step count when a rate or the learning rate is a schedule, and empty
    otherwise (`d_t` is then the same at every step), so that with constant hyperparameters
    the transform adds no state at all to the optimizer's.
    """
    spec = make_decay_spec(rate, learning_rate, transform, max_decay=max_decay, strict=strict)

    def init_fn(params):
        require_params(params, transform)
        check_against_params(spec, mask, params)
        return init_step_state(not spec.is_constant(params))

    def update_fn(updates, state, params=None):
        require_params(params, transform)
        count, state = step_and_advance(state)
        step = count + step_offset
        leaves_u, treedef = jax.tree_util.tree_flatten(updates)
        leaves_p = treedef.flatten_up_to(params)
        masks = resolve_mask(mask, params, transform)
        rates = spec.per_leaf_rates(params)
        out = []
        for u, p, m, r in zip(leaves_u, leaves_p, masks, rates):
            if m:
                u = rule(u, p, spec.decay(r, step)).astype(u.dtype)
            out.append(u)
        return treedef.unflatten(out), state

    return optax.GradientTransformation(init_fn, update_fn)


def per_leaf_decays(
    params: Any,
    rate: Rate,
    learning_rate: ScalarOrSchedule | None,
    mask: MaskOrFn,
    step: chex.Numeric,
    transform: str,
) -> list[chex.Numeric | None]:
    """`d_step` for each leaf in params' order, or None for leaves outside the mask."""
    spec = make_decay_spec(rate, learning_rate, transform, max_decay=None)
    masks = resolve_mask(mask, params, transform)
    return [spec.decay(r, step) if m else None for m, r in zip(masks, spec.per_leaf_rates(params))]
