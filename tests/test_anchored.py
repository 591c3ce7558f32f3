"""Decoupled decay toward the starting weights against a literal numpy loop of its equation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lpwd_optax as lo

LR, RATE, STEPS = 1e-2, 0.5, 20


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "conv": {"kernel": rng.normal(size=(3, 3, 2, 4)), "bias": rng.normal(size=(4,))},
        "fc": {"kernel": rng.normal(size=(4, 3)), "bias": rng.normal(size=(3,))},
    }


def _grads(theta, t):
    rng = np.random.default_rng(100 + t)
    return {k: np.tanh(v - 2.0) + 0.3 * rng.normal(size=v.shape) for k, v in theta.items()}


def _flat(tree):
    return {k: np.asarray(v, np.float64) for k, v in lo._common.leaves_with_paths(tree)}


def _numpy_loop(theta, anchor, decayed, schedule):
    """Adam (0.9, 0.999, 1e-8), then theta <- theta + u - d_t (theta - theta_0) on `decayed`."""
    m = {k: np.zeros_like(v) for k, v in theta.items()}
    v = {k: np.zeros_like(x) for k, x in theta.items()}
    for t in range(STEPS):
        g = _grads(theta, t)
        lr = schedule(t)
        for k in theta:
            m[k] = 0.9 * m[k] + 0.1 * g[k]
            v[k] = 0.999 * v[k] + 0.001 * g[k] ** 2
            u = (
                -lr
                * (m[k] / (1 - 0.9 ** (t + 1)))
                / (np.sqrt(v[k] / (1 - 0.999 ** (t + 1))) + 1e-8)
            )
            d = RATE * lr if k in decayed else 0.0
            theta[k] = theta[k] + u - d * (theta[k] - anchor[k])
    return theta


def _optax_run(opt, params):
    state = opt.init(params)
    update = jax.jit(opt.update)
    for t in range(STEPS):
        grads = jax.tree.unflatten(
            jax.tree.structure(params), list(_grads(_flat(params), t).values())
        )
        updates, state = update(jax.tree.map(jnp.asarray, grads), state, params)
        params = optax.apply_updates(params, updates)
    return _flat(params)


@pytest.mark.parametrize("scheduled", [False, True])
def test_equals_the_numpy_loop_of_its_equation(scheduled):
    schedule = optax.linear_schedule(LR, LR / 10, STEPS) if scheduled else (lambda t: LR)
    lr = schedule if scheduled else LR
    with jax.enable_x64():
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), _params())
        opt = optax.chain(optax.adam(lr), lo.decay_to_init(RATE, learning_rate=lr))
        got = _optax_run(opt, params)
    theta = _flat(_params())
    want = _numpy_loop(
        dict(theta), theta, {"conv/kernel", "fc/kernel"}, lambda t: float(schedule(t))
    )
    for k in want:  # optax evaluates the schedule in float32
        np.testing.assert_allclose(got[k], want[k], rtol=1e-7, atol=1e-8, err_msg=k)


def test_an_anchor_given_as_init_params_and_a_mask():
    anchor = _params(seed=3)
    mask = {"conv": {"kernel": False, "bias": False}, "fc": {"kernel": True, "bias": True}}
    with jax.enable_x64():
        params = jax.tree.map(jnp.asarray, _params())
        opt = optax.chain(
            optax.adam(LR),
            lo.decay_to_init(RATE, learning_rate=LR, mask=mask, init_params=anchor),
        )
        got = _optax_run(opt, params)
    want = _numpy_loop(
        dict(_flat(_params())), _flat(anchor), {"fc/kernel", "fc/bias"}, lambda t: LR
    )
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-10, atol=1e-12, err_msg=k)


def test_a_zero_anchor_is_weight_decay():
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _params())
    zeros = jax.tree.map(jnp.zeros_like, params)
    a = optax.chain(optax.adam(LR), lo.decay_to_init(RATE, learning_rate=LR, init_params=zeros))
    b = optax.chain(optax.adam(LR), lo.weight_decay(RATE, learning_rate=LR))
    for k, v in _optax_run(a, params).items():
        np.testing.assert_allclose(v, _optax_run(b, params)[k], rtol=1e-6, atol=1e-7)


def test_errors_name_the_problem():
    params = jax.tree.map(jnp.asarray, _params())
    with pytest.raises(ValueError, match="decay_to_init rate must be a finite number >= 0"):
        lo.decay_to_init(-1.0)
    wrong = jax.tree.map(lambda x: jnp.zeros((*x.shape, 2)), params)
    with pytest.raises(ValueError, match="init_params at 'conv/bias' has shape"):
        lo.decay_to_init(0.1, init_params=wrong).init(params)
    with pytest.raises(ValueError, match="decay_to_init"):
        lo.decay_to_init(0.1, init_params={"conv": params["conv"]}).init(params)
