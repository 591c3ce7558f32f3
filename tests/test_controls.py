"""The LPWD controls (lwd, lpwd_reversed, lpwd_shuffled, wd_matched) and WRS on the
scale-invariant kernels: each builds the intended chain with rates worked out by hand."""

from __future__ import annotations

import json
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lpwd_optax as lo
from lpwd_optax._common import leaves_with_paths
from lpwd_optax.experiments import cifar, methods
from tests import _cifar_helpers as helpers

LR, LAM = 0.05, 0.4


class Net(nn.Module):
    """Forward order a (4x8 kernel) -> norm (LayerNorm) -> b (8x6) -> c (6x2): depth labels
    1, 2, 3, 4; the decayed leaves are the three kernels (32, 48 and 12 entries)."""

    @nn.compact
    def __call__(self, x):
        x = nn.LayerNorm(name="norm")(nn.Dense(8, name="a")(x))
        x = nn.relu(nn.Dense(6, name="b")(x))
        return nn.Dense(2, name="c")(x)


def _net():
    x = jax.random.normal(jax.random.key(1), (16, 4))
    params = Net().init(jax.random.key(0), x)["params"]
    return params, (lambda p, x: Net().apply({"params": p}, x)), x


# LPWD's rates lambda * 2 * i / 4 = lambda * i / 2 at depth i of n = 4.
LPWD_RATES = {"a": LAM / 2, "norm": LAM, "b": 3 * LAM / 2, "c": 2 * LAM}


def _rate_tree(params, per_module):
    return {m: {k: per_module[m] for k in leaves} for m, leaves in params.items()}


def _build(name, params, apply_fn, x, **kwargs):
    return methods.build_method(
        name,
        optimizer="adam",
        learning_rate=LR,
        weight_decay=LAM,
        params=params,
        apply_fn=apply_fn,
        example_batch=x,
        **kwargs,
    )


def _assert_same_updates(method, reference, params, steps=3):
    """`method.tx` and `reference` give the same updates on random gradients, step after step."""
    state, ref_state = method.tx.init(params), reference.init(params)
    key = jax.random.key(7)
    for _ in range(steps):
        key, sub = jax.random.split(key)
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(sub, len(leaves))
        grads = jax.tree.unflatten(
            treedef, [jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)]
        )
        updates, state = method.tx.update(grads, state, params)
        want, ref_state = reference.update(grads, ref_state, params)
        chex.assert_trees_all_close(updates, want, rtol=1e-6, atol=1e-7)
        params = optax.apply_updates(params, updates)


def test_lwd_is_wd_with_lpwds_rates_and_no_pre_decay():
    params, apply_fn, x = _net()
    method = _build("lwd", params, apply_fn, x)
    assert (method.placement, method.predecayed, method.has_rop) == ("last", False, True)
    chex.assert_trees_all_equal(method.init_params(params), params)  # nothing pre-decayed
    rates = _rate_tree(params, LPWD_RATES)
    reference = optax.chain(optax.adam(LR, eps=1e-8), lo.weight_decay(rates, learning_rate=LR))
    _assert_same_updates(method, reference, params)
    # With a zero gradient Adam's update is 0 and only the decay remains: -eta * lambda_i * theta.
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = method.tx.update(zero, method.tx.init(params), params)
    for m in ("a", "b", "c"):
        np.testing.assert_allclose(
            updates[m]["kernel"], -LR * LPWD_RATES[m] * params[m]["kernel"], rtol=1e-6
        )
        np.testing.assert_array_equal(updates[m]["bias"], 0.0)


def test_wd_matched_rate_is_the_parameter_weighted_mean_of_lpwds_rates():
    params, apply_fn, x = _net()
    method = _build("wd_matched", params, apply_fn, x)
    # Decayed leaves: a/kernel (32 entries, rate lambda/2), b/kernel (48, 3 lambda/2),
    # c/kernel (12, 2 lambda): (16 + 72 + 24) / 92 = 112 / 92 = 28 / 23 lambda.
    matched = 28 / 23 * LAM
    assert method.details["matched_rate"] == pytest.approx(matched, rel=1e-12)
    assert method.details["mass_weighted_rate_over_lambda"] == pytest.approx(28 / 23)
    assert f"{matched:.6g}" in method.description.splitlines()[0]
    assert (method.placement, method.predecayed) == ("last", False)
    reference = optax.chain(optax.adam(LR, eps=1e-8), lo.weight_decay(matched, learning_rate=LR))
    _assert_same_updates(method, reference, params)
    # LPWD reports the same mean, from the same depth table.
    lpwd = _build("lpwd", params, apply_fn, x)
    assert lpwd.details["mass_weighted_rate"] == pytest.approx(matched, rel=1e-12)


