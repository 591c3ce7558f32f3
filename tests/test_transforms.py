"""Properties every transform has: jit without retrace, inject_hyperparams, dtype, state size,
NNX and linen trees, sharded execution, and clear errors on bad input."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import lpwd_optax as lo

LR = 1e-2


def _lpwd(params, **kw):
    depths = lo.depth_labels(params)
    return lo.pre_weight_decay(lo.layerwise_schedule(depths, 0.1), learning_rate=LR, **kw)


# name -> (factory(params, **mask) -> transform, place in the chain, keeps only a step count)
CASES = {
    "l2": (lambda p, **kw: lo.l2_regularization(0.1, **kw), "first", True),
    "wd": (lambda p, **kw: lo.weight_decay(0.1, learning_rate=LR, **kw), "last", True),
    "rwd": (lambda p, **kw: lo.real_time_weight_decay(0.1, learning_rate=LR, **kw), "last", True),
    "pwd": (lambda p, **kw: lo.pre_weight_decay(0.1, learning_rate=LR, **kw), "last", True),
    "lpwd": (_lpwd, "last", True),
    "adadecay": (lambda p, **kw: lo.adaptive_weight_decay(0.1, **kw), "first", True),
    "randomized": (
        lambda p, **kw: lo.randomized_weight_decay(0.1, key=jax.random.key(0), **kw),
        "first",
        False,
    ),
    "wrs": (lambda p, **kw: lo.weight_rescaling(2, **kw), "last", True),
    # AdamP's projection wraps the optimizer (it needs the raw gradient and the final update).
    "adamp": (
        lambda p, base=None, **kw: lo.project_scale_invariant(
            base or optax.adam(LR), weight_decay=0.1, learning_rate=LR, **kw
        ),
        "wrap",
        False,
    ),
    # SGDP without Nesterov keeps a projected momentum buffer of its own.
    "sgdp": (
        lambda p, base=None, **kw: lo.sgdp(LR, momentum=0.9, weight_decay=0.1, **kw),
        "wrap",
        False,
    ),
    # The weight-decay variants of 2023-2025.
    "cautious": (
        lambda p, **kw: lo.cautious_weight_decay(0.1, learning_rate=LR, **kw),
        "last",
        True,
    ),
    "corrected": (
        lambda p, **kw: lo.corrected_weight_decay(
            0.1, learning_rate=optax.cosine_decay_schedule(LR, 100), max_learning_rate=LR, **kw
        ),
        "last",
        True,
    ),
    # AdamS reads the wrapped Adam's second moment.
    "stable": (
        lambda p, base=None, **kw: lo.stable_weight_decay(
            base or optax.adam(LR), 0.1, b2=0.999, learning_rate=LR, **kw
        ),
        "wrap",
        False,
    ),
    # Decay toward the starting weights keeps them.
    "decay_to_init": (
        lambda p, **kw: lo.decay_to_init(0.1, learning_rate=LR, **kw),
        "last",
        False,
    ),
    # CPR keeps one multiplier and one bound per leaf.
    "cpr": (
        lambda p, **kw: lo.constrained_parameter_regularization("uniform", 0.1, **kw),
        "last",
        False,
    ),
}


def _chain(name, params, base=None):
    make, place, _ = CASES[name]
    base = base or optax.adam(LR)
    if place == "wrap":
        return make(params, base=base)
    tx = make(params)
    return optax.chain(tx, base) if place == "first" else optax.chain(base, tx)


def _params(dtype=jnp.float32, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {
        "conv": {
            "kernel": jax.random.normal(k1, (3, 3, 4, 8), dtype),
            "bias": jnp.zeros((8,), dtype),
        },
        "fc": {
            "kernel": jax.random.normal(k2, (8, 16), dtype),
            "bias": jax.random.normal(k3, (16,), dtype),
        },
    }


def _grads(params, seed):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(100 + seed), len(leaves))
    return treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _run(opt, params, steps, step_fn=None):
    state = opt.init(params)
    step_fn = step_fn or opt.update
    for i in range(steps):
        updates, state = step_fn(_grads(params, i), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("name", CASES)
def test_jit_without_retrace(name):
    params = _params()
    opt = _chain(name, params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(grads, state, params):
        return opt.update(grads, state, params)

    chex.clear_trace_counter()
    jitted, _ = _run(opt, params, 4, step)
    eager, _ = _run(opt, params, 4)
    chex.assert_trees_all_close(jitted, eager, rtol=1e-5, atol=1e-6)


INJECT = {
    "l2": (lo.l2_regularization, {"rate": 0.1}, ()),
    "wd": (lo.weight_decay, {"rate": 0.1, "learning_rate": LR}, ()),
    "rwd": (lo.real_time_weight_decay, {"rate": 0.1, "learning_rate": LR}, ()),
    "pwd": (lo.pre_weight_decay, {"rate": 0.1, "learning_rate": LR}, ()),
    "adadecay": (lo.adaptive_weight_decay, {"rate": 0.1, "alpha": 4.0}, ()),
    "wrs": (lo.weight_rescaling, {"every": 1, "mode": "output"}, ("every", "mode")),
    "adamp": (lo.adamp, {"learning_rate": LR, "weight_decay": 0.1}, ()),
    "cautious": (lo.cautious_weight_decay, {"rate": 0.1, "learning_rate": LR}, ()),
    "corrected": (
        lo.corrected_weight_decay,
        {"rate": 0.1, "learning_rate": LR, "max_learning_rate": 2 * LR},
        (),
    ),
    "adams": (lo.adams, {"learning_rate": LR, "weight_decay": 0.1}, ()),
    "cpr": (
        lo.cpr,
        {"learning_rate": LR, "kappa_init": "uniform", "kappa_init_param": 0.1, "mu_lr": 1.0},
        ("kappa_init",),
    ),
}


@pytest.mark.parametrize("name", INJECT)
def test_works_inside_inject_hyperparams(name):
    factory, kwargs, static = INJECT[name]
    tx = optax.inject_hyperparams(factory, static_args=("mask", *static))(**kwargs)
    params = _params()
    grads = _grads(params, 0)
    update = jax.jit(chex.assert_max_traces(tx.update, n=1))
    chex.clear_trace_counter()
    state = tx.init(params)
    out, state = update(grads, state, params)
    chex.assert_trees_all_close(
        out,
        factory(**kwargs).update(grads, factory(**kwargs).init(params), params)[0],
        rtol=1e-5,
        atol=1e-6,
    )
    rate = next((k for k in ("rate", "weight_decay") if k in kwargs), None)
    if rate:  # a new rate takes effect without recompiling
        state.hyperparams[rate] = jnp.full_like(state.hyperparams[rate], 0.2)
        out2, _ = update(grads, state, params)
        fresh = factory(**{**kwargs, rate: 0.2})
        chex.assert_trees_all_close(
            out2, fresh.update(grads, fresh.init(params), params)[0], rtol=1e-5, atol=1e-6
        )
        assert not np.allclose(out2["fc"]["kernel"], out["fc"]["kernel"])


def _fixed_tree_from_callable(params):
    tree = lo.default_decay_mask(params)
    return lambda _: tree


# How the mask is given: default (a callable on the params), a tree, or a callable that
# returns a fixed tree (as `optax.adamw(..., mask=tree)` users write it).
MASKS = {
    "default": lambda p: {},
    "tree": lambda p: {"mask": lo.default_decay_mask(p)},
    "fixed tree from a callable": lambda p: {"mask": _fixed_tree_from_callable(p)},
}


def _transform_and_optimizer(name, params, mask):
    if name == "lpwd_adam":
        tx = lo.lpwd_adam(LR, lo.layerwise_schedule(lo.depth_labels(params), 0.1), **mask)
        return tx, tx
    make, place, _ = CASES[name]
    tx = make(params, **mask)
    if place == "wrap":
        return tx, tx
    return tx, optax.chain(tx, optax.adam(LR)) if place == "first" else optax.chain(
        optax.adam(LR), tx
    )


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("name", [*CASES, "lpwd_adam"])
def test_works_with_optax_tree_utils_and_eval_shape(name, mask):
    params = _params()
    grads = _grads(params, 0)
    tx, opt = _transform_and_optimizer(name, params, MASKS[mask](params))
    state = opt.init(params)

    # Shapes without computing anything: the same as the real calls'.
    chex.assert_trees_all_equal_shapes_and_dtypes(jax.eval_shape(opt.init, params), state)
    chex.assert_trees_all_equal_shapes_and_dtypes(
        jax.eval_shape(opt.update, grads, state, params), opt.update(grads, state, params)
    )

    # Optimizer-state shardings derived from the params' (optax's placeholder init).
    mesh = Mesh(np.array(jax.devices()[:8]), ("model",))
    spec = lambda x: PartitionSpec(*([None] * (x.ndim - 1)), "model") if x.ndim else PartitionSpec()
    param_shardings = jax.tree.map(lambda x: NamedSharding(mesh, spec(x)), params)
    replicated = NamedSharding(mesh, PartitionSpec())
    state_shardings = optax.tree_utils.tree_map_params(
        opt, lambda _, s: s, state, param_shardings, transform_non_params=lambda _: replicated
    )
    sharded_params = jax.device_put(params, param_shardings)
    sharded_state = jax.jit(opt.init, out_shardings=state_shardings)(sharded_params)
    moments = optax.tree_utils.tree_get(sharded_state, "mu")
    for x, s in zip(jax.tree.leaves(moments), jax.tree.leaves(param_shardings)):
        assert x.sharding.is_equivalent_to(s, x.ndim)
    step = jax.jit(opt.update, out_shardings=(param_shardings, state_shardings))
    updates, _ = step(grads, sharded_state, sharded_params)
    chex.assert_trees_all_close(updates, opt.update(grads, state, params)[0], rtol=1e-5, atol=1e-6)

    # The step count, read and written by name.
    tx_state = tx.init(params)
    count = optax.tree_utils.tree_get(tx_state, "count")
    if count is None and CASES.get(name, (None, None))[1] == "wrap":
        return  # SGDP: momentum, no step count
    if count is None:
        assert jax.tree.leaves(tx_state) == []
        return
    assert int(count) == 0
    jumped = optax.tree_utils.tree_set(tx_state, count=jnp.asarray(3, jnp.int32))
    out, new_state = tx.update(grads, jumped, params)
    assert int(optax.tree_utils.tree_get(new_state, "count")) == 4
    if isinstance(tx_state, lo._common.CountState):  # nothing but the count: three real steps
        for _ in range(3):
            _, tx_state = tx.update(grads, tx_state, params)
        chex.assert_trees_all_close(out, tx.update(grads, tx_state, params)[0], rtol=1e-6)


@pytest.mark.parametrize("name", CASES)
def test_keeps_bf16_update_dtype(name):
    params = _params(jnp.bfloat16)
    opt = _chain(name, params)
    updates, _ = opt.update(_grads(params, 0), opt.init(params), params)
    chex.assert_trees_all_equal_dtypes(updates, params)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c[2]])
def test_state_is_a_step_count(name):
    params = _params()
    tx = CASES[name][0](params)
    leaves = jax.tree.leaves(tx.init(params))
    assert all(np.size(x) == 1 for x in leaves), [np.shape(x) for x in leaves]
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(_chain(name, params).init(params)))
    adam_bytes = sum(x.nbytes for x in jax.tree.leaves(optax.adam(LR).init(params)))
    assert state_bytes <= adam_bytes + 4


def _lpwd_scheduled(params):
    """LPWD's per-leaf rates with the learning rate as a (constant) schedule."""
    depths = lo.depth_labels(params)
    return lo.pre_weight_decay(lo.layerwise_schedule(depths, 0.1), learning_rate=lambda t: LR)


