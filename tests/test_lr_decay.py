"""Layer-wise learning-rate decay: each layer's update times `decay ** (n - depth)`.

Checked against a numpy loop on a hand-built tree (a stacked leaf included), a model whose
blocks a scan stacks against its unrolled twin, the composition with a multiplicative decay
against a numpy AdamW-style loop, and timm's `layer_decay` on a ConvNeXt for 20 AdamW steps in
float64 (marker `timm`).
"""

from __future__ import annotations

import pathlib
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lpwd_optax as lo

DEPTHS = {"embed": 1, "stack": np.array([2, 3, 4, 5]).reshape(4, 1, 1), "head": 6}
SHAPES = {"embed": (3, 2), "stack": (4, 2, 2), "head": (2,)}


def _tree(seed, shapes=SHAPES, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return {k: jax.random.normal(key, s, dtype) for key, (k, s) in zip(keys, shapes.items())}


def _numpy_scales(depths, decay, min_scale=0.0):
    n = max(int(np.max(d)) for d in depths.values())
    return {
        k: np.maximum(min_scale, np.float64(decay) ** (n - np.asarray(d, np.float64)))
        for k, d in depths.items()
    }


# --------------------------------------------------------------------------------------------
# The equation, against numpy


@pytest.mark.parametrize("min_scale", [0.0, 0.3])
def test_scales_each_slice_as_numpy(min_scale):
    grads = _tree(0)
    opt = optax.chain(optax.sgd(0.1), lo.layerwise_lr_decay(0.5, DEPTHS, min_scale=min_scale))
    params = _tree(1)
    updates, state = jax.jit(opt.update)(grads, opt.init(params), params)
    scales = _numpy_scales(DEPTHS, 0.5, min_scale)
    for k, g in grads.items():
        want = -0.1 * np.asarray(g, np.float64) * scales[k]
        np.testing.assert_allclose(updates[k], want, rtol=1e-6, err_msg=k)
    # slice i of the stack: 0.5 ** (6 - (i + 2)), floored at min_scale
    want_stack = [max(min_scale, 0.5 ** (4 - i)) for i in range(4)]
    ratio = np.asarray(updates["stack"][:, 0, 0] / (-0.1 * grads["stack"][:, 0, 0]))
    np.testing.assert_allclose(ratio, want_stack, rtol=1e-6)
    assert state[1] == optax.EmptyState()


def test_scales_helper_is_the_transforms_multiplier():
    scales = lo.layerwise_lr_scales(DEPTHS, 0.8)
    want = _numpy_scales(DEPTHS, 0.8)
    assert scales["head"] == 1.0 and isinstance(scales["embed"], float)
    for k in DEPTHS:
        np.testing.assert_allclose(scales[k], want[k], rtol=1e-15)
    assert scales["stack"].shape == (4, 1, 1)


def test_takes_a_layer_structure():
    def apply_fn(p, x):
        h = jnp.tanh(x @ p["embed"])
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, p["stack"])
        return h * p["head"]

    params = _tree(0)
    layers = lo.layer_structure(params, apply_fn, jnp.ones((1, 3)))
    got = lo.layerwise_lr_scales(layers, 0.5)
    want = _numpy_scales(layers.depths, 0.5)
    for k in params:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-15)
    assert layers.depths["stack"].ravel().tolist() == [2, 3, 4, 5]
    grads = _tree(2)
    tx = lo.layerwise_lr_decay(0.5, layers)
    updates, _ = tx.update(grads, tx.init(params))
    for k in params:
        np.testing.assert_allclose(updates[k], grads[k] * want[k], rtol=1e-6)


# --------------------------------------------------------------------------------------------
# The properties every transform has


def test_jit_without_retrace_and_dtype_kept():
    params = _tree(0, dtype=jnp.bfloat16)
    tx = lo.layerwise_lr_decay(0.7, DEPTHS)
    state = tx.init(params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(grads, state):
        return tx.update(grads, state)

    for seed in range(3):
        updates, state = step(_tree(seed, dtype=jnp.bfloat16), state)
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))


