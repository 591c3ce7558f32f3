"""Diagnostics: the opposing-penalty rate R_op and per-layer norms for logging."""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax

from lpwd_optax import _common


def penalties(updates: optax.Updates, regularized_updates: optax.Updates) -> optax.Updates:
    """The penalty `P = u - u'` a LAST-placed transform applied: `theta_{t+1} = theta + u - P`.

    Args:
      updates: `u`, the base optimizer's update (the transform's input).
      regularized_updates: `u'`, the transform's output.

    Returns:
      `P`, shaped like the updates.
    """
    return jax.tree.map(lambda u, r: u - r, updates, regularized_updates)


def opposing_penalty_rate(
    params: optax.Params, updates: optax.Updates, penalties: optax.Updates
) -> chex.Array:
    """R_op: the share of penalty mass that pushes weights away from zero.

    An entry receives an opposing penalty when the penalty increases its magnitude after the
    update:

    .. math::
      (\\theta_j + u_j - P_j)^2 > (\\theta_j + u_j)^2, \\qquad
      R_{op} = \\frac{\\sum_{j\\ \\mathrm{opposing}} |P_j|}{\\sum_j |P_j|}

    WD's penalty `d_t theta_t` opposes when the update has crossed zero; RWD's
    `d_t (theta_t + u_t)` never does. Returns 0 when there is no penalty at all.

    Args:
      params: `theta_t`.
      updates: `u_t`, the base optimizer's update before the penalty.
      penalties: `P_t`, e.g. from `penalties(u, u')`.

    Returns:
      A float32 scalar in [0, 1].

    Example:
      >>> import jax.numpy as jnp, lpwd_optax
      >>> theta, u = {"w": jnp.array([1.0, 1.0])}, {"w": jnp.array([-0.5, -1.5])}
      >>> p = {"w": 0.1 * theta["w"]}                      # WD's penalty
      >>> float(lpwd_optax.opposing_penalty_rate(theta, u, p))  # entry 1 crossed zero
      0.5

    References:
      "Layer-wise Pre-Weight Decay", ICLR 2024 submission (openreview), eq. 10-11.
    """
    opposing, total = jnp.zeros([], jnp.float32), jnp.zeros([], jnp.float32)
    for theta, u, p in zip(
        jax.tree.leaves(params), jax.tree.leaves(updates), jax.tree.leaves(penalties)
    ):
        moved = theta.astype(jnp.float32) + u.astype(jnp.float32)
        p = p.astype(jnp.float32)
        mass = jnp.abs(p)
        opposing += jnp.sum(jnp.where(jnp.square(moved - p) > jnp.square(moved), mass, 0.0))
        total += jnp.sum(mass)
    return jnp.where(total > 0, opposing / jnp.where(total > 0, total, 1.0), 0.0)


def module_path(path: str) -> str:
    """The module a leaf belongs to: its path without the leaf name (`a/b/kernel` -> `a/b`)."""
    return path.rsplit("/", 1)[0] if "/" in path else path


def layer_statistics(
    params: optax.Params, updates: optax.Updates
) -> dict[str, dict[str, chex.Array]]:
    """Per-module weight norm, update norm and effective step `||u|| / ||theta||`.

    The effective step is the "effective learning rate" through which weight decay acts on
    scale-invariant layers (Zhang et al.). Cheap reductions: log them every N steps.

    Args:
      params: `theta_t`.
      updates: the final updates `u_t` (what `optax.apply_updates` adds).

    Returns:
      `{module_path: {"weight_norm", "update_norm", "effective_step"}}`, float32 scalars.

    Example:
      >>> import jax.numpy as jnp, lpwd_optax
      >>> stats = lpwd_optax.layer_statistics({"fc": {"kernel": jnp.ones((2, 2))}},
      ...                                     {"fc": {"kernel": jnp.full((2, 2), 0.1)}})
      >>> round(float(stats["fc"]["effective_step"]), 6)
      0.1

    References:
      Zhang et al., "Three Mechanisms of Weight Decay Regularization" (arXiv:1810.12281).
    """
    sq_w: dict[str, Any] = {}
    sq_u: dict[str, Any] = {}
    for (path, theta), u in zip(_common.leaves_with_paths(params), jax.tree.leaves(updates)):
        key = module_path(path)
        sq_w[key] = sq_w.get(key, 0.0) + jnp.sum(jnp.square(theta.astype(jnp.float32)))
        sq_u[key] = sq_u.get(key, 0.0) + jnp.sum(jnp.square(u.astype(jnp.float32)))
    stats = {}
    for key in sq_w:
        w, u = jnp.sqrt(sq_w[key]), jnp.sqrt(sq_u[key])
        stats[key] = {
            "weight_norm": w,
            "update_norm": u,
            "effective_step": jnp.where(w > 0, u / jnp.where(w > 0, w, 1.0), 0.0),
        }
    return stats
