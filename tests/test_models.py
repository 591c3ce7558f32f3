"""models/: shapes, timm's param counts, determinism, drop path, depthwise paths, converter errors.

No torch needed; tests/test_timm_parity.py compares the numbers with timm itself.
"""

import functools
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lpwd_optax import models
from lpwd_optax.models import convert, layers, resample, swin
from lpwd_optax.models.convnext import stage_strides

# Exact parameter counts of timm 1.0.31's models (num_classes=1000 unless noted), computed with
# sum(p.numel() for p in timm.create_model(name, **kwargs).parameters()). They match timm's
# published sizes (convnext_atto 3.7M, convnext_tiny 28.6M, swin_tiny 28.3M, ...).
TIMM_PARAM_COUNTS = {
    "convnext_atto": 3_695_520,
    "convnext_femto": 5_217_784,
    "convnext_pico": 9_045_672,
    "convnext_nano": 15_593_560,
    "convnext_tiny": 28_589_128,
    "convnext_small": 50_223_688,
    "convnext_base": 88_591_464,
    "convnext_large": 197_767_336,
    "swin_tiny_patch4_window7_224": 28_288_354,
    "swin_small_patch4_window7_224": 49_606_258,
    "swin_base_patch4_window7_224": 87_768_224,
    # timm.create_model("convnext_atto", num_classes=10, patch_size=2), etc.
    "convnext_atto_cifar": 3_382_810,
    "convnext_tiny_cifar": 27_861_514,
    # timm.create_model("swin_tiny_patch4_window7_224", num_classes=10, img_size=32,
    #                   patch_size=2, window_size=4)
    "swin_tiny_cifar": 27_505_108,
}


def abstract_model(name, **kwargs):
    """The model with shapes only (no arrays allocated, no init compute)."""
    return nnx.eval_shape(lambda: models.create_model(name, **kwargs))


def flat_params(model_or_state):
    state = model_or_state
    if isinstance(model_or_state, nnx.Module):
        state = nnx.state(model_or_state, nnx.Param)
    return {path: var for path, var in nnx.to_flat_state(state)}


def param_count(model):
    return sum(math.prod(v.shape) for v in flat_params(model).values())


# Narrow, shallow versions of the CIFAR presets: same code paths, a fraction of the time.
SMALL_CONVNEXT = dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32))
SMALL_SWIN = dict(embed_dim=8, depths=(2, 2, 1, 1), num_heads=(1, 1, 2, 2))


def small_convnext(**kwargs):
    return models.create_model("convnext_atto_cifar", **{**SMALL_CONVNEXT, **kwargs})


def small_swin(**kwargs):
    return models.create_model("swin_tiny_cifar", **{**SMALL_SWIN, **kwargs})


