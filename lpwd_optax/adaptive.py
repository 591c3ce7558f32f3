"""Adaptive weight decay (AdaDecay) and its randomized ablation.

Both are coupled regularizers: they add a per-entry penalty `rate * c_j * theta_j` to the
gradient, so they go FIRST in an `optax.chain`, before the optimizer.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lpwd_optax import _common
from lpwd_optax._common import MaskOrFn, Rate


class RandomizedDecayState(NamedTuple):
    """State of `randomized_weight_decay`."""

    count: chex.Array  # shape=(), dtype=jnp.int32
    key: chex.PRNGKey  # the key the next step's draws are split from


def decay_coefficients(ghat: chex.Array, alpha: chex.Numeric) -> chex.Array:
    """AdaDecay's per-entry coefficient `c = 2 / (1 + exp(-alpha * ghat))`, in (0, 2)."""
    return 2.0 * jax.nn.sigmoid(alpha * ghat)


def _standardized_magnitudes(grads: list[chex.Array], groups: list[Any]) -> list[chex.Array]:
    """`(|g| - mean_l |g|) / std_l |g|` with mean and population std over each group `l`.

    A group with zero spread gets `ghat = 0` (so `c = 1`, plain L2).
    """
    mags = [jnp.abs(g.astype(jnp.float32)) for g in grads]
    out: list[chex.Array | None] = [None] * len(mags)
    for label in dict.fromkeys(groups):
        members = [i for i, gl in enumerate(groups) if gl == label]
        count = sum(mags[i].size for i in members)
        mean = sum(jnp.sum(mags[i]) for i in members) / count
        var = sum(jnp.sum(jnp.square(mags[i] - mean)) for i in members) / count
        std = jnp.sqrt(var)
        safe_std = jnp.where(std > 0, std, 1.0)
        for i in members:
            out[i] = jnp.where(std > 0, (mags[i] - mean) / safe_std, 0.0)
    return out


def _check_alpha(alpha: Any) -> None:
    if not isinstance(alpha, jax.core.Tracer) and float(np.asarray(alpha)) < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}.")


def _coupled_penalty(
    grads_leaves, param_leaves, masks, rates, step, spec, coeffs
) -> list[chex.Array]:
    """`g + d_t * c * theta` on masked leaves; `coeffs` holds one array per masked leaf."""
    out, k = [], 0
    for g, p, m, r in zip(grads_leaves, param_leaves, masks, rates):
        if m:
            c = coeffs[k]
            k += 1
            g = (g + spec.decay(r, step) * c * p).astype(g.dtype)
        out.append(g)
    return out