# name -> (factory with constant hyperparameters, the same transform with a constant schedule)
STATELESS = {
    "l2": (lambda p: lo.l2_regularization(0.1), lambda p: lo.l2_regularization(lambda t: 0.1)),
    "wd": (
        lambda p: lo.weight_decay(0.1, learning_rate=LR),
        lambda p: lo.weight_decay(lambda t: 0.1, learning_rate=LR),
    ),
    "rwd": (
        lambda p: lo.real_time_weight_decay(0.1, learning_rate=LR),
        lambda p: lo.real_time_weight_decay(0.1, learning_rate=lambda t: LR),
    ),
    "pwd": (
        lambda p: lo.pre_weight_decay(0.1, learning_rate=LR),
        lambda p: lo.pre_weight_decay(lambda t: 0.1, learning_rate=LR),
    ),
    "lpwd": (_lpwd, _lpwd_scheduled),
    "adadecay": (
        lambda p: lo.adaptive_weight_decay(0.1),
        lambda p: lo.adaptive_weight_decay(lambda t: 0.1),
    ),
    "wrs": (lambda p: lo.weight_rescaling(1), None),  # every=1: no step to count
    "cautious": (
        lambda p: lo.cautious_weight_decay(0.1, learning_rate=LR),
        lambda p: lo.cautious_weight_decay(lambda t: 0.1, learning_rate=LR),
    ),
    "corrected": (
        lambda p: lo.corrected_weight_decay(0.1, learning_rate=LR),
        lambda p: lo.corrected_weight_decay(0.1, learning_rate=lambda t: LR, max_learning_rate=LR),
    ),
}


