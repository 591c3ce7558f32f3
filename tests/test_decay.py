"""WD, L2, RWD, PWD and LPWD against the literal numpy loops in tests/reference.py."""

from __future__ import annotations

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lpwd_optax as lo
from tests import reference

STEPS = 50
SHAPES = {"dense/kernel": (3, 4), "dense/bias": (4,), "out/kernel": (4, 2)}
DECAYED = {"dense/kernel", "out/kernel"}  # the default mask skips the 1-D bias
LAYER_RATE = {"dense/kernel": 0.02, "dense/bias": 0.0, "out/kernel": 0.08}


def _tree(flat):
    return {
        "dense": {"kernel": flat["dense/kernel"], "bias": flat["dense/bias"]},
        "out": {"kernel": flat["out/kernel"]},
    }


def _flat(tree):
    return {
        "dense/kernel": tree["dense"]["kernel"],
        "dense/bias": tree["dense"]["bias"],
        "out/kernel": tree["out"]["kernel"],
    }


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    theta0 = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    targets = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    return theta0, targets


def _jax_loss(params, targets):
    return sum(
        jnp.sum(jnp.log(jnp.cosh(p - t)))
        for p, t in zip(jax.tree.leaves(params), jax.tree.leaves(targets))
    )


# Schedules are inputs, shared verbatim by both sides (jnp works on Python ints too).
def lr_schedule_adam(t):
    return 1e-2 * 0.98**t


def lr_schedule_sgdm(t):
    return 5e-2 * (1.0 + jnp.cos(t / 7.0)) / 2.0 + 1e-3


def rate_schedule(t):
    return 0.5 * (1.2 + jnp.sin(t / 5.0))


OPTIMIZERS = {
    "adam": (optax.adam, reference.Adam, lr_schedule_adam),
    "sgdm": (lambda lr: optax.sgd(lr, momentum=0.9), reference.SGDMomentum, lr_schedule_sgdm),
}
FACTORIES = {
    "wd": lo.weight_decay,
    "rwd": lo.real_time_weight_decay,
    "pwd": lo.pre_weight_decay,
}


def _rates(kind):
    """(optax rate argument, reference rate(name, t)) for each kind of rate."""
    if kind == "constant":
        return 0.5, lambda k, t: 0.5
    if kind == "scheduled":
        return rate_schedule, lambda k, t: float(rate_schedule(t))
    if kind == "layerwise":
        scale = {k: v * 10 for k, v in LAYER_RATE.items()}
        return _tree(scale), lambda k, t: scale[k]
    if kind == "layerwise_scheduled":
        tree = _tree({k: (lambda t, v=v: v * 10 * rate_schedule(t)) for k, v in LAYER_RATE.items()})
        return tree, lambda k, t: LAYER_RATE[k] * 10 * float(rate_schedule(t))
    raise ValueError(kind)


def _train_optax(opt, params, targets, steps):
    grad = jax.jit(jax.grad(_jax_loss))
    state = opt.init(params)
    update = jax.jit(opt.update)
    for _ in range(steps):
        updates, state = update(grad(params, targets), state, params)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("rate_kind", ["constant", "scheduled", "layerwise", "layerwise_scheduled"])
@pytest.mark.parametrize("opt_name", ["adam", "sgdm"])
@pytest.mark.parametrize("method", ["wd", "rwd", "pwd"])
def test_decoupled_decay_matches_reference_loop(method, opt_name, rate_kind):
    """theta_T after 50 steps equals the paper's loop (Algorithm 2/3 for PWD/LPWD)."""
    make_opt, make_ref, lr = OPTIMIZERS[opt_name]
    rate, ref_rate = _rates(rate_kind)
    theta0, targets = _problem()
    expected = reference.run(
        method,
        theta0,
        targets,
        make_ref(lambda t: float(lr(t))),
        STEPS,
        ref_rate,
        lambda t: float(lr(t)),
        DECAYED,
    )

    params = jax.tree.map(jnp.asarray, _tree(theta0))
    tx = FACTORIES[method](rate, learning_rate=lr)
    opt = optax.chain(make_opt(lr), tx)
    if method == "pwd":
        params = lo.pre_decay_params(params, rate, learning_rate=lr)
    got = _train_optax(opt, params, _tree(targets), STEPS)
    if method == "pwd":
        got = lo.evaluated_params(got, rate, STEPS, learning_rate=lr)
    for k, v in _flat(got).items():
        np.testing.assert_allclose(v, expected[k], rtol=2e-5, atol=2e-6, err_msg=k)


