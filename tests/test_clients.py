"""One training loop, four model libraries: Flax linen, Flax NNX, Equinox and Haiku models of the
same network train on real digits with LPWD, WD, AdaDecay, WRS and AdamP, each configured from
the model's `layer_structure` alone."""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lpwd_optax as lo
from lpwd_optax.experiments.data import digits

LR, STEPS, BATCH = 3e-3, 80, 128


def _digits(split):
    data = digits.load(split)
    x = data.images[:, 2::4, 2::4, :1].astype(np.float32) / 255.0  # 8x8 grey, NHWC
    return jnp.asarray(x), jnp.asarray(data.labels)


# The network: conv 3x3 (8) -> relu -> dense (32) -> LayerNorm -> relu -> dense (10).


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x)).reshape(x.shape[0], -1)
        return nn.Dense(10)(nn.relu(nn.LayerNorm()(nn.Dense(32)(x))))


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.hidden = nnx.Linear(8 * 64, 32, rngs=rngs)
        self.norm = nnx.LayerNorm(32, rngs=rngs)
        self.out = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv(x)).reshape(x.shape[0], -1)
        return self.out(nnx.relu(self.norm(self.hidden(x))))


class EqxNet(eqx.Module):
    conv: eqx.nn.Conv2d
    hidden: eqx.nn.Linear
    norm: eqx.nn.LayerNorm
    out: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv = eqx.nn.Conv2d(1, 8, 3, padding=1, key=k1)
        self.hidden = eqx.nn.Linear(8 * 64, 32, key=k2)
        self.norm = eqx.nn.LayerNorm(32)
        self.out = eqx.nn.Linear(32, 10, key=k3)

    def __call__(self, x):  # one example, (H, W, C) as the others get it
        x = jax.nn.relu(self.conv(jnp.transpose(x, (2, 0, 1)))).reshape(-1)
        return self.out(jax.nn.relu(self.norm(self.hidden(x))))


def _haiku_net(x):
    x = jax.nn.relu(hk.Conv2D(8, 3)(x)).reshape(x.shape[0], -1)
    return hk.Linear(10)(jax.nn.relu(hk.LayerNorm(-1, True, True)(hk.Linear(32)(x))))


def _model(library, x):
    """(params, apply_fn) in the library's own idiom."""
    if library == "linen":
        params = LinenNet().init(jax.random.key(0), x)["params"]
        return params, lambda p, x: LinenNet().apply({"params": p}, x)
    if library == "nnx":
        graphdef, params = nnx.split(NnxNet(nnx.Rngs(0)), nnx.Param)
        return params, lambda p, x: nnx.merge(graphdef, p)(x)
    if library == "equinox":
        params, static = eqx.partition(EqxNet(jax.random.key(0)), eqx.is_array)
        return params, lambda p, x: jax.vmap(eqx.combine(p, static))(x)
    t = hk.without_apply_rng(hk.transform(_haiku_net))
    return t.init(jax.random.key(0), x), t.apply


def _method(name, layers):
    """(optimizer, params -> stored params, (stored params, step) -> evaluated weights)."""
    same = lambda p, *_: p
    if name == "lpwd":
        rates = lo.layerwise_schedule(layers.depths, 0.5)
        mask = layers.decay_mask
        tx = optax.chain(optax.adam(LR), lo.pre_weight_decay(rates, learning_rate=LR, mask=mask))
        return (
            tx,
            lambda p: lo.pre_decay_params(p, rates, learning_rate=LR, mask=mask),
            lambda p, t: lo.evaluated_params(p, rates, t, learning_rate=LR, mask=mask),
        )
    if name == "wd":
        tx = optax.chain(
            optax.adam(LR), lo.weight_decay(0.5, learning_rate=LR, mask=layers.decay_mask)
        )
        return tx, same, same
    if name == "adadecay":
        return (
            optax.chain(lo.adaptive_weight_decay(1e-3, layers=layers), optax.adam(LR)),
            same,
            same,
        )
    if name == "wrs":
        return optax.chain(optax.adam(LR), lo.weight_rescaling(1, layers=layers)), same, same
    return lo.adamp(LR, weight_decay=0.5, layers=layers), same, same


@pytest.mark.parametrize("method", ["lpwd", "wd", "adadecay", "wrs", "adamp"])
@pytest.mark.parametrize("library", ["linen", "nnx", "equinox", "haiku"])
def test_one_loop_trains_every_library(library, method):
    x_train, y_train = _digits("train")
    x_test, y_test = _digits("test")
    params, apply_fn = _model(library, x_train[:2])
    layers = lo.layer_structure(params, apply_fn, x_train[:2])
    roles = [x.role for x in layers.leaves]
    assert roles.count("kernel") == 3 and roles.count("scale") == 1, layers
    tx, init, evaluated = _method(method, layers)
    params = init(params)
    state = tx.init(params)

    def loss_fn(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y).mean()

    @jax.jit
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    order = np.random.default_rng(0).permutation(np.arange(STEPS * BATCH) % len(y_train))
    losses = []
    for t in range(STEPS):
        idx = order[t * BATCH : (t + 1) * BATCH]
        params, state, loss = step(params, state, x_train[idx], y_train[idx])
        losses.append(float(loss))
    weights = evaluated(params, STEPS)
    accuracy = float(jnp.mean(jnp.argmax(apply_fn(weights, x_test), -1) == y_test))
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10]), losses
    assert accuracy > 0.8, accuracy
    if method == "wrs":  # every kernel's output units have unit norm over its traced fan-in
        for layout, w in zip(layers.leaves, jax.tree.leaves(params)):
            if layout.role == "kernel":
                norms = jnp.sqrt(jnp.sum(jnp.square(w), axis=layout.fan_in_axes))
                np.testing.assert_allclose(norms, 1.0, rtol=1e-5, err_msg=layout.path)