@pytest.mark.parametrize("name", STATELESS)
def test_constant_hyperparameters_add_no_state(name):
    params = _params()
    constant, scheduled = STATELESS[name]
    place = CASES[name][1]
    chain = lambda tx: (
        optax.chain(tx, optax.adam(LR)) if place == "first" else optax.chain(optax.adam(LR), tx)
    )
    assert jax.tree.leaves(constant(params).init(params)) == []
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(chain(constant(params)).init(params)))
    adam_bytes = sum(x.nbytes for x in jax.tree.leaves(optax.adam(LR).init(params)))
    assert state_bytes == adam_bytes
    if scheduled is None:
        return
    # A schedule needs the step count; the stateless form takes the same steps.
    (count,) = jax.tree.leaves(scheduled(params).init(params))
    assert count.shape == () and count.dtype == jnp.int32
    step = lambda tx: jax.jit(chain(tx).update)
    got, _ = _run(chain(constant(params)), params, 4, step(constant(params)))
    want, state = _run(chain(scheduled(params)), params, 4, step(scheduled(params)))
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
    transform_state = state[0] if place == "first" else state[1]
    assert int(transform_state.count) == 4


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(4, 8, (3, 3), rngs=rngs)
        self.norm = nnx.LayerNorm(8, rngs=rngs)
        self.fc = nnx.Linear(8, 16, rngs=rngs)

    def __call__(self, x):
        return self.fc(self.norm(self.conv(x)).mean(axis=(1, 2)))


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.LayerNorm()(nn.Conv(8, (3, 3))(x))
        return nn.Dense(16)(x.mean(axis=(1, 2)))


