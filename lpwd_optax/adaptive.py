"""Adaptive weight decay (AdaDecay) and its randomized ablation.

Both are coupled regularizers: they add a per-entry penalty `rate * c_j * theta_j` to the
gradient, so they go FIRST in an `optax.chain`, before the optimizer.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from lpwd_optax import _common, structure
from lpwd_optax._common import MaskOrFn, Rate
from lpwd_optax.structure import LayerStructure


class RandomizedDecayState(NamedTuple):
    """State of `randomized_weight_decay`."""

    count: chex.Array  # shape=(), dtype=jnp.int32
    key: chex.PRNGKey  # the key the next step's draws are split from


def decay_coefficients(ghat: chex.Array, alpha: chex.Numeric) -> chex.Array:
    """AdaDecay's per-entry coefficient `c = 2 / (1 + exp(-alpha * ghat))`, in (0, 2)."""
    return _two_sigmoid(alpha * jnp.asarray(ghat, jnp.float32))


def _two_sigmoid(x: chex.Array) -> chex.Array:
    """`2 / (1 + exp(-x))` from multiplies, adds, a floor and a bit shift (4e-7 relative).

    XLA never copies a transcendental op (exp, logistic, divide) into more than one consumer.
    AdaDecay's penalty feeds both of Adam's moment updates, which XLA:CPU runs as two passes,
    so `2 * jax.nn.sigmoid(x)` would be written to memory (a param-sized temporary per leaf)
    and read back twice. Built from cheap ops, the coefficient is recomputed inside each pass.
    """
    t = _exp_of_nonpositive(-jnp.abs(x))  # e^{-|x|}, in (0, 1]
    z = 1.0 + t
    # 1/z on [1, 2] to 1/99 relative (the minimax quadratic); two Newton steps square the
    # error twice, to 1e-8.
    r = 70.0 / 33.0 + z * (-16.0 / 11.0 + z * (32.0 / 99.0))
    for _ in range(2):
        r = r * (2.0 - z * r)
    return jnp.where(x >= 0, 2.0 * r, 2.0 * t * r)  # sigmoid(-|x|) = e^{-|x|} sigmoid(|x|)


# e^r = 1 + r q(r) on |r| <= ln(2) / 2, q of degree 4 fitted at Chebyshev nodes: 2e-7 relative,
# and exactly 1 at r = 0 (so that c = 1 where ghat = 0).
_EXP_COEFFICIENTS = (1.0, 0.9999995, 0.49999142, 0.16668114, 0.04189875, 0.008261533)


def _exp_of_nonpositive(x: chex.Array) -> chex.Array:
    """`e^x` for `x <= 0`: `2^n` from the exponent bits times a polynomial in `r = x - n ln 2`."""
    x = jnp.maximum(x, -87.0)  # e^-87 is near float32's smallest normal; NaN stays NaN
    n = jnp.floor(x * 1.4426950408889634 + 0.5)
    r = x - n * 0.693145751953125 - n * 1.4286068203094173e-06  # ln 2 in two parts
    p = _EXP_COEFFICIENTS[-1]
    for c in reversed(_EXP_COEFFICIENTS[:-1]):
        p = p * r + c
    return p * lax.bitcast_convert_type((n.astype(jnp.int32) + 127) << 23, jnp.float32)


class MagnitudeStatistics(NamedTuple):
    """Mean and reciprocal population std of `|g|` over a group of entries."""

    mean: chex.Array  # shape=() or, per slice of a stacked leaf, 1 on the other axes
    inv_std: chex.Array  # like mean; 0 for a group with zero spread, so that ghat = 0


def _statistics(total: chex.Array, total_sq: chex.Array, count: int) -> MagnitudeStatistics:
    """From `sum |g|` and `sum g^2` over `count` entries: `std^2 = E[g^2] - mean^2`."""
    mean = total / count
    std = jnp.sqrt(jnp.maximum(total_sq / count - jnp.square(mean), 0.0))
    return MagnitudeStatistics(mean, jnp.where(std > 0, 1.0 / jnp.where(std > 0, std, 1.0), 0.0))