def images(batch, size=32, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


# --------------------------------------------------------------------------- registry, shapes


def test_list_models():
    names = models.list_models()
    for variant in ("atto", "femto", "pico", "nano", "tiny", "small", "base", "large"):
        assert f"convnext_{variant}" in names
        assert f"convnext_{variant}_cifar" in names
    for variant in ("tiny", "small", "base"):
        assert f"swin_{variant}_patch4_window7_224" in names
        assert f"swin_{variant}_cifar" in names
    assert models.list_models("swin_*_cifar") == [
        "swin_base_cifar",
        "swin_small_cifar",
        "swin_tiny_cifar",
    ]


@pytest.mark.parametrize("name", sorted(TIMM_PARAM_COUNTS))
def test_param_count_equals_timm(name):
    num_classes = 10 if name.endswith("_cifar") else 1000
    assert param_count(abstract_model(name, num_classes=num_classes)) == TIMM_PARAM_COUNTS[name]


@pytest.mark.parametrize(
    "name, size, num_classes",
    [
        ("convnext_atto", 224, 1000),
        ("convnext_tiny", 224, 7),
        ("convnext_atto_cifar", 32, 10),
        ("convnext_tiny_cifar", 32, 100),
        ("swin_tiny_patch4_window7_224", 224, 1000),
        ("swin_tiny_cifar", 32, 10),
        ("swin_base_cifar", 32, 100),
    ],
)
def test_output_shape(name, size, num_classes):
    fm = models.functional_model(abstract_model(name, num_classes=num_classes))
    x = jax.ShapeDtypeStruct((3, size, size, 3), jnp.float32)
    out = jax.eval_shape(fm.apply, fm.params, x)
    assert out.shape == (3, num_classes) and out.dtype == jnp.float32


def test_default_num_classes():
    assert abstract_model("convnext_atto").num_classes == 1000
    assert abstract_model("convnext_atto_cifar").num_classes == 10
    assert abstract_model("swin_tiny_cifar").num_classes == 10


def test_convnext_param_paths_and_shapes():
    params = flat_params(abstract_model("convnext_atto"))
    expected = {
        ("stem", "conv", "kernel"): (4, 4, 3, 40),
        ("stem", "norm", "scale"): (40,),
        ("stages", 0, "blocks", 1, "conv_dw", "kernel"): (7, 7, 1, 40),
        ("stages", 0, "blocks", 1, "mlp", "fc1", "kernel"): (40, 160),
        ("stages", 0, "blocks", 1, "mlp", "fc2", "kernel"): (160, 40),
        ("stages", 0, "blocks", 1, "gamma"): (40,),
        ("stages", 1, "downsample", "norm", "scale"): (40,),
        ("stages", 1, "downsample", "conv", "kernel"): (2, 2, 40, 80),
        ("stages", 3, "blocks", 1, "norm", "bias"): (320,),
        ("head", "norm", "scale"): (320,),
        ("head", "fc", "kernel"): (320, 1000),
    }
    for path, shape in expected.items():
        assert params[path].shape == shape, path
    assert not any(p[:3] == ("stages", 0, "downsample") for p in params)  # patch 4: none


def test_convnext_stage_strides_follow_timm():
    # timm: stage 0 downsamples only after a stride-2 stem; patch 8 would need dilation.
    assert stage_strides(4) == [1, 2, 2, 2]
    assert stage_strides(2) == [2, 2, 2, 2]
    assert stage_strides(1) == [1, 2, 2, 2]
    with pytest.raises(ValueError, match="dilated"):
        stage_strides(8)
    params = flat_params(abstract_model("convnext_atto_cifar"))
    assert params[("stem", "conv", "kernel")].shape == (2, 2, 3, 40)
    assert params[("stages", 0, "downsample", "conv", "kernel")].shape == (2, 2, 40, 40)


def test_stem_patch_size_alias():
    a = abstract_model("convnext_atto", stem_patch_size=1)
    b = abstract_model("convnext_atto", patch_size=1)
    assert a.patch_size == b.patch_size == 1
    assert param_count(a) == param_count(b)


def test_swin_param_paths_and_windows():
    model = abstract_model("swin_tiny_cifar")
    params = flat_params(model)
    assert params[("patch_embed", "proj", "kernel")].shape == (2, 2, 3, 96)
    assert params[("layers", 1, "downsample", "norm", "scale")].shape == (384,)
    assert params[("layers", 1, "downsample", "reduction", "kernel")].shape == (384, 192)
    assert ("layers", 1, "downsample", "reduction", "bias") not in params
    assert params[("layers", 0, "blocks", 1, "attn", "qkv", "bias")].shape == (288,)
    assert params[("head", "fc", "kernel")].shape == (768, 10)
    assert not any(p[:3] == ("layers", 0, "downsample") for p in params)
    # Stages at 16, 8, 4, 2: windows 4, 4, 4 (no shift: resolution == window), 2 (clamped).
    windows = [(s.resolution, s.blocks[1].window, s.blocks[1].shift) for s in model.layers]
    assert windows == [
        ((16, 16), (4, 4), (2, 2)),
        ((8, 8), (4, 4), (2, 2)),
        ((4, 4), (4, 4), (0, 0)),
        ((2, 2), (2, 2), (0, 0)),
    ]
    table = ("layers", 3, "blocks", 0, "attn", "relative_position_bias_table")
    assert params[table].shape == (9, 24)
    rpb = [p for p in params if p[-1] == "relative_position_bias_table"]
    assert len(rpb) == 12


def test_swin_224_windows():
    model = abstract_model("swin_tiny_patch4_window7_224")
    windows = [(s.resolution, s.blocks[-1].window, s.blocks[-1].shift) for s in model.layers]
    assert windows == [
        ((56, 56), (7, 7), (3, 3)),
        ((28, 28), (7, 7), (3, 3)),
        ((14, 14), (7, 7), (3, 3)),
        ((7, 7), (7, 7), (0, 0)),
    ]


def test_unknown_model_and_bad_input_size():
    with pytest.raises(ValueError, match="unknown model"):
        models.create_model("resnet50")
    fm = models.functional_model(abstract_model("swin_tiny_cifar"))
    with pytest.raises(ValueError, match="img_size"):
        jax.eval_shape(fm.apply, fm.params, jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))


# --------------------------------------------------------------------------- swin helpers


def test_window_and_shift_clamping():
    assert swin.window_and_shift((16, 16), (4, 4), (2, 2)) == ((4, 4), (2, 2))
    assert swin.window_and_shift((4, 4), (4, 4), (2, 2)) == ((4, 4), (0, 0))
    assert swin.window_and_shift((2, 2), (4, 4), (2, 2)) == ((2, 2), (0, 0))
    assert swin.window_and_shift((8, 3), (7, 7), (3, 3)) == ((7, 3), (3, 0))


def test_relative_position_index():
    # 2x2 window, table of 3x3 offsets: index = (dh + 1) * 3 + (dw + 1), dh/dw = query - key.
    expected = np.array([[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]])
    np.testing.assert_array_equal(swin.relative_position_index((2, 2)), expected)
    index = swin.relative_position_index((7, 7))
    assert index.shape == (49, 49) and index.min() == 0 and index.max() == 168
    assert np.all(np.diag(index) == 84)


def test_window_partition_roundtrip():
    x = jnp.arange(2 * 8 * 12 * 3, dtype=jnp.float32).reshape(2, 8, 12, 3)
    windows = swin.window_partition(x, (4, 4))
    assert windows.shape == (2 * 2 * 3, 16, 3)
    np.testing.assert_array_equal(windows[1].reshape(4, 4, 3), x[0, :4, 4:8])
    np.testing.assert_array_equal(swin.window_reverse(windows, (4, 4), 8, 12), x)


