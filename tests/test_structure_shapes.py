"""`LayerStructure.from_shapes`: the one structure the transforms use without `layers=`.

Each leaf's role, axes, decay and depth are written out by hand for Flax, Equinox and Haiku
params (the shapes alone read every tree in Flax's layout: output channel last), and every
transform or diagnostic that takes `layers=` gives, without it, exactly what it gives with
`layers=LayerStructure.from_shapes(params)`.
"""

from __future__ import annotations

import chex
import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lpwd_optax as lo


class FlaxNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), name="conv")(x)
        x = nn.Conv(8, (3, 3), feature_group_count=8, name="dwconv")(x)
        x = nn.LayerNorm(name="norm")(x).mean((1, 2))
        return nn.Dense(3, name="head")(nn.Dense(6, name="fc")(x))


X = jnp.ones((2, 8, 8, 4))


def _flax_params():
    return FlaxNet().init(jax.random.key(0), X)["params"]


def _equinox_params():
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    model = [
        eqx.nn.Conv2d(4, 8, 3, key=k1),  # weight (out, in, kh, kw), bias (out, 1, 1)
        eqx.nn.LayerNorm(8),
        eqx.nn.Linear(8, 6, key=k2),  # weight (out, in)
        eqx.nn.Linear(6, 3, use_bias=False, key=k3),
    ]
    return eqx.filter(model, eqx.is_array)


def _haiku_params():
    def forward(x):
        x = hk.Conv2D(8, 3, name="conv")(x)
        x = hk.BatchNorm(True, True, 0.9, name="bn")(x, is_training=True)  # (1, 1, 1, C)
        return hk.Linear(6, name="fc")(x.mean((1, 2)))

    params, _ = hk.transform_with_state(forward).init(jax.random.key(2), X)
    return params


# path: (role, input axes, window axes, output axes, decays, depth). Nothing is stacked.
FLAX = {
    "conv/bias": ("other", (), (), (), False, 1),
    "conv/kernel": ("kernel", (2,), (0, 1), (3,), True, 1),
    "dwconv/bias": ("other", (), (), (), False, 2),
    "dwconv/kernel": ("kernel", (2,), (0, 1), (3,), True, 2),
    "fc/bias": ("other", (), (), (), False, 3),
    "fc/kernel": ("kernel", (0,), (), (1,), True, 3),
    "head/bias": ("other", (), (), (), False, 4),
    "head/kernel": ("kernel", (0,), (), (1,), True, 4),
    "norm/bias": ("other", (), (), (), False, 5),
    "norm/scale": ("other", (), (), (), False, 5),
}
# Equinox's (out, in, ...) kernels read as Flax's (..., in, out): what the shapes alone say.
EQUINOX = {
    "0/bias": ("kernel", (1,), (0,), (2,), False, 1),  # (8, 1, 1): one axis of size > 1
    "0/weight": ("kernel", (2,), (0, 1), (3,), True, 1),
    "1/bias": ("other", (), (), (), False, 2),
    "1/weight": ("other", (), (), (), False, 2),
    "2/bias": ("other", (), (), (), False, 3),
    "2/weight": ("kernel", (0,), (), (1,), True, 3),
    "3/weight": ("kernel", (0,), (), (1,), True, 4),
}
HAIKU = {
    "bn/offset": ("kernel", (2,), (0, 1), (3,), False, 1),  # (1, 1, 1, 8): not decayed
    "bn/scale": ("kernel", (2,), (0, 1), (3,), False, 1),
    "conv/b": ("other", (), (), (), False, 2),
    "conv/w": ("kernel", (2,), (0, 1), (3,), True, 2),
    "fc/b": ("other", (), (), (), False, 3),
    "fc/w": ("kernel", (0,), (), (1,), True, 3),
}


@pytest.mark.parametrize(
    "params, expected",
    [(_flax_params, FLAX), (_equinox_params, EQUINOX), (_haiku_params, HAIKU)],
    ids=["flax", "equinox", "haiku"],
)
def test_from_shapes_reads_every_layout_as_flax(params, expected):
    params = params()
    layers = lo.LayerStructure.from_shapes(params)
    got = {
        x.path: (x.role, x.input_axes, x.spatial_axes, x.output_axes, x.decay, x.depth)
        for x in layers.leaves
    }
    assert got == expected
    assert all(x.stacked_axes == () for x in layers.leaves)
    assert layers.decay_mask == lo.default_decay_mask(params)
    assert layers.depths == lo.depth_labels(params)
    # The per-channel axes every transform reads: WRS's norms and AdamP's views.
    for x in layers.leaves:
        ndim = len(x.shape)
        assert x.has_units == (ndim >= 2)
        assert x.slice_axes == tuple(range(ndim))
        if ndim >= 2:
            assert x.fan_in_axes == tuple(range(ndim - 1))  # all but the output channel
            assert x.input_axes == (ndim - 2,)


