"""Weight decay and its variants: coupled L2, decoupled WD, real-time WD, and (layer-wise) pre-WD.

Notation (see the README): `u_t` is the base optimizer's final update at step `t` (learning rate
applied, sign included), so unregularized training is `theta_{t+1} = theta_t + u_t`. The per-step
decay is `d_t = rate(t) * learning_rate(t)` when `learning_rate` is given (the AdamW convention
the LPWD paper uses), else `d_t = rate(t)`.

Placement in an `optax.chain`: `l2_regularization` goes FIRST (it changes the gradient the
optimizer sees); `weight_decay`, `real_time_weight_decay` and `pre_weight_decay` go LAST (they
must see the optimizer's final update, like `add_decayed_weights` inside `optax.adamw`).
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import optax

from lpwd_optax import _common
from lpwd_optax._common import MaskOrFn, Rate, ScalarOrSchedule


def l2_regularization(rate: Rate, *, mask: MaskOrFn = None) -> optax.GradientTransformation:
    """Coupled L2 regularization: adds `rate * theta` to the gradient.

    .. math::
      g_t \\leftarrow g_t + \\lambda_t \\theta_t

    This is the gradient of `rate / 2 * ||theta||^2`. Place it FIRST in a chain: the optimizer
    that follows rescales the penalty together with the gradient (for Adam, this is why L2 and
    decoupled weight decay differ; for plain SGD they coincide).

    Args:
      rate: lambda; a float, a schedule `step -> float`, or a pytree of per-leaf floats or
        schedules shaped like the params.
      mask: a pytree of bools or a callable `params -> pytree of bools`; False leaves are not
        regularized. Defaults to `default_decay_mask` (no decay for ndim <= 1 leaves).

    Returns:
      An `optax.GradientTransformation` whose state is the step count, or empty when no
      rate is a schedule.

    Example:
      >>> import jax.numpy as jnp, optax, lpwd_optax
      >>> opt = optax.chain(lpwd_optax.l2_regularization(1e-2), optax.sgd(0.1))
      >>> params = {"w": jnp.ones((2, 2))}
      >>> state = opt.init(params)
      >>> updates, state = opt.update({"w": jnp.zeros((2, 2))}, state, params)
      >>> round(float(updates["w"][0, 0]), 6)
      -0.001

    References:
      Krogh & Hertz, "A Simple Weight Decay Can Improve Generalization", NeurIPS 1991.
    """
    return _common.leafwise_transform(
        "l2_regularization", lambda g, theta, d: g + d * theta, mask=mask, rate=rate
    )


def weight_decay(
    rate: Rate,
    *,
    learning_rate: ScalarOrSchedule | None = None,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
    """Decoupled weight decay (WD): subtracts `d_t * theta_t` from the final update.

    .. math::
      \\theta_{t+1} = \\theta_t + u_t - d_t \\theta_t,
      \\qquad d_t = \\lambda_t \\eta_t

    Place it LAST in a chain, after the base optimizer. `chain(optax.adam(lr),
    weight_decay(wd, learning_rate=lr))` is `optax.adamw(lr, weight_decay=wd)`. With
    `optax.contrib.schedule_free`, place it last in the chain the wrapper wraps (after its
    `scale_by_learning_rate`): it is then `schedule_free_adamw`'s weight decay, acting on the
    wrapper's iterate z; placed after the wrapper, it decays the interpolated params instead
    (the guide "Inside optax's wrappers and aliases" shows both).

    Args:
      rate: lambda; a float, a schedule, or a pytree of per-leaf floats or schedules.
      learning_rate: eta; a float or a schedule. When given, `d_t = rate * learning_rate(t)`
        (PyTorch AdamW / `optax.adamw` convention); when None, `d_t = rate`.
      mask: a pytree of bools or a callable `params -> pytree of bools`. Defaults to
        `default_decay_mask`.

    Returns:
      An `optax.GradientTransformation` whose state is the step count, or empty when no
      rate and not the learning rate is a schedule.

    Example:
      >>> import jax.numpy as jnp, optax, lpwd_optax
      >>> opt = optax.chain(optax.adam(1e-3), lpwd_optax.weight_decay(1e-2, learning_rate=1e-3))
      >>> params = {"w": jnp.ones((2, 2))}
      >>> updates, _ = opt.update({"w": jnp.ones((2, 2))}, opt.init(params), params)
      >>> round(float(updates["w"][0, 0]), 6)  # Adam's first step -lr, plus -lr * wd * theta
      -0.00101

    References:
      Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019 (arXiv:1711.05101).
    """
    # d_t = 1 is allowed: it is the limit theta_{t+1} = u_t.
    return _decoupled(
        "weight_decay", lambda u, theta, d: u - d * theta, rate, learning_rate, mask, strict=False
    )


def real_time_weight_decay(
    rate: Rate,
    *,
    learning_rate: ScalarOrSchedule | None = None,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
    """Real-time weight decay (RWD): decays the weights after the update is applied.

    .. math::
      \\theta_{t+1} = (1 - d_t)(\\theta_t + u_t)

    WD decays `theta_t`, which the update has already moved; when `u_t` points toward 0
    the penalty can push the new weights away from 0 (the "delay defect"). RWD's penalty
    `d_t (theta_t + u_t)` shrinks `|theta_t + u_t|` and never opposes (LPWD paper, eq. 7-8).
    Place it LAST in a chain.

    Args:
      rate: lambda; a float, a schedule, or a pytree of per-leaf floats or schedules.
      learning_rate: eta; when given, `d_t = rate * learning_rate(t)`.
      mask: a pytree of bools or a callable `params -> pytree of bools`. Defaults to
        `default_decay_mask`.

    Returns:
      An `optax.GradientTransformation` whose state is the step count, or empty when no
      rate and not the learning rate is a schedule.

    Example:
      >>> import jax.numpy as jnp, optax, lpwd_optax
      >>> opt = optax.chain(optax.sgd(1.0), lpwd_optax.real_time_weight_decay(0.5))
      >>> params = {"w": jnp.full((2, 2), 3.0)}
      >>> updates, _ = opt.update({"w": jnp.ones((2, 2))}, opt.init(params), params)
      >>> float(params["w"][0, 0] + updates["w"][0, 0])  # (1 - 0.5) * (3 - 1)
      1.0

    References:
      "Layer-wise Pre-Weight Decay", ICLR 2024 submission (openreview), eq. 7.
    """
    # (1 - d)(theta + u) - theta, written so that d = 0 returns u exactly.
    rule = lambda u, theta, d: u - d * (theta + u)
    return _decoupled("real_time_weight_decay", rule, rate, learning_rate, mask)


def pre_weight_decay(
    rate: Rate,
    *,
    learning_rate: ScalarOrSchedule | None = None,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
    """Pre-weight decay (PWD); with a per-leaf rate pytree, layer-wise pre-weight decay (LPWD).

    The paper's Algorithm 2 decays the weights BEFORE the forward pass and takes the gradient
    at the decayed weights:

    .. math::
      \\theta'_t = (1 - d_t)\\theta_t, \\quad g_t = \\nabla f(\\theta'_t), \\quad
      \\theta_{t+1} = \\theta'_t + u(g_t)

    An optax transform only sees gradients taken at the stored params, so the stored params
    are the pre-decayed weights `phi_t = theta'_t`, and this transform emits

    .. math::
      \\phi_{t+1} - \\phi_t = (1 - d_{t+1})(\\phi_t + u_t) - \\phi_t

    Initialise the stored params with `pre_decay_params` (`phi_0 = (1 - d_0) theta_0`) and
    recover the paper's weights `theta_t = phi_t / (1 - d_t)` with `evaluated_params` (what is
    evaluated and exported). With a constant rate, the points where gradients are taken are
    exactly RWD's, shifted by one decay. Place it LAST in a chain. For LPWD pass
    `rate=layerwise_schedule(depth_labels(params, ...), lam)`.

    Args:
      rate: lambda; a float, a schedule, or a pytree of per-leaf floats or schedules (LPWD).
      learning_rate: eta; when given, `d_t = rate * learning_rate(t)`.
      mask: a pytree of bools or a callable `params -> pytree of bools`. Defaults to
        `default_decay_mask`.

    Returns:
      An `optax.GradientTransformation` whose state is the step count, or empty when no
      rate and not the learning rate is a schedule.

    Example:
      >>> import jax.numpy as jnp, optax, lpwd_optax
      >>> rate = 0.5
      >>> opt = optax.chain(optax.sgd(1.0), lpwd_optax.pre_weight_decay(rate))
      >>> theta0 = {"w": jnp.full((2, 2), 4.0)}
      >>> phi = lpwd_optax.pre_decay_params(theta0, rate)       # (1 - 0.5) * 4 = 2
      >>> updates, _ = opt.update({"w": jnp.ones((2, 2))}, opt.init(phi), phi)
      >>> phi = optax.apply_updates(phi, updates)               # (1 - 0.5) * (2 - 1)
      >>> float(phi["w"][0, 0]), float(lpwd_optax.evaluated_params(phi, rate, 1)["w"][0, 0])
      (0.5, 1.0)

    References:
      "Layer-wise Pre-Weight Decay", ICLR 2024 submission (openreview), Algorithms 2 and 3.
    """
    # (1 - d_{t+1})(phi + u) - phi, written so that d = 0 returns u exactly.
    rule = lambda u, phi, d_next: u - d_next * (phi + u)
    return _decoupled("pre_weight_decay", rule, rate, learning_rate, mask, step_offset=1)


def _decoupled(transform, rule, rate, learning_rate, mask, *, strict=True, step_offset=0):
    """A decay that sees the final update: `d_t = rate(t) * learning_rate(t)` below 1."""
    return _common.leafwise_transform(
        transform,
        rule,
        mask=mask,
        rate=rate,
        learning_rate=learning_rate,
        step_offset=step_offset,
        max_decay=1.0,
        strict=strict,
    )


def _rescale_params(params, rate, learning_rate, mask, step, transform, fn):
    _common.check_rate(rate, learning_rate, transform, max_decay=None, strict=True)
    resolved = _common.resolve(params, transform, mask=mask, rate=rate)
    decay = jax.tree.map(lambda r: _common.decay_at(r, learning_rate, step), resolved.rate)
    return _common.map_masked(lambda p, _, d: fn(p, d), params, params, resolved.mask, decay)


def pre_decay_params(
    params: optax.Params,
    rate: Rate,
    *,
    learning_rate: ScalarOrSchedule | None = None,
    mask: MaskOrFn = None,
    step: chex.Numeric = 0,
) -> optax.Params:
    """The first pre-decay of PWD/LPWD: `phi_0 = (1 - d_0) theta_0` (masked leaves only).

    Args:
      params: the initial weights `theta_0`.
      rate, learning_rate, mask: exactly as passed to `pre_weight_decay`.
      step: the step whose decay to apply (0 at the start of training).

    Returns:
      The params to store and train with `pre_weight_decay`.

    Example:
      >>> import jax.numpy as jnp, lpwd_optax
      >>> lpwd_optax.pre_decay_params({"w": jnp.full((2, 2), 4.0)}, 0.25)["w"][0, 0]
      Array(3., dtype=float32)
    """
    return _rescale_params(
        params, rate, learning_rate, mask, step, "pre_decay_params", lambda p, d: (1 - d) * p
    )


def evaluated_params(
    params: optax.Params,
    rate: Rate,
    step: chex.Numeric,
    *,
    learning_rate: ScalarOrSchedule | None = None,
    mask: MaskOrFn = None,
) -> optax.Params:
    """The paper's weights from PWD/LPWD's stored ones: `theta_t = phi_t / (1 - d_t)`.

    These are the weights Algorithm 2 returns, evaluates and exports; the stored `phi_t` are
    the same weights already decayed for the next step's forward pass.

    Args:
      params: the stored params `phi_t` after `step` updates.
      rate, learning_rate, mask: exactly as passed to `pre_weight_decay`.
      step: the number of updates applied so far (`t`; the optimizer's count).

    Returns:
      `theta_t`, shaped like `params`.

    Example:
      >>> import jax.numpy as jnp, lpwd_optax
      >>> lpwd_optax.evaluated_params({"w": jnp.full((2, 2), 3.0)}, 0.25, 0)["w"][0, 0]
      Array(4., dtype=float32)
    """
    return _rescale_params(
        params, rate, learning_rate, mask, step, "evaluated_params", lambda p, d: p / (1 - d)
    )


def lpwd_adam(
    learning_rate: ScalarOrSchedule,
    weight_decay: Rate = 1e-2,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any | None = None,
    nesterov: bool = False,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
    """Adam with (layer-wise) pre-weight decay, as `optax.adamw` is Adam with weight decay.

    `chain(optax.adam(lr, ...), pre_weight_decay(weight_decay, learning_rate=lr))`, taking
    `optax.adamw`'s arguments. Pass a per-leaf `weight_decay` tree from `layerwise_schedule`
    for LPWD. Remember `pre_decay_params` at init and `evaluated_params` for evaluation. With
    `weight_decay=0` the updates are exactly `optax.adamw(..., weight_decay=0)`'s. Unlike
    `optax.adamw`, the default `mask` decays only leaves with ndim > 1 (`default_decay_mask`);
    pass `mask=lambda p: jax.tree.map(lambda _: True, p)` to decay every leaf.

    Args:
      learning_rate: eta, a float or a schedule.
      weight_decay: lambda, a float, a schedule or a per-leaf tree (LPWD).
      b1, b2, eps, eps_root: Adam's hyperparameters, as in `optax.adam`.
      mu_dtype: the dtype of the first moment, as in `optax.adam`.
      nesterov: Nesterov momentum (NAdam), as in `optax.adam`.
      mask: which leaves are decayed; defaults to `default_decay_mask`.

    Returns:
      An `optax.GradientTransformation`.

    Example:
      >>> import jax.numpy as jnp, lpwd_optax
      >>> opt = lpwd_optax.lpwd_adam(1e-3, 1e-2)
      >>> state = opt.init({"w": jnp.ones((2, 2))})

    References:
      "Layer-wise Pre-Weight Decay", ICLR 2024 submission (openreview).
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
    return optax.chain(adam, pre_weight_decay(weight_decay, learning_rate=learning_rate, mask=mask))