def test_shifted_window_mask():
    mask = swin.shifted_window_mask((8, 8), (4, 4), (2, 2))
    assert mask.shape == (4, 16, 16)
    assert set(np.unique(mask)) == {0.0, -100.0}
    np.testing.assert_array_equal(mask, mask.transpose(0, 2, 1))
    assert np.all(mask[0] == 0)  # the top-left window holds one region only
    assert np.all(np.diagonal(mask, axis1=1, axis2=2) == 0)
    # Bottom-right window: four regions of 2x2 tokens each, tokens 0 and 3 differ in region.
    assert mask[3, 0, 1] == 0 and mask[3, 0, 2] == -100 and mask[3, 0, 8] == -100


def test_patch_merging_channel_order():
    merge = swin.PatchMerging(1, 4, rngs=nnx.Rngs(0))
    merge.norm = lambda x: x  # isolate the rearrangement
    merge.reduction.kernel[...] = jnp.eye(4)
    x = jnp.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 2, 1)  # x[h, w]
    # timm's order: (h, w) = (0, 0), (1, 0), (0, 1), (1, 1)
    np.testing.assert_array_equal(merge(x).reshape(-1), [1.0, 3.0, 2.0, 4.0])


# --------------------------------------------------------------------------- determinism, modes


def test_init_is_deterministic_in_seed():
    a = flat_params(small_convnext(seed=3))
    b = flat_params(small_convnext(seed=3))
    c = flat_params(small_convnext(seed=4))
    key = ("stages", 0, "blocks", 0, "mlp", "fc1", "kernel")
    for path in a:
        np.testing.assert_array_equal(a[path][...], b[path][...])
    assert not np.allclose(a[key][...], c[key][...])
    np.testing.assert_allclose(np.std(a[key][...]), 0.02, rtol=0.1)  # timm: N(0, 0.02)
    np.testing.assert_array_equal(a[("stages", 0, "blocks", 0, "gamma")][...], np.float32(1e-6))


@pytest.mark.parametrize("make", [small_convnext, small_swin])
def test_functional_apply_is_pure_and_jittable(make):
    model = make(drop_path_rate=0.0)
    fm = models.functional_model(model)
    before = {path: np.asarray(v[...]) for path, v in flat_params(model).items()}
    x = images(2)
    out = jax.jit(fm.apply)(fm.params, x)
    np.testing.assert_array_equal(jax.jit(fm.apply)(fm.params, x), out)
    assert all(isinstance(v, nnx.Param) for v in flat_params(fm.params).values())
    if make is small_convnext:  # one gradient compile is enough here; parity tests do more

        def loss(params):
            return jnp.mean(fm.apply(params, x) ** 2)

        grads = jax.jit(jax.grad(loss))(fm.params)
        assert jax.tree.structure(grads) == jax.tree.structure(fm.params)
        chex.assert_tree_all_finite(grads)
    for path, var in flat_params(model).items():  # the module itself is untouched
        np.testing.assert_array_equal(var[...], before[path])


def test_drop_path_active_only_in_training():
    model = small_convnext(drop_path_rate=0.5)
    # Larger layer scale so that dropping a branch visibly changes the logits.
    for path, var in flat_params(model).items():
        if path[-1] == "gamma":
            var[...] = jnp.ones_like(var[...])
    fm = models.functional_model(model)
    apply = jax.jit(fm.apply, static_argnames="train")
    x, key = images(4), jax.random.key(1)
    eval_out = apply(fm.params, x)
    np.testing.assert_array_equal(apply(fm.params, x, train=False, rng=key), eval_out)
    train_a = apply(fm.params, x, train=True, rng=key)
    np.testing.assert_array_equal(apply(fm.params, x, train=True, rng=key), train_a)
    train_b = apply(fm.params, x, train=True, rng=jax.random.key(2))
    assert not np.allclose(train_a, eval_out, atol=1e-3)
    assert not np.allclose(train_a, train_b, atol=1e-3)
    with pytest.raises(ValueError, match="rng"):
        fm.apply(fm.params, x, train=True, rng=None)


def test_no_drop_path_train_equals_eval():
    fm = models.functional_model(small_convnext(drop_path_rate=0.0))
    apply = jax.jit(fm.apply, static_argnames="train")
    x = images(2)
    np.testing.assert_array_equal(apply(fm.params, x, train=True, rng=None), apply(fm.params, x))


def test_swin_block_drop_path():
    block = swin.SwinBlock(8, (4, 4), 2, (2, 2), (1, 1), drop_path_rate=0.5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (64, 4, 4, 8))
    run = nnx.jit(lambda block, x, train, rng: block(x, train=train, rng=rng), static_argnums=2)
    eval_out = np.asarray(run(block, x, False, None))
    train_out = np.asarray(run(block, x, True, jax.random.key(1)))
    # Per sample, each residual branch is dropped with probability 0.5: a sample that lost
    # both passes through unchanged (about a quarter of them); the others differ from x.
    untouched = (train_out == np.asarray(x)).all(axis=(1, 2, 3))
    assert 5 < untouched.sum() < 30
    assert not np.allclose(eval_out, x, atol=1e-3)
    np.testing.assert_array_equal(run(block, x, True, jax.random.key(1)), train_out)
    with pytest.raises(ValueError, match="rng"):
        run(block, x, True, None)