def _check_pre_decay(method, params, per_module):
    """A pre-decayed method with per-layer rates `per_module` on the kernels."""
    rates = _rate_tree(params, per_module)
    assert method.predecayed and method.placement == "last"
    reference = optax.chain(optax.adam(LR, eps=1e-8), lo.pre_weight_decay(rates, learning_rate=LR))
    _assert_same_updates(method, reference, params)
    stored = method.init_params(params)
    for m in ("a", "b", "c"):  # phi_0 = (1 - eta * lambda_i) theta_0 on the kernels
        np.testing.assert_allclose(
            stored[m]["kernel"], (1 - LR * per_module[m]) * params[m]["kernel"], rtol=1e-6
        )
        np.testing.assert_array_equal(stored[m]["bias"], params[m]["bias"])
    chex.assert_trees_all_close(method.eval_params(stored, 0), params, rtol=1e-6)


def test_lpwd_reversed_gives_the_shallowest_decayed_layer_the_deepest_rate():
    params, apply_fn, x = _net()
    method = _build("lpwd_reversed", params, apply_fn, x)
    # Decayed layers 1 (a), 3 (b), 4 (c) take the rates of 4, 3, 1; norm (2) is not decayed.
    assert method.details["rate_taken_from_layer"] == {"1": 4, "3": 3, "4": 1}
    _check_pre_decay(method, params, {"a": 2 * LAM, "norm": LAM, "b": 3 * LAM / 2, "c": LAM / 2})
    # (32 * 2 + 48 * 1.5 + 12 * 0.5) / 92 = 142 / 92 of lambda: less mass than LPWD's 112 / 92.
    assert method.details["mass_weighted_rate_over_lambda"] == pytest.approx(142 / 92)


@pytest.mark.parametrize("seed", [0, 3])
def test_lpwd_shuffled_uses_a_fixed_permutation_of_lpwds_rates(seed):
    params, apply_fn, x = _net()
    method = _build("lpwd_shuffled", params, apply_fn, x, lpwd_permutation_seed=seed)
    order = np.random.default_rng(seed).permutation(3)  # over the decayed layers 1, 3, 4
    layers = [1, 3, 4]
    rate_of_layer = {1: LAM / 2, 3: 3 * LAM / 2, 4: 2 * LAM}
    module_of_layer = {1: "a", 3: "b", 4: "c"}
    expected = {"norm": LAM}
    for layer, j in zip(layers, order):
        expected[module_of_layer[layer]] = rate_of_layer[layers[j]]
    assert method.details["permutation_seed"] == seed
    assert method.details["rate_taken_from_layer"] == {
        str(layer): layers[j] for layer, j in zip(layers, order)
    }
    _check_pre_decay(method, params, expected)
    # The permutation depends on the permutation seed alone: the same for every run seed.
    again = _build("lpwd_shuffled", params, apply_fn, x, lpwd_permutation_seed=seed)
    assert again.details == method.details


def test_reassign_layer_rates_rejects_a_wrong_order():
    labels = {"a": 1, "b": 2}
    with pytest.raises(ValueError, match="permutation of range"):
        methods.reassign_layer_rates(labels, labels, {"a": True, "b": True}, [0, 0])


class _ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.relu(nn.Dense(8, name="fc")(x)), None


