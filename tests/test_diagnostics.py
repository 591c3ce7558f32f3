"""lo.jacobian_norm against the exact input-output Jacobian (jax.jacfwd), example by example."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lpwd_optax as lo


def _mlp(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return h @ params["w2"]


def _cnn(params, x):
    y = jax.lax.conv_general_dilated(
        x, params["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jax.nn.gelu(y).mean(axis=(1, 2)) @ params["w"]


def _setup(kind):
    keys = jax.random.split(jax.random.key(0), 4)
    if kind == "mlp":
        params = {
            "w1": jax.random.normal(keys[0], (6, 16)) / 2,
            "b1": jax.random.normal(keys[1], (16,)),
            "w2": jax.random.normal(keys[2], (16, 4)),
        }
        return _mlp, params, jax.random.normal(keys[3], (5, 6))
    params = {
        "k": jax.random.normal(keys[0], (3, 3, 2, 4)),
        "w": jax.random.normal(keys[1], (4, 3)),
    }
    return _cnn, params, jax.random.normal(keys[3], (3, 5, 5, 2))


def _exact(apply_fn, params, inputs) -> float:
    """mean_i ||J_i||_F^2 with J_i the Jacobian of one example's outputs w.r.t. its input."""
    norms = []
    for x in np.asarray(inputs):
        jac = jax.jacfwd(lambda x: apply_fn(params, x[None])[0])(jnp.asarray(x))
        norms.append(float(np.sum(np.square(np.asarray(jac, np.float64)))))
    return float(np.mean(norms))


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_estimate_agrees_with_the_exact_jacobian(kind):
    apply_fn, params, inputs = _setup(kind)
    exact = _exact(apply_fn, params, inputs)
    est = jax.jit(lo.jacobian_norm, static_argnames=("apply_fn", "num_probes"))(
        apply_fn, params, inputs, jax.random.key(1), num_probes=2000
    )
    assert est.num_probes == 2000
    assert abs(float(est.mean) - exact) < 4 * float(est.stderr)
    assert float(est.stderr) < 0.05 * exact  # the probes resolve it to a few percent
    # The standard error shrinks like 1 / sqrt(probes).
    small = lo.jacobian_norm(apply_fn, params, inputs, jax.random.key(2), num_probes=125)
    assert 2.0 < float(small.stderr) / float(est.stderr) < 6.0


def test_unbiased_over_keys_and_nan_stderr_for_one_probe():
    apply_fn, params, inputs = _setup("mlp")
    exact = _exact(apply_fn, params, inputs)
    one = jax.vmap(lambda k: lo.jacobian_norm(apply_fn, params, inputs, k, num_probes=1).mean)
    means = np.asarray(one(jax.random.split(jax.random.key(3), 4000)))
    assert abs(means.mean() - exact) < 4 * means.std() / np.sqrt(len(means))
    single = lo.jacobian_norm(apply_fn, params, inputs, jax.random.key(4), num_probes=1)
    assert np.isnan(float(single.stderr))