def test_drop_path_rates_linear():
    rates = layers.drop_path_rates(0.3, (2, 2, 6, 2))
    np.testing.assert_allclose(np.concatenate(rates), np.linspace(0, 0.3, 12))
    assert [len(r) for r in rates] == [2, 2, 6, 2]
    model = abstract_model("convnext_tiny", drop_path_rate=0.2)
    block_rates = [b.drop_path_rate for s in model.stages for b in s.blocks]
    np.testing.assert_allclose(block_rates, np.linspace(0, 0.2, 18))
    assert abstract_model("swin_tiny_cifar").drop_path_rate == 0.1  # timm's Swin default
    assert abstract_model("convnext_tiny").drop_path_rate == 0.0


def test_drop_path_is_per_sample():
    x = jnp.ones((1000, 3, 3, 2))
    y = layers.drop_path(x, 0.25, jax.random.key(0), train=True)
    per_sample = np.asarray(y).reshape(1000, -1)
    assert np.all((per_sample == 0).all(1) | np.isclose(per_sample, 1 / 0.75).all(1))
    assert 0.2 < np.mean(per_sample[:, 0] == 0) < 0.3
    np.testing.assert_array_equal(layers.drop_path(x, 0.25, None, train=False), x)


# --------------------------------------------------------------------------- depthwise paths

DEPTHWISE_CASES = [
    # (batch, height, width, channels, kernel, padding)
    (2, 8, 8, 5, 7, 3),
    (3, 7, 5, 4, 7, 3),  # non-square
    (2, 2, 2, 4, 7, 3),  # most taps read only padding
    (2, 20, 17, 3, 7, 3),  # tiled kernel gradient in "shift"
    (2, 6, 6, 3, 3, 0),  # other kernel size, 'valid' padding
]


@pytest.mark.parametrize("impl", ["shift", "matmul"])
@pytest.mark.parametrize("case", DEPTHWISE_CASES)
def test_depthwise_impls_match_conv(impl, case):
    batch, height, width, channels, size, padding = case
    x = jax.random.normal(jax.random.key(0), (batch, height, width, channels))
    kernel = jax.random.normal(jax.random.key(1), (size, size, 1, channels))
    cotangent = jax.random.normal(jax.random.key(2), (batch, height, width, channels))
    cotangent = cotangent[:, : height + 2 * padding - size + 1, : width + 2 * padding - size + 1]

    @functools.partial(jax.jit, static_argnums=0)
    def run(name):
        y, vjp = jax.vjp(lambda a, k: layers.depthwise_conv2d(a, k, padding, name), x, kernel)
        return (y, *vjp(cotangent))

    for got, want in zip(run(impl), run("conv"), strict=True):
        assert got.shape == want.shape
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(scale, 1.0))


def test_depthwise_auto_resolution():
    assert layers.resolve_depthwise_impl("conv") == "conv"
    assert layers.resolve_depthwise_impl("shift", (1, 8, 8, 40)) == "shift"
    if jax.default_backend() == "cpu":
        assert layers.resolve_depthwise_impl("auto", (128, 8, 8, 40)) == "matmul"
        assert layers.resolve_depthwise_impl("auto", (128, 16, 16, 96)) == "matmul"
        assert layers.resolve_depthwise_impl("auto", (128, 32, 32, 40)) == "shift"
        assert layers.resolve_depthwise_impl("auto", (128, 56, 56, 96)) == "shift"
    else:
        assert layers.resolve_depthwise_impl("auto", (128, 8, 8, 40)) == "conv"
    with pytest.raises(ValueError, match="depthwise_impl"):
        layers.resolve_depthwise_impl("fft")
    with pytest.raises(ValueError, match="depthwise_impl"):
        small_convnext(depthwise_impl="fft")


def test_depthwise_impls_agree_in_a_model():
    x = images(2)
    outs = {}
    for impl in ("conv", "shift", "matmul"):
        model = small_convnext(depthwise_impl=impl)
        for path, var in flat_params(model).items():
            if path[-1] == "gamma":  # make the depthwise branch matter
                var[...] = jnp.full_like(var[...], 0.5)
        outs[impl] = np.asarray(nnx.jit(lambda m, x: m(x))(model, x))
    scale = np.abs(outs["conv"]).max()
    for impl in ("shift", "matmul"):
        np.testing.assert_allclose(outs[impl], outs["conv"], rtol=0, atol=1e-5 * scale)


