"""Corrected weight decay (AdamC): a decay that scales with the square of the learning rate.

Under decoupled weight decay with a constant rate, the norm of a normalized layer's weights
settles where the growth from the updates balances the decay; that balance depends on the
learning rate, so when the learning rate is scheduled down the equilibrium norm drifts (and with
it the effective step size). Defazio et al. show that a per-step decay proportional to
`eta_t^2 / eta_max` keeps the equilibrium where it was at the peak learning rate.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from lpwd_optax import _common
from lpwd_optax._common import MaskOrFn, Rate, ScalarOrSchedule


def _corrected_learning_rate(
    learning_rate: ScalarOrSchedule, max_learning_rate: float | None, transform: str
) -> ScalarOrSchedule:
    """`eta_t^2 / eta_max`, the factor that multiplies the rate (a schedule if eta is one)."""
    if max_learning_rate is None:
        if callable(learning_rate):
            raise ValueError(
                f"{transform}: with a learning-rate schedule, pass max_learning_rate (the "
                "schedule's peak eta_max); the decay is rate * eta_t^2 / eta_max."
            )
        return learning_rate  # eta^2 / eta = eta, also when eta is 0 or traced
    if not isinstance(max_learning_rate, jax.core.Tracer):
        peak = float(max_learning_rate)
        if not peak > 0:
            raise ValueError(f"{transform}: max_learning_rate must be > 0, got {peak}.")
    if callable(learning_rate):
        return lambda t: learning_rate(t) ** 2 / max_learning_rate
    return learning_rate**2 / max_learning_rate


def corrected_weight_decay(
    rate: Rate,
    *,
    learning_rate: ScalarOrSchedule,
    max_learning_rate: float | None = None,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
    """Corrected weight decay (AdamC): decoupled decay at `rate * eta_t^2 / eta_max` per step.

    .. math::
      \\theta_{t+1} = \\theta_t + u_t - d_t \\theta_t,
      \\qquad d_t = \\lambda_t \\frac{\\eta_t^2}{\\eta_{\\max}}

    At the peak learning rate this is `weight_decay(rate, learning_rate=eta)`; as the
    schedule decays, the decay falls with `eta_t^2` instead of `eta_t`, so that the steady-state
    norm of normalized layers does not drift. Place it LAST in a chain, after the base
    optimizer. With a constant learning rate and `max_learning_rate=None` it is `weight_decay`.

    Args:
      rate: lambda; a float, a schedule, or a pytree of per-leaf floats or schedules.
      learning_rate: eta; a float or a schedule (the base optimizer's learning rate).
      max_learning_rate: eta_max, the schedule's peak (> 0). Required when `learning_rate`
        is a schedule; defaults to `learning_rate` when it is a float. Under
        `optax.inject_hyperparams`, where the learning rate arrives as a number, pass it.
      mask: a pytree of bools or a callable `params -> pytree of bools`. Defaults to
        `default_decay_mask`.

    Returns:
      An `optax.GradientTransformation` whose state is the step count, or empty when
      neither the rate nor the learning rate is a schedule.

    Example:
      >>> import jax.numpy as jnp, optax, lpwd_optax
      >>> lr = optax.linear_schedule(0.1, 0.05, 10)
      >>> tx = lpwd_optax.corrected_weight_decay(0.5, learning_rate=lr, max_learning_rate=0.1)
      >>> params = {"w": jnp.ones((2, 2))}
      >>> state = tx.init(params)
      >>> for _ in range(10):  # run the schedule down to eta = 0.05
      ...     _, state = tx.update({"w": jnp.zeros((2, 2))}, state, params)
      >>> updates, _ = tx.update({"w": jnp.zeros((2, 2))}, state, params)
      >>> round(float(updates["w"][0, 0]), 6)  # -0.5 * 0.05**2 / 0.1
      -0.0125

    References:
      Defazio et al., "Why Gradients Rapidly Increase Near the End of Training", 2025
      (arXiv:2506.02285).
    """
    name = "corrected_weight_decay"
    return _common.leafwise_transform(
        name,
        lambda u, theta, d: u - d * theta,
        mask=mask,
        rate=rate,
        learning_rate=_corrected_learning_rate(learning_rate, max_learning_rate, name),
        max_decay=1.0,
        strict=False,
    )


def adamc(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any | None = None,
    weight_decay: Rate = 1e-4,
    mask: MaskOrFn = None,
    *,
    max_learning_rate: float | None = None,
    nesterov: bool = False,
) -> optax.GradientTransformation:
    """AdamC: Adam with corrected weight decay, shaped like `optax.adamw`.

    `chain(optax.adam(learning_rate, ...), corrected_weight_decay(weight_decay,
    learning_rate=learning_rate, max_learning_rate=max_learning_rate))`: AdamW whose
    per-step decay is `weight_decay * eta_t^2 / eta_max`. Unlike `optax.adamw`, the default
    `mask` decays only leaves with ndim > 1 (`default_decay_mask`).

    Args:
      learning_rate: eta, a float or a schedule.
      b1, b2, eps, eps_root: Adam's hyperparameters, as in `optax.adam`.
      mu_dtype: the dtype of the first moment, as in `optax.adam`.
      weight_decay: lambda, a float, a schedule or a per-leaf tree.
      mask: which leaves are decayed; defaults to `default_decay_mask`.
      max_learning_rate: eta_max, the schedule's peak; required with a schedule.
      nesterov: Nesterov momentum (NAdam), as in `optax.adam`.

    Returns:
      An `optax.GradientTransformation`.

    Example:
      >>> import jax.numpy as jnp, optax, lpwd_optax
      >>> lr = optax.cosine_decay_schedule(1e-3, 100)
      >>> opt = lpwd_optax.adamc(lr, weight_decay=0.05, max_learning_rate=1e-3)
      >>> state = opt.init({"w": jnp.ones((3, 2))})

    References:
      Defazio et al., "Why Gradients Rapidly Increase Near the End of Training", 2025
      (arXiv:2506.02285).
    """
    adam = optax.adam(
        learning_rate,
        b1=b1,
        b2=b2,
        eps=eps,
        eps_root=eps_root,
        mu_dtype=mu_dtype,
        nesterov=nesterov,
    )
    decay = corrected_weight_decay(
        weight_decay, learning_rate=learning_rate, max_learning_rate=max_learning_rate, mask=mask
    )
    return optax.chain(adam, decay)
