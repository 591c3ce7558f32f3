"""Diagnostics: the opposing-penalty rate R_op, per-layer norms, and the Jacobian norm."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

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


class JacobianNorm(NamedTuple):
    """An estimate of the mean squared Frobenius norm of the input-output Jacobian."""

    mean: chex.Array  # the estimate, averaged over the inputs
    stderr: chex.Array  # its standard error over the random projections
    num_probes: int


def jacobian_norm(
    apply_fn: Callable[[Any, chex.Array], chex.Array],
    params: Any,
    inputs: chex.Array,
    key: chex.PRNGKey,
    *,
    num_probes: int = 8,
) -> JacobianNorm:
    """Mean over `inputs` of `||d f(x) / d x||_F^2`, estimated with random projections.

    For one input `x` with Jacobian `J` (outputs x input entries) and a probe `v ~ N(0, I)` over
    the outputs, `E ||J^T v||^2 = tr(J J^T) = ||J||_F^2`, so each probe gives an unbiased
    estimate. One `jax.vjp` of the batched function gives `J_i^T v_i` for every input at once
    (inputs must not interact in `apply_fn`: evaluation mode). The weight-decay paper of Zhang
    et al. relates this norm to the generalization effect of weight decay (its second
    mechanism).

    Args:
      apply_fn: `apply_fn(params, inputs) -> outputs`, the batch axis first on both.
      params: the model's params.
      inputs: a batch of inputs `(B, ...)`.
      key: PRNG key of the probes.
      num_probes: probes per input; the standard error is taken over the probes' batch means.

    Returns:
      A `JacobianNorm` with the estimate and its standard error (NaN for one probe).

    Example:
      >>> import jax, jax.numpy as jnp, lpwd_optax
      >>> w = jnp.array([[1.0, 2.0], [0.0, 3.0]])  # f(x) = x @ w, ||J||_F^2 = 14
      >>> est = lpwd_optax.jacobian_norm(lambda w, x: x @ w, w, jnp.ones((4, 2)),
      ...                                jax.random.key(0), num_probes=4096)
      >>> bool(abs(est.mean - 14.0) < 5 * est.stderr)
      True

    References:
      Zhang, Wang, Xu & Grosse, "Three Mechanisms of Weight Decay Regularization", ICLR 2019
      (arXiv:1810.12281).
    """
    outputs, vjp = jax.vjp(lambda x: apply_fn(params, x), inputs)
    batch = inputs.shape[0]

    def probe(k):
        v = jax.random.normal(k, outputs.shape, outputs.dtype)
        (jt_v,) = vjp(v)
        return jnp.sum(jnp.square(jt_v.astype(jnp.float32))) / batch

    samples = jax.lax.map(probe, jax.random.split(key, num_probes))
    mean = jnp.mean(samples)
    stderr = (
        jnp.std(samples, ddof=1) / jnp.sqrt(num_probes)
        if num_probes > 1
        else jnp.array(jnp.nan, jnp.float32)
    )
    return JacobianNorm(mean, stderr, num_probes)
