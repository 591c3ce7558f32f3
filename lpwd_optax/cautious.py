"""Cautious weight decay: decoupled decay only where the update already shrinks the weight.

Decoupled weight decay pulls every coordinate toward zero, also those the optimizer is moving
away from zero; there the decay fights the update. Cautious weight decay (Chen et al.) keeps the
decay only on the coordinates where the optimizer's step and the decay point the same way, so it
adds no new hyperparameter and leaves the stationary points of the loss unchanged.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from lpwd_optax import _common
from lpwd_optax._common import MaskOrFn, Rate, ScalarOrSchedule


def cautious_weight_decay(
    rate: Rate,
    *,
    learning_rate: ScalarOrSchedule | None = None,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
    """Cautious weight decay (CWD): decoupled decay on the entries the update shrinks.

    With `u_t` the final update (learning rate applied, sign included), an entry is decayed
    only where `u_t` and `theta_t` have opposite signs (or `u_t` is zero), that is where the
    step moves the weight toward zero:

    .. math::
      \\theta_{t+1} = \\theta_t + u_t - d_t \\, \\mathbb{I}(u_t \\odot \\theta_t \\le 0)
        \\odot \\theta_t, \\qquad d_t = \\lambda_t \\eta_t

    The paper writes the step as `x_{t+1} = x_t - eta_t (v_t + lambda I(v_t x_t >= 0) x_t)`
    with `v_t` the optimizer's direction; here `u_t = -eta_t v_t`, so its condition
    `v_t x_t >= 0` reads `u_t theta_t <= 0`. Place it LAST in a chain, after the base
    optimizer, like `weight_decay`.

    Args:
      rate: lambda; a float, a schedule, or a pytree of per-leaf floats or schedules.
      learning_rate: eta; when given, `d_t = rate * learning_rate(t)` (AdamW convention),
        else `d_t = rate`.
      mask: a pytree of bools or a callable `params -> pytree of bools`. Defaults to
        `default_decay_mask`.

    Returns:
      An `optax.GradientTransformation` whose state is the step count, or empty when
      neither the rate nor the learning rate is a schedule.

    Example:
      >>> import jax.numpy as jnp, optax, lpwd_optax
      >>> opt = optax.chain(optax.sgd(1.0), lpwd_optax.cautious_weight_decay(0.5))
      >>> params = {"w": jnp.array([[2.0, 2.0], [2.0, 2.0]])}
      >>> grads = {"w": jnp.array([[1.0, -1.0], [1.0, -1.0]])}  # toward 0, then away from 0
      >>> updates, _ = opt.update(grads, opt.init(params), params)
      >>> updates["w"][0].tolist()  # [-1 - 0.5 * 2, +1 with no decay]
      [-2.0, 1.0]

    References:
      Chen et al., "Cautious Weight Decay", 2025 (arXiv:2510.12402), Algorithm 1.
    """

    def rule(u, theta, d):
        return u - d * jnp.where(u * theta <= 0, theta, jnp.zeros_like(theta))

    # d_t = 1 is allowed, as for weight_decay: the decayed entries become u_t.
    return _common.leafwise_transform(
        "cautious_weight_decay",
        rule,
        mask=mask,
        rate=rate,
        learning_rate=learning_rate,
        max_decay=1.0,
        strict=False,
    )
