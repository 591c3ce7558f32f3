"""The layer structure from the forward pass: a model whose blocks are stacked by a scan and
its unrolled twin are the same model, so from the same weights they must follow the same
trajectory under every per-layer transform, and give the same per-layer diagnostics."""

from __future__ import annotations

import functools
import warnings
from typing import Any

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

L, WIDTH, HIDDEN, CLASSES, STEPS = 4, 8, 16, 3, 20
# Blocks of the scanned models and their unrolled twins: two, the fewest whose slices are
# layers of different depths; more only lengthen the compilation of every twin's step.
BLOCKS = 2
LR = 1e-2


# --------------------------------------------------------------------------------------------
# linen: nn.scan over a block, and the same block unrolled


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(HIDDEN, use_bias=False, name="fc1")(x)  # followed by a norm: invariant
        h = nn.LayerNorm(name="norm")(h)
        return x + nn.Dense(WIDTH, name="fc2")(nn.gelu(h))


class ScanCell(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return Block(name="block")(x), None


class LinenScanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(WIDTH, name="embed")(x)
        blocks = nn.scan(
            nn.remat(ScanCell),
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=BLOCKS,
        )
        x, _ = blocks(name="blocks")(x, None)
        return nn.Dense(CLASSES, name="head")(nn.LayerNorm(name="final_norm")(x))


class LinenUnrolled(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(WIDTH, name="embed")(x)
        for i in range(BLOCKS):
            x = Block(name=f"block_{i}")(x)
        return nn.Dense(CLASSES, name="head")(nn.LayerNorm(name="final_norm")(x))


def _linen_pair():
    x = jax.random.normal(jax.random.key(0), (32, 5))
    scanned = LinenScanned().init(jax.random.key(1), x)["params"]
    scanned = jax.tree.map(lambda a: a * 1.5, scanned)  # some LayerNorm scales away from 1

    def unroll(p):
        out = {k: v for k, v in p.items() if k != "blocks"}
        for i in range(BLOCKS):
            out[f"block_{i}"] = jax.tree.map(lambda a, i=i: a[i], p["blocks"]["block"])
        return out

    apply_s = lambda p, x: LinenScanned().apply({"params": p}, x)
    apply_u = lambda p, x: LinenUnrolled().apply({"params": p}, x)
    return x, (scanned, apply_s), (unroll(scanned), apply_u), unroll, lambda p: p


def _linen_loop_pair():
    """The scanned model's params, applied by a Python loop that reads one slice at a time."""
    x, (stacked, _), (unrolled, apply_u), unroll, pure = _linen_pair()

    def apply_loop(p, x):
        x = nn.Dense(WIDTH).apply({"params": p["embed"]}, x)
        for i in range(BLOCKS):
            block = jax.tree.map(lambda a, i=i: a[i], p["blocks"]["block"])
            x = Block().apply({"params": block}, x)
        x = nn.LayerNorm().apply({"params": p["final_norm"]}, x)
        return nn.Dense(CLASSES).apply({"params": p["head"]}, x)

    return x, (stacked, apply_loop), (unrolled, apply_u), unroll, pure


def _linen_fori_pair():
    """The scanned model's params, applied by `jax.lax.fori_loop`: block i read at the traced
    counter i."""
    x, (stacked, _), (unrolled, apply_u), unroll, pure = _linen_pair()

    def apply_fori(p, x):
        x = nn.Dense(WIDTH).apply({"params": p["embed"]}, x)

        def step(i, x):
            block = jax.tree.map(lambda a: a[i], p["blocks"]["block"])
            return Block().apply({"params": block}, x)

        x = jax.lax.fori_loop(0, BLOCKS, step, x)
        x = nn.LayerNorm().apply({"params": p["final_norm"]}, x)
        return nn.Dense(CLASSES).apply({"params": p["head"]}, x)

    return x, (stacked, apply_fori), (unrolled, apply_u), unroll, pure


# --------------------------------------------------------------------------------------------
# NNX: nnx.vmap-built blocks applied with nnx.scan, and a list of blocks


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(WIDTH, HIDDEN, use_bias=False, rngs=rngs)
        self.norm = nnx.LayerNorm(HIDDEN, rngs=rngs)
        self.fc2 = nnx.Linear(HIDDEN, WIDTH, rngs=rngs)

    def __call__(self, x):
        return x + self.fc2(nnx.gelu(self.norm(self.fc1(x))))


class NnxScanned(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Linear(5, WIDTH, rngs=rngs)

        @nnx.split_rngs(splits=BLOCKS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return NnxBlock(rngs)

        self.blocks = make(rngs)
        self.final_norm = nnx.LayerNorm(WIDTH, rngs=rngs)
        self.head = nnx.Linear(WIDTH, CLASSES, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, block):
            return block(x)

        return self.head(self.final_norm(body(self.embed(x), self.blocks)))


class NnxUnrolled(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Linear(5, WIDTH, rngs=rngs)
        self.blocks = nnx.List([NnxBlock(rngs) for _ in range(BLOCKS)])
        self.final_norm = nnx.LayerNorm(WIDTH, rngs=rngs)
        self.head = nnx.Linear(WIDTH, CLASSES, rngs=rngs)

    def __call__(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x))


def _nnx_pair():
    x = jax.random.normal(jax.random.key(0), (32, 5))
    graph_s, scanned = nnx.split(NnxScanned(nnx.Rngs(1)), nnx.Param)
    graph_u, unrolled = nnx.split(NnxUnrolled(nnx.Rngs(2)), nnx.Param)
    scanned = jax.tree.map(lambda a: a * 1.5, scanned)
    stacked = scanned.to_pure_dict()

    def unroll(state):
        p = state.to_pure_dict() if isinstance(state, nnx.State) else state
        out = {k: v for k, v in p.items() if k != "blocks"}
        out["blocks"] = {i: jax.tree.map(lambda a, i=i: a[i], p["blocks"]) for i in range(BLOCKS)}
        return out

    nnx.replace_by_pure_dict(unrolled, unroll(stacked))
    apply_s = lambda p, x: nnx.merge(graph_s, p)(x)
    apply_u = lambda p, x: nnx.merge(graph_u, p)(x)
    return x, (scanned, apply_s), (unrolled, apply_u), unroll, _pure


# --------------------------------------------------------------------------------------------
# Equinox: eqx.filter_vmap-built blocks applied with jax.lax.scan (its stacked-layers recipe)


class EqxBlock(eqx.Module):
    fc1: eqx.nn.Linear
    norm: eqx.nn.LayerNorm
    fc2: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.fc1 = eqx.nn.Linear(WIDTH, HIDDEN, use_bias=False, key=k1)
        self.norm = eqx.nn.LayerNorm(HIDDEN)
        self.fc2 = eqx.nn.Linear(HIDDEN, WIDTH, key=k2)

    def __call__(self, x):
        return x + self.fc2(jax.nn.gelu(self.norm(self.fc1(x))))


class EqxNet(eqx.Module):
    embed: eqx.nn.Linear
    blocks: Any  # one EqxBlock with stacked arrays, or a list of blocks
    final_norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear
    loop: str = eqx.field(static=True, default="scan")  # over stacked blocks: or "fori_loop"

    def __call__(self, x):
        x = self.embed(x)
        if isinstance(self.blocks, list):
            for block in self.blocks:
                x = block(x)
        elif self.loop == "scan":
            arrays, static = eqx.partition(self.blocks, eqx.is_array)
            step = lambda x, a: (eqx.combine(a, static)(x), None)
            x, _ = jax.lax.scan(step, x, arrays)
        else:
            arrays, static = eqx.partition(self.blocks, eqx.is_array)
            block = lambda i: eqx.combine(jax.tree.map(lambda a: a[i], arrays), static)
            x = jax.lax.fori_loop(0, BLOCKS, lambda i, x: block(i)(x), x)
        return self.head(self.final_norm(x))


def _eqx_pair(loop="scan"):
    x = jax.random.normal(jax.random.key(0), (32, 5))
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    blocks = eqx.filter_vmap(EqxBlock)(jax.random.split(k2, BLOCKS))
    model = EqxNet(
        eqx.nn.Linear(5, WIDTH, key=k1),
        blocks,
        eqx.nn.LayerNorm(WIDTH),
        eqx.nn.Linear(WIDTH, CLASSES, key=k3),
        loop,
    )
    scanned, static_s = eqx.partition(model, eqx.is_array)
    scanned = jax.tree.map(lambda a: a * 1.5, scanned)

    def slices(p):
        return [jax.tree.map(lambda a, i=i: a[i], p.blocks) for i in range(BLOCKS)]

    unrolled_model = eqx.tree_at(
        lambda m: m.blocks,
        eqx.combine(scanned, static_s),
        [eqx.combine(b, eqx.partition(EqxBlock(k2), eqx.is_array)[1]) for b in slices(scanned)],
    )
    unrolled, static_u = eqx.partition(unrolled_model, eqx.is_array)
    apply_s = lambda p, x: jax.vmap(eqx.combine(p, static_s))(x)
    apply_u = lambda p, x: jax.vmap(eqx.combine(p, static_u))(x)

    def pure(p):
        if isinstance(p.blocks, list):
            blocks = list(p.blocks)
        else:
            blocks = slices(p)
        return {"embed": p.embed, "blocks": blocks, "final_norm": p.final_norm, "head": p.head}

    return x, (scanned, apply_s), (unrolled, apply_u), pure, pure


# --------------------------------------------------------------------------------------------
# Haiku: hk.layer_stack, and the same layers unrolled


def _haiku_layer(x, suffix=""):
    h = hk.Linear(HIDDEN, with_bias=False, name="fc1" + suffix)(x)
    h = hk.LayerNorm(-1, True, True, name="norm" + suffix)(h)
    return x + hk.Linear(WIDTH, name="fc2" + suffix)(jax.nn.gelu(h))


def _haiku_pair():
    x = jax.random.normal(jax.random.key(0), (32, 5))

    def scanned_fn(x):
        x = hk.Linear(WIDTH, name="embed")(x)
        x = hk.layer_stack(BLOCKS, name="blocks")(_haiku_layer)(x)
        return hk.Linear(CLASSES, name="head")(x)

    def unrolled_fn(x):
        x = hk.Linear(WIDTH, name="embed")(x)
        for i in range(BLOCKS):
            x = _haiku_layer(x, f"_{i}")
        return hk.Linear(CLASSES, name="head")(x)

    t_s = hk.without_apply_rng(hk.transform(scanned_fn))
    t_u = hk.without_apply_rng(hk.transform(unrolled_fn))
    scanned = jax.tree.map(lambda a: a * 1.5, t_s.init(jax.random.key(1), x))

    def unroll(p):
        out = {k: v for k, v in p.items() if not k.startswith("blocks/")}
        for name in ("fc1", "fc2", "norm"):
            for i in range(BLOCKS):
                out[f"{name}_{i}"] = jax.tree.map(lambda a, i=i: a[i], p[f"blocks/{name}"])
        return out

    return x, (scanned, t_s.apply), (unroll(scanned), t_u.apply), unroll, lambda p: p


PAIRS = {
    "linen nn.scan": _linen_pair,
    "linen loop over slices": _linen_loop_pair,
    "linen fori_loop over slices": _linen_fori_pair,
    "nnx.scan": _nnx_pair,
    "equinox lax.scan": _eqx_pair,
    "equinox fori_loop": lambda: _eqx_pair("fori_loop"),
    "haiku layer_stack": _haiku_pair,
}
FLAX_PAIRS = ("linen nn.scan", "linen loop over slices", "linen fori_loop over slices", "nnx.scan")
# Pairs that share their unrolled twin (the same params, applied by the same forward pass): the
# linen pairs all unroll into the linen twin, the Equinox pairs into one Equinox twin. The twin's
# trajectory under each transform is computed once, for the first of its pairs.
TWIN_OF = {
    "linen nn.scan": "linen nn.scan",
    "linen loop over slices": "linen nn.scan",
    "linen fori_loop over slices": "linen nn.scan",
    "nnx.scan": "nnx.scan",
    "equinox lax.scan": "equinox lax.scan",
    "equinox fori_loop": "equinox lax.scan",
    "haiku layer_stack": "haiku layer_stack",
}
# Equinox's (out, in) kernels and Haiku's layout: the transforms that read kernel axes.
LAYOUT_TRANSFORMS = ("lpwd", "wrs", "adamp", "sgdp")


# --------------------------------------------------------------------------------------------
# The transforms: (scanned structure, params) -> (tx, init_params, eval_params) for each side


def _lpwd(layers, params, apply_fn, x):
    if layers is None:
        depths, mask = lo.depth_labels(params, apply_fn, x), None
    else:
        depths, mask = layers.depths, layers.decay_mask
    rates = lo.layerwise_schedule(depths, 0.5)
    tx = optax.chain(optax.adam(LR), lo.pre_weight_decay(rates, learning_rate=LR, mask=mask))
    init = lambda p: lo.pre_decay_params(p, rates, learning_rate=LR, mask=mask)
    return tx, init


def _decoupled(factory):
    def make(layers, params, apply_fn, x):
        mask = None if layers is None else layers.decay_mask
        tx = optax.chain(optax.adam(LR), factory(2.0, learning_rate=LR, mask=mask))
        return tx, lambda p: p

    return make


def _with_layers(build):
    def make(layers, params, apply_fn, x):
        return build({} if layers is None else {"layers": layers}), lambda p: p

    return make


TRANSFORMS = {
    "lpwd": _lpwd,
    "wd": _decoupled(lo.weight_decay),
    "rwd": _decoupled(lo.real_time_weight_decay),
    "pwd": _decoupled(lo.pre_weight_decay),
    "adadecay": _with_layers(
        lambda kw: optax.chain(lo.adaptive_weight_decay(0.5, **kw), optax.adam(LR))
    ),
    "wrs": _with_layers(
        lambda kw: optax.chain(optax.sgd(0.1, momentum=0.9), lo.weight_rescaling(1, **kw))
    ),
    "adamp": _with_layers(lambda kw: lo.adamp(LR, weight_decay=0.5, **kw)),
    "sgdp": _with_layers(lambda kw: lo.sgdp(0.1, momentum=0.9, weight_decay=1e-2, **kw)),
}


def _trajectory(params, apply_fn, x, y, tx, init):
    params = init(params)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
            apply_fn(p, x), y
        ).mean()
        grads = jax.grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    out = []
    for _ in range(STEPS):
        params, state = step(params, state)
        out.append(params)
    return jax.device_get(out)  # compared on the host, leaf slice by leaf slice


def _pure(tree):
    return tree.to_pure_dict() if isinstance(tree, nnx.State) else tree


@functools.cache
def _pair(name):
    """`PAIRS[name]()`, built once: the tests only read its params and apply its functions."""
    return PAIRS[name]()


@functools.cache
def _twin_trajectory(twin, transform):
    """The unrolled twin of pair `twin` under `transform`: its start and its params after each
    step. Flax's twin runs on the library's Flax-layout defaults; Equinox's and Haiku's need
    their own structure (the defaults read an Equinox (out, in) kernel the wrong way round)."""
    x, _, (unrolled, apply_u), _, _ = _pair(twin)
    y = jnp.arange(x.shape[0]) % CLASSES
    layers = None if twin in FLAX_PAIRS else lo.layer_structure(unrolled, apply_u, x)
    tx, init = TRANSFORMS[transform](layers, unrolled, apply_u, x)
    return jax.device_get(init(unrolled)), _trajectory(unrolled, apply_u, x, y, tx, init)


def _assert_same(scanned_tree, unrolled_tree, unroll, pure, atol):
    got = unroll(scanned_tree)
    want = pure(unrolled_tree)
    chex_leaves = jax.tree_util.tree_flatten_with_path(want)[0]
    got_leaves = jax.tree.leaves(got)
    assert len(got_leaves) == len(chex_leaves)
    for (path, w), g in zip(chex_leaves, got_leaves):
        np.testing.assert_allclose(g, w, atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))


CASES = [
    (pair, transform)
    for pair in sorted(PAIRS)
    for transform in sorted(TRANSFORMS)
    if pair in FLAX_PAIRS or transform in LAYOUT_TRANSFORMS
]


@pytest.mark.parametrize(("pair", "transform"), CASES)
def test_scanned_and_unrolled_follow_one_trajectory(pair, transform):
    x, (scanned, apply_s), (unrolled, _), unroll, pure = _pair(pair)
    y = jnp.arange(x.shape[0]) % CLASSES
    layers = lo.layer_structure(scanned, apply_s, x)
    tx_s, init_s = TRANSFORMS[transform](layers, scanned, apply_s, x)
    path_s = _trajectory(scanned, apply_s, x, y, tx_s, init_s)
    # This pair's unrolled twin holds the very params of the twin whose trajectory is shared.
    twin_params = _pair(TWIN_OF[pair])[2][0]
    assert len(jax.tree.leaves(unrolled)) == len(jax.tree.leaves(twin_params))
    for a, b in zip(jax.tree.leaves(unrolled), jax.tree.leaves(twin_params)):
        np.testing.assert_array_equal(a, b)
    start, path_u = _twin_trajectory(TWIN_OF[pair], transform)
    moved = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(jax.tree.leaves(path_u[-1]), jax.tree.leaves(start))
    )
    assert moved > 1e-2, "the transform did not move the weights"
    for t in range(STEPS):
        _assert_same(path_s[t], path_u[t], unroll, pure, atol=3e-5)


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_structure_matches_the_unrolled_twin(pair):
    x, (scanned, apply_s), (unrolled, apply_u), unroll, pure = _pair(pair)
    layers = lo.layer_structure(scanned, apply_s, x)
    # Slice i of a stacked leaf has the depth of block i of the twin.
    want = lo.depth_labels(unrolled, apply_u, x)
    treedef = jax.tree.structure(scanned)
    got = unroll(treedef.unflatten([np.asarray(x.depth) for x in layers.leaves]))
    want = pure(want)
    assert jax.tree.map(lambda a: int(np.asarray(a).item()), got) == jax.tree.map(int, want)
    # The decay mask is the twin's default mask, slice by slice.
    full = [np.full(x.shape, x.decay) for x in layers.leaves]
    mask_s = unroll(treedef.unflatten(full))
    mask_u = pure(lo.default_decay_mask(unrolled))
    assert jax.tree.map(lambda m: bool(np.all(m)), mask_s) == mask_u
    assert sum(x.decay for x in layers.leaves) == 4  # embed, fc1, fc2 and head kernels
    # Kernels are read with their traced axes; stacked axis 0 is not among them.
    by_path = {x.path: x for x in layers.leaves}
    fc1 = next(x for p, x in by_path.items() if "fc1" in p)
    fan_in, out = ((2,), (1,)) if pair.startswith("equinox") else ((1,), (2,))  # (BLOCKS, out, in)
    assert (fc1.role, fc1.stacked_axes, fc1.fan_in_axes, fc1.output_axes) == (
        "kernel",
        (0,),
        fan_in,
        out,
    )
    assert layers.num_layers == max(jax.tree.leaves(want))
    for x in layers.leaves:
        assert x.role in ("kernel", "bias", "scale"), (x.path, x.role)


@pytest.mark.parametrize("pair", FLAX_PAIRS)
def test_diagnostics_are_per_slice(pair):
    x, (scanned, apply_s), (unrolled, apply_u), unroll, _ = _pair(pair)
    layers = lo.layer_structure(scanned, apply_s, x)
    updates_s = jax.tree.map(lambda p: 0.01 * jnp.cos(p), scanned)
    updates_u = jax.tree.map(lambda p: 0.01 * jnp.cos(p), unrolled)
    stats_s = lo.layer_statistics(scanned, updates_s, learning_rate=LR, layers=layers)
    stats_u = lo.layer_statistics(unrolled, updates_u, learning_rate=LR)
    stacked = [k for k in stats_s if k.startswith("blocks")]
    assert len(stacked) == 3
    for key in stacked:
        module = key.split("/")[-1]
        for i in range(BLOCKS):
            twin = f"blocks/{i}/{module}" if pair == "nnx.scan" else f"block_{i}/{module}"
            for stat in ("weight_norm", "update_norm", "effective_step", "effective_lr"):
                np.testing.assert_allclose(stats_s[key][stat][i], stats_u[twin][stat], rtol=1e-5)
    # Scale sensitivity: fc1 (followed by a LayerNorm, no bias) is invariant in every slice.
    sens_s = lo.scale_sensitivity(apply_s, scanned, x, layers=layers)
    sens_u = lo.scale_sensitivity(apply_u, unrolled, x)
    got = unroll(jax.tree.map(lambda s: np.asarray(s, np.float64), sens_s))
    want = _pure(sens_u)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g).squeeze(), w, rtol=1e-3, atol=1e-6)
    inv = _pure(lo.scale_invariant_mask(apply_s, scanned, x, layers=layers))
    block = inv["blocks"]["block"] if "block" in inv["blocks"] else inv["blocks"]
    assert block["fc1"]["kernel"] and not block["fc2"]["kernel"]