def _nnx_state():
    _, state = nnx.split(NNXNet(nnx.Rngs(0)), nnx.Param)
    return state


def _linen_params():
    return LinenNet().init(jax.random.key(0), jnp.ones((1, 6, 6, 4)))["params"]


@pytest.mark.parametrize("tree", ["nnx", "linen"])
@pytest.mark.parametrize("name", CASES)
def test_works_on_nnx_state_and_linen_params(name, tree):
    params = _nnx_state() if tree == "nnx" else _linen_params()
    opt = _chain(name, params)
    new, _ = _run(opt, params, 2, jax.jit(opt.update))
    chex.assert_trees_all_equal_structs(new, params)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(new))
    # Decayed kernels moved differently from the base optimizer alone; norm scales did not.
    # The base optimizer alone (SGDP's is momentum SGD).
    base, _ = _run(optax.sgd(LR, momentum=0.9) if name == "sgdp" else optax.adam(LR), params, 2)
    paths = dict(lo._common.leaves_with_paths(new))
    base_paths = dict(lo._common.leaves_with_paths(base))
    kernel = next(p for p in paths if p.endswith("kernel"))
    scale = next(p for p in paths if p.endswith("scale"))
    assert not np.allclose(paths[kernel], base_paths[kernel], rtol=0, atol=1e-7)
    if CASES[name][1] in ("last", "wrap"):
        np.testing.assert_allclose(paths[scale], base_paths[scale], rtol=1e-6)