@pytest.mark.parametrize("opt_name", ["adam", "sgdm"])
@pytest.mark.parametrize("scheduled", [False, True])
def test_l2_matches_reference_loop(opt_name, scheduled):
    make_opt, make_ref, lr = OPTIMIZERS[opt_name]
    rate, ref_rate = (rate_schedule, _rates("scheduled")[1]) if scheduled else (0.3, None)
    ref_rate = ref_rate or (lambda k, t: 0.3)
    theta0, targets = _problem(1)
    expected = reference.run(
        "l2", theta0, targets, make_ref(lambda t: float(lr(t))), STEPS, ref_rate, None, DECAYED
    )
    opt = optax.chain(lo.l2_regularization(rate), make_opt(lr))
    got = _train_optax(opt, jax.tree.map(jnp.asarray, _tree(theta0)), _tree(targets), STEPS)
    for k, v in _flat(got).items():
        np.testing.assert_allclose(v, expected[k], rtol=2e-5, atol=2e-6, err_msg=k)


def test_pwd_gradient_points_are_rwd_points_shifted_by_one_decay():
    """Constant rate: PWD's stored params (where gradients are taken) follow RWD started at
    (1 - d) theta_0, step for step."""
    theta0, targets = _problem(2)
    params = jax.tree.map(jnp.asarray, _tree(theta0))
    rate, lr = 0.3, 1e-2
    grad = jax.grad(_jax_loss)
    pwd = optax.chain(optax.adam(lr), lo.pre_weight_decay(rate, learning_rate=lr))
    rwd = optax.chain(optax.adam(lr), lo.real_time_weight_decay(rate, learning_rate=lr))
    phi = lo.pre_decay_params(params, rate, learning_rate=lr)
    psi = phi
    s_p, s_r = pwd.init(phi), rwd.init(psi)
    for _ in range(10):
        u, s_p = pwd.update(grad(phi, _tree(targets)), s_p, phi)
        phi = optax.apply_updates(phi, u)
        u, s_r = rwd.update(grad(psi, _tree(targets)), s_r, psi)
        psi = optax.apply_updates(psi, u)
        chex.assert_trees_all_close(phi, psi, rtol=1e-6, atol=1e-7)
    # ...but the evaluated weights differ from the stored ones by exactly one decay.
    theta = lo.evaluated_params(phi, rate, 10, learning_rate=lr)
    np.testing.assert_allclose(
        theta["out"]["kernel"] * (1 - rate * lr), phi["out"]["kernel"], rtol=1e-6
    )
    np.testing.assert_array_equal(theta["dense"]["bias"], phi["dense"]["bias"])


def test_pre_decay_and_evaluated_params_are_inverse():
    theta0, _ = _problem(3)
    params = jax.tree.map(jnp.asarray, _tree(theta0))
    rate = _tree({k: v * 5 for k, v in LAYER_RATE.items()})
    for step in (0, 7):
        phi = lo.pre_decay_params(params, rate, learning_rate=lr_schedule_adam, step=step)
        back = lo.evaluated_params(phi, rate, step, learning_rate=lr_schedule_adam)
        chex.assert_trees_all_close(back, params, rtol=1e-6)
    np.testing.assert_allclose(
        phi["out"]["kernel"], params["out"]["kernel"] * (1 - 0.4 * lr_schedule_adam(7)), rtol=1e-6
    )


finite = st.floats(-10, 10, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    theta=hnp.arrays(np.float32, (5, 3), elements=finite),
    u=hnp.arrays(np.float32, (5, 3), elements=finite),
    rate=st.floats(0.0, 0.999),
)
def test_rwd_never_increases_magnitude_and_never_opposes(theta, u, rate):
    """Paper eq. 8: |theta + u'| <= |theta + u| entrywise, and R_op(RWD) is exactly 0."""
    params, updates = {"w": jnp.asarray(theta)}, {"w": jnp.asarray(u)}
    tx = lo.real_time_weight_decay(rate)
    out, _ = tx.update(updates, tx.init(params), params)
    assert np.all(np.abs(theta + np.asarray(out["w"])) <= np.abs(theta + u) + 1e-6)
    r_op = lo.opposing_penalty_rate(params, updates, lo.penalties(updates, out))
    assert float(r_op) == 0.0


