"""lo.jacobian_norm against the exact input-output Jacobian (jax.jacfwd), example by example;
the effective learning rate of lo.layer_statistics by hand; lo.scale_sensitivity against the
exact Jacobian and lo.scale_invariant_mask on Flax models with a known answer."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lpwd_optax as lo
from lpwd_optax._common import leaves_with_paths


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


# ----------------------------------------------------------------------------------------------
# Effective learning rate (layer_statistics) and scale invariance (scale_sensitivity / mask)


def test_layer_statistics_effective_lr_and_flags_by_hand():
    params = {
        "conv": {"kernel": jnp.array([[1.0, 2.0], [2.0, 0.0]]), "bias": jnp.array([0.0, 4.0])},
        "norm": {"scale": jnp.ones(4)},
        "zero": {"kernel": jnp.zeros((2, 2))},
    }
    updates = jax.tree.map(jnp.zeros_like, params)
    updates["conv"]["bias"] = jnp.array([0.3, 0.4])
    mask = {
        "conv": {"kernel": True, "bias": False},
        "norm": {"scale": False},
        "zero": {"kernel": False},
    }
    stats = jax.jit(
        lambda p, u: lo.layer_statistics(p, u, learning_rate=0.5, scale_invariant=mask)
    )(params, updates)
    conv, norm, zero = stats["conv"], stats["norm"], stats["zero"]
    np.testing.assert_allclose(float(conv["weight_norm"]), 5.0)  # sqrt(1 + 4 + 4 + 16)
    np.testing.assert_allclose(float(conv["update_norm"]), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(conv["effective_step"]), 0.1, rtol=1e-6)
    np.testing.assert_allclose(float(conv["effective_lr"]), 0.5 / 25, rtol=1e-6)
    np.testing.assert_allclose(float(norm["effective_lr"]), 0.5 / 4, rtol=1e-6)
    assert float(zero["effective_lr"]) == 0.0 and float(zero["effective_step"]) == 0.0
    assert [bool(s["scale_invariant"]) for s in (conv, norm, zero)] == [True, False, False]
    # Without the new arguments, the same three statistics as before.
    plain = lo.layer_statistics(params, updates)
    assert {k: sorted(v) for k, v in plain.items()} == {
        k: ["effective_step", "update_norm", "weight_norm"] for k in params
    }
    with pytest.raises(ValueError, match="'norm/bias' in the scale_invariant"):
        lo.layer_statistics(params, updates, scale_invariant={**mask, "norm": {"bias": True}})


def _hidden_and_out(params, x):
    hidden = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    return hidden @ params["out"]["kernel"]


def _exact_sensitivity(apply_fn, params, inputs, module: str) -> float:
    """sqrt(d) ||J theta|| / (||theta|| ||J||_F) from the full Jacobian of the module's leaves."""
    theta = params[module]

    def outputs(theta_m):
        return apply_fn({**params, module: theta_m}, inputs).ravel()

    jac = jnp.concatenate(
        [j.reshape(j.shape[0], -1) for j in jax.tree.leaves(jax.jacrev(outputs)(theta))], axis=1
    )
    flat = jnp.concatenate([t.ravel() for t in jax.tree.leaves(theta)])
    jac, flat = np.asarray(jac, np.float64), np.asarray(flat, np.float64)
    return float(
        np.sqrt(flat.size)
        * np.linalg.norm(jac @ flat)
        / (np.linalg.norm(flat) * np.linalg.norm(jac))
    )


def test_scale_sensitivity_agrees_with_the_exact_jacobian():
    k = jax.random.split(jax.random.key(0), 4)
    params = {
        "hidden": {"kernel": jax.random.normal(k[0], (5, 12)) / 2, "bias": jnp.full(12, 0.3)},
        "out": {"kernel": jax.random.normal(k[1], (12, 4))},
    }
    inputs = jax.random.normal(k[2], (6, 5))
    sensitivity = lo.scale_sensitivity(_hidden_and_out, params, inputs, num_probes=4000)
    for module in ("hidden", "out"):
        exact = _exact_sensitivity(_hidden_and_out, params, inputs, module)
        assert 0.05 < exact < 2.0
        np.testing.assert_allclose(sensitivity[module]["kernel"], exact, rtol=0.05)
    assert np.isnan(sensitivity["hidden"]["bias"])  # not a kernel


class _ConvNorm(nn.Module):
    """conv -> LayerNorm or BatchNorm (batch statistics) -> relu -> pool -> dense."""

    norm: str

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), name="conv")(x)
        if self.norm == "layer":
            x = nn.LayerNorm(name="ln")(x)
        else:
            x = nn.BatchNorm(use_running_average=False, name="bn")(x)
        x = nn.Dense(8, name="hidden")(nn.relu(x).mean(axis=(1, 2)))
        return nn.Dense(3, name="out")(nn.relu(x))


@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_scale_invariant_mask_of_small_flax_models(norm):
    model, x = _ConvNorm(norm), jax.random.normal(jax.random.key(1), (8, 8, 8, 3))
    variables = model.init(jax.random.key(0), x)

    def apply_fn(params, x):  # BatchNorm normalizes with the statistics of `x` (training mode)
        return model.apply({**variables, "params": params}, x, mutable=["batch_stats"])[0]

    mask = lo.scale_invariant_mask(apply_fn, variables["params"], x)
    sensitivity = lo.scale_sensitivity(apply_fn, variables["params"], x)
    assert mask == jax.tree.map(lambda s: bool(s < 0.02), sensitivity)
    expected = {"conv": True, "hidden": False, "out": False}  # relu is not a normalization
    assert {m: mask[m]["kernel"] for m in expected} == expected
    assert not any(v for m, leaves in mask.items() for n, v in leaves.items() if n != "kernel")
    # Without a normalization nothing is scale-invariant.
    plain = lo.scale_invariant_mask(_hidden_and_out, _mlp_params(), x[:, 0, 0])
    assert not any(jax.tree.leaves(plain))


def _mlp_params():
    k = jax.random.split(jax.random.key(2), 2)
    return {
        "hidden": {"kernel": jax.random.normal(k[0], (3, 8)), "bias": jnp.zeros(8)},
        "out": {"kernel": jax.random.normal(k[1], (8, 2))},
    }


@pytest.mark.parametrize("layer_scale", [1e-6, 1.0])
def test_scale_invariant_layers_of_convnext(layer_scale):
    """ConvNeXt: the stem conv and every depthwise conv are followed by a LayerNorm; the block
    MLP and the head are not. The downsample convs feed the next LayerNorm through the residual
    stream, to which the blocks add layer_scale * (their output): invariant at init (1e-6),
    not with trained-size layer scales. (Measured sensitivities: 2e-7 to 2.4e-3 for the
    invariant kernels, 0.095 and up for the others.)"""
    models = pytest.importorskip("lpwd_optax.models")
    net = models.create_model(
        "convnext_atto_cifar",
        num_classes=10,
        dims=(32, 64),
        depths=(1, 1),
        kernel_size=3,
        ls_init_value=layer_scale,
    )
    fm = models.functional_model(net)
    images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    mask = lo.scale_invariant_mask(lambda p, x: fm.apply(p, x), fm.params, images)
    invariant = {path.removesuffix("/kernel") for path, m in leaves_with_paths(mask) if m}
    expected = {"stem/conv", "stages/0/blocks/0/conv_dw", "stages/1/blocks/0/conv_dw"}
    if layer_scale < 1e-3:
        expected |= {"stages/0/downsample/conv", "stages/1/downsample/conv"}
    assert invariant == expected