def test_depthwise_block_gradients_agree():
    from lpwd_optax.models.convnext import ConvNeXtBlock

    x = images(2, size=8)[..., :1] * jnp.ones((1, 1, 1, 16))
    grads = {}
    for impl in ("conv", "shift", "matmul"):
        block = ConvNeXtBlock(16, ls_init_value=0.5, depthwise_impl=impl, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(block, nnx.Param)

        def loss(params, x, graphdef=graphdef):
            return jnp.sum(jnp.sin(nnx.merge(graphdef, params)(x)))

        grads[impl] = flat_params(jax.jit(jax.grad(loss))(params, x))
    for impl in ("shift", "matmul"):
        for path, want in grads["conv"].items():
            got = grads[impl][path][...]
            scale = float(jnp.max(jnp.abs(want[...])))
            np.testing.assert_allclose(got, want[...], rtol=0, atol=1e-5 * max(scale, 1e-3))


# --------------------------------------------------------------------------- converter


def random_state_dict(model, seed=0):
    rng = np.random.default_rng(seed)
    return {
        k: rng.standard_normal(e.timm_shape).astype(np.float32)
        for k, e in convert.timm_layout(model).items()
    }


def test_timm_layout_names_and_shapes():
    atto = convert.timm_layout(abstract_model("convnext_atto"))
    assert atto["stem.0.weight"].timm_shape == (40, 3, 4, 4)
    assert atto["stem.1.weight"].path == ("stem", "norm", "scale")
    assert atto["stages.1.downsample.0.bias"].timm_shape == (40,)
    assert atto["stages.1.downsample.1.weight"].timm_shape == (80, 40, 2, 2)
    assert atto["stages.0.blocks.0.conv_dw.weight"].timm_shape == (40, 1, 7, 7)
    assert atto["stages.0.blocks.0.mlp.fc1.weight"].timm_shape == (160, 40, 1, 1)  # conv_mlp
    assert atto["stages.0.blocks.0.gamma"].timm_shape == (40,)
    assert atto["head.norm.weight"].timm_shape == (320,)
    assert atto["head.fc.weight"].timm_shape == (1000, 320)
    assert len(atto) == 128
    tiny = convert.timm_layout(abstract_model("convnext_tiny"))
    assert tiny["stages.0.blocks.0.mlp.fc1.weight"].timm_shape == (384, 96)
    sw = convert.timm_layout(abstract_model("swin_tiny_patch4_window7_224"))
    assert sw["patch_embed.proj.weight"].timm_shape == (96, 3, 4, 4)
    assert sw["layers.1.downsample.reduction.weight"].timm_shape == (192, 384)
    assert sw["layers.1.downsample.norm.weight"].timm_shape == (384,)
    assert sw["layers.0.blocks.0.attn.relative_position_bias_table"].timm_shape == (169, 3)
    assert sw["layers.0.blocks.0.attn.qkv.weight"].timm_shape == (288, 96)
    assert sw["norm.weight"].timm_shape == (768,)


@pytest.mark.parametrize("make", [small_convnext, small_swin])
def test_timm_roundtrip(make):
    model = make()
    state_dict = random_state_dict(model)
    before = {p: np.asarray(v[...]) for p, v in flat_params(model).items()}
    params = models.from_timm(model, state_dict)
    # from_timm does not touch the model; load_timm_weights does.
    for path, var in flat_params(model).items():
        np.testing.assert_array_equal(var[...], before[path])
    back = models.to_timm(model, params)
    assert back.keys() == state_dict.keys()
    for key, value in state_dict.items():
        np.testing.assert_array_equal(back[key], value)
    models.load_timm_weights(model, state_dict)
    for key, value in models.to_timm(model).items():
        np.testing.assert_array_equal(value, state_dict[key])


def test_converter_layouts():
    model = small_convnext()
    state_dict = random_state_dict(model)
    params = flat_params(models.from_timm(model, state_dict))
    conv = state_dict["stem.0.weight"]  # (out, in, kh, kw)
    np.testing.assert_array_equal(
        params[("stem", "conv", "kernel")][...][1, 0, 2], conv[:, 2, 1, 0]
    )
    dw = state_dict["stages.0.blocks.0.conv_dw.weight"]  # (C, 1, 7, 7)
    got = params[("stages", 0, "blocks", 0, "conv_dw", "kernel")][...]
    np.testing.assert_array_equal(got[2, 5, 0], dw[:, 0, 2, 5])
    fc1 = state_dict["stages.0.blocks.0.mlp.fc1.weight"]  # (out, in, 1, 1)
    got = params[("stages", 0, "blocks", 0, "mlp", "fc1", "kernel")][...]
    np.testing.assert_array_equal(got, fc1[:, :, 0, 0].T)


def test_converter_ignores_derived_buffers():
    model = small_swin()
    state_dict = random_state_dict(model)
    state_dict["layers.0.blocks.0.attn.relative_position_index"] = np.zeros((16, 16), np.int64)
    state_dict["layers.0.blocks.1.attn_mask"] = np.zeros((16, 16, 16), np.float32)
    models.from_timm(model, state_dict)


def test_converter_reports_every_problem():
    model = abstract_model("convnext_atto_cifar")  # atto: conv_mlp layout
    state_dict = random_state_dict(model)
    del state_dict["stages.2.blocks.3.gamma"]
    del state_dict["head.fc.bias"]
    state_dict["stages.9.blocks.0.mystery.weight"] = np.zeros(3, np.float32)
    state_dict["stages.0.blocks.1.mlp.fc2.weight"] = np.zeros((40, 160), np.float32)  # not 1x1
    state_dict["head.fc.weight"] = np.zeros((1000, 320), np.float32)  # wrong num_classes
    with pytest.raises(ValueError) as info:
        models.from_timm(model, state_dict)
    message = str(info.value)
    assert "missing keys (2): head.fc.bias, stages.2.blocks.3.gamma" in message
    assert "unexpected keys (1): stages.9.blocks.0.mystery.weight" in message
    assert "mis-shaped keys (2)" in message
    assert "head.fc.weight: expected (10, 320), got (1000, 320)" in message
    assert "stages.0.blocks.1.mlp.fc2.weight: expected (40, 160, 1, 1), got (40, 160)" in message


def test_converter_rejects_other_variant():
    model = abstract_model("convnext_atto_cifar")
    tiny_keys = convert.timm_layout(abstract_model("convnext_tiny_cifar"))
    state_dict = {k: np.zeros(e.timm_shape, np.float32) for k, e in tiny_keys.items()}
    with pytest.raises(ValueError, match=re.escape("stages.0.blocks.2.gamma")):
        models.from_timm(model, state_dict)
    with pytest.raises(TypeError, match="no timm layout"):
        convert.timm_layout(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))


