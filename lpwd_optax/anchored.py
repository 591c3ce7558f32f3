"""Decoupled weight decay toward the starting weights (the decoupled form of L2-SP).

Fine-tuning starts from weights that already encode something worth keeping. Plain weight decay
pulls every weight toward zero, and so away from what pretraining learned; L2-SP (Li et al.)
penalizes the distance to the starting point instead. Decoupled as AdamW decouples L2, the
penalty becomes a shrink of `theta - theta_0` after the optimizer's step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import optax

from lpwd_optax import _common
from lpwd_optax._common import MaskOrFn, Rate, ScalarOrSchedule


class DecayToInitState(NamedTuple):
    """State of `decay_to_init`."""

    count: chex.Array  # shape=(), dtype=jnp.int32: the 0-based index of the next update
    init_params: Any  # the weights decayed toward, shaped like the params


def decay_to_init(
    rate: Rate,
    *,
    learning_rate: ScalarOrSchedule | None = None,
    mask: MaskOrFn = None,
    init_params: Any = None,
) -> optax.GradientTransformation:
    """Decoupled decay toward the starting weights: subtracts `d_t * (theta_t - theta_0)`.

    .. math::
      \\theta_{t+1} = \\theta_t + u_t - d_t (\\theta_t - \\theta_0),
      \\qquad d_t = \\lambda_t \\eta_t

    `theta_0` is the params the transform is initialized with (`init`), or `init_params` when
    given (the pretrained weights, if the optimizer is initialized elsewhere). With
    `theta_0 = 0` this is `weight_decay`. Place it LAST in a chain, after the base optimizer.
    Its state holds one copy of the params.

    Args:
      rate: lambda; a float, a schedule, or a pytree of per-leaf floats or schedules.
      learning_rate: eta; when given, `d_t = rate * learning_rate(t)` (AdamW convention),
        else `d_t = rate`.
      mask: a pytree of bools or a callable `params -> pytree of bools`; False leaves are not
        decayed. Defaults to `default_decay_mask`.
      init_params: the anchor `theta_0`, shaped like the params; default the params at `init`.

    Returns:
      An `optax.GradientTransformation` whose state is a `DecayToInitState`.

    Example:
      >>> import jax.numpy as jnp, optax, lpwd_optax
      >>> opt = optax.chain(optax.sgd(1.0), lpwd_optax.decay_to_init(0.5))
      >>> params = {"w": jnp.full((2, 2), 3.0)}
      >>> state = opt.init(params)  # theta_0 = 3
      >>> moved = {"w": jnp.full((2, 2), 5.0)}
      >>> updates, state = opt.update({"w": jnp.zeros((2, 2))}, state, moved)
      >>> float(updates["w"][0, 0])  # -0.5 * (5 - 3)
      -1.0

    References:
      Li, Grandvalet & Davoine, "Explicit Inductive Bias for Transfer Learning with
      Convolutional Networks" (L2-SP), ICML 2018 (arXiv:1802.01483); decoupled as in
      Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (arXiv:1711.05101).
    """
    name = "decay_to_init"
    _common.check_rate(rate, learning_rate, name, max_decay=1.0, strict=False)

    def resolved_for(params):
        return _common.checked_resolution(
            params,
            name,
            mask=mask,
            rate=rate,
            learning_rate=learning_rate,
            max_decay=1.0,
            strict=False,
        )

    def init_fn(params):
        if params is not None and not jax.tree.leaves(params):
            # optax.tree_utils.tree_map_params inits with a leafless placeholder of the params:
            # the anchor is a params-shaped leaf of the state, so it takes the placeholder.
            return DecayToInitState(_common.init_count(), params)
        _common.require_params(params, name)
        resolved_for(params)
        anchor = params if init_params is None else init_params
        _common.flatten_like_params(anchor, params, f"{name} init_params")
        for (path, a), p in zip(_common.leaves_with_paths(anchor), jax.tree.leaves(params)):
            if a.shape != p.shape:
                raise ValueError(
                    f"{name} init_params at '{path}' has shape {a.shape}, the params {p.shape}"
                )
        anchor = jax.tree.map(lambda a, p: a.astype(p.dtype), anchor, params)
        return DecayToInitState(_common.init_count(), anchor)

    def update_fn(updates, state, params=None):
        resolved = resolved_for(params)
        step = state.count
        decay = jax.tree.map(lambda r: _common.decay_at(r, learning_rate, step), resolved.rate)

        def rule(u, theta, d, theta_0):
            return u - d * (theta - theta_0)

        updates = _common.map_masked(rule, updates, params, resolved.mask, decay, state.init_params)
        return updates, DecayToInitState(optax.safe_increment(step), state.init_params)

    return optax.GradientTransformation(init_fn, update_fn)