# --------------------------------------------------------------------------------------------
# Trees from any library, layouts, and bad input


def _numpy_unit_rows(w, axes):
    norm = np.sqrt(np.sum(np.square(np.asarray(w, np.float64)), axis=axes, keepdims=True))
    return np.asarray(w, np.float64) / norm


def test_wrs_follows_equinox_layouts():
    keys = jax.random.split(jax.random.key(0), 2)
    model = [eqx.nn.Linear(6, 4, key=keys[0]), eqx.nn.Conv2d(3, 5, 3, key=keys[1])]
    params, static = eqx.partition(model, eqx.is_array)

    def apply_fn(p, x):
        dense, conv = eqx.combine(p, static)
        return dense(conv(x).mean((1, 2)) @ jnp.ones((5, 6)))

    layers = lo.layer_structure(params, apply_fn, jnp.ones((3, 8, 8)))
    linear, conv = params
    assert layers.leaves[0].path == "0/weight"
    new = lo.rescale_params(params, layers=layers)
    # An Equinox Linear is (out, in): each output row gets unit norm over `in`; a Conv2d is
    # (out, in, kh, kw): each output channel over (in, kh, kw). Biases are left alone.
    np.testing.assert_allclose(new[0].weight, _numpy_unit_rows(linear.weight, (1,)), rtol=1e-6)
    np.testing.assert_allclose(new[1].weight, _numpy_unit_rows(conv.weight, (1, 2, 3)), rtol=1e-6)
    np.testing.assert_array_equal(new[1].bias, conv.bias)
    # mode="input" (WRS(IC)): per (out, kh, kw) over `in` only.
    ic = lo.rescale_params(params, mode="input", layers=layers)
    np.testing.assert_allclose(ic[1].weight, _numpy_unit_rows(conv.weight, (1,)), rtol=1e-6)