@settings(max_examples=40, deadline=None)
@given(
    theta=hnp.arrays(np.float32, (4, 4), elements=finite),
    u=hnp.arrays(np.float32, (4, 4), elements=finite),
    rate=st.floats(0.01, 0.9),
)
def test_wd_opposing_penalty_rate_matches_reference(theta, u, rate):
    params, updates = {"w": jnp.asarray(theta)}, {"w": jnp.asarray(u)}
    tx = lo.weight_decay(rate)
    out, _ = tx.update(updates, tx.init(params), params)
    p = lo.penalties(updates, out)
    np.testing.assert_allclose(np.asarray(p["w"]), rate * theta, rtol=1e-5, atol=1e-5)
    expected = reference.opposing_penalty_rate(theta, u, np.asarray(p["w"]))
    np.testing.assert_allclose(
        float(lo.opposing_penalty_rate(params, updates, p)), expected, rtol=1e-5, atol=1e-6
    )


def test_wd_with_unit_decay_leaves_only_the_update():
    """d_t -> 1: theta_{t+1} = u_t."""
    params = {"w": jnp.arange(6.0).reshape(2, 3)}
    u = {"w": jnp.full((2, 3), -0.25)}
    tx = lo.weight_decay(1.0)
    out, _ = tx.update(u, tx.init(params), params)
    chex.assert_trees_all_close(optax.apply_updates(params, out), u, atol=1e-6)


@pytest.mark.parametrize("opt_name", ["adam", "sgdm"])
def test_rate_zero_equals_base_optimizer(opt_name):
    make_opt, _, lr = OPTIMIZERS[opt_name]
    theta0, targets = _problem(4)
    params = jax.tree.map(jnp.asarray, _tree(theta0))
    base = _train_optax(make_opt(lr), params, _tree(targets), 5)
    for tx in (
        lo.weight_decay(0.0, learning_rate=lr),
        lo.real_time_weight_decay(0.0),
        lo.pre_weight_decay(0.0, learning_rate=lr),
        lo.weight_decay(0.0),
    ):
        got = _train_optax(optax.chain(make_opt(lr), tx), params, _tree(targets), 5)
        # PWD/RWD form (1 - 0) * (theta + u) - theta: equal up to one rounding per step.
        chex.assert_trees_all_close(got, base, rtol=1e-6, atol=1e-7)
    for tx in (lo.l2_regularization(0.0), lo.adaptive_weight_decay(0.0)):
        got = _train_optax(optax.chain(tx, make_opt(lr)), params, _tree(targets), 5)
        chex.assert_trees_all_equal(got, base)


def test_l2_equals_wd_with_plain_sgd():
    theta0, targets = _problem(5)
    params = jax.tree.map(jnp.asarray, _tree(theta0))
    lr, rate = 0.1, 0.05
    coupled = optax.chain(lo.l2_regularization(rate), optax.sgd(lr))
    decoupled = optax.chain(optax.sgd(lr), lo.weight_decay(rate, learning_rate=lr))
    chex.assert_trees_all_close(
        _train_optax(coupled, params, _tree(targets), 20),
        _train_optax(decoupled, params, _tree(targets), 20),
        rtol=1e-5,
        atol=1e-6,
    )


def test_weight_decay_equals_optax_adamw():
    theta0, targets = _problem(6)
    params = jax.tree.map(jnp.asarray, _tree(theta0))
    ours = optax.chain(optax.adam(1e-2), lo.weight_decay(0.1, learning_rate=1e-2))
    adamw = optax.adamw(1e-2, weight_decay=0.1, mask=lo.default_decay_mask)
    chex.assert_trees_all_close(
        _train_optax(ours, params, _tree(targets), 20),
        _train_optax(adamw, params, _tree(targets), 20),
        rtol=1e-6,
        atol=1e-7,
    )


@pytest.mark.parametrize(
    "adam_args",
    [
        {},
        {"b1": 0.8, "b2": 0.99, "eps": 1e-6, "eps_root": 1e-9},
        {"nesterov": True},
        {"mu_dtype": jnp.bfloat16},
    ],
    ids=["defaults", "betas_eps_root", "nesterov", "mu_bf16"],
)
def test_lpwd_adam_with_rate_zero_is_optax_adamw_without_decay(adam_args):
    theta0, targets = _problem(7)
    params = jax.tree.map(jnp.asarray, _tree(theta0))
    ours = lo.lpwd_adam(lr_schedule_adam, 0.0, **adam_args)
    adamw = optax.adamw(lr_schedule_adam, weight_decay=0.0, **adam_args)
    grad = jax.jit(jax.grad(_jax_loss))
    s_ours, s_adamw = ours.init(params), adamw.init(params)
    for _ in range(10):
        g = grad(params, _tree(targets))
        u_ours, s_ours = ours.update(g, s_ours, params)
        u_adamw, s_adamw = adamw.update(g, s_adamw, params)
        chex.assert_trees_all_equal(u_ours, u_adamw)
        params = optax.apply_updates(params, u_ours)