def test_decay_is_a_hyperparameter_under_inject_hyperparams():
    params = _tree(0)
    grads = _tree(1)
    opt = optax.inject_hyperparams(lo.layerwise_lr_decay)(decay=0.5, layers=DEPTHS)
    state = opt.init(params)
    traces = []

    @jax.jit
    def step(grads, state):
        traces.append(1)
        return opt.update(grads, state, params)

    updates, state = step(grads, state)
    np.testing.assert_allclose(updates["embed"], grads["embed"] * 0.5**5, rtol=1e-6)
    state.hyperparams["decay"] = jnp.asarray(0.9, jnp.float32)
    updates, state = step(grads, state)
    np.testing.assert_allclose(updates["embed"], grads["embed"] * 0.9**5, rtol=1e-6)
    np.testing.assert_allclose(updates["head"], grads["head"], rtol=0)
    assert len(traces) == 1


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="decay must be a finite number >= 0"):
        lo.layerwise_lr_decay(-0.5, DEPTHS)
    with pytest.raises(ValueError, match="min_scale must be <= 1"):
        lo.layerwise_lr_decay(0.5, DEPTHS, min_scale=2.0)
    with pytest.raises(TypeError, match=r"LayerStructure .* or a tree of depth labels"):
        lo.layerwise_lr_decay(0.5, None)
    with pytest.raises(ValueError, match="must be >= 1"):
        lo.layerwise_lr_decay(0.5, {**DEPTHS, "head": 0})
    tx = lo.layerwise_lr_decay(0.5, DEPTHS)
    with pytest.raises(ValueError, match="'other'"):
        tx.init({**_tree(0), "other": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"'stack'.*broadcast"):
        tx.init({**_tree(0), "stack": jnp.ones((3, 2, 2))})


# --------------------------------------------------------------------------------------------
# A scan over stacked blocks and its unrolled twin follow one trajectory

BLOCKS, WIDTH = 4, 6


def _stacked_apply(p, x):
    h = jnp.tanh(x @ p["embed"]["w"])
    body = lambda h, b: (h + jnp.tanh(h @ b["w"] + b["b"]), None)
    h, _ = jax.lax.scan(body, h, p["blocks"])
    return h @ p["head"]["w"]


def _unrolled_apply(p, x):
    h = jnp.tanh(x @ p["embed"]["w"])
    for i in range(BLOCKS):
        h = h + jnp.tanh(h @ p[f"block_{i}"]["w"] + p[f"block_{i}"]["b"])
    return h @ p["head"]["w"]


def _unroll(p):
    out = {"embed": p["embed"], "head": p["head"]}
    for i in range(BLOCKS):
        out[f"block_{i}"] = jax.tree.map(lambda a, i=i: a[i], p["blocks"])
    return out


def test_scanned_and_unrolled_follow_one_trajectory():
    k = jax.random.split(jax.random.key(0), 5)
    stacked = {
        "embed": {"w": jax.random.normal(k[0], (5, WIDTH)) / 2},
        "blocks": {
            "w": jax.random.normal(k[1], (BLOCKS, WIDTH, WIDTH)) / 3,
            "b": jax.random.normal(k[2], (BLOCKS, WIDTH)) / 3,
        },
        "head": {"w": jax.random.normal(k[3], (WIDTH, 3)) / 2},
    }
    x = jax.random.normal(k[4], (16, 5))
    y = jnp.arange(16) % 3

    def trajectory(params, apply_fn, tx):
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y).mean()
        step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
        state, out = tx.init(params), []
        for _ in range(20):
            updates, state = step(params, state)
            params = optax.apply_updates(params, updates)
            out.append(params)
        return out

    layers = lo.layer_structure(stacked, _stacked_apply, x)
    assert layers.depths["blocks"]["w"].ravel().tolist() == [2, 3, 4, 5]
    unrolled = _unroll(stacked)
    adamw = lambda mask: optax.adamw(1e-2, weight_decay=0.5, mask=mask)
    tx_s = optax.chain(adamw(layers.decay_mask), lo.layerwise_lr_decay(0.6, layers))
    depths_u = lo.depth_labels(unrolled, _unrolled_apply, x)
    tx_u = optax.chain(adamw(lo.default_decay_mask(unrolled)), lo.layerwise_lr_decay(0.6, depths_u))
    path_s = trajectory(stacked, _stacked_apply, tx_s)
    path_u = trajectory(unrolled, _unrolled_apply, tx_u)
    for s, u in zip(path_s, path_u):
        chex.assert_trees_all_close(_unroll(s), u, atol=3e-6, rtol=0)
    moved = lambda p, q: float(jnp.max(jnp.abs(p - q)))
    # the first block moved 0.6 ** 3 as far per step as the last
    assert moved(path_u[0]["block_0"]["w"], unrolled["block_0"]["w"]) < 0.3 * moved(
        path_u[0]["block_3"]["w"], unrolled["block_3"]["w"]
    )


