"""Constrained parameter regularization (CPR): a bound on each matrix instead of a penalty.

Weight decay pulls every weight matrix toward zero with the same coefficient, however large or
small the matrix is. CPR (Franke et al.) instead enforces an upper bound `R(theta) <= kappa` on
a statistic of each matrix (its squared L2 norm or its standard deviation) with an augmented
Lagrangian: each matrix keeps a multiplier `mu >= 0` that grows while the bound is violated and
decays back to 0 once it holds, and the weights are pulled along `grad R` with strength `mu`.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lpwd_optax import _common, _ordering
from lpwd_optax._common import MaskOrFn, ScalarOrSchedule

KAPPA_INITS = ("uniform", "warm_start", "dependent")
REGULARIZATIONS = ("l2", "std")


class CPRState(NamedTuple):
    """State of `constrained_parameter_regularization`; one entry per param leaf, in the
    params' leaf order (entries of undecayed leaves stay 0)."""

    count: chex.Array  # shape=(), dtype=jnp.int32: the 0-based index of the next update
    multiplier: chex.Array  # shape=(n_leaves,), dtype=float32 (or the params' if wider): mu
    bound: chex.Array  # shape=(n_leaves,), dtype=multiplier's: kappa, the bound on R(theta)


def _statistic(theta: chex.Array, regularization: str) -> chex.Array:
    if regularization == "l2":
        return jnp.sum(jnp.square(theta))
    return jnp.std(theta, ddof=1)


def _gradient_coefficients(
    theta: chex.Array, r: chex.Array, regularization: str
) -> tuple[chex.Array, chex.Array]:
    """`(a, b)` with `grad R(theta) = a * theta + b`, both scalars."""
    if regularization == "l2":
        return jnp.asarray(2.0, theta.dtype), jnp.zeros([], theta.dtype)
    # d std / d theta = (theta - mean) / ((n - 1) std); a constant matrix has no direction.
    a = jnp.where(r > 0, 1.0 / ((theta.size - 1) * jnp.where(r > 0, r, 1.0)), 0.0)
    return a, -a * jnp.mean(theta)


