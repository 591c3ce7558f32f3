"""Depth is a fact of the dataflow, roles are what a user means: one computation written in
different ways (fused or not, in one module or several) gets one structure.

- A kernel's depth is one more than the deepest layer its input depends on: parallel
  projections of one input share a depth, two kernels used in sequence get two, whether the
  code keeps them in one module, in several, or in a shared scope.
- Every normalization's scale is a "scale", also when it is applied as `x * (1 + scale)` or
  as a product that contracts none of its axes (an einsum, flax's `nn.Einsum` layer).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lpwd_optax as lo

WIDTH, HIDDEN, HEADS = 8, 16, 2
init = nn.initializers.lecun_normal()


def _structure(module, x):
    params = module.init(jax.random.key(0), x)["params"]
    return lo.layer_structure(params, lambda p, x: module.apply({"params": p}, x), x)


def _depths(layers):
    return {x.path: int(np.max(x.depth)) for x in layers.leaves}


# --------------------------------------------------------------------------------------------
# Attention: q, k and v read one input, the output projection reads all three


class FlaxAttention(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="norm")(x)
        return x + nn.MultiHeadDotProductAttention(HEADS, name="attn")(h, h)


def _attend(q, k, v):
    return jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])) @ v


class SplitAttention(nn.Module):
    """q, k and v as three Dense modules."""

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="norm")(x)
        q, k, v = (nn.Dense(WIDTH, name=name)(h) for name in ("query", "key", "value"))
        return x + nn.Dense(WIDTH, name="out")(_attend(q, k, v))


class FusedAttention(nn.Module):
    """q, k and v from one fused kernel."""

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="norm")(x)
        q, k, v = jnp.split(nn.Dense(3 * WIDTH, name="qkv")(h), 3, axis=-1)
        return x + nn.Dense(WIDTH, name="out")(_attend(q, k, v))


def test_flax_attention_projections_share_a_depth_and_the_output_is_one_deeper():
    depths = _depths(_structure(FlaxAttention(), jnp.ones((2, 5, WIDTH))))
    norm = depths["norm/scale"]
    for name in ("query", "key", "value"):
        assert depths[f"attn/{name}/kernel"] == depths[f"attn/{name}/bias"] == norm + 1, depths
    assert depths["attn/out/kernel"] == depths["attn/out/bias"] == norm + 2, depths


def test_fused_and_split_attention_agree():
    x = jnp.ones((2, 5, WIDTH))
    split = _depths(_structure(SplitAttention(), x))
    fused = _depths(_structure(FusedAttention(), x))
    assert {split[f"{n}/kernel"] for n in ("query", "key", "value")} == {fused["qkv/kernel"]}
    assert split["out/kernel"] == fused["out/kernel"] == fused["qkv/kernel"] + 1
    assert split["norm/scale"] == fused["norm/scale"] == 1


# --------------------------------------------------------------------------------------------
# A gated MLP: gate and up read one input, down reads their product


def _gated(x, gate, up, down):
    return (nn.silu(x @ gate[0] + gate[1]) * (x @ up[0] + up[1])) @ down[0] + down[1]


class GatedOneModule(nn.Module):
    """Every kernel and bias a param of one module."""

    @nn.compact
    def __call__(self, x):
        p = lambda name, shape: self.param(name, init if len(shape) > 1 else nn.zeros, shape)
        gate = p("gate", (WIDTH, HIDDEN)), p("gate_bias", (HIDDEN,))
        up = p("up", (WIDTH, HIDDEN)), p("up_bias", (HIDDEN,))
        down = p("down", (HIDDEN, WIDTH)), p("down_bias", (WIDTH,))
        return _gated(x, gate, up, down)


class GatedModules(nn.Module):
    """The same MLP as three Dense modules."""

    @nn.compact
    def __call__(self, x):
        h = nn.silu(nn.Dense(HIDDEN, name="gate")(x)) * nn.Dense(HIDDEN, name="up")(x)
        return nn.Dense(WIDTH, name="down")(h)


class _Down(nn.Module):
    @nn.compact
    def __call__(self, h):
        return h @ self.param("down", init, (HIDDEN, WIDTH))


class GatedSharedScope(nn.Module):
    """The down projection a submodule whose params `nn.share_scope` puts in this scope."""

    def setup(self):
        self.down_proj = _Down()
        nn.share_scope(self, self.down_proj)
        self.gate = self.param("gate", init, (WIDTH, HIDDEN))
        self.up = self.param("up", init, (WIDTH, HIDDEN))

    def __call__(self, x):
        return self.down_proj(nn.silu(x @ self.gate) * (x @ self.up))


class Net(nn.Module):
    mlp: type

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(WIDTH, name="embed")(x)
        return nn.Dense(3, name="head")(x + self.mlp(name="mlp")(x))


@pytest.mark.parametrize("mlp", [GatedOneModule, GatedModules, GatedSharedScope])
def test_a_gated_mlp_has_the_same_depths_in_one_module_or_several(mlp):
    depths = _depths(_structure(Net(mlp), jnp.ones((2, 5))))
    kernel = lambda name: next(
        d for p, d in depths.items() if p in (f"mlp/{name}", f"mlp/{name}/kernel")
    )
    assert depths["embed/kernel"] == 1
    assert kernel("gate") == kernel("up") == 2, depths
    assert kernel("down") == 3, depths
    assert depths["head/kernel"] == 4, depths


def test_biases_take_the_depth_of_the_kernel_they_follow_in_their_module():
    depths = _depths(_structure(Net(GatedOneModule), jnp.ones((2, 5))))
    for name in ("gate", "up", "down"):
        assert depths[f"mlp/{name}_bias"] == depths[f"mlp/{name}"], depths
    assert depths["mlp/down_bias"] == depths["mlp/gate_bias"] + 1, depths
    layers = _structure(Net(GatedOneModule), jnp.ones((2, 5)))
    roles = {x.path: x.role for x in layers.leaves}
    assert roles["mlp/down"] == "kernel" and roles["mlp/down_bias"] == "bias"


def test_a_stacked_block_with_parallel_projections_matches_its_twin():
    # The scanned twin of a block whose q, k and v share a depth: each slice as unrolled.
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return FlaxAttention(name="block")(x), None

    class Scanned(nn.Module):
        @nn.compact
        def __call__(self, x):
            stack = nn.scan(
                Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
            )
            return stack(name="blocks")(x, None)[0]

    layers = _structure(Scanned(), jnp.ones((2, 5, WIDTH)))
    depths = {x.path: np.ravel(x.depth).tolist() for x in layers.leaves}
    attn = "blocks/block/attn"
    assert depths["blocks/block/norm/scale"] == [1, 4, 7]
    for name in ("query", "key", "value"):
        assert depths[f"{attn}/{name}/kernel"] == [2, 5, 8]
    assert depths[f"{attn}/out/kernel"] == [3, 6, 9]


# --------------------------------------------------------------------------------------------
# Norm scales, however the product is written


class Norms(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.LayerNorm(name="layer_norm")(x)
        rms = lambda x: x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
        # Gemma's RMSNorm: the scale is stored around 0 and applied as (1 + scale).
        x = rms(x) * (1 + self.param("one_plus_scale", nn.zeros, (WIDTH,)))
        x = nn.Dense(WIDTH, name="mix")(x)
        # A scale applied as a one-axis einsum, and through flax's nn.Einsum layer.
        x = jnp.einsum("...c,c->...c", rms(x), self.param("einsum_scale", nn.ones, (WIDTH,)))
        x = nn.Einsum(
            (WIDTH,), "...c,c->...c", use_bias=False, kernel_init=nn.ones, name="einsum_layer"
        )(rms(x))
        return nn.Dense(3, name="head")(x)


def test_every_norm_scale_is_a_scale():
    layers = _structure(Norms(), jnp.ones((2, WIDTH)))
    roles = {x.path: x.role for x in layers.leaves}
    scales = ("layer_norm/scale", "one_plus_scale", "einsum_scale", "einsum_layer/kernel")
    assert {p: roles[p] for p in scales} == dict.fromkeys(scales, "scale")
    picked = {
        p for p, keep in zip(roles, jax.tree.leaves(layers.mask(("scale",), decayed=False))) if keep
    }
    assert picked == set(scales)
    assert not any(x.decay for x in layers.leaves if x.path in scales)
    assert roles["mix/kernel"] == roles["head/kernel"] == "kernel"


def test_a_norm_scale_has_a_depth_of_its_own_between_kernels():
    depths = _depths(_structure(Norms(), jnp.ones((2, WIDTH))))
    assert depths["layer_norm/scale"] == 1
    assert depths["one_plus_scale"] == 2 and depths["mix/kernel"] == 3
    assert depths["einsum_scale"] == 4 and depths["einsum_layer/kernel"] == 5
    assert depths["head/kernel"] == 6