def test_read_state_dict_safetensors(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    model = small_convnext()
    state_dict = random_state_dict(model)
    path = tmp_path / "weights.safetensors"
    safetensors_numpy.save_file(state_dict, str(path))
    loaded = models.read_state_dict(path)
    assert loaded.keys() == state_dict.keys()
    models.load_timm_weights(model, path)
    np.testing.assert_array_equal(
        models.to_timm(model)["head.fc.weight"], state_dict["head.fc.weight"]
    )
    # A truncated file is an error, not silently partial weights.
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cannot read .* as safetensors"):
        models.read_state_dict(path)
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        models.read_state_dict(tmp_path / "absent.safetensors")


def test_read_state_dict_refuses_plain_pickles(tmp_path):
    torch = pytest.importorskip("torch")

    class Payload:
        def __reduce__(self):
            return (print, ("this must not run",))

    path = tmp_path / "weights.pth"
    torch.save({"a.weight": torch.ones(2), "extra": Payload()}, path)
    with pytest.raises(ValueError, match=r"cannot read .* weights_only=True") as info:
        models.read_state_dict(path)
    assert "\n" not in str(info.value)


def test_read_state_dict_unwraps_checkpoint():
    inner = {"a.weight": np.ones((2, 2), np.float32)}
    assert models.read_state_dict({"state_dict": inner}).keys() == {"a.weight"}
    assert models.read_state_dict({"model": inner}).keys() == {"a.weight"}


# --------------------------------------------------------------------------- CPU speed paths


def test_gelu_is_exact_erf_gelu():
    x = jnp.linspace(-12.0, 12.0, 2001)
    # Independent reference: the erf form in float64.
    from math import erf, sqrt

    want = np.array([v * 0.5 * (1.0 + erf(v / sqrt(2.0))) for v in np.asarray(x, np.float64)])
    np.testing.assert_allclose(layers.gelu(x), want, rtol=1e-6, atol=1e-6)
    exact = functools.partial(jax.nn.gelu, approximate=False)
    np.testing.assert_allclose(
        jax.vmap(jax.grad(layers.gelu))(x), jax.vmap(jax.grad(exact))(x), atol=2e-6
    )


def test_residual_barrier_changes_no_value_or_gradient():
    x = jax.random.normal(jax.random.key(0), (2, 3, 4, 5))

    def chain(x, barrier):
        for i in range(6):
            y = jnp.tanh(x * (i + 1.0))
            x = x + y
            x = layers.residual_barrier(x) if barrier else x
        return jnp.sum(x * jnp.cos(x))

    for f in (jax.grad(chain, argnums=0), jax.jit(jax.grad(chain), static_argnums=1)):
        np.testing.assert_array_equal(f(x, True), f(x, False))
    assert float(chain(x, True)) == float(chain(x, False))
    if jax.default_backend() == "cpu":
        # The cotangent passes through a conditional, which XLA:CPU cannot fuse through.
        hlo = jax.jit(jax.grad(chain), static_argnums=1).lower(x, True).as_text()
        assert hlo.count("case") + hlo.count("conditional") >= 6


def test_residual_barrier_keeps_nan_gradients_nan():
    g = jax.grad(lambda x: jnp.sum(layers.residual_barrier(x) * jnp.array([jnp.nan, 1.0])))(
        jnp.ones(2)
    )
    assert bool(jnp.all(jnp.isnan(g))) or jax.default_backend() != "cpu"


def test_linear_flattens_leading_axes():
    dense = layers.linear(5, 3, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 4, 6, 5))
    want = jnp.einsum("bhwc,cd->bhwd", x, dense.kernel[...]) + dense.bias[...]
    np.testing.assert_allclose(dense(x), want, rtol=1e-5, atol=1e-6)
    assert dense(x[0, 0, 0]).shape == (3,)