def constrained_parameter_regularization(
    kappa_init: str = "warm_start",
    kappa_init_param: float = 1000,
    *,
    mu_lr: float = 1.0,
    regularization: str = "l2",
    learning_rate: ScalarOrSchedule | None = None,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
    """CPR: an upper bound on each matrix's `R(theta)`, kept by a Lagrange multiplier.

    For each masked leaf, with `theta' = theta_t + u_t` the weights after the base optimizer's
    update, `R` the squared L2 norm (`"l2"`) or the standard deviation (`"std"`, with n - 1)
    and `kappa` the leaf's bound:

    .. math::
      \\mu \\leftarrow \\max\\bigl(0,\\; \\mu + \\mu_{lr}' \\,(R(\\theta') - \\kappa)\\bigr),
      \\qquad \\theta_{t+1} = \\theta' - c_t \\, \\mu \\, \\nabla R(\\theta')

    where `mu_lr' = mu_lr / size(theta)` for `"l2"` and `mu_lr` for `"std"`, and `c_t` is
    `learning_rate(t)` when given, else 1. The bound comes from `kappa_init`:

    - `"uniform"`: `kappa = kappa_init_param` for every leaf, from the first step.
    - `"warm_start"`: no regularization for the first `s = kappa_init_param` steps; at step
      `s` (1-based), `kappa = R(theta')`, and the constraint acts from step `s + 1` on.
    - `"dependent"`: `kappa = kappa_init_param * R(theta_0)`, the initial weights' value.

    `mu` starts at 0. Place it LAST in a chain, after the base optimizer.

    Args:
      kappa_init: how the bound is set: "uniform", "warm_start" or "dependent".
      kappa_init_param: the bound ("uniform"), the number of warm-up steps, an int >= 1
        ("warm_start"), or the factor on `R(theta_0)` ("dependent").
      mu_lr: the multiplier's step size (>= 0).
      regularization: "l2" (squared norm) or "std" (standard deviation).
      learning_rate: eta; when given, the pull `mu grad R` is multiplied by it.
      mask: which leaves are constrained; defaults to `default_decay_mask`. With "std",
        every masked leaf needs at least 2 entries.

    Returns:
      An `optax.GradientTransformation` whose state is a `CPRState`: the step count, and one
      multiplier and one bound per leaf (no param-sized buffer).

    Example:
      >>> import jax.numpy as jnp, optax, lpwd_optax
      >>> tx = lpwd_optax.constrained_parameter_regularization("uniform", 2.0)
      >>> params = {"w": jnp.ones((2, 2))}  # R = 4 > kappa = 2
      >>> updates, state = tx.update({"w": jnp.zeros((2, 2))}, tx.init(params), params)
      >>> float(state.multiplier[0])  # mu = 0 + (1 / 4) * (4 - 2)
      0.5
      >>> float(updates["w"][0, 0])  # -0.5 * 2 * theta
      -1.0

    References:
      Franke et al., "Improving Deep Learning Optimization through Constrained Parameter
      Regularization", NeurIPS 2024 (arXiv:2311.09058).
    """
    name = "constrained_parameter_regularization"
    warm_start = _warm_start_steps(name, kappa_init, kappa_init_param, regularization)
    _common.check_scalar_rate(mu_lr, f"{name} mu_lr")
    if learning_rate is not None:
        _common.check_rate(1.0, learning_rate, name, max_decay=None, strict=False)

    def check_leaf(path, theta):
        if regularization == "std" and np.size(theta) < 2:
            raise ValueError(
                f"{name}: the leaf '{path}' has shape {np.shape(theta)}; the std needs at "
                "least 2 entries (leave it out with `mask`)."
            )

    def resolved_for(params):
        return _common.checked_resolution(params, name, mask=mask, check_leaf=check_leaf)

    def init_fn(params):
        leaves = jax.tree.leaves(params)
        dtype = jnp.result_type(jnp.float32, *leaves)
        zeros = jnp.zeros([len(leaves)], dtype)
        if params is None or leaves:
            resolved = resolved_for(params)
            masked = jax.tree.leaves(resolved.mask)
        else:  # optax.tree_utils.tree_map_params' placeholder: nothing to measure
            masked = []
        if kappa_init == "uniform":
            kappa = jnp.full([len(leaves)], kappa_init_param, dtype)
        elif kappa_init == "dependent":
            stats = [
                _statistic(p.astype(dtype), regularization) if m else jnp.zeros([], dtype)
                for p, m in zip(leaves, masked)
            ]
            kappa = (kappa_init_param * jnp.stack(stats)).astype(dtype) if stats else zeros
        else:
            kappa = zeros  # set from the weights at the warm-start step
        return CPRState(count=_common.init_count(), multiplier=zeros, bound=kappa)

    def update_fn(updates, state, params=None):
        resolved = resolved_for(params)
        t = state.count
        step = t + 1  # 1-based, as the reference counts
        c = _common.decay_at(1.0, learning_rate, t)
        active = step > warm_start
        leaves_u, treedef = jax.tree.flatten(updates)
        leaves_p = treedef.flatten_up_to(params)
        masks = treedef.flatten_up_to(resolved.mask)
        out, mus, kappas, token = [], [], [], None
        for i, (u, p, m) in enumerate(zip(leaves_u, leaves_p, masks)):
            mu, kappa = state.multiplier[i], state.bound[i]
            if not m:
                out.append(u)
                mus.append(mu)
                kappas.append(kappa)
                continue
            # Leaf by leaf (see `_ordering`): XLA keeps one leaf's `theta + u` in memory at a
            # time instead of every leaf's.
            u = _ordering.after(u, token)
            pulled, new_mu, r = _constrain_leaf(p, u, mu, kappa, c, active, mu_lr, regularization)
            out.append(pulled)
            mus.append(new_mu)
            token = new_mu
            if kappa_init == "warm_start":
                kappa = jnp.where(step == warm_start, r, kappa)
            kappas.append(kappa)
        new_state = CPRState(
            count=optax.safe_increment(t),
            multiplier=jnp.stack(mus).astype(state.multiplier.dtype) if mus else state.multiplier,
            bound=jnp.stack(kappas).astype(state.bound.dtype) if kappas else state.bound,
        )
        return treedef.unflatten(out), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def _constrain_leaf(p, u, mu, kappa, c, active, mu_lr: float, regularization: str):
    """One leaf's step: (the constrained update, the new multiplier, R(theta + u))."""
    acc = jnp.promote_types(p.dtype, jnp.float32)
    theta = p.astype(acc) + u.astype(acc)
    r = _statistic(theta, regularization)
    step_size = mu_lr / theta.size if regularization == "l2" else mu_lr
    new_mu = jnp.where(active, jnp.maximum(0.0, mu + step_size * (r - kappa)), mu)
    a, b = _gradient_coefficients(theta, r, regularization)
    k = jnp.where(active, c * new_mu, 0.0)
    # theta' - k grad R(theta') - p, with grad R(theta') = a theta' + b. XLA writes theta' to
    # memory once for the reduction (it never recomputes the optimizer's divide in two passes),
    # and the last pass reads it with p.
    pulled = theta * (1 - (k * a).astype(acc)) - (k * b).astype(acc) - p.astype(acc)
    return pulled.astype(u.dtype), new_mu, r


def _warm_start_steps(name: str, kappa_init: str, kappa_init_param, regularization: str) -> int:
    """Checks the bound's arguments; the number of warm-up steps (0 unless 'warm_start')."""
    if kappa_init not in KAPPA_INITS:
        raise ValueError(f"{name}: kappa_init must be one of {KAPPA_INITS}, got {kappa_init!r}.")
    if regularization not in REGULARIZATIONS:
        raise ValueError(
            f"{name}: regularization must be one of {REGULARIZATIONS}, got {regularization!r}."
        )
    if kappa_init != "warm_start":
        _common.check_scalar_rate(kappa_init_param, f"{name} kappa_init_param")
        return 0
    whole = isinstance(kappa_init_param, numbers.Integral) or (
        isinstance(kappa_init_param, float) and float(kappa_init_param).is_integer()
    )
    if isinstance(kappa_init_param, bool) or not whole or kappa_init_param < 1:
        raise ValueError(
            f"{name}: with kappa_init='warm_start', kappa_init_param is the number of "
            f"warm-up steps, an int >= 1; got {kappa_init_param!r}."
        )
    return int(kappa_init_param)


def cpr(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    kappa_init: str = "warm_start",
    kappa_init_param: float = 1000,
    mu_lr: float = 1.0,
    regularization: str = "l2",
    scale_by_learning_rate: bool = False,
    mu_dtype: Any | None = None,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
    """AdamCPR: Adam followed by constrained parameter regularization.

    `chain(optax.adam(learning_rate, b1, b2, eps), constrained_parameter_regularization(
    kappa_init, kappa_init_param, mu_lr=mu_lr, regularization=regularization,
    learning_rate=learning_rate if scale_by_learning_rate else None))`.

    Args:
      learning_rate: eta, a float or a schedule.
      b1, b2, eps: Adam's hyperparameters.
      kappa_init, kappa_init_param, mu_lr, regularization: see
        `constrained_parameter_regularization`.
      scale_by_learning_rate: multiply the pull `mu grad R` by the learning rate.
      mu_dtype: the dtype of Adam's first moment.
      mask: which leaves are constrained; defaults to `default_decay_mask`.

    Returns:
      An `optax.GradientTransformation`.

    Example:
      >>> import jax.numpy as jnp, lpwd_optax
      >>> opt = lpwd_optax.cpr(1e-3, kappa_init="warm_start", kappa_init_param=500)
      >>> state = opt.init({"w": jnp.ones((3, 2))})

    References:
      Franke et al., "Improving Deep Learning Optimization through Constrained Parameter
      Regularization", NeurIPS 2024 (arXiv:2311.09058).
    """
    adam = optax.adam(learning_rate, b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype)
    constraint = constrained_parameter_regularization(
        kappa_init,
        kappa_init_param,
        mu_lr=mu_lr,
        regularization=regularization,
        learning_rate=learning_rate if scale_by_learning_rate else None,
        mask=mask,
    )
    return optax.chain(adam, constraint)
