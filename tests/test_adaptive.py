"""AdaDecay and randomized weight decay against the paper's per-entry definition."""

from __future__ import annotations

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import given, settings
from hypothesis import strategies as st

import lpwd_optax as lo
from tests import reference


def _grads_and_params(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "a": {
            "kernel": rng.normal(size=(5, 6)).astype(np.float32),
            "bias": rng.normal(size=(6,)).astype(np.float32),
        },
        "b": {"kernel": rng.normal(size=(6, 3)).astype(np.float32)},
    }
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
    return grads, params


@settings(max_examples=30, deadline=None)
@given(alpha=st.floats(0.0, 8.0), rate=st.floats(0.0, 0.5), seed=st.integers(0, 10_000))
def test_adadecay_matches_per_entry_reference(alpha, rate, seed):
    grads, params = _grads_and_params(seed)
    tx = lo.adaptive_weight_decay(rate, alpha=alpha)
    out, _ = tx.update(grads, tx.init(params), params)
    for layer in ("a", "b"):
        c = reference.adadecay_coefficients(grads[layer]["kernel"], alpha)
        expected = grads[layer]["kernel"] + rate * c * params[layer]["kernel"]
        np.testing.assert_allclose(out[layer]["kernel"], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["a"]["bias"], grads["a"]["bias"])  # masked out


def test_adadecay_with_sgd_is_per_entry_shrinkage():
    """w <- (1 - eta * lambda * c_j) w - eta * g_j."""
    grads, params = _grads_and_params(1)
    eta, lam, alpha = 0.1, 0.3, 4.0
    opt = optax.chain(lo.adaptive_weight_decay(lam, alpha=alpha), optax.sgd(eta))
    out, _ = opt.update(grads, opt.init(params), params)
    new = optax.apply_updates(params, out)
    c = reference.adadecay_coefficients(grads["b"]["kernel"], alpha)
    expected = (1 - eta * lam * c) * params["b"]["kernel"] - eta * grads["b"]["kernel"]
    np.testing.assert_allclose(new["b"]["kernel"], expected, rtol=1e-5, atol=1e-6)


def test_adadecay_alpha_zero_is_l2():
    grads, params = _grads_and_params(2)
    ada = lo.adaptive_weight_decay(0.2, alpha=0.0)
    l2 = lo.l2_regularization(0.2)
    chex.assert_trees_all_close(
        ada.update(grads, ada.init(params), params)[0],
        l2.update(grads, l2.init(params), params)[0],
        rtol=1e-6,
    )


def _ghat(g):
    (layout,) = lo.LayerStructure.from_shapes(g).leaves
    return lo.adaptive._standardized(g, lo.adaptive._layer_statistics([g], [layout], None)[0])


@settings(max_examples=30, deadline=None)
@given(
    g=hnp.arrays(np.float32, (7, 5), elements=st.floats(-1e3, 1e3, width=32)),
    alpha=st.floats(0.0, 50.0),
)
def test_coefficients_lie_in_open_interval(g, alpha):
    ghat = _ghat(jnp.asarray(g))
    c = np.asarray(lo.decay_coefficients(ghat, alpha), np.float64)
    # The map is into (0, 2); float32 saturates to the closed interval for extreme ghat.
    assert np.all(c >= 0.0) and np.all(c <= 2.0)
    assert np.all(np.isfinite(c))


@settings(max_examples=25, deadline=None)
# A few sizes, not every one: each new size compiles the coefficients again.
@given(n=st.sampled_from([2, 3, 16, 199]), alpha=st.floats(0.1, 4.0), seed=st.integers(0, 1000))
def test_coefficients_average_one_for_symmetric_magnitudes(n, alpha, seed):
    """|g| symmetric about its mean => ghat symmetric => mean c = 1 (sigma(x) + sigma(-x) = 1)."""
    rng = np.random.default_rng(seed)
    mags = np.linspace(1.0, 3.0, n)
    g = (mags * rng.choice([-1.0, 1.0], n)).astype(np.float32)
    ghat = _ghat(jnp.asarray(g))
    c = np.asarray(lo.decay_coefficients(ghat, alpha))
    assert np.all((c > 0) & (c < 2))
    np.testing.assert_allclose(c.mean(), 1.0, atol=1e-5)