def test_swin_attention_vjp_matches_autodiff():
    keys = jax.random.split(jax.random.key(0), 5)
    q, k, v = (jax.random.normal(key, (3, 2, 4, 9, 5)) for key in keys[:3])
    bias = jax.random.normal(keys[3], (2, 4, 9, 9))  # (windows, heads, N, N)
    cotangent = jax.random.normal(keys[4], q.shape)

    def plain(q, k, v, bias):
        logits = jnp.einsum("...qd,...kd->...qk", q, k) + bias
        return jnp.einsum("...qk,...kd->...qd", jax.nn.softmax(logits, axis=-1), v)

    got_out, got_vjp = jax.vjp(swin.attention, q, k, v, bias)
    want_out, want_vjp = jax.vjp(plain, q, k, v, bias)
    np.testing.assert_allclose(got_out, want_out, rtol=1e-5, atol=1e-6)
    for got, want in zip(got_vjp(cotangent), want_vjp(cotangent), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- initialization


@pytest.mark.parametrize("make", [small_convnext, small_swin])
def test_one_seed_one_set_of_weights_however_built(make):
    eager = flat_params(make(seed=5))
    jitted = flat_params(nnx.jit(lambda: make(seed=5))())
    abstract = flat_params(nnx.eval_shape(lambda: make(seed=5)))
    _, state = jax.jit(lambda: nnx.split(make(seed=5), nnx.Param))()
    traced = flat_params(state)
    assert eager.keys() == jitted.keys() == abstract.keys() == traced.keys()
    for path, value in eager.items():
        np.testing.assert_array_equal(jitted[path][...], value[...])
        np.testing.assert_array_equal(traced[path][...], value[...])
        assert abstract[path].shape == value.shape and abstract[path].dtype == value.dtype


# --------------------------------------------------------------------------- checkpoint adaptation


def test_resample_docstring_examples():
    import doctest

    assert doctest.testmod(resample).failed == 0


def test_bicubic_resize_matrix_hand_worked():
    # 4 -> 2: scale 2, the Keys cubic (a = -0.5) stretched 2x; output 0 is centred at 1.0 and
    # reads inputs 0..3 at distances 0.25, 0.25, 0.75, 1.25 (in stretched units).
    taps = np.array([0.8671875, 0.8671875, 0.2265625, -0.0703125])
    matrix = resample.bicubic_resize_matrix(4, 2)
    np.testing.assert_allclose(matrix[0], taps / taps.sum(), rtol=1e-12)
    np.testing.assert_allclose(matrix[1], matrix[0][::-1], rtol=1e-12)
    for old, new in [(4, 1), (2, 4), (7, 3), (4, 4)]:
        np.testing.assert_allclose(resample.bicubic_resize_matrix(old, new).sum(1), 1.0)
    np.testing.assert_allclose(resample.bicubic_resize_matrix(5, 5), np.eye(5), atol=1e-12)


def test_resample_patch_kernel_keeps_embeddings_of_resized_patches():
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((6, 3, 4, 4)).astype(np.float32)
    assert resample.resample_patch_kernel(kernel, (4, 4)) is kernel
    small = resample.resample_patch_kernel(kernel, (2, 2))
    assert small.shape == (6, 3, 2, 2) and small.dtype == np.float32
    # w' = w pinv(D) gives <w', D x> = <w, P x>, P the projection on the row space of the
    # resize D: exact for patches in that space, and the least-squares choice for the rest.
    down = np.kron(resample.bicubic_resize_matrix(4, 2), resample.bicubic_resize_matrix(4, 2))
    patch = (rng.standard_normal((3, 4)) @ down).reshape(3, 4, 4)
    resized = (patch.reshape(3, 16) @ down.T).reshape(3, 2, 2)
    np.testing.assert_allclose(
        np.einsum("oihw,ihw->o", small, resized),
        np.einsum("oihw,ihw->o", kernel, patch),
        rtol=1e-4,
        atol=1e-4,
    )


def test_relative_position_table_resize():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((13 * 13, 2))  # window 7: offsets -6..6 per axis
    grid = table.T.reshape(2, 13, 13)
    assert resample.resize_relative_position_bias_table(table, (7, 7)) is table
    for window in (4, 2, 1):
        side = 2 * window - 1
        new = resample.resize_relative_position_bias_table(table, (window, window))
        assert new.shape == (side * side, 2)
        new_grid = new.T.reshape(2, side, side)
        # Offsets 0 and +-1 are kept exactly (the source's offset 1 sits at 1.0).
        keep = min(window - 1, 1)
        got = new_grid[
            :, side // 2 - keep : side // 2 + keep + 1, side // 2 - keep : side // 2 + keep + 1
        ]
        np.testing.assert_allclose(got, grid[:, 6 - keep : 7 + keep, 6 - keep : 7 + keep])
    # Offset 3 (window 4) falls between the source's offsets 2 (at 1 + q) and 3 (at 1 + q + q^2),
    # q = 1.01 to the bisection's 1e-6.
    new = resample.resize_relative_position_bias_table(table, (4, 4)).T.reshape(2, 7, 7)
    q = 1.01
    weight = (3 - (1 + q)) / q**2
    want = (1 - weight) * grid[:, 6 + 2, 6] + weight * grid[:, 6 + 3, 6]
    np.testing.assert_allclose(new[:, 6, 3], want, rtol=1e-4)
    with pytest.raises(ValueError, match="square"):
        resample.resize_relative_position_bias_table(np.zeros((12, 2)), (2, 2))


def test_convnext_checkpoint_adapted_to_patch_2():
    source = abstract_model("convnext_atto", **SMALL_CONVNEXT, num_classes=7)  # patch 4
    state_dict = random_state_dict(source)
    model = small_convnext(num_classes=10)  # patch 2: stage 0 downsamples
    initial = models.to_timm(model)
    adapted = models.adapt_timm_checkpoint(model, state_dict)
    assert adapted.notes == (
        "stem.0.weight: 4x4 patch kernel resampled to 2x2 (pseudo-inverse of a bicubic resize)",
        "stages.0.downsample: not in the checkpoint (patch_size=2 downsamples in stage 0): "
        "left at the model's initialization",
        "head.fc: the checkpoint has 7 classes, the model 10: classifier left at the model's "
        "initialization",
    )
    assert sorted(adapted.kept) == sorted(
        [f"stages.0.downsample.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")]
        + ["head.fc.weight", "head.fc.bias"]
    )
    assert models.init_from_timm(model, state_dict) == list(adapted.notes)
    loaded = models.to_timm(model)
    for key, value in loaded.items():
        if key in adapted.kept:
            np.testing.assert_array_equal(value, initial[key])
        elif key == "stem.0.weight":
            want = resample.resample_patch_kernel(state_dict[key], (2, 2))
            np.testing.assert_allclose(value, want, rtol=1e-6)
        else:
            np.testing.assert_array_equal(value, state_dict[key])
    # The same geometry and classes: nothing to adapt, nothing to report.
    assert models.init_from_timm(model, loaded) == []