# --------------------------------------------------------------------------------------------
# With a multiplicative decay: each layer decays with its own scaled learning rate


def test_rwd_after_it_decays_with_the_scaled_learning_rate():
    """chain(adam, layerwise_lr_decay, real_time_weight_decay(rate * scales)) is RWD run with
    each layer's learning rate `s * lr`: theta <- (1 - s lr lambda) (theta - s lr m / v)."""
    lr, wd, decay, b1, b2, eps = 0.05, 0.5, 0.5, 0.9, 0.999, 1e-8
    depths = {"embed": 1, "stack": DEPTHS["stack"], "head": 6}
    shapes = {**SHAPES, "head": (2, 2)}
    scales = lo.layerwise_lr_scales(depths, decay)
    rates = jax.tree.map(lambda s: wd * s, scales)
    opt = optax.chain(
        optax.adam(lr, b1, b2, eps),
        lo.layerwise_lr_decay(decay, depths),
        lo.real_time_weight_decay(
            rates, learning_rate=lr, mask=lambda p: jax.tree.map(lambda _: True, p)
        ),
    )
    params = _tree(0, shapes)
    state = opt.init(params)
    ref = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in ref.items()}
    v = {k: np.zeros_like(x) for k, x in ref.items()}
    s = _numpy_scales(depths, decay)
    update = jax.jit(opt.update)
    for t in range(10):
        grads = _tree(100 + t, shapes)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        for k in ref:
            g = np.asarray(grads[k], np.float64)
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            direction = (m[k] / (1 - b1 ** (t + 1))) / (np.sqrt(v[k] / (1 - b2 ** (t + 1))) + eps)
            ref[k] = (1 - s[k] * lr * wd) * (ref[k] - s[k] * lr * direction)
    for k in ref:
        np.testing.assert_allclose(params[k], ref[k], rtol=2e-5, atol=1e-6, err_msg=k)


# --------------------------------------------------------------------------------------------
# The guide's examples

GUIDE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "guides" / "layerwise_lr_decay.md"


def test_guide_examples_run(capsys):
    text = GUIDE.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    printed = re.findall(r"```text\n(.*?)```", text, re.S)
    namespace: dict = {}
    exec(compile(blocks[0], str(GUIDE), "exec"), namespace)
    assert capsys.readouterr().out.strip() == printed[0].strip()
    # the LPWD chain with each layer's scaled rate, on the first example's params
    namespace.update(gamma=0.5, wd=0.1, lr=1e-2)
    exec(compile(blocks[2], str(GUIDE), "exec"), namespace)
    params, opt = namespace["params"], namespace["opt"]
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(grads, opt.init(params), params)
    # zero gradient: the update is PWD's decay alone, -d * theta with d = s * 2 wd i / n * lr
    d = 0.5**3 * (2 * 0.1 * 2 / 5) * 1e-2
    np.testing.assert_allclose(updates["blocks"][0], -d * params["blocks"][0], rtol=1e-5)


# --------------------------------------------------------------------------------------------
# timm's layer_decay: 20 AdamW steps on a ConvNeXt, float64

ARCH = dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), patch_size=2, ls_init_value=0.5)
CLASSES, LR, WD, GAMMA, STEPS = 5, 1e-3, 0.05, 0.8, 20

# timm's ConvNeXt `group_matcher`, as depth_labels rules on the Flax port's paths: the stem is
# layer 0, then every block in order with a stage's downsample in its first block's layer, and
# the head (unmatched in timm) last.
TIMM_CONVNEXT_RULES = [
    (r"^stem/", 0),
    (r"^stages/(\d+)/downsample/", lambda m: (1, int(m[1]), 0)),
    (r"^stages/(\d+)/blocks/(\d+)/", lambda m: (1, int(m[1]), int(m[2]))),
    (r"^head/", 2),
]