@pytest.mark.parametrize("name", CASES)
def test_sharded_over_eight_devices_equals_one_device(name):
    assert jax.device_count() >= 8
    params = _params()
    opt = _chain(name, params)
    single, _ = _run(opt, params, 3, jax.jit(opt.update))

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(8), ("model",))
    spec = lambda x: PartitionSpec(*([None] * (x.ndim - 1)), "model") if x.ndim else PartitionSpec()
    shard = lambda t: jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), t)
    sharded_params = shard(params)
    state = jax.jit(opt.init)(sharded_params)
    step = jax.jit(opt.update)
    p = sharded_params
    for i in range(3):
        updates, state = step(shard(_grads(params, i)), state, p)
        p = optax.apply_updates(p, updates)
    assert len(p["fc"]["kernel"].sharding.device_set) == 8
    chex.assert_trees_all_close(jax.device_get(p), single, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Bad input


DECOUPLED = [lo.weight_decay, lo.real_time_weight_decay, lo.pre_weight_decay]
DECOUPLED += [lo.cautious_weight_decay]
RATED = [*DECOUPLED, lo.l2_regularization, lo.adaptive_weight_decay]


@pytest.mark.parametrize("factory", RATED)
def test_negative_rate_is_rejected(factory):
    with pytest.raises(ValueError, match="rate must be a finite number >= 0"):
        factory(-0.1)
    with pytest.raises(ValueError, match=r"rate at 'conv/bias' must be a finite number"):
        factory(jax.tree.map(lambda x: -1.0, _params())).init(_params())


@pytest.mark.parametrize(
    "factory",
    [lo.real_time_weight_decay, lo.pre_weight_decay, lo.weight_decay, lo.cautious_weight_decay],
)
def test_per_step_decay_at_or_above_one_is_rejected(factory):
    with pytest.raises(ValueError, match="per-step decay"):
        factory(2.0)
    with pytest.raises(ValueError, match="per-step decay"):
        factory(0.5, learning_rate=4.0)
    with pytest.raises(ValueError, match="per-step decay"):
        factory(lambda t: 1.5 + 0 * t)
    # A per-leaf rate is bounded on the leaves it decays only (the default mask skips biases).
    with pytest.raises(ValueError, match=r"at 'conv/kernel'.*per-step decay"):
        factory(jax.tree.map(lambda x: 3.0, _params())).init(_params())
    rates = jax.tree.map(lambda x: 3.0 if x.ndim <= 1 else 0.1, _params())
    factory(rates).init(_params())


def test_every_below_one_is_rejected():
    for every in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="every must be an int >= 1"):
            lo.weight_rescaling(every)
    with pytest.raises(ValueError, match="mode"):
        lo.weight_rescaling(1, mode="sideways")


def test_mismatched_mask_names_the_first_mismatching_path():
    params = _params()
    mask = {"conv": {"kernel": True, "bias": False}, "fcc": {"kernel": True, "bias": False}}
    with pytest.raises(ValueError, match=r"mask does not match the params.*'fcc/bias'.*'fc/bias'"):
        lo.weight_decay(0.1, mask=mask).init(params)
    short = {"conv": {"kernel": True, "bias": False}}
    with pytest.raises(ValueError, match=r"'fc/bias' is in the params only"):
        lo.real_time_weight_decay(0.1, mask=short).init(params)


def test_mismatched_rate_tree_names_the_first_mismatching_path():
    params = _params()
    rates = {"conv": {"kernel": 0.1, "bias": 0.0}, "fc": {"kernel": 0.1, "gamma": 0.0}}
    with pytest.raises(ValueError, match=r"rate tree does not match.*'fc/gamma'.*'fc/bias'"):
        lo.pre_weight_decay(rates).init(params)


@pytest.mark.parametrize("name", CASES)
def test_missing_params_is_a_clear_error(name):
    params = _params()
    tx = CASES[name][0](params)
    state = tx.init(params)
    with pytest.raises(ValueError, match="needs the current params"):
        tx.update(_grads(params, 0), state)
    with pytest.raises(ValueError, match="needs the current params"):
        tx.init(None)