def test_adaptation_still_refuses_what_it_cannot_adapt():
    model = small_convnext()
    state_dict = random_state_dict(abstract_model("convnext_atto", **SMALL_CONVNEXT))
    state_dict["stem.0.weight"] = np.zeros((8, 1, 4, 4), np.float32)  # one input channel
    del state_dict["stages.2.blocks.1.gamma"]
    state_dict["stages.0.downsample.0.weight"] = np.zeros(8, np.float32)  # half a layer
    with pytest.raises(ValueError) as info:
        models.init_from_timm(model, state_dict)
    message = str(info.value)
    assert "\n" not in message
    assert "stem.0.weight: expected (8, 3, 2, 2), got (8, 1, 4, 4)" in message
    assert "missing keys (4): stages.0.downsample.0.bias" in message
    assert "stages.2.blocks.1.gamma" in message
    # A patch-2 checkpoint has a stage-0 downsample that a patch-4 model has no place for.
    patch4 = small_convnext(patch_size=4)
    with pytest.raises(ValueError, match=re.escape("unexpected keys (4): stages.0.downsample")):
        models.init_from_timm(patch4, random_state_dict(small_convnext()))


def test_swin_checkpoint_adapted_to_cifar_geometry(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    source = abstract_model("swin_tiny_patch4_window7_224", **SMALL_SWIN, num_classes=10)
    state_dict = random_state_dict(source)
    state_dict["layers.0.blocks.0.attn.relative_position_index"] = np.zeros((49, 49), np.int64)
    path = tmp_path / "swin.safetensors"
    safetensors_numpy.save_file(state_dict, str(path))
    model = small_swin()  # img 32, patch 2, window 4: stages at 16, 8, 4, 2
    notes = models.init_from_timm(model, path)
    assert notes[0].startswith("patch_embed.proj.weight: 4x4 patch kernel resampled to 2x2")
    assert notes[1:] == [
        "layers.0.blocks.0.attn.relative_position_bias_table: window 7x7 -> 4x4, "
        "table resized (169 -> 49 offsets)",
        "layers.0.blocks.1.attn.relative_position_bias_table: window 7x7 -> 4x4, "
        "table resized (169 -> 49 offsets)",
        "layers.1.blocks.0.attn.relative_position_bias_table: window 7x7 -> 4x4, "
        "table resized (169 -> 49 offsets)",
        "layers.1.blocks.1.attn.relative_position_bias_table: window 7x7 -> 4x4, "
        "table resized (169 -> 49 offsets)",
        "layers.2.blocks.0.attn.relative_position_bias_table: window 7x7 -> 4x4, "
        "table resized (169 -> 49 offsets)",
        "layers.3.blocks.0.attn.relative_position_bias_table: window 7x7 -> 2x2 (clamped to "
        "the stage's 2x2 tokens), table resized (169 -> 9 offsets)",
    ]
    loaded = models.to_timm(model)
    key = "layers.3.blocks.0.attn.relative_position_bias_table"
    want = resample.resize_relative_position_bias_table(state_dict[key], (2, 2))
    np.testing.assert_allclose(loaded[key], want, rtol=1e-6)
    np.testing.assert_array_equal(loaded["head.fc.weight"], state_dict["head.fc.weight"])


class TinyClassifier(nnx.Module):
    """A model unknown to convert.py that defines the timm hooks, as model files do."""

    TIMM_CLASSIFIER = "fc"
    TIMM_BUFFERS = ("counter",)

    def __init__(self, num_classes, rngs):
        self.fc = nnx.Linear(3, num_classes, rngs=rngs)

    def timm_param(self, path, shape):
        return convert.timm_key(path), convert.default_layout(path, shape)

    def timm_checkpoint_filter(self, state_dict, layout):
        return convert.Adapted(state_dict, (), ())


def test_converter_is_generic_over_models():
    model = TinyClassifier(4, nnx.Rngs(0))
    layout = convert.timm_layout(model)
    assert {k: (e.layout, e.timm_shape) for k, e in layout.items()} == {
        "fc.weight": ("linear", (4, 3)),
        "fc.bias": ("copy", (4,)),
    }
    weight = np.arange(12.0, dtype=np.float32).reshape(4, 3)
    state_dict = {"fc.weight": weight, "fc.bias": np.ones(4, np.float32), "fc.counter": 0}
    models.load_timm_weights(model, state_dict)
    np.testing.assert_array_equal(model.fc.kernel[...], weight.T)
    other = TinyClassifier(5, nnx.Rngs(1))
    initial = np.asarray(other.fc.kernel[...])
    assert models.init_from_timm(other, state_dict) == [
        "fc: the checkpoint has 4 classes, the model 5: classifier left at the model's "
        "initialization"
    ]
    np.testing.assert_array_equal(other.fc.kernel[...], initial)
