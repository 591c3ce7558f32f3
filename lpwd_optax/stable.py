"""Stable weight decay (AdamS): Adam's decoupled decay divided by its mean second moment.

With Adam, the update size is normalized by `sqrt(v_hat)` but decoupled decay is not, so the
ratio of decay to update grows wherever the gradients are small; Xie et al. show that this
makes the weight norm and the effective learning rate unstable late in training. Stable weight
decay scales the decay by `1 / sqrt(mean(v_hat))`, one number over all params, so the decay
moves with the optimizer's own normalization.

The decay needs the inner optimizer's second moment, so like `project_scale_invariant` it wraps
the optimizer instead of following it in a chain.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lpwd_optax import _common
from lpwd_optax._common import MaskOrFn, Rate, ScalarOrSchedule


class StableDecayState(NamedTuple):
    """State of `stable_weight_decay`: the wrapped optimizer's, and a step count when the
    decay depends on the step."""

    inner_state: optax.OptState
    decay_state: _common.CountState | optax.EmptyState


def _is_record(x: Any) -> bool:
    # An optimizer state record: a NamedTuple, i.e. a tuple whose type declares its fields.
    return isinstance(x, tuple) and isinstance(getattr(type(x), "_fields", None), tuple)


def _records(tree: Any) -> list[Any]:
    """Every NamedTuple inside an optimizer state, outermost first."""
    found = []

    def visit(node):
        if _is_record(node):
            found.append(node)
        for child in jax.tree.leaves(node, is_leaf=lambda x: x is not node and _is_record(x)):
            if _is_record(child):
                visit(child)

    visit(tree)
    return found


def _describe(record: Any) -> str:
    return f"{type(record).__name__}({', '.join(record._fields)})"


def _not_a_second_moment(record: Any, params: Any) -> str | None:
    """Why a record with `count` and `nu` fields holds no second moment of `params`, or None
    when it holds one: `nu` has the params' paths and, leaf for leaf, their shapes."""
    if isinstance(record, optax.contrib.SophiaState):
        return f"{_describe(record)}, whose nu estimates the Hessian diagonal"
    want = [(path, np.shape(p)) for path, p in _common.leaves_with_paths(params)]
    got = [(path, np.shape(v)) for path, v in _common.leaves_with_paths(record.nu)]
    for (path, shape), (nu_path, nu_shape) in zip(want, got):
        if (nu_path, nu_shape) != (path, shape):
            return (
                f"{_describe(record)}, whose nu holds '{nu_path}' of shape {nu_shape} where the "
                f"params hold '{path}' of shape {shape}"
            )
    if len(got) != len(want):
        return f"{_describe(record)}, whose nu has {len(got)} leaves for {len(want)} params"
    return None


def _second_moment(inner_state: Any, params: Any, transform: str) -> tuple[chex.Array, Any]:
    """(count, nu) of the one second moment inside `inner_state`; a ValueError otherwise."""
    records = _records(inner_state)
    accepted, rejected = [], []
    for record in records:
        if {"count", "nu"} <= set(record._fields):
            why = _not_a_second_moment(record, params)
            if why is None:
                accepted.append(record)
            else:
                rejected.append(why)
    if len(accepted) == 1:
        return accepted[0].count, accepted[0].nu
    if len(accepted) > 1:
        found = [_describe(x) for x in accepted]
    else:
        found = rejected or list(dict.fromkeys(_describe(x) for x in records)) or ["no NamedTuple"]
    raise ValueError(
        f"{transform} needs an inner optimizer whose state holds exactly one second moment: "
        "a NamedTuple with a step `count` and a tree `nu` of moving averages of squared "
        "gradients shaped leaf for leaf like the params (optax.scale_by_adam's "
        f"ScaleByAdamState, as in optax.adam); found {len(accepted)} ({'; '.join(found)})."
    )


def _mean_second_moment(count: chex.Array, nu: Any, b2: float) -> chex.Array:
    """mean(v_hat) over every entry of every leaf, v_hat = nu / (1 - b2^count), in float32
    (or wider, for wider moments)."""
    leaves = jax.tree.leaves(nu)
    dtype = jnp.result_type(jnp.float32, *leaves)
    total = sum(jnp.sum(x.astype(dtype)) for x in leaves)
    size = sum(x.size for x in leaves)
    return total / size / (1 - b2 ** count.astype(dtype))