def _timm_layer_ids(model, depths):
    """timm param name -> our depth - 1 (timm numbers layers from 0), through the converter's
    name map."""
    from lpwd_optax.models.convert import timm_layout

    by_path = dict((lo.path_str(p), d) for p, d in jax.tree_util.tree_flatten_with_path(depths)[0])
    return {
        key: int(by_path["/".join(map(str, entry.path))]) - 1
        for key, entry in timm_layout(model).items()
    }


@pytest.fixture(scope="module")
def convnext64():
    """The Flax ConvNeXt in float64 and its jitted loss gradient, compiled once for both
    groupings."""
    from lpwd_optax import models

    with jax.enable_x64(True):
        model = models.create_model("convnext_atto", num_classes=CLASSES, **ARCH)
        fm = models.functional_model(model)
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), fm.params)

        def loss_fn(p, x, y):
            return optax.softmax_cross_entropy_with_integer_labels(fm.apply(p, x), y).mean()

        return model, fm, params, jax.jit(jax.grad(loss_fn))


@pytest.mark.timm
@pytest.mark.parametrize("grouping", ["forward pass", "timm group_matcher"])
def test_matches_timm_layer_decay(grouping, convnext64):
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    timm_optim = pytest.importorskip("timm.optim")
    timm_scheduler = pytest.importorskip("timm.scheduler")

    from lpwd_optax import models

    model, fm, params, grad_fn = convnext64
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only contend
    try:
        with jax.enable_x64(True):
            if grouping == "forward pass":
                x_spec = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float64)
                layers = lo.layer_structure(params, fm.apply, x_spec)
                depths = layers.depths
            else:
                layers = depths = lo.depth_labels(params, rules=TIMM_CONVNEXT_RULES)

            reference = timm.create_model(
                "convnext_atto", num_classes=CLASSES, drop_path_rate=0.0, **ARCH
            ).double()
            state_dict = models.to_timm(model, params)
            reference.load_state_dict({k: torch.tensor(v) for k, v in state_dict.items()})
            layer_ids = _timm_layer_ids(model, depths)
            if grouping == "forward pass":  # timm groups by our layer ids
                reference.group_matcher = lambda coarse=False: lambda name: layer_ids[name]
            torch_opt = timm_optim.create_optimizer_v2(
                reference, "adamw", lr=LR, weight_decay=WD, layer_decay=GAMMA
            )
            timm_scheduler.StepLRScheduler(torch_opt, decay_t=10**6)  # lr = LR * lr_scale
            # timm assigned our layers and scales them as the docstring says: the layer
            # decay is not vacuous (the stem's scale is GAMMA ** (n - 1)).
            n = max(layer_ids.values()) + 1
            assert n == (37 if grouping == "forward pass" else 7)
            scale = {id(p): g["lr"] / LR for g in torch_opt.param_groups for p in g["params"]}
            for name, p in reference.named_parameters():
                want = GAMMA ** (n - 1 - layer_ids[name])
                assert scale[id(p)] == pytest.approx(want, rel=1e-14), name

            mask = lo.default_decay_mask(params)
            opt = optax.chain(
                optax.adamw(LR, weight_decay=WD, mask=mask), lo.layerwise_lr_decay(GAMMA, layers)
            )
            update = jax.jit(opt.update)
            state = opt.init(params)
            rng = np.random.default_rng(0)
            for _ in range(STEPS):
                x = rng.standard_normal((4, 32, 32, 3))
                y = rng.integers(0, CLASSES, 4)
                torch_opt.zero_grad()
                logits = reference(torch.tensor(x.transpose(0, 3, 1, 2)))
                torch.nn.functional.cross_entropy(logits, torch.tensor(y)).backward()
                torch_opt.step()
                updates, state = update(grad_fn(params, x, y), state, params)
                params = optax.apply_updates(params, updates)

            want = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
            got = models.to_timm(model, params)
            assert all(v.dtype == np.float64 for v in got.values())
            start = models.to_timm(model, convnext64[2])
            moved = max(float(np.max(np.abs(want[k] - start[k]))) for k in want)
            diff = max(float(np.max(np.abs(got[k] - want[k]))) for k in want)
            assert moved > 1e-3 and diff < 1e-12, (moved, diff)
    finally:
        torch.set_num_threads(threads)