class ScanNet(nn.Module):
    """embed (4x8) -> 3 scanned blocks (a stacked (3, 8, 8) kernel and (3, 8) bias) -> head
    (8x2): depths 1, then 2, 3, 4 over the slices, then 5."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8, name="embed")(x)
        blocks = nn.scan(
            _ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )
        x, _ = blocks(name="blocks")(x, None)
        return nn.Dense(2, name="head")(x)


def test_controls_on_a_scanned_model_move_rates_slice_by_slice():
    x = jax.random.normal(jax.random.key(1), (16, 4))
    params = ScanNet().init(jax.random.key(0), x)["params"]
    apply_fn = lambda p, x: ScanNet().apply({"params": p}, x)
    layers = lo.layer_structure(params, apply_fn, x)
    unit = 2 * LAM / 5  # LPWD's rate lambda * 2 * i / 5 at depth i is i units
    # lpwd_reversed: depth i takes depth 6 - i's rate; the stacked kernel's slices 2, 3, 4
    # take 4, 3, 2 units. Its stacked bias (3, 8) is not decayed: a bias in every slice.
    method = methods.build_method(
        "lpwd_reversed",
        optimizer="adam",
        learning_rate=LR,
        weight_decay=LAM,
        params=params,
        layers=layers,
    )
    assert method.details["rate_taken_from_layer"] == {"1": 5, "2": 4, "3": 3, "4": 2, "5": 1}
    stored = method.init_params(params)
    kernel = params["blocks"]["fc"]["kernel"]
    for i, units in enumerate([4, 3, 2]):
        np.testing.assert_allclose(
            stored["blocks"]["fc"]["kernel"][i], (1 - LR * units * unit) * kernel[i], rtol=1e-6
        )
    np.testing.assert_allclose(
        stored["embed"]["kernel"], (1 - LR * 5 * unit) * params["embed"]["kernel"], rtol=1e-6
    )
    np.testing.assert_allclose(
        stored["head"]["kernel"], (1 - LR * 1 * unit) * params["head"]["kernel"], rtol=1e-6
    )
    for m in ("embed", "blocks", "head"):
        key = "fc" if m == "blocks" else None
        bias = params[m][key]["bias"] if key else params[m]["bias"]
        got = stored[m][key]["bias"] if key else stored[m]["bias"]
        np.testing.assert_array_equal(got, bias)
    chex.assert_trees_all_close(method.eval_params(stored, 0), params, rtol=1e-6)
    # wd_matched: (32 * 1 + 64 * (2 + 3 + 4) + 16 * 5) / 240 = 688 / 240 units.
    matched = methods.build_method(
        "wd_matched",
        optimizer="adam",
        learning_rate=LR,
        weight_decay=LAM,
        params=params,
        layers=layers,
    )
    assert matched.details["matched_rate"] == pytest.approx(688 / 240 * unit, rel=1e-12)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = matched.tx.update(zero, matched.tx.init(params), params)
    np.testing.assert_array_equal(updates["blocks"]["fc"]["bias"], 0.0)
    np.testing.assert_allclose(
        updates["blocks"]["fc"]["kernel"], -LR * 688 / 240 * unit * kernel, rtol=1e-6
    )


# ----------------------------------------------------------------------------------------------
# WRS: only the scale-invariant kernels are rescaled.


def test_wrs_rescales_only_the_scale_invariant_kernels_and_decays_the_rest():
    params, apply_fn, x = _net()
    invariant = lo.scale_invariant_mask(apply_fn, params, x)
    assert invariant["a"]["kernel"] and not invariant["b"]["kernel"]  # a LayerNorm follows a
    method = _build("wrs", params, apply_fn, x, scale_invariant=invariant)
    assert method.details["rescaled"] == ["a/kernel"]
    assert "rescales the 1 scale-invariant kernels" in method.description
    others = jax.tree.map(lambda m: not m, invariant)
    reference = optax.chain(
        optax.adam(LR, eps=1e-8),
        lo.weight_decay(LAM, learning_rate=LR, mask=others),
        lo.weight_rescaling(1, mode="output", mask=invariant),
    )
    _assert_same_updates(method, reference, params)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = method.tx.update(zero, method.tx.init(params), params)
    new = optax.apply_updates(params, updates)
    # a's kernel: unit norm per output channel; every other leaf: (1 - eta * lambda) theta.
    np.testing.assert_allclose(np.linalg.norm(new["a"]["kernel"], axis=0), 1.0, rtol=1e-5)
    for m, leaf in (("b", "kernel"), ("c", "kernel"), ("a", "bias"), ("norm", "scale")):
        np.testing.assert_allclose(new[m][leaf], (1 - LR * LAM) * params[m][leaf], rtol=1e-6)


class ConvNet(nn.Module):
    """A 3x3 conv and a 3x3 depthwise conv, each followed by a LayerNorm (both invariant)."""

    @nn.compact
    def __call__(self, x):
        x = nn.LayerNorm(name="n1")(nn.Conv(4, (3, 3), name="conv")(x))
        x = nn.Conv(4, (3, 3), feature_group_count=4, name="dw")(x)
        x = nn.LayerNorm(name="n2")(x).mean((1, 2))
        return nn.Dense(3, name="head")(x)


def test_wrs_ic_rescales_per_input_channel_and_depthwise_kernels_per_channel():
    x = jax.random.normal(jax.random.key(1), (8, 6, 6, 2))
    params = ConvNet().init(jax.random.key(0), x)["params"]
    apply_fn = lambda p, x: ConvNet().apply({"params": p}, x)
    invariant = lo.scale_invariant_mask(apply_fn, params, x)
    assert invariant["conv"]["kernel"] and invariant["dw"]["kernel"]
    assert not invariant["head"]["kernel"]
    method = _build("wrs_ic", params, apply_fn, x, scale_invariant=invariant)
    assert method.details["mode"] == "input" and "mode=input" in method.description
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = method.tx.update(zero, method.tx.init(params), params)
    new = optax.apply_updates(params, updates)
    # (3, 3, 2, 4): unit norm over the input axis at every (kh, kw, out) position.
    np.testing.assert_allclose(np.linalg.norm(new["conv"]["kernel"], axis=2), 1.0, rtol=1e-5)
    # (3, 3, 1, 4): unit norm per channel over (kh, kw, 1), not +-1 per entry.
    dw = np.asarray(new["dw"]["kernel"])
    np.testing.assert_allclose(np.sqrt((dw**2).sum(axis=(0, 1, 2))), 1.0, rtol=1e-5)
    assert not np.allclose(np.abs(dw), 1.0)
    np.testing.assert_allclose(
        new["head"]["kernel"], (1 - LR * LAM) * params["head"]["kernel"], rtol=1e-6
    )


def test_wrs_needs_the_scale_invariant_mask():
    params, apply_fn, x = _net()
    for name in methods.RESCALING_METHODS:
        with pytest.raises(ValueError, match="needs the scale_invariant mask"):
            _build(name, params, apply_fn, x)
    bad = jax.tree.map(lambda _: True, params)  # marks biases too
    with pytest.raises(ValueError, match="'a/bias', which is not a kernel"):
        _build("wrs", params, apply_fn, x, scale_invariant=bad)


@pytest.mark.slow
def test_the_program_rescales_exactly_the_layers_layers_txt_calls_invariant(
    tmp_path, cache_dir, monkeypatch
):
    monkeypatch.setenv("LPWD_OPTAX_CACHE", str(tmp_path / "data_cache"))
    out = tmp_path / "run"
    flags = helpers.run_flags(out, cache_dir, "--method=wrs", "--epochs=1", "--optimizer=sgdm")
    assert cifar.main(flags) == 0
    with open(out / "layers.txt") as f:
        rows = [
            line.split() for line in f if re.match(r"^\S+\s+\d\.\d\de[+-]\d\d\s+(yes|no)$", line)
        ]
    invariant = {name for name, _, verdict in rows if verdict == "yes"}
    assert invariant and len(invariant) < len(rows)  # some kernels are not scale-invariant
    with open(out / "config.json") as f:
        rescaled = json.load(f)["method_details"]["rescaled"]
    assert {path.rsplit("/", 1)[0] for path in rescaled} == invariant
    assert all(path.endswith("/kernel") for path in rescaled)


def test_the_program_traces_the_forward_pass_once(tmp_path, cache_dir, monkeypatch):
    """build() reads LPWD's depths, the decay mask and the kernels from one layer_structure,
    with the same depths and rates the separate depth_labels trace gives."""
    monkeypatch.setenv("LPWD_OPTAX_CACHE", str(tmp_path / "data_cache"))
    from lpwd_optax.experiments.config import parse_config

    calls = []
    real = lo.layer_structure
    monkeypatch.setattr(lo, "layer_structure", lambda *a, **k: calls.append(1) or real(*a, **k))
    separate = {"depth_labels": lo.depth_labels, "scale_invariant_mask": lo.scale_invariant_mask}

    def refuse(*a, **k):
        raise AssertionError("a separate trace of the forward pass")

    for name in (*separate, "default_decay_mask"):
        monkeypatch.setattr(lo, name, refuse)
    setup = cifar.build(
        parse_config(helpers.run_flags(tmp_path / "run", cache_dir, "--method=lpwd"))
    )
    assert len(calls) == 1
    params, apply_fn = setup.model.params, setup.model.apply
    example = jnp.zeros((2, *setup.train_ds.images.shape[1:]), jnp.float32)
    labels = separate["depth_labels"](params, apply_fn, example)
    assert jax.tree.map(int, setup.layers.depths) == jax.tree.map(int, labels)
    rates = lo.layerwise_schedule(labels, 0.5, max_scale=2.0)
    stored = setup.method.init_params(params)
    want = lo.pre_decay_params(params, rates, learning_rate=1e-2)
    chex.assert_trees_all_close(stored, want, rtol=1e-6)
    # layers.txt's invariant kernels are those scale_invariant_mask finds on its own.
    probe = cifar.first_images(setup.train_ds, cifar.SCALE_PROBE_EXAMPLES)
    mask = separate["scale_invariant_mask"](apply_fn, params, probe)
    flat = [p for p, m in zip(leaves_with_paths(params), jax.tree.leaves(mask)) if m]
    assert {path.rsplit("/", 1)[0] for path, _ in flat} == set(cifar.scale_invariant_modules(setup))
    table = cifar._scale_invariance_table(setup)
    assert setup.layers.table() in table