def _layer_statistics(
    grads: list[chex.Array], layouts: list[Any], labels: list[Any] | None
) -> list[MagnitudeStatistics]:
    """Statistics per layer, one read of each gradient: every leaf, and every slice of a
    stacked leaf, is a layer of its own, or, with `labels` (a label per leaf, or an array of
    labels over its slices), the slices sharing a label are one group."""
    sums = []
    for g, layout in zip(grads, layouts):
        axes = layout.slice_axes
        count = math.prod(g.shape[a] for a in axes)
        # `maximum(g, -g)` rather than `abs(g)`: XLA would merge an `abs` here with the one in
        # the penalty pass and write |g| to memory for both.
        abs_sum = jnp.sum(jnp.maximum(g, -g), axis=axes, keepdims=True, dtype=jnp.float32)
        sq_sum = jnp.sum(jnp.square(g.astype(jnp.float32)), axis=axes, keepdims=True)
        sums.append((count, abs_sum, sq_sum))

    if labels is None:
        return [_statistics(s1, s2, n) for n, s1, s2 in sums]
    slice_labels = [
        np.broadcast_to(np.asarray(label), s1.shape) for label, (_, s1, _) in zip(labels, sums)
    ]
    values = sorted({v.item() for lab in slice_labels for v in lab.ravel()}, key=repr)
    totals = []
    for v in values:
        # The leaves with a slice in group v, in leaf order; the others add nothing.
        members = [(lab == v, *s) for lab, s in zip(slice_labels, sums) if np.any(lab == v)]
        n = sum(c * int(np.sum(m)) for m, c, _, _ in members)
        s1 = sum(jnp.sum(jnp.where(m, a, 0.0)) for m, _, a, _ in members)
        s2 = sum(jnp.sum(jnp.where(m, b, 0.0)) for m, _, _, b in members)
        totals.append(_statistics(s1, s2, n))
    means, invs = jnp.stack([m for m, _ in totals]), jnp.stack([i for _, i in totals])
    index = {v: k for k, v in enumerate(values)}
    out = []
    for lab in slice_labels:
        idx = np.vectorize(lambda v: index[v], otypes=[np.int32])(lab)
        out.append(MagnitudeStatistics(means[idx], invs[idx]))
    return out


def _standardized(g: chex.Array, stats: MagnitudeStatistics) -> chex.Array:
    """`ghat = (|g| - mean) / std` (0 where the group has no spread)."""
    return (jnp.abs(g.astype(jnp.float32)) - stats.mean) * stats.inv_std


def _check_alpha(alpha: Any) -> None:
    if not isinstance(alpha, jax.core.Tracer) and float(np.asarray(alpha)) < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}.")


