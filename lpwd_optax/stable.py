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
import optax

from lpwd_optax import _common
from lpwd_optax._common import MaskOrFn, Rate, ScalarOrSchedule


class StableDecayState(NamedTuple):
    """State of `stable_weight_decay`: the wrapped optimizer's, and a step count when the
    decay depends on the step."""

    inner_state: optax.OptState
    decay_state: _common.CountState | optax.EmptyState


def _is_second_moment_state(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "nu") and hasattr(x, "count")


def _second_moment(inner_state: Any, params: Any, transform: str) -> tuple[chex.Array, Any]:
    """(count, nu) of the one Adam-like state inside `inner_state`; a ValueError otherwise."""
    found = [
        x
        for x in jax.tree.leaves(inner_state, is_leaf=_is_second_moment_state)
        if _is_second_moment_state(x)
    ]
    if len(found) != 1:
        raise ValueError(
            f"{transform} needs an inner optimizer whose state holds exactly one Adam-like "
            "second moment: a NamedTuple with a step `count` and a tree `nu` of "
            "exponential moving averages of squared gradients shaped like the params (as "
            f"optax.scale_by_adam's ScaleByAdamState, inside optax.adam); found {len(found)}."
        )
    (state,) = found
    if params is not None and jax.tree.leaves(params):
        _common.flatten_like_params(state.nu, params, f"{transform}: the inner state's nu")
    return state.count, state.nu


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
) -> optax.GradientTransformation:
    """Stable weight decay around an Adam-like optimizer: decay over `sqrt(mean(v_hat))`.

    With `u_t` the inner optimizer's update and `v_hat_t = nu_t / (1 - b2^t)` its
    bias-corrected second moment after this step,

    .. math::
      \\theta_{t+1} = \\theta_t + u_t - \\frac{d_t}{\\sqrt{\\bar v_t} + \\epsilon}\\,\\theta_t,
      \\qquad \\bar v_t = \\operatorname{mean}(\\hat v_t), \\quad d_t = \\lambda_t \\eta_t

    The mean runs over every entry of every param (decayed or not), as in the paper and its
    reference implementation; only masked leaves are decayed.

    Requirements on `inner`: its state must hold exactly one NamedTuple with the fields
    `count` (the step count) and `nu` (a tree shaped like the params), which is what
    `optax.scale_by_adam` keeps (so `optax.adam`, `optax.nadam`, `optax.adamw` with
    `weight_decay=0`, or a chain holding `scale_by_adam`), and `b2` must be the decay rate
    with which it updates `nu`. Anything else is a ValueError at `init`.

    Args:
      inner: the Adam-like optimizer, with its learning rate applied (e.g. `optax.adam(lr)`).
      weight_decay: lambda; a float, a schedule or a per-leaf tree.
      b2: the inner optimizer's second-moment decay rate, for the bias correction.
      learning_rate: eta; when given, `d_t = weight_decay * learning_rate(t)` (AdamW
        convention), else `d_t = weight_decay`.
      eps: added to `sqrt(mean(v_hat))`.
      mask: which leaves are decayed; defaults to `default_decay_mask`.

    Returns:
      An `optax.GradientTransformation` whose state holds `inner`'s state and a step count
      when the decay depends on the step.

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

    def update_fn(grads, state, params=None):
        resolved = resolved_for(params)
        updates, inner_state = inner.update(grads, state.inner_state, params)
        count, nu = _second_moment(inner_state, None, name)
        scale = 1.0 / (jnp.sqrt(_mean_second_moment(count, nu, b2)) + eps)
        step, decay_state = _common.step_and_advance(state.decay_state)
        decay = jax.tree.map(lambda r: _common.decay_at(r, learning_rate, step), resolved.rate)

        def rule(u, theta, d):
            return u - (d * scale) * theta.astype(jnp.promote_types(theta.dtype, jnp.float32))

        updates = _common.map_masked(rule, updates, params, resolved.mask, decay)
        return updates, StableDecayState(inner_state, decay_state)

    return optax.GradientTransformation(init_fn, update_fn)


def adams(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: Rate = 1e-4,
    *,
    mu_dtype: Any | None = None,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
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
      An `optax.GradientTransformation`.

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