# --------------------------------------------------------------------------------------------
# Without `layers=` is with `layers=LayerStructure.from_shapes(params)`


def _params():
    params = {"flax": _flax_params(), "equinox": _equinox_params(), "haiku": _haiku_params()}
    params["relative_position_bias_table"] = jnp.ones((7, 2))
    return params


def _groups(params):
    # Two AdaDecay groups that span libraries: the Flax leaves, and all others.
    return {k: jax.tree.map(lambda _, k=k: int(k == "flax"), v) for k, v in params.items()}


TRANSFORMS = {
    "adaptive_weight_decay": lambda p, layers: lo.adaptive_weight_decay(0.1, layers=layers),
    "adaptive_weight_decay groups": lambda p, layers: lo.adaptive_weight_decay(
        0.1, groups=_groups(p), layers=layers
    ),
    "randomized_weight_decay": lambda p, layers: lo.randomized_weight_decay(
        0.1, key=jax.random.key(3), layers=layers
    ),
    "weight_rescaling output": lambda p, layers: optax.chain(
        optax.sgd(0.1), lo.weight_rescaling(2, layers=layers)
    ),
    "weight_rescaling input": lambda p, layers: optax.chain(
        optax.sgd(0.1), lo.weight_rescaling(1, mode="input", layers=layers)
    ),
    "project_scale_invariant": lambda p, layers: lo.project_scale_invariant(
        optax.adam(0.1), weight_decay=0.1, learning_rate=0.1, layers=layers
    ),
    "project_scale_invariant layer view": lambda p, layers: lo.project_scale_invariant(
        optax.sgd(0.1), weight_decay=0.1, views=("layer",), layers=layers
    ),
    "adamp": lambda p, layers: lo.adamp(1e-2, weight_decay=1e-2, layers=layers),
    "sgdp": lambda p, layers: lo.sgdp(1e-2, momentum=0.9, weight_decay=1e-2, layers=layers),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_a_transform_without_layers_is_one_with_the_shapes_structure(name):
    params = _params()
    layers = lo.LayerStructure.from_shapes(params)
    keys = iter(jax.random.split(jax.random.key(4), 100))
    grads = [jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape), params)] * 2
    trajectories = []
    for given in (None, layers):
        tx = TRANSFORMS[name](params, given)
        state, p, updates = tx.init(params), params, []
        step = jax.jit(tx.update)
        for g in grads:
            u, state = step(g, state, p)
            p = optax.apply_updates(p, u)
            updates.append(u)
        trajectories.append(updates)
    chex.assert_trees_all_equal(*trajectories)


def test_the_diagnostics_without_layers_are_those_with_the_shapes_structure():
    params = _params()
    layers = lo.LayerStructure.from_shapes(params)
    updates = jax.tree.map(lambda p: 0.1 * jnp.cos(p), params)
    for mode in ("output", "input"):
        chex.assert_trees_all_equal(
            lo.rescale_params(params, mode=mode),
            lo.rescale_params(params, mode=mode, layers=layers),
        )
    chex.assert_trees_all_equal(
        lo.layer_statistics(params, updates, learning_rate=0.1),
        lo.layer_statistics(params, updates, learning_rate=0.1, layers=layers),
    )
    # With layers=, depth_table adds the role and stacked columns to the same rows.
    labels = lo.depth_labels(params)
    rates = lo.layerwise_schedule(labels, 0.1)
    rows = lambda table: [line.split()[:2] for line in table.splitlines()[1:]]
    assert rows(lo.depth_table(params, labels, rates)) == rows(
        lo.depth_table(params, labels, rates, layers=layers)
    )

    flax_params = params["flax"]
    apply = lambda p, x: FlaxNet().apply({"params": p}, x)
    flax_layers = lo.LayerStructure.from_shapes(flax_params)
    without = lo.scale_sensitivity(apply, flax_params, X)
    with_layers = lo.scale_sensitivity(apply, flax_params, X, layers=flax_layers)
    np.testing.assert_array_equal(jax.tree.leaves(without), jax.tree.leaves(with_layers))
    assert lo.scale_invariant_mask(apply, flax_params, X) == lo.scale_invariant_mask(
        apply, flax_params, X, layers=flax_layers
    )