def test_adadecay_group_statistics_span_leaves():
    grads, params = _grads_and_params(3)
    groups = {"a": {"kernel": 1, "bias": 1}, "b": {"kernel": 1}}
    tx = lo.adaptive_weight_decay(0.1, alpha=4.0, groups=groups)
    out, _ = tx.update(grads, tx.init(params), params)
    # One group over both masked kernels: statistics of the concatenation.
    both = np.concatenate([grads["a"]["kernel"].ravel(), grads["b"]["kernel"].ravel()])
    c = reference.adadecay_coefficients(both, 4.0)
    c_a = c[: grads["a"]["kernel"].size].reshape(grads["a"]["kernel"].shape)
    expected = grads["a"]["kernel"] + 0.1 * c_a * params["a"]["kernel"]
    np.testing.assert_allclose(out["a"]["kernel"], expected, rtol=1e-5, atol=1e-6)


def test_randomized_decay_draws_standard_normal_from_state_key():
    grads, params = _grads_and_params(4)
    key = jax.random.key(7)
    tx = lo.randomized_weight_decay(0.5, key=key, alpha=1.0)
    state = tx.init(params)
    out1, state1 = tx.update(grads, state, params)
    out1_again, _ = tx.update(grads, state, params)
    out2, _ = tx.update(grads, state1, params)
    chex.assert_trees_all_equal(out1, out1_again)  # reproducible from the state
    assert not np.allclose(out1["b"]["kernel"], out2["b"]["kernel"])  # fresh draws each step
    # Recover c from the output and check it is 2 * sigmoid(alpha * z) with z ~ N(0, 1).
    c = (np.asarray(out1["a"]["kernel"]) - grads["a"]["kernel"]) / (0.5 * params["a"]["kernel"])
    assert np.all((c > 0) & (c < 2))
    z = np.log(c / (2 - c))  # alpha = 1
    assert abs(z.mean()) < 0.6 and 0.5 < z.std() < 1.6


@settings(max_examples=30, deadline=None)
@given(
    ghat=hnp.arrays(np.float32, (64,), elements=st.floats(-1e4, 1e4, width=32)),
    alpha=st.floats(0.0, 8.0),
)
def test_coefficients_match_the_logistic_in_float64(ghat, alpha):
    x = (np.float32(alpha) * ghat).astype(np.float64)  # the float32 product the library takes
    with np.errstate(over="ignore"):  # exp(-x) = inf: the coefficient is 0
        expected = 2.0 / (1.0 + np.exp(-x))
    got = np.asarray(lo.decay_coefficients(jnp.asarray(ghat), alpha), np.float64)
    # Relative to float32 precision where the value is a normal float32, absolute below.
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-37)


def test_coefficient_is_one_at_zero_and_nan_stays_nan():
    c = np.asarray(lo.decay_coefficients(jnp.array([0.0, np.nan, -np.inf, np.inf]), 4.0))
    assert c[0] == 1.0 and np.isnan(c[1]) and c[2] < 1e-37 and c[3] == 2.0


def test_adadecay_step_writes_no_param_sized_temporary():
    """The coefficient is recomputed inside Adam's two moment passes, not stored between them
    (XLA:CPU's buffer assignment; with `2 * jax.nn.sigmoid` this is one kernel's size)."""
    if jax.default_backend() != "cpu":
        return
    params = {"a": jax.ShapeDtypeStruct((256, 512), jnp.float32)}
    opt = optax.chain(lo.adaptive_weight_decay(0.1), optax.adam(1e-3))

    def step(p, s, g):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = jax.eval_shape(opt.init, params)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 256 * 512 * 4 // 4