def test_equinox_modules_are_trees_not_schedules():
    model = eqx.nn.MLP(4, 2, 8, 2, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    apply_fn = lambda p, x: eqx.combine(p, static)(x)
    labels = lo.depth_labels(params, apply_fn, jnp.ones(4))
    rates = lo.layerwise_schedule(labels, 0.1)
    assert isinstance(rates, eqx.nn.MLP) and callable(rates)  # a callable pytree
    opt = optax.chain(optax.sgd(0.1), lo.pre_weight_decay(rates, learning_rate=0.1))
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(grads, opt.init(params), params)
    kernels = [layer.weight for layer in params.layers]
    for layer, u, w in zip(range(3), [layer.weight for layer in updates.layers], kernels):
        expected = -0.1 * (0.1 * 2 * (layer + 1) / 3) * np.asarray(w)  # -d_{t+1} * phi
        np.testing.assert_allclose(u, expected, rtol=1e-5, atol=1e-8)
    table = lo.depth_table(params, labels, rates)
    assert "layers/2/weight" in table and "3 layers" in table  # 'activation' is no leaf


def test_haiku_batchnorm_is_not_decayed():
    def f(x, training):
        x = hk.Conv2D(4, 3)(x)
        return hk.BatchNorm(True, True, 0.9)(x, training).mean((1, 2))

    t = hk.transform_with_state(f)
    x = jnp.ones((2, 6, 6, 3))
    params, state = t.init(jax.random.key(0), x, True)
    assert params["batch_norm"]["scale"].shape == (1, 1, 1, 4)
    mask = lo.default_decay_mask(params)
    assert mask == {
        "batch_norm": {"offset": False, "scale": False},
        "conv2_d": {"b": False, "w": True},
    }
    layers = lo.layer_structure(params, lambda p, x: t.apply(p, state, None, x, True)[0], x)
    assert layers.decay_mask == mask
    assert layers.roles["batch_norm"] == {"offset": "bias", "scale": "scale"}
    assert layers.fan_in_axes["conv2_d"]["w"] == (0, 1, 2)  # HWIO


def test_stacking_is_found_through_jit_remat_and_vmap():
    def block(x, w):
        return jnp.tanh(jax.vmap(lambda row: row @ w)(x))

    def apply_fn(p, x):
        x = x @ p["stem"]["w"]
        body = jax.jit(jax.checkpoint(lambda x, w: (block(x, w), None)))
        x, _ = jax.lax.scan(body, x, p["blocks"]["w"])
        x, _ = jax.lax.scan(lambda x, w: (x @ w, None), x, p["rev"]["w"], reverse=True)
        return x @ p["head"]["w"]

    shapes = {"stem": (3, 4), "blocks": (5, 4, 4), "rev": (2, 4, 4), "head": (4, 2)}
    params = {k: {"w": jnp.ones(s)} for k, s in shapes.items()}
    layers = lo.layer_structure(params, apply_fn, jnp.ones((2, 3)))
    depths = {k: v["w"] for k, v in layers.depths.items()}
    assert depths["stem"] == 1 and depths["head"] == 9
    assert depths["blocks"].ravel().tolist() == [2, 3, 4, 5, 6]
    assert depths["rev"].ravel().tolist() == [8, 7]  # a reversed scan uses the last slice first
    assert depths["blocks"].shape == (5, 1, 1)  # broadcasts against the leaf
    assert layers.fan_in_axes["blocks"]["w"] == (1,) and layers.output_axes["blocks"]["w"] == (2,)
    assert "2..6" in str(layers) and "8..7" in str(layers)  # slice 0 first


def test_bad_input_names_the_leaf():
    params = {
        "a": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
        "b": {"kernel": jnp.ones((4, 2))},
    }
    apply_fn = lambda p, x: (x @ p["a"]["kernel"] + p["a"]["bias"]) @ p["b"]["kernel"]
    layers = lo.layer_structure(params, apply_fn, jnp.ones((1, 3)))
    other = {
        "a": {"kernel": jnp.ones((3, 5)), "bias": jnp.ones(5)},
        "b": {"kernel": jnp.ones((5, 2))},
    }
    with pytest.raises(
        ValueError, match=r"built for other params: leaf 'a/bias' \(5,\) is 'a/bias' \(4,\)"
    ):
        lo.weight_rescaling(1, layers=layers).init(other)
    with pytest.raises(ValueError, match="built for 3 param leaves"):
        lo.layer_statistics({"x": jnp.ones(2)}, {"x": jnp.ones(2)}, layers=layers)
    with pytest.raises(TypeError, match="layers must be a LayerStructure"):
        lo.adamp(1e-3, layers=params)
    with pytest.raises(ValueError, match=r"'a/bias' is not a kernel .* role 'bias'"):
        mask = {"a": {"kernel": True, "bias": True}, "b": {"kernel": True}}
        lo.rescale_params(params, mask=mask, layers=layers)
    with pytest.warns(UserWarning, match="never used 1 params"):
        lo.layer_structure(
            {**params, "unused": {"w": jnp.ones((2, 2))}}, apply_fn, jnp.ones((1, 3))
        )
    with pytest.raises(TypeError, match="leaf 'act' is a custom_jvp, not an array"):
        lo.layer_structure({**params, "act": jax.nn.relu}, apply_fn, jnp.ones((1, 3)))


@pytest.mark.parametrize("name", ["convnext_atto_cifar", "swin_tiny_cifar"])
def test_project_models_keep_their_labels_and_mask(name):
    # The ports own one module per layer: the structure's depths and decay mask are the
    # forward-pass labels and timm's mask the training program used before it existed.
    from lpwd_optax import models

    model = models.functional_model(models.create_model(name, num_classes=10))
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    layers = lo.layer_structure(model.params, model.apply, x)
    assert jax.tree.leaves(layers.depths) == jax.tree.leaves(
        lo.depth_labels(model.params, model.apply, x)
    )
    assert jax.tree.leaves(layers.decay_mask) == jax.tree.leaves(
        lo.default_decay_mask(model.params)
    )
    assert not any(x.stacked_axes for x in layers.leaves)
    kernels = [x for x in layers.leaves if x.role == "kernel"]
    assert kernels and all(x.output_axes == (len(x.shape) - 1,) for x in kernels)


def test_a_depthwise_kernel_is_a_kernel_in_every_form():
    # The ConvNeXt port runs its depthwise convolution as XLA's grouped convolution, as a
    # Toeplitz matmul (the taps gathered by constant indices) or as a sum of shifted products
    # (each tap sliced out on its own); the trace must read one kernel from all three.
    from lpwd_optax import models

    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    seen = {}
    for impl in ("conv", "matmul", "shift"):
        net = models.create_model(
            "convnext_atto_cifar", num_classes=10, dims=[8], depths=[1], depthwise_impl=impl
        )
        model = models.functional_model(net)
        layers = lo.layer_structure(model.params, model.apply, x)
        seen[impl] = [
            (x.path, x.role, x.fan_in_axes, x.output_axes, x.decay, int(np.max(x.depth)))
            for x in layers.leaves
        ]
        dw = next(x for x in layers.leaves if x.path.endswith("conv_dw/kernel"))
        assert (dw.role, dw.fan_in_axes, dw.output_axes, dw.decay) == (
            "kernel",
            (0, 1, 2),
            (3,),
            True,
        ), impl
    assert seen["matmul"] == seen["conv"] and seen["shift"] == seen["conv"]


def test_a_table_read_by_a_constant_index_is_not_an_embedding():
    # Swin's relative position bias table is gathered by a fixed index and added to the
    # attention logits: a bias. A table read by the inputs' token ids is an embedding.
    from lpwd_optax import models

    model = models.functional_model(models.create_model("swin_tiny_cifar", num_classes=10))
    layers = lo.layer_structure(
        model.params, model.apply, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    )
    tables = [x for x in layers.leaves if x.path.endswith("relative_position_bias_table")]
    assert tables and all((x.role, x.decay) == ("bias", False) for x in tables)

    class Tokens(nn.Module):
        @nn.compact
        def __call__(self, ids):
            return nn.Dense(3, name="out")(nn.Embed(11, 4, name="embed")(ids))

    ids = jnp.zeros((2, 5), jnp.int32)
    params = Tokens().init(jax.random.key(0), ids)["params"]
    layers = lo.layer_structure(params, lambda p, i: Tokens().apply({"params": p}, i), ids)
    embed = layers.leaves[0]
    assert embed.path == "embed/embedding"
    assert (embed.role, embed.input_axes, embed.output_axes) == ("embedding", (1,), (0,))


def _decode(table, head, token):
    # Greedy decoding: each step looks up the token the previous step generated.
    def step(token, _):
        logits = table[token] @ head
        return jnp.argmax(logits).astype(jnp.int32), logits

    return jax.lax.scan(step, token, None, length=3)[1]


LOOKUPS = {
    "table[tokens]": lambda t, h, tok: t[jnp.stack([tok, tok + 1])] @ h,
    "table[token] (a traced scalar)": lambda t, h, tok: t[tok] @ h,
    "lax.dynamic_index_in_dim": lambda t, h, tok: jax.lax.dynamic_index_in_dim(t, tok, 0) @ h,
    "a window at a traced offset": (lambda t, h, tok: jax.lax.dynamic_slice_in_dim(t, tok, 3) @ h),
    "greedy decoding": _decode,
}


@pytest.mark.parametrize("lookup", sorted(LOOKUPS))
def test_rows_read_at_an_index_the_inputs_give_are_an_embedding(lookup):
    # However the index reaches the table (a gather of an array of ids, a dynamic slice at a
    # traced scalar, the token a decoding loop generated), its rows are output units and its
    # features the fan-in, as for a gather by token ids.
    params = {"embed": {"table": jnp.ones((11, WIDTH))}, "head": {"w": jnp.ones((WIDTH, 11))}}
    apply = lambda p, tok: LOOKUPS[lookup](p["embed"]["table"], p["head"]["w"], tok)
    layers = lo.layer_structure(params, apply, jnp.int32(2))
    table = {x.path: x for x in layers.leaves}["embed/table"]
    assert (table.role, table.input_axes, table.output_axes, table.stacked_axes) == (
        "embedding",
        (1,),
        (0,),
        (),
    )
    assert (int(layers.depths["embed"]["table"]), int(layers.depths["head"]["w"])) == (1, 2)


TAKE = {
    "x[i]": lambda a, i: a[i],
    "jnp.take": lambda a, i: jnp.take(a, i, axis=0),
    "lax.dynamic_index_in_dim": lambda a, i: jax.lax.dynamic_index_in_dim(a, i, 0, False),
}


LOOPS = ("python loop", "fori_loop", "fori_loop, array bounds", "while_loop", "scan over indices")


def _loop(kind, step, x, order):
    """`x = step(i, x)` for `i` in `order`, as a Python loop, a `fori_loop` (with `order` as
    arithmetic on its traced counter; with array bounds it is a `while_loop`), a hand-written
    `while_loop` (`j < n`) or a `scan` over the indices."""
    if kind == "python loop":
        for i in order:
            x = step(i, x)
        return x
    first, last = order[0], order[-1]
    sign, n = (1 if last >= first else -1), len(order)
    body = lambda j, x: step(first + sign * j, x)
    if kind == "fori_loop":
        return jax.lax.fori_loop(0, n, body, x)
    if kind == "fori_loop, array bounds":
        return jax.lax.fori_loop(jnp.int32(0), jnp.int32(n), body, x)
    if kind == "while_loop":
        cond = lambda carry: carry[0] < n
        return jax.lax.while_loop(cond, lambda c: (c[0] + 1, body(*c)), (0, x))[1]
    return jax.lax.scan(lambda x, i: (step(i, x), None), x, jnp.asarray(order))[0]


def _stacked_params():
    keys = jax.random.split(jax.random.key(0), 2)
    return {
        "blocks": {
            "w": jax.random.normal(keys[0], (L, WIDTH, WIDTH)),
            "gain": jnp.ones((L, WIDTH)),
        },
        "head": {"w": jax.random.normal(keys[1], (WIDTH, CLASSES))},
    }


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("index", sorted(TAKE))
def test_a_loop_over_a_stacked_leaf_is_one_layer_per_slice(loop, index):
    # Hand-written JAX often keeps the blocks stacked and reads block i in a loop: a Python
    # loop (static i, unrolled in the trace), `fori_loop` or `while_loop` (i its traced
    # counter) or a scan over `jnp.arange(L)`. Each slice is a layer, as under a scan over the
    # blocks themselves.
    take, params = TAKE[index], _stacked_params()

    def apply(p, x):
        step = lambda i, x: jnp.tanh(x @ take(p["blocks"]["w"], i)) * take(p["blocks"]["gain"], i)
        return _loop(loop, step, x, list(range(L))) @ p["head"]["w"]

    layers = lo.layer_structure(params, apply, jnp.ones((2, WIDTH)))
    by_path = {x.path: x for x in layers.leaves}
    w, gain, head = by_path["blocks/w"], by_path["blocks/gain"], by_path["head/w"]
    assert (w.role, w.stacked_axes, w.fan_in_axes, w.output_axes, w.decay) == (
        "kernel",
        (0,),
        (1,),
        (2,),
        True,
    )
    assert (gain.role, gain.stacked_axes, gain.decay) == ("scale", (0,), False)
    np.testing.assert_array_equal(np.ravel(w.depth), np.arange(1, L + 1))
    np.testing.assert_array_equal(np.ravel(gain.depth), np.arange(1, L + 1))
    assert int(head.depth) == L + 1 and layers.num_layers == L + 1


@pytest.mark.parametrize("loop", LOOPS)
def test_a_loop_in_reverse_or_over_part_of_a_stack_reads_those_slices(loop):
    # The depth of a slice is the step that reads it: block L-1 first in a loop counting down.
    params = _stacked_params()
    step = lambda p: lambda i, x: jnp.tanh(x @ p["blocks"]["w"][i]) * p["blocks"]["gain"][i]
    apply = lambda order: lambda p, x: _loop(loop, step(p), x, order) @ p["head"]["w"]
    x = jnp.ones((2, WIDTH))
    down = lo.layer_structure(params, apply(list(range(L - 1, -1, -1))), x)
    np.testing.assert_array_equal(np.ravel(down.depths["blocks"]["w"]), np.arange(L, 0, -1))
    assert down.stacked_axes["blocks"]["w"] == (0,)
    # Blocks 1 and 2 only: blocks 0 and 3 are never used, and get the last label.
    unused = r"never used 4 params \(e.g. blocks/gain\[0\], blocks/gain\[3\], blocks/w\[0\]\)"
    with pytest.warns(UserWarning, match=unused):
        part = lo.layer_structure(params, apply([1, 2]), x)
    np.testing.assert_array_equal(np.ravel(part.depths["blocks"]["w"]), [4, 1, 2, 4])
    assert int(part.depths["head"]["w"]) == 3


@pytest.mark.parametrize("outer", ["fori_loop", "scan over the stack"])
def test_nested_loops_stack_two_axes(outer):
    # Groups of blocks, (groups, blocks, in, out): block (j, i) is read at the counters of two
    # nested loops, so both axes are stacked and the slices follow in execution order.
    groups, blocks = 2, 3
    params = {"w": jax.random.normal(jax.random.key(0), (groups, blocks, WIDTH, WIDTH))}
    params["head"] = {"w": jnp.ones((WIDTH, CLASSES))}
    inner = lambda read, x: jax.lax.fori_loop(0, blocks, lambda i, x: jnp.tanh(x @ read(i)), x)

    def apply(p, x):
        if outer == "fori_loop":
            x = jax.lax.fori_loop(0, groups, lambda j, x: inner(lambda i: p["w"][j, i], x), x)
        else:
            x = jax.lax.scan(lambda x, w: (inner(lambda i: w[i], x), None), x, p["w"])[0]
        return x @ p["head"]["w"]

    layers = lo.layer_structure(params, apply, jnp.ones((2, WIDTH)))
    w = layers.leaves[1]
    assert (w.path, w.role, w.stacked_axes, w.fan_in_axes, w.output_axes) == (
        "w",
        "kernel",
        (0, 1),
        (2,),
        (3,),
    )
    np.testing.assert_array_equal(w.depth[..., 0, 0], np.arange(1, 7).reshape(groups, blocks))
    assert layers.num_layers == groups * blocks + 1


GROUPS, BLOCKS = 2, 3
# Views of a (groups, blocks, in, out) stack that a loop runs over, and the slices (g, b) their
# entries are, in order: a static range or stride of one axis, and both axes merged by a
# reshape (after a transpose: blocks-major).
STACK_VIEWS = {
    "w[1, 1:]": (lambda w: w[1, 1:], [(1, 1), (1, 2)]),
    "w[0, ::2]": (lambda w: w[0, ::2], [(0, 0), (0, 2)]),
    "w[:, 1]": (lambda w: w[:, 1], [(0, 1), (1, 1)]),
    "w[1, ::-1]": (lambda w: w[1, ::-1], [(1, 2), (1, 1), (1, 0)]),
    "jnp.flip(w, (0, 1)).reshape(6, ...)": (
        lambda w: jnp.flip(w, (0, 1)).reshape(GROUPS * BLOCKS, *w.shape[2:]),
        [(g, b) for g in reversed(range(GROUPS)) for b in reversed(range(BLOCKS))],
    ),
    "w.reshape(6, ...)": (
        lambda w: w.reshape(GROUPS * BLOCKS, *w.shape[2:]),
        [(g, b) for g in range(GROUPS) for b in range(BLOCKS)],
    ),
    "w.transpose(1, 0, ...).reshape(6, ...)": (
        lambda w: w.transpose(1, 0, 2, 3).reshape(GROUPS * BLOCKS, *w.shape[2:]),
        [(g, b) for b in range(BLOCKS) for g in range(GROUPS)],
    ),
}


def _check_stacked_kernel(params, apply, reads, shape):
    """Checks that leaf "w" (stack axes of sizes `shape`, then (in, out)) is a kernel stacked
    along the axes `reads` walks, at the depths of `_first_read_depths`, and that exactly the
    slices never read are named unused. Returns the structure and the warnings."""
    stacked, expected = _first_read_depths(reads, shape)
    layers, messages = _structure_and_warnings(params, apply)
    w = layers.leaves[1]
    ndim = len(shape) + 2
    assert (w.path, w.role, w.stacked_axes, w.fan_in_axes, w.output_axes) == (
        "w",
        "kernel",
        stacked,
        (ndim - 2,),
        (ndim - 1,),
    )
    depth = np.squeeze(w.depth, (ndim - 2, ndim - 1)).reshape(expected.shape)
    np.testing.assert_array_equal(depth, expected)
    unread = int(np.sum(expected > len(set(reads)) + 1))
    assert any(f"never used {unread} params" in m for m in messages) == bool(unread), messages
    return layers, messages


def _structure_and_warnings(params, apply):
    """`layer_structure` on a batch of two `WIDTH`-vectors, and the warnings it gives."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layers = lo.layer_structure(params, apply, jnp.ones((2, WIDTH)))
    return layers, [str(c.message) for c in caught]


def _first_read_depths(reads, shape):
    """Reference: the stacked axes are those whose entry changes from read to read; a slice
    along them has depth 1 + the rank of its first read, the head comes next, and slices
    never read get the label after the head's. Returns (axes, depths over those axes)."""
    axes = tuple(a for a in range(len(shape)) if len({s[a] for s in reads}) > 1)
    first = list(dict.fromkeys(tuple(s[a] for a in axes) for s in reads))
    depth = np.full([shape[a] for a in axes], len(first) + 2)
    for rank, s in enumerate(first):
        depth[s] = rank + 1
    return axes, depth


@pytest.mark.parametrize("loop", ["scan", "fori_loop", "python loop"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("view", sorted(STACK_VIEWS))
def test_a_loop_over_a_range_or_a_merge_of_stacked_axes_reads_those_slices(view, reverse, loop):
    # Each entry of the view is one block (g, b): the view's entries map back to the leaf's
    # slices, so the blocks it reads are layers in the order read and the rest are unused.
    make_view, entries = STACK_VIEWS[view]
    params = {"w": jax.random.normal(jax.random.key(0), (GROUPS, BLOCKS, WIDTH, WIDTH))}
    params["head"] = {"w": jnp.ones((WIDTH, CLASSES))}
    n = len(entries)
    order = list(range(n - 1, -1, -1)) if reverse else list(range(n))

    def apply(p, x):
        w = make_view(p["w"])
        step = lambda x, wi: jnp.tanh(x @ wi)
        if loop == "scan":
            x = jax.lax.scan(lambda x, wi: (step(x, wi), None), x, w, reverse=reverse)[0]
        elif loop == "fori_loop":
            at = (lambda j: n - 1 - j) if reverse else (lambda j: j)  # traced arithmetic
            x = jax.lax.fori_loop(0, n, lambda j, x: step(x, w[at(j)]), x)
        else:
            for i in order:
                x = step(x, w[i])
        return x @ p["head"]["w"]

    reads = [entries[i] for i in order]
    layers, _ = _check_stacked_kernel(params, apply, reads, (GROUPS, BLOCKS))
    assert int(layers.depths["head"]["w"]) == n + 1


UNFOLLOWED = {
    # The trip count is an input: which slices the counter reaches is not in the trace.
    "trip count an input": (
        lambda w, x, n: jax.lax.fori_loop(0, n, lambda i, x: jnp.tanh(x @ w[i]), x)
    ),
    # More steps than the trace evaluates.
    "2000 steps": (
        lambda w, x, n: jax.lax.fori_loop(0, 2000, lambda i, x: jnp.tanh(x @ w[i % L]), x)
    ),
    # The stack permuted by a constant gather, scanned or indexed one block at a time.
    "scan over w[perm]": (lambda w, x, n: _scan_blocks(x, w[jnp.array([2, 0, 3, 1])])),
    "python loop over w[perm]": (
        lambda w, x, n: functools.reduce(_block, w[jnp.array([2, 0, 3, 1])], x)
    ),
    # The stack joined with itself and split into groups of another size.
    "scan over concatenate([w, w]).reshape(2, L, ...)": (
        lambda w, x, n: _scan_groups(
            x, jnp.concatenate([w, w]).reshape(2, L, WIDTH, WIDTH), _scan_blocks
        )
    ),
    # Each step uses a group of blocks whole (one product over the group).
    "scan over w.reshape(2, 3, ...), each group used whole": (
        lambda w, x, n: jax.lax.scan(
            lambda x, g: (jnp.tanh(jnp.einsum("bi,gij->bj", x, g)), None),
            x,
            w.reshape(2, L // 2, WIDTH, WIDTH),
        )[0]
    ),
}


@pytest.mark.parametrize("case", sorted(UNFOLLOWED))
def test_a_loop_the_trace_cannot_follow_reads_the_leaf_whole_and_says_so(case):
    # The leaf stays one layer (LPWD gives all its blocks one rate), and a warning names it.
    params = {"blocks": {"w": jnp.ones((L, WIDTH, WIDTH))}, "head": {"w": jnp.ones((WIDTH, 1))}}
    loop = UNFOLLOWED[case]
    apply = lambda p, x, n: loop(p["blocks"]["w"], x, n) @ p["head"]["w"]
    with pytest.warns(UserWarning, match=r"reads 1 params \(e\.g\. blocks/w\) .* one layer"):
        layers = lo.layer_structure(params, apply, jnp.ones((2, WIDTH)), jnp.int32(L))
    w = layers.leaves[0]
    assert (w.path, w.role, w.stacked_axes, int(w.depth)) == ("blocks/w", "other", (), 1)


def _block(x, w):
    return jnp.tanh(x @ w)


def _scan_blocks(x, w):
    return jax.lax.scan(lambda x, wi: (_block(x, wi), None), x, w)[0]


def _scan_groups(x, groups, inner):
    return jax.lax.scan(lambda x, g: (inner(x, g), None), x, groups)[0]


def _python_loop_over_groups(x, w):
    g = w.reshape(2, 3, WIDTH, WIDTH)
    for j in range(2):
        for i in range(3):
            x = _block(x, g[j][i])
    return x


G23 = lambda w: w.reshape(2, 3, WIDTH, WIDTH)
# Loops over the six blocks of a (6, in, out) stack in groups, or at an index that two loops'
# counters make, and the blocks they read, in execution order.
GROUP_LOOPS = {
    "fori j, fori i: w[2 * j + i]": (
        lambda x, w: jax.lax.fori_loop(
            0, 3, lambda j, x: jax.lax.fori_loop(0, 2, lambda i, x: _block(x, w[2 * j + i]), x), x
        ),
        [0, 1, 2, 3, 4, 5],
    ),
    "fori j, fori i: take(w, 5 - (3 * j + i))": (
        lambda x, w: jax.lax.fori_loop(
            0,
            2,
            lambda j, x: jax.lax.fori_loop(
                0, 3, lambda i, x: _block(x, jnp.take(w, 5 - (3 * j + i), axis=0)), x
            ),
            x,
        ),
        [5, 4, 3, 2, 1, 0],
    ),
    "scan over arange(3), fori i < 1: w[2 * j + i]": (
        lambda x, w: jax.lax.scan(
            lambda x, j: (jax.lax.fori_loop(0, 1, lambda i, x: _block(x, w[2 * j + i]), x), None),
            x,
            jnp.arange(3),
        )[0],
        [0, 2, 4],
    ),
    "scan over groups, g[0], g[1], g[2]": (
        lambda x, w: _scan_groups(
            x, G23(w), lambda x, g: _block(_block(_block(x, g[0]), g[1]), g[2])
        ),
        [0, 1, 2, 3, 4, 5],
    ),
    "reverse scan over groups, g[2], g[1], g[0]": (
        lambda x, w: jax.lax.scan(
            lambda x, g: (_block(_block(_block(x, g[2]), g[1]), g[0]), None),
            x,
            G23(w),
            reverse=True,
        )[0],
        [5, 4, 3, 2, 1, 0],
    ),
    "scan over groups, scan over the group": (
        lambda x, w: _scan_groups(x, G23(w), _scan_blocks),
        [0, 1, 2, 3, 4, 5],
    ),
    "scan over groups, fori_loop over the group": (
        lambda x, w: _scan_groups(
            x, G23(w), lambda x, g: jax.lax.fori_loop(0, 3, lambda i, x: _block(x, g[i]), x)
        ),
        [0, 1, 2, 3, 4, 5],
    ),
    "fori j: scan over dynamic_slice(w, 3 * j, 3)": (
        lambda x, w: jax.lax.fori_loop(
            0, 2, lambda j, x: _scan_blocks(x, jax.lax.dynamic_slice_in_dim(w, 3 * j, 3)), x
        ),
        [0, 1, 2, 3, 4, 5],
    ),
    "fori j: scan over the group g[j]": (
        lambda x, w: jax.lax.fori_loop(0, 2, lambda j, x: _scan_blocks(x, G23(w)[j]), x),
        [0, 1, 2, 3, 4, 5],
    ),
    "fori j, fori i: g[1 - j, i]": (
        lambda x, w: jax.lax.fori_loop(
            0,
            2,
            lambda j, x: jax.lax.fori_loop(0, 3, lambda i, x: _block(x, G23(w)[1 - j, i]), x),
            x,
        ),
        [3, 4, 5, 0, 1, 2],
    ),
    "python loops: g[j][i]": (_python_loop_over_groups, [0, 1, 2, 3, 4, 5]),
    "scan over the transposed groups (the block digit first)": (
        lambda x, w: _scan_groups(x, G23(w).transpose(1, 0, 2, 3), _scan_blocks),
        [0, 3, 1, 4, 2, 5],
    ),
    "scan over groups, each reversed (g[::-1])": (
        lambda x, w: _scan_groups(x, G23(w), lambda x, g: _scan_blocks(x, g[::-1])),
        [2, 1, 0, 5, 4, 3],
    ),
    "scan over w[::-1]": (lambda x, w: _scan_blocks(x, w[::-1]), [5, 4, 3, 2, 1, 0]),
    "scan over w[2:6] in groups of two": (
        lambda x, w: _scan_groups(x, w[2:6].reshape(2, 2, WIDTH, WIDTH), _scan_blocks),
        [2, 3, 4, 5],
    ),
    "groups merged back: scan over reshape(6, ...)": (
        lambda x, w: _scan_blocks(x, G23(w).reshape(6, WIDTH, WIDTH)),
        [0, 1, 2, 3, 4, 5],
    ),
    "both digits reversed, merged back: scan over jnp.flip(g, (0, 1)).reshape(6, ...)": (
        lambda x, w: _scan_blocks(x, jnp.flip(G23(w), (0, 1)).reshape(6, WIDTH, WIDTH)),
        [5, 4, 3, 2, 1, 0],
    ),
    # Digits merged back in an order no single stride describes: each axis of a view is a
    # number in the digits a reshape left, each digit with its own stride.
    "one digit reversed, merged back: scan over jnp.flip(g, 1).reshape(6, ...)": (
        lambda x, w: _scan_blocks(x, jnp.flip(G23(w), 1).reshape(6, WIDTH, WIDTH)),
        [2, 1, 0, 5, 4, 3],
    ),
    "digits merged back out of order: scan over g.transpose(1, 0, ...).reshape(6, ...)": (
        lambda x, w: _scan_blocks(x, G23(w).transpose(1, 0, 2, 3).reshape(6, WIDTH, WIDTH)),
        [0, 3, 1, 4, 2, 5],
    ),
    "scan over groups, each narrowed (g[:, 1:])": (
        lambda x, w: _scan_groups(x, G23(w)[:, 1:], _scan_blocks),
        [1, 2, 4, 5],
    ),
    "scan over groups, every other block (g[:, ::2])": (
        lambda x, w: _scan_groups(x, G23(w)[:, ::2], _scan_blocks),
        [0, 2, 3, 5],
    ),
    "scan over groups, each reversed and narrowed (jnp.flip(g, 1)[:, 1:])": (
        lambda x, w: _scan_groups(x, jnp.flip(G23(w), 1)[:, 1:], _scan_blocks),
        [1, 0, 4, 3],
    ),
    "scan over the transposed groups, narrowed ([1:])": (
        lambda x, w: _scan_groups(x, G23(w).transpose(1, 0, 2, 3)[1:], _scan_blocks),
        [1, 4, 2, 5],
    ),
    "fori j, fori i: g[:, 1:][j, i]": (
        lambda x, w: jax.lax.fori_loop(
            0,
            2,
            lambda j, x: jax.lax.fori_loop(0, 2, lambda i, x: _block(x, G23(w)[:, 1:][j, i]), x),
            x,
        ),
        [1, 2, 4, 5],
    ),
}


@pytest.mark.parametrize("case", sorted(GROUP_LOOPS))
def test_loops_over_groups_of_blocks_or_at_mixed_counters_read_each_block(case):
    # Which block each step reads is a function of the loops' counters (a split of the stacked
    # axis into groups, an index computed from two counters): every block is a layer at the
    # depth of its first read, as in the unrolled loop.
    loop, reads = GROUP_LOOPS[case]
    params = {"w": jax.random.normal(jax.random.key(0), (6, WIDTH, WIDTH))}
    params["head"] = {"w": jnp.ones((WIDTH, CLASSES))}
    apply = lambda p, x: loop(x, p["w"]) @ p["head"]["w"]
    _, messages = _check_stacked_kernel(params, apply, [(s,) for s in reads], (6,))
    assert not any("cannot follow" in m or "group of slices" in m for m in messages), messages


def _joinable_params():
    """Three leaves to join: `a` a stack of 3 blocks, `b` of 2, `c` one block; and a head."""
    normal = lambda i, *shape: jax.random.normal(jax.random.key(i), shape)
    return {
        "a": {"w": normal(0, 3, WIDTH, WIDTH)},
        "b": {"w": normal(1, 2, WIDTH, WIDTH)},
        "c": {"w": normal(2, WIDTH, WIDTH)},
        "head": {"w": jnp.ones((WIDTH, CLASSES))},
    }


def _scan_stacks(x, stacks, inner=_scan_blocks):
    return jax.lax.scan(lambda x, g: (inner(x, g), None), x, stacks)[0]


# Params joined into one stack (by `concatenate` or `stack`) and read one block at a time,
# and the (leaf, block) each step reads, None for a leaf that is one block.
JOINS = {
    "scan over concatenate([a, b])": (
        lambda x, a, b, c: _scan_blocks(x, jnp.concatenate([a, b])),
        [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1)],
    ),
    "reverse scan over concatenate([b, a])": (
        lambda x, a, b, c: jax.lax.scan(
            lambda x, w: (_block(x, w), None), x, jnp.concatenate([b, a]), reverse=True
        )[0],
        [("a", 2), ("a", 1), ("a", 0), ("b", 1), ("b", 0)],
    ),
    "python loop over concatenate([b, a])": (
        lambda x, a, b, c: functools.reduce(_block, jnp.concatenate([b, a]), x),
        [("b", 0), ("b", 1), ("a", 0), ("a", 1), ("a", 2)],
    ),
    "scan over concatenate([b, a])[::-1]": (
        lambda x, a, b, c: _scan_blocks(x, jnp.concatenate([b, a])[::-1]),
        [("a", 2), ("a", 1), ("a", 0), ("b", 1), ("b", 0)],
    ),
    "scan over concatenate([b, a])[1:4]": (
        lambda x, a, b, c: _scan_blocks(x, jnp.concatenate([b, a])[1:4]),
        [("b", 1), ("a", 0), ("a", 1)],
    ),
    "scan over concatenate([b, a constant])": (
        lambda x, a, b, c: _scan_blocks(x, jnp.concatenate([b, jnp.eye(WIDTH)[None]])),
        [("b", 0), ("b", 1)],
    ),
    "fori_loop over concatenate([b, a])[i]": (
        lambda x, a, b, c: jax.lax.fori_loop(
            0, 5, lambda i, x: _block(x, jnp.concatenate([b, a])[i]), x
        ),
        [("b", 0), ("b", 1), ("a", 0), ("a", 1), ("a", 2)],
    ),
    "fori_loop over concatenate([b, a])[4 - i]": (
        lambda x, a, b, c: jax.lax.fori_loop(
            0, 5, lambda i, x: _block(x, jnp.concatenate([b, a])[4 - i]), x
        ),
        [("a", 2), ("a", 1), ("a", 0), ("b", 1), ("b", 0)],
    ),
    "fori_loop over stack([c, b[1], c])[2 - i]": (
        lambda x, a, b, c: jax.lax.fori_loop(
            0, 3, lambda i, x: _block(x, jnp.stack([c, b[1], c])[2 - i]), x
        ),
        [("c", None), ("b", 1), ("c", None)],
    ),
    "scan over arange(5): jnp.take(concatenate([b, a]), i, axis=0)": (
        lambda x, a, b, c: jax.lax.scan(
            lambda x, i: (_block(x, jnp.take(jnp.concatenate([b, a]), i, axis=0)), None),
            x,
            jnp.arange(5),
        )[0],
        [("b", 0), ("b", 1), ("a", 0), ("a", 1), ("a", 2)],
    ),
    "fori j, fori i: stack([a, a])[j, i]": (
        lambda x, a, b, c: jax.lax.fori_loop(
            0,
            2,
            lambda j, x: jax.lax.fori_loop(
                0, 3, lambda i, x: _block(x, jnp.stack([a, a])[j, i]), x
            ),
            x,
        ),
        [("a", 0), ("a", 1), ("a", 2), ("a", 0), ("a", 1), ("a", 2)],
    ),
    "scan over stack([c, a[2], c])": (
        lambda x, a, b, c: _scan_blocks(x, jnp.stack([c, a[2], c])),
        [("c", None), ("a", 2), ("c", None)],
    ),
    "scan over stack([b[0], c, b[1]], axis=1).transpose(1, 0, 2)": (
        lambda x, a, b, c: _scan_blocks(x, jnp.stack([b[0], c, b[1]], axis=1).transpose(1, 0, 2)),
        [("b", 0), ("c", None), ("b", 1)],
    ),
    "scan over stack([b, a[:2]]), scan over each": (
        lambda x, a, b, c: _scan_stacks(x, jnp.stack([b, a[:2]])),
        [("b", 0), ("b", 1), ("a", 0), ("a", 1)],
    ),
    "scan over stack([b, a[1:]]), each g[1] then g[0]": (
        lambda x, a, b, c: _scan_stacks(
            x, jnp.stack([b, a[1:]]), lambda x, g: _block(_block(x, g[1]), g[0])
        ),
        [("b", 1), ("b", 0), ("a", 2), ("a", 1)],
    ),
}


@pytest.mark.parametrize("case", sorted(JOINS))
def test_params_joined_into_one_stack_are_read_block_by_block(case):
    # A loop over a join reads each block of each param at its own step: the blocks are
    # layers at the depth of their first read, as in the loop over the params themselves;
    # what no step reads is unused.
    loop, reads = JOINS[case]
    params = _joinable_params()
    apply = lambda p, x: loop(x, *(p[k]["w"] for k in "abc")) @ p["head"]["w"]
    layers, messages = _structure_and_warnings(params, apply)
    assert not any("joined" in m or "cannot" in m for m in messages), messages
    first = list(dict.fromkeys(reads))
    depth_of = {read: rank + 1 for rank, read in enumerate(first)}
    by_path = {leaf.path: leaf for leaf in layers.leaves}
    assert int(by_path["head/w"].depth) == len(first) + 1
    for name in "abc":
        leaf = by_path[f"{name}/w"]
        blocks = {k for n, k in first if n == name}
        if not blocks:
            assert leaf.role == "unused", (name, leaf)
            continue
        assert (leaf.role, leaf.fan_in_axes[-1:], leaf.output_axes) == (
            "kernel",
            (len(leaf.shape) - 2,),
            (len(leaf.shape) - 1,),
        ), (name, leaf)
        if len(blocks) == 1:  # one block of it read: one layer
            assert (leaf.stacked_axes, int(leaf.depth)) == ((), depth_of[(name, *blocks)])
            continue
        expected = [depth_of.get((name, k), len(first) + 2) for k in range(leaf.shape[0])]
        assert leaf.stacked_axes == (0,)
        np.testing.assert_array_equal(np.ravel(leaf.depth), expected)


@pytest.mark.parametrize("form", ["concatenate", "stack"])
def test_each_kernel_of_a_fused_product_is_a_kernel(form):
    # A fused q/k/v product: one matmul by the q, k and v kernels joined along their output
    # axis. Each is a kernel with its own fan-in and output axes, as in three products.
    normal = lambda i: jax.random.normal(jax.random.key(i), (WIDTH, HIDDEN))
    params = {name: {"kernel": normal(i)} for i, name in enumerate("qkv")}
    params["out"] = {"kernel": jnp.ones((HIDDEN, CLASSES))}

    def apply(p, x):
        kernels = [p[name]["kernel"] for name in "qkv"]
        if form == "concatenate":
            q, k, v = jnp.split(x @ jnp.concatenate(kernels, 1), 3, 1)
        else:
            q, k, v = jnp.einsum("bi,ito->tbo", x, jnp.stack(kernels, 1))
        return (jax.nn.softmax(q @ k.T) @ v) @ p["out"]["kernel"]

    layers, messages = _structure_and_warnings(params, apply)
    assert not messages, messages
    for leaf in layers.leaves:
        assert (leaf.role, leaf.stacked_axes, leaf.fan_in_axes, leaf.output_axes) == (
            "kernel",
            (),
            (0,),
            (1,),
        ), leaf
    # q, k and v read one input: one depth, as in three products; the output is one deeper.
    depths = {leaf.path: int(leaf.depth) for leaf in layers.leaves}
    assert depths["out/kernel"] == 2 and {depths[f"{n}/kernel"] for n in "qkv"} == {1}


@pytest.mark.parametrize("transpose_kernel", [False, True])
def test_a_transposed_convolution_kernel_is_a_kernel(transpose_kernel):
    # With transpose_kernel, `lax.conv_transpose` flips the kernel's window (`lax.rev`) and
    # swaps its feature axes: (kh, kw, out, in) as the product reads it.
    class Up(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.ConvTranspose(8, (3, 3), transpose_kernel=transpose_kernel, name="up")(x)
            return nn.Dense(2, name="head")(x.mean((1, 2)))

    x = jnp.ones((1, 6, 6, 3))
    params = Up().init(jax.random.key(0), x)["params"]
    layers = lo.layer_structure(params, lambda p, x: Up().apply({"params": p}, x), x)
    kernel = {k.path: k for k in layers.leaves}["up/kernel"]
    features = ((3,), (2,)) if transpose_kernel else ((2,), (3,))
    assert (kernel.shape[2:], kernel.role, kernel.spatial_axes) == (
        (8, 3) if transpose_kernel else (3, 8),
        "kernel",
        (0, 1),
    )
    assert (kernel.input_axes, kernel.output_axes) == features


def test_the_taps_of_a_shifted_sum_convolution_are_one_kernel():
    # A 1-d depthwise convolution written as a sum of shifted products (as in Mamba-style
    # code): every tap k[j] is one static entry along axis 0, used one after the other with no
    # other param in between, so axis 0 is the kernel's window, not a stack of layers.
    width, taps = 6, 4
    params = {"conv": {"k": jnp.ones((taps, width))}, "head": {"w": jnp.ones((width, 2))}}

    def apply(p, x):  # x: (time, width)
        y = sum(p["conv"]["k"][j] * x[j : j + x.shape[0] - taps + 1] for j in range(taps))
        return y @ p["head"]["w"]

    layers = lo.layer_structure(params, apply, jnp.ones((10, width)))
    k = layers.leaves[0]
    assert k.path == "conv/k"
    assert (k.role, k.stacked_axes, k.fan_in_axes, k.output_axes, int(k.depth)) == (
        "kernel",
        (),
        (0,),
        (1,),
        1,
    )
    assert layers.num_layers == 2