def test_wrs_on_a_vector_is_rejected():
    with pytest.raises(ValueError, match="'conv/bias' has shape"):
        lo.weight_rescaling(1, mask=lambda p: jax.tree.map(lambda x: True, p)).init(_params())


def test_default_mask_follows_timm():
    params = {
        "stage": {
            "blocks_0": {
                "attn": {
                    "relative_position_bias_table": jnp.ones((9, 3)),
                    "qkv": {"kernel": jnp.ones((4, 12)), "bias": jnp.ones((12,))},
                },
                "gamma": jnp.ones((4,)),
            }
        }
    }
    mask = lo.default_decay_mask(params)
    blk = mask["stage"]["blocks_0"]
    assert blk["attn"]["qkv"]["kernel"] is True
    assert blk["attn"]["qkv"]["bias"] is False
    assert blk["attn"]["relative_position_bias_table"] is False
    assert blk["gamma"] is False


PMAP = ["wd", "rwd", "pwd", "l2", "adadecay", "wrs", "adamp"]
PMAP += ["cautious", "corrected", "stable", "cpr"]


@pytest.mark.parametrize("name", PMAP)
def test_runs_under_pmap(name):
    """Replicated over 8 devices with pmap (each device a different gradient), every replica
    equals the single-device update of its own gradient."""
    params = _params()
    opt = _chain(name, params)
    grads = [_grads(params, i) for i in range(8)]
    state = opt.init(params)
    stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
    replicate = lambda t: jax.tree.map(lambda x: jnp.broadcast_to(x, (8, *x.shape)), t)
    out, _ = jax.pmap(opt.update)(stack(grads), replicate(state), replicate(params))
    for i in (0, 5):
        expected, _ = opt.update(grads[i], state, params)
        chex.assert_trees_all_close(
            jax.tree.map(lambda x, i=i: x[i], out), expected, rtol=1e-5, atol=1e-6
        )


def _random_tree(draw, depth=0):
    keys = draw(
        st.lists(st.text("abcxyz_", min_size=1, max_size=4), min_size=1, max_size=3, unique=True)
    )
    tree = {}
    for k in keys:
        if depth < 2 and draw(st.booleans()):
            tree[k] = _random_tree(draw, depth + 1)
        else:
            shape = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=3)))
            seed = draw(st.integers(0, 2**16))
            tree[k] = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    return tree


@st.composite
def trees_and_updates(draw):
    params = _random_tree(draw)
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    updates = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
    return params, updates


@settings(max_examples=25, deadline=None)
@given(data=trees_and_updates(), rate=st.floats(0.0, 0.9), lr=st.floats(0.01, 1.0))
def test_one_step_equations_on_generated_trees(data, rate, lr):
    params, u = data
    d = rate * lr
    mask = lo.default_decay_mask(params)
    cases = {
        "wd": (lo.weight_decay(rate, learning_rate=lr), lambda p, u: u - d * p),
        "rwd": (
            lo.real_time_weight_decay(rate, learning_rate=lr),
            lambda p, u: (1 - d) * (p + u) - p,
        ),
        "pwd": (lo.pre_weight_decay(rate, learning_rate=lr), lambda p, u: (1 - d) * (p + u) - p),
        "l2": (lo.l2_regularization(rate), lambda p, g: g + rate * p),
        "cautious": (
            lo.cautious_weight_decay(rate, learning_rate=lr),
            lambda p, u: np.where(u * p <= 0, u - d * p, u),
        ),
        "corrected": (  # eta_max = 1: d = rate * lr^2
            lo.corrected_weight_decay(rate, learning_rate=lr, max_learning_rate=1.0),
            lambda p, u: u - rate * lr**2 * p,
        ),
    }
    for tx, expected in cases.values():
        out, _ = tx.update(u, tx.init(params), params)
        want = jax.tree.map(lambda p, u, m, f=expected: f(p, u) if m else u, params, u, mask)
        chex.assert_trees_all_close(out, want, rtol=1e-5, atol=1e-6)