def adaptive_weight_decay(
    rate: Rate,
    *,
    alpha: chex.Numeric = 4.0,
    groups: Any | None = None,
    mask: MaskOrFn = None,
    layers: LayerStructure | None = None,
) -> optax.GradientTransformation:
    """AdaDecay: a per-entry L2 rate that grows with the entry's standardized gradient magnitude.

    .. math::
      \\hat g_j = \\frac{|g_j| - \\mathrm{mean}_l |g|}{\\mathrm{std}_l |g|}, \\quad
      c_j = \\frac{2}{1 + e^{-\\alpha \\hat g_j}}, \\quad
      g_j \\leftarrow g_j + \\lambda_t c_j \\theta_j

    `l` is the layer of entry `j`: one param leaf by default, or all leaves sharing a label in
    `groups` (e.g. `depth_labels(params)`). With `layers` (a `LayerStructure`), every slice of a
    stacked leaf is a layer of its own (and `groups` may hold arrays of labels over a stacked
    leaf's slices, as `depth_labels` gives). With plain SGD this is
    `w <- (1 - eta * lambda * c_j) w - eta * g_j`; `alpha = 0` gives `c = 1`, plain L2.
    Place it FIRST in a chain.

    Args:
      rate: lambda; a float, a schedule, or a pytree of per-leaf floats or schedules.
      alpha: the sigmoid's steepness, >= 0 (the paper uses 4).
      groups: optional pytree of hashable labels shaped like the params; entries of leaves with
        equal labels share the mean and std. None: each leaf is its own group.
      mask: a pytree of bools or a callable `params -> pytree of bools`; defaults to
        `default_decay_mask`, or with `layers` to its `decay_mask`.
      layers: optional `LayerStructure` of the params (from `layer_structure`).

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
    _check_alpha(alpha)
    name = "adaptive_weight_decay"
    per_layer = structure.resolve_layers(layers, mask, name)

    def magnitude_statistics(grads, params, resolved):
        # Mean and std of |g| per layer of the masked leaves, or over those sharing a label.
        leaves, treedef = jax.tree.flatten(grads)
        layouts = per_layer.layouts(params)
        chosen = [i for i, m in enumerate(treedef.flatten_up_to(resolved.mask)) if m]
        labels = None
        if groups is not None:
            labels = [treedef.flatten_up_to(resolved.extra["groups"])[i] for i in chosen]
        per_leaf = _layer_statistics(
            [leaves[i] for i in chosen], [layouts[i] for i in chosen], labels
        )
        stats: list[MagnitudeStatistics | None] = [None] * len(leaves)
        for i, st in zip(chosen, per_leaf):
            stats[i] = st
        return treedef.unflatten(stats)

    def penalty(g, theta, d, stats):
        # alpha * ghat = |g| * A - B with per-layer A and B: one multiply-add per entry.
        scale = alpha * stats.inv_std
        c = _two_sigmoid(jnp.abs(g.astype(jnp.float32)) * scale - scale * stats.mean)
        return g + d * c * theta

    return _common.leafwise_transform(
        name,
        penalty,
        mask=per_layer.mask,
        rate=rate,
        extra={"groups": groups},
        leaf_inputs=magnitude_statistics,
        check_params=per_layer.layouts,
    )


def randomized_weight_decay(
    rate: Rate,
    *,
    key: chex.PRNGKey,
    alpha: chex.Numeric = 4.0,
    mask: MaskOrFn = None,
    layers: LayerStructure | None = None,
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
      mask: a pytree of bools or a callable; defaults to `default_decay_mask`, or with
        `layers` to its `decay_mask`.
      layers: optional `LayerStructure` of the params; the draws are per entry, so the layer
        structure only sets the default mask.

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
    _common.check_rate(rate, None, transform, max_decay=None, strict=True)
    _check_alpha(alpha)
    mask = structure.resolve_layers(layers, mask, transform).mask

    def penalty(g, theta, d, ghat):
        return g + d * decay_coefficients(ghat, alpha) * theta

    def init_fn(params):
        if params is None or jax.tree.leaves(params):  # not tree_map_params' placeholder
            _common.require_params(params, transform)
            _common.resolve(params, transform, mask=mask, rate=rate)
        return RandomizedDecayState(count=_common.init_count(), key=key)

    def update_fn(updates, state, params=None):
        _common.require_params(params, transform)
        resolved = _common.resolve(params, transform, mask=mask, rate=rate)
        next_key, draw_key = jax.random.split(state.key)
        keys = optax.tree_utils.tree_split_key_like(draw_key, updates)
        draw = lambda k, g, m: jax.random.normal(k, g.shape, jnp.float32) if m else None
        ghat = jax.tree.map(draw, keys, updates, resolved.mask)
        decay = jax.tree.map(lambda r: _common.decay_at(r, None, state.count), resolved.rate)
        out = _common.map_masked(penalty, updates, params, resolved.mask, decay, ghat)
        return out, RandomizedDecayState(optax.safe_increment(state.count), next_key)

    return optax.GradientTransformation(init_fn, update_fn)
