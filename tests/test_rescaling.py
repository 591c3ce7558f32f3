"""Weight rescaling: unit channel norms on schedule, and BatchNorm invariance."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lpwd_optax as lo
from tests import reference


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "conv": {
            "kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 5)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32),
        },
        "dw": {"kernel": jnp.asarray(rng.normal(size=(7, 7, 1, 6)), jnp.float32)},
        "fc": {"kernel": jnp.asarray(rng.normal(size=(6, 2)), jnp.float32)},
    }


@pytest.mark.parametrize("every", [1, 3])
def test_rescales_exactly_every_k_steps(every):
    params = _params()
    opt = optax.chain(optax.sgd(0.1), lo.weight_rescaling(every))
    state = opt.init(params)
    rng = np.random.default_rng(1)
    for t in range(6):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        plain = optax.apply_updates(params, jax.tree.map(lambda g: -0.1 * g, grads))
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        if (t + 1) % every == 0:
            for name in ("conv", "dw", "fc"):
                np.testing.assert_allclose(
                    params[name]["kernel"],
                    reference.rescale_output_channels(np.asarray(plain[name]["kernel"])),
                    rtol=1e-5,
                    atol=1e-6,
                )
                norms = np.sqrt(
                    (np.asarray(params[name]["kernel"]) ** 2)
                    .reshape(-1, params[name]["kernel"].shape[-1])
                    .sum(0)
                )
                np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
        else:
            chex.assert_trees_all_close(params, plain, rtol=1e-6)
        np.testing.assert_allclose(params["conv"]["bias"], plain["conv"]["bias"], rtol=1e-6)


def test_input_channel_mode_normalizes_each_position_over_in():
    params = _params(2)
    tx = lo.weight_rescaling(1, mode="input")
    zeros = jax.tree.map(jnp.zeros_like, params)
    out, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, out)
    k = np.asarray(new["conv"]["kernel"])
    np.testing.assert_allclose(np.sqrt((k**2).sum(axis=2)), np.ones((3, 3, 5)), rtol=1e-5)
    w = np.asarray(params["conv"]["kernel"], np.float64)
    for i, j, o in [(0, 0, 0), (2, 1, 4)]:
        np.testing.assert_allclose(
            k[i, j, :, o], w[i, j, :, o] / np.linalg.norm(w[i, j, :, o]), rtol=1e-5
        )


class ConvBN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), use_bias=False, name="conv")(x)
        return nn.BatchNorm(use_running_average=False, epsilon=1e-12, name="bn")(x)


def test_conv_followed_by_batchnorm_is_unchanged_by_a_rescale():
    model = ConvBN()
    x = jax.random.normal(jax.random.key(0), (4, 10, 10, 3))
    variables = model.init(jax.random.key(1), x)
    params = variables["params"]
    # Make channel norms far from one so the rescale is a real change.
    params = {**params, "conv": {"kernel": params["conv"]["kernel"] * 7.3}}
    tx = lo.weight_rescaling(1)
    zeros = jax.tree.map(jnp.zeros_like, params)
    out, _ = tx.update(zeros, tx.init(params), params)
    rescaled = optax.apply_updates(params, out)
    assert not np.allclose(rescaled["conv"]["kernel"], params["conv"]["kernel"])

    def apply(p):
        y, _ = model.apply({**variables, "params": p}, x, mutable=["batch_stats"])
        return y

    np.testing.assert_allclose(apply(rescaled), apply(params), rtol=1e-4, atol=1e-5)


def test_rescale_kernel_rejects_bad_input():
    with pytest.raises(ValueError, match="mode"):
        lo.rescale_kernel(jnp.ones((2, 2)), mode="both")
    with pytest.raises(ValueError, match="ndim"):
        lo.rescale_kernel(jnp.ones((3,)))


def _flat(tree):
    return dict(lo._common.leaves_with_paths(tree))


def _sgd_step_then_rescale(sgd, every):
    # WRS's in-step form: the update applied, then `rescale_params` under a conditional.
    @jax.jit
    def step(params, state, grads, t):
        updates, state = sgd.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        due = (t + 1) % every == 0
        return jax.lax.cond(due, lo.rescale_params, lambda p: p, params), state

    return step


@pytest.mark.parametrize("form", ["own call", "in step"])
@pytest.mark.parametrize("every", [1, 3])
def test_rescale_params_after_every_kth_update_matches_reference_and_transform(every, form):
    # WRS without the transform: the base optimizer alone, then `rescale_params` after every
    # k-th update, in a jitted call of its own or in the step under a conditional. Checked
    # against a numpy loop of SGD + per-channel rescale, and against the `weight_rescaling`
    # transform's trajectory.
    params = _params(3)
    sgd = optax.sgd(0.1)
    sgd_state = sgd.init(params)
    chain = optax.chain(optax.sgd(0.1), lo.weight_rescaling(every))
    chain_params, chain_state = params, chain.init(params)
    ref = {name: np.asarray(leaf, np.float64) for name, leaf in _flat(params).items()}
    rescale = jax.jit(lo.rescale_params)
    in_step = _sgd_step_then_rescale(sgd, every)
    rng = np.random.default_rng(4)
    for t in range(6):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        updates, chain_state = chain.update(grads, chain_state, chain_params)
        chain_params = optax.apply_updates(chain_params, updates)
        due = (t + 1) % every == 0
        if form == "in step":
            params, sgd_state = in_step(params, sgd_state, grads, t)
        else:
            updates, sgd_state = sgd.update(grads, sgd_state, params)
            params = optax.apply_updates(params, updates)
            if due:
                params = rescale(params)
        for name, g in _flat(grads).items():
            ref[name] = ref[name] - 0.1 * np.asarray(g, np.float64)
            if due and name.endswith("kernel"):
                ref[name] = reference.rescale_output_channels(ref[name])
        for name, leaf in _flat(params).items():
            np.testing.assert_allclose(leaf, ref[name], rtol=1e-5, atol=1e-6, err_msg=name)
        chex.assert_trees_all_close(params, chain_params, rtol=1e-5, atol=1e-6)


def test_rescale_params_input_mode_and_untouched_leaves():
    params = _params(5)
    new = lo.rescale_params(params, mode="input")
    k = np.asarray(new["conv"]["kernel"])
    np.testing.assert_allclose(np.sqrt((k**2).sum(axis=2)), np.ones((3, 3, 5)), rtol=1e-5)
    np.testing.assert_array_equal(new["conv"]["bias"], params["conv"]["bias"])
    nothing = lo.rescale_params(params, mask=lambda p: jax.tree.map(lambda _: False, p))
    chex.assert_trees_all_equal(nothing, params)


def test_rescale_params_rejects_bad_input():
    params = _params()
    with pytest.raises(ValueError, match="mode"):
        lo.rescale_params(params, mode="both")
    everything = jax.tree.map(lambda _: True, params)
    with pytest.raises(ValueError, match=r"rescale_params: 'conv/bias' has shape \(5,\)"):
        lo.rescale_params(params, mask=everything)


@pytest.mark.parametrize("every", [1, 1000])
def test_wrs_step_keeps_a_few_kernels_in_memory(every):
    """XLA writes `theta + u` (a rescale step) or `u` (a skipped one) to memory; the kernels are
    computed one after another, so those temporaries take at most three kernels' bytes, however
    many kernels there are (XLA:CPU's buffer assignment; computed side by side, all ten)."""
    if jax.default_backend() != "cpu":
        return
    params = {f"k{i}": jax.ShapeDtypeStruct((256, 512), jnp.float32) for i in range(10)}
    opt = optax.chain(optax.adam(1e-3), lo.weight_rescaling(every))

    def step(p, s, g):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = jax.eval_shape(opt.init, params)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()
    assert compiled.memory_analysis().temp_size_in_bytes <= 3 * 256 * 512 * 4 + 2**16