def stable_weight_decay(
    inner: optax.GradientTransformation,
    weight_decay: Rate,
    *,
    b2: float,
    learning_rate: ScalarOrSchedule | None = None,
    eps: float = 1e-8,
    mask: MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
    """Stable weight decay around an Adam-like optimizer: decay over `sqrt(mean(v_hat))`.

    With `u_t` the inner optimizer's update and `v_hat_t = nu_t / (1 - b2^t)` its
    bias-corrected second moment after this step,

    .. math::
      \\theta_{t+1} = \\theta_t + u_t - \\frac{d_t}{\\sqrt{\\bar v_t} + \\epsilon}\\,\\theta_t,
      \\qquad \\bar v_t = \\operatorname{mean}(\\hat v_t), \\quad d_t = \\lambda_t \\eta_t

    The mean runs over every entry of every param (decayed or not), as in the paper and its
    reference implementation; only masked leaves are decayed.

    Requirements on `inner`: its state must hold exactly one second moment, a NamedTuple
    with the fields `count` (the step count) and `nu` (moving averages of squared gradients
    shaped leaf for leaf like the params), which is what `optax.scale_by_adam` keeps (so
    `optax.adam`, `optax.nadam`, `optax.adamw` with `weight_decay=0`, or a chain holding
    `scale_by_adam`), and `b2` must be the decay rate with which it updates `nu`. Anything
    else is one ValueError at `init` naming what the state holds instead: no `count`
    (`optax.rmsprop`, `optax.sm3`), a `nu` of another shape (`optax.novograd`'s one scalar
    per leaf), or two second moments. A Hessian estimate is not a second moment: the `nu`
    that `optax.contrib.sophia` keeps is a moving average of the Hessian's diagonal, and
    sophia is refused too.

    Extra arguments of `update` (`value=` for `optax.contrib.reduce_on_plateau`, as
    `optax.chain` and `optax.MultiSteps` pass them) go to `inner`.

    Args:
      inner: the Adam-like optimizer, with its learning rate applied (e.g. `optax.adam(lr)`).
      weight_decay: lambda; a float, a schedule or a per-leaf tree.
      b2: the inner optimizer's second-moment decay rate, for the bias correction.
      learning_rate: eta; when given, `d_t = weight_decay * learning_rate(t)` (AdamW
        convention), else `d_t = weight_decay`.
      eps: added to `sqrt(mean(v_hat))`.
      mask: which leaves are decayed; defaults to `default_decay_mask`.

    Returns:
      An `optax.GradientTransformationExtraArgs` whose state holds `inner`'s state and a
      step count when the decay depends on the step.

    Example:
      >>> import jax.numpy as jnp, optax, lpwd_optax
      >>> opt = lpwd_optax.stable_weight_decay(optax.adam(0.1), 0.5, b2=0.999, learning_rate=0.1)
      >>> params = {"w": jnp.ones((2, 2))}
      >>> grads = {"w": jnp.full((2, 2), 4.0)}  # v_hat = 16 after one step
      >>> updates, _ = opt.update(grads, opt.init(params), params)
      >>> round(float(updates["w"][0, 0]), 5)  # Adam's -0.1, minus 0.5 * 0.1 / 4 * 1
      -0.1125

    References:
      Xie et al., "On the Overlooked Pitfalls of Weight Decay and How to Mitigate Them: A
      Gradient-Norm Perspective", NeurIPS 2023 (arXiv:2011.11152).
    """
    name = "stable_weight_decay"
    inner = optax.with_extra_args_support(inner)
    _common.check_scalar_rate(eps, f"{name} eps")
    _common.check_scalar_rate(b2, f"{name} b2", upper=1.0)
    _common.check_rate(weight_decay, learning_rate, name, max_decay=None, strict=False)
    counted = _common.is_scheduled(weight_decay, learning_rate)

    def resolved_for(params):
        return _common.checked_resolution(
            params, name, mask=mask, rate=weight_decay, learning_rate=learning_rate
        )

    def init_fn(params):
        checked = params is None or jax.tree.leaves(params)
        if checked:
            resolved_for(params)
        inner_state = inner.init(params)
        if checked:
            _second_moment(inner_state, params, name)
        return StableDecayState(inner_state, _common.init_step_state(counted))

    def update_fn(grads, state, params=None, **extra_args):
        resolved = resolved_for(params)
        updates, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
        count, nu = _second_moment(inner_state, params, name)
        scale = 1.0 / (jnp.sqrt(_mean_second_moment(count, nu, b2)) + eps)
        step, decay_state = _common.step_and_advance(state.decay_state)
        decay = jax.tree.map(lambda r: _common.decay_at(r, learning_rate, step), resolved.rate)

        def rule(u, theta, d):
            return u - (d * scale) * theta.astype(jnp.promote_types(theta.dtype, jnp.float32))

        updates = _common.map_masked(rule, updates, params, resolved.mask, decay)
        return updates, StableDecayState(inner_state, decay_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adams(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: Rate = 1e-4,
    *,
    mu_dtype: Any | None = None,
    mask: MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
    """AdamS: Adam with stable weight decay, shaped like `optax.adamw`.

    `stable_weight_decay(optax.adam(learning_rate, b1, b2, eps), weight_decay, b2=b2,
    learning_rate=learning_rate, eps=eps)`: the per-step decay is `weight_decay * eta_t /
    (sqrt(mean(v_hat_t)) + eps)`. Unlike `optax.adamw`, the default `mask` decays only
    leaves with ndim > 1 (`default_decay_mask`).

    Args:
      learning_rate: eta, a float or a schedule.
      b1, b2, eps: Adam's hyperparameters; `eps` also guards the decay's denominator.
      weight_decay: lambda, a float, a schedule or a per-leaf tree.
      mu_dtype: the dtype of the first moment, as in `optax.adam`.
      mask: which leaves are decayed; defaults to `default_decay_mask`.

    Returns:
      An `optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp, lpwd_optax
      >>> opt = lpwd_optax.adams(1e-3, weight_decay=5e-4)
      >>> state = opt.init({"w": jnp.ones((3, 2))})

    References:
      Xie et al., "On the Overlooked Pitfalls of Weight Decay and How to Mitigate Them: A
      Gradient-Norm Perspective", NeurIPS 2023 (arXiv:2011.11152).
    """
    inner = optax.adam(learning_rate, b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype)
    return stable_weight_decay(
        inner, weight_decay, b2=b2, learning_rate=learning_rate, eps=eps, mask=mask
    )