def adaptive_weight_decay(
    rate: Rate,
    *,
    alpha: chex.Numeric = 4.0,
    groups: Any | None = None,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
    """AdaDecay: a per-entry L2 rate that grows with the entry's standardized gradient magnitude.

    .. math::
      \\hat g_j = \\frac{|g_j| - \\mathrm{mean}_l |g|}{\\mathrm{std}_l |g|}, \\quad
      c_j = \\frac{2}{1 + e^{-\\alpha \\hat g_j}}, \\quad
      g_j \\leftarrow g_j + \\lambda_t c_j \\theta_j

    `l` is the layer of entry `j`: one param leaf by default, or all leaves sharing a label in
    `groups` (e.g. `depth_labels(params)`). With plain SGD this is
    `w <- (1 - eta * lambda * c_j) w - eta * g_j`; `alpha = 0` gives `c = 1`, plain L2.
    Place it FIRST in a chain.

    Args:
      rate: lambda; a float, a schedule, or a pytree of per-leaf floats or schedules.
      alpha: the sigmoid's steepness, >= 0 (the paper uses 4).
      groups: optional pytree of hashable labels shaped like the params; entries of leaves with
        equal labels share the mean and std. None: each leaf is its own group.
      mask: a pytree of bools or a callable `params -> pytree of bools`; defaults to
        `default_decay_mask`.

    Returns:
      An `optax.GradientTransformation` whose state is the step count, or empty when no rate
      is a schedule.

    Example:
      >>> import jax.numpy as jnp, optax, lpwd_optax
      >>> opt = optax.chain(lpwd_optax.adaptive_weight_decay(1e-2), optax.sgd(0.1))
      >>> params = {"w": jnp.ones((2, 2))}
      >>> updates, _ = opt.update({"w": jnp.zeros((2, 2))}, opt.init(params), params)
      >>> round(float(updates["w"][0, 0]), 6)  # zero gradient spread: c = 1, plain L2
      -0.001

    References:
      Nakamura & Hong, "Adaptive Weight Decay for Deep Neural Networks" (arXiv:1907.08931).
    """
    transform = "adaptive_weight_decay"
    spec = _common.make_decay_spec(rate, None, transform, max_decay=None)
    _check_alpha(alpha)

    def group_labels(params, masks):
        if groups is None:
            return list(range(sum(masks)))
        labels = _common.flatten_like_params(groups, params, f"{transform} groups")
        return [lab for lab, m in zip(labels, masks) if m]

    def init_fn(params):
        _common.require_params(params, transform)
        masks = _common.resolve_mask(mask, params, transform)
        group_labels(params, masks)
        return _common.init_step_state(not spec.is_constant(params))  # validates the rates too

    def update_fn(updates, state, params=None):
        _common.require_params(params, transform)
        masks = _common.resolve_mask(mask, params, transform)
        leaves_g, treedef = jax.tree_util.tree_flatten(updates)
        leaves_p = treedef.flatten_up_to(params)
        ghats = _standardized_magnitudes(
            [g for g, m in zip(leaves_g, masks) if m], group_labels(params, masks)
        )
        coeffs = [decay_coefficients(gh, alpha) for gh in ghats]
        step, state = _common.step_and_advance(state)
        out = _coupled_penalty(
            leaves_g, leaves_p, masks, spec.per_leaf_rates(params), step, spec, coeffs
        )
        return treedef.unflatten(out), state

    return optax.GradientTransformation(init_fn, update_fn)


def randomized_weight_decay(
    rate: Rate,
    *,
    key: chex.PRNGKey,
    alpha: chex.Numeric = 4.0,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
    """AdaDecay's ablation: the standardized magnitude is replaced by noise, `ghat ~ N(0, 1)`.

    .. math::
      \\hat g_j \\sim \\mathcal N(0, 1), \\quad c_j = \\frac{2}{1 + e^{-\\alpha \\hat g_j}}, \\quad
      g_j \\leftarrow g_j + \\lambda_t c_j \\theta_j

    The draws come from a PRNG key kept in the state (split every step), so a run is
    reproducible. Place it FIRST in a chain.

    Args:
      rate: lambda; a float, a schedule, or a pytree of per-leaf floats or schedules.
      key: the PRNG key the draws start from.
      alpha: the sigmoid's steepness, >= 0.
      mask: a pytree of bools or a callable; defaults to `default_decay_mask`.

    Returns:
      An `optax.GradientTransformation` with `RandomizedDecayState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, lpwd_optax
      >>> reg = lpwd_optax.randomized_weight_decay(1e-2, key=jax.random.key(0))
      >>> opt = optax.chain(reg, optax.sgd(0.1))
      >>> state = opt.init({"w": jnp.ones((2, 2))})

    References:
      Nakamura & Hong, "Adaptive Weight Decay for Deep Neural Networks" (arXiv:1907.08931),
      the randomized-decay ablation.
    """
    transform = "randomized_weight_decay"
    spec = _common.make_decay_spec(rate, None, transform, max_decay=None)
    _check_alpha(alpha)

    def init_fn(params):
        _common.require_params(params, transform)
        _common.resolve_mask(mask, params, transform)
        spec.per_leaf_rates(params)
        return RandomizedDecayState(count=_common.init_count(), key=key)

    def update_fn(updates, state, params=None):
        _common.require_params(params, transform)
        masks = _common.resolve_mask(mask, params, transform)
        leaves_g, treedef = jax.tree_util.tree_flatten(updates)
        leaves_p = treedef.flatten_up_to(params)
        next_key, draw_key = jax.random.split(state.key)
        selected = [g for g, m in zip(leaves_g, masks) if m]
        keys = jax.random.split(draw_key, max(len(selected), 1))
        coeffs = [
            decay_coefficients(jax.random.normal(k, g.shape, jnp.float32), alpha)
            for k, g in zip(keys, selected)
        ]
        out = _coupled_penalty(
            leaves_g, leaves_p, masks, spec.per_leaf_rates(params), state.count, spec, coeffs
        )
        new_state = RandomizedDecayState(optax.safe_increment(state.count), next_key)
        return treedef.unflatten(out), new_state

    return optax.GradientTransformation(init_fn, update_fn)
