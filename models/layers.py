"""Blocks shared by the ConvNeXt and Swin ports: initializers, drop path, depthwise conv, MLP.

Everything is NHWC. Modules hold only `nnx.Param` leaves and static Python configuration;
randomness for stochastic depth is passed explicitly as a PRNG key at call time, so
`nnx.split(model, nnx.Param)` yields the whole state and the forward pass is a pure function
of (params, inputs, train, rng).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

DepthwiseImpl = Literal["auto", "conv", "shift", "matmul"]
DEPTHWISE_IMPLS = ("auto", "conv", "shift", "matmul")
# "matmul" builds a (C, H*W, H*W) matrix; beyond these sizes "auto" uses "shift" instead.
MATMUL_MAX_POSITIONS_SQUARED = 256 * 256
MATMUL_MAX_MATRIX_ELEMENTS = 2**24


def _host_sample(key: jax.Array, shape, dtype, sample) -> jax.Array:
    """`sample(numpy_generator, shape)` drawn on the host, seeded by the JAX `key`'s data.

    Eager JAX RNG compiles one XLA program per parameter shape, seconds each on CPU, which made
    building a model take tens of seconds; numpy draws are immediate. Under tracing
    (nnx.jit, nnx.eval_shape, jax.jit of a constructor) the same numpy draw runs as a host
    callback on the key's runtime value, so a seed gives the same weights however the model is
    built (eval_shape runs nothing; jitting the whole constructor is also fast, where
    jax.random under jit made it a 20 s compile).
    """

    def draw(key_data) -> np.ndarray:
        seed = np.asarray(key_data).ravel()
        return np.asarray(sample(np.random.default_rng(seed), shape), dtype)

    key_data = jax.random.key_data(key)
    if isinstance(key_data, jax.core.Tracer):
        return jax.pure_callback(draw, jax.ShapeDtypeStruct(shape, dtype), key_data)
    return jnp.asarray(draw(key_data))


def timm_normal(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """timm's Linear/Conv init, trunc_normal_(std=0.02) with cutoffs at +-2.

    The cutoffs are absolute, 100 standard deviations out: in effect a plain normal. (Flax's
    truncated_normal truncates at 2 standard deviations, a different distribution.)
    """
    return _host_sample(key, shape, dtype, lambda g, s: 0.02 * g.standard_normal(s))


def _uniform(key: jax.Array, shape, dtype, bound: float) -> jax.Array:
    return _host_sample(key, shape, dtype, lambda g, s: g.uniform(-bound, bound, s))


zeros = jax.nn.initializers.zeros
ones = jax.nn.initializers.ones


def torch_default_kernel_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """PyTorch's default Conv/Linear weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    (kaiming_uniform with a=sqrt(5); `shape` is a Flax kernel, fan_in is all axes but the last.)
    """
    return _uniform(key, shape, dtype, 1.0 / math.sqrt(math.prod(shape[:-1])))


def torch_default_bias_init(fan_in: int):
    """PyTorch's default Conv/Linear bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""

    def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        return _uniform(key, shape, dtype, 1.0 / math.sqrt(fan_in))

    return init


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, x (1 + erf(x / sqrt 2)) / 2: torch.nn.GELU()'s formula, timm's 'gelu'.

    XLA:CPU's erf is a fast polynomial; jax.nn.gelu(approximate=False) uses an erfc form that
    took twice as long in the train step, for the same values to float32 rounding.
    """
    return x * (0.5 + 0.5 * jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


@jax.custom_vjp
def _cotangent_barrier(x: jax.Array) -> jax.Array:
    return x


def _cotangent_barrier_fwd(x):
    return x, None


def _cotangent_barrier_bwd(_, g):
    # A conditional is one of the few things XLA:CPU never fuses through. The predicate is
    # false for every finite cotangent; when the first entry is NaN the whole cotangent becomes
    # NaN, as the matmuls downstream would make it anyway.
    first = g.reshape(-1)[0]
    return (jax.lax.cond(jnp.isnan(first), lambda g: jnp.full_like(g, jnp.nan), lambda g: g, g),)


_cotangent_barrier.defvjp(_cotangent_barrier_fwd, _cotangent_barrier_bwd)


def residual_barrier(x: jax.Array) -> jax.Array:
    """Identity whose gradient XLA:CPU must write to memory once (a no-op on other backends).

    A residual stream's gradient is a chain of adds, one per block. XLA:CPU treats adds as free
    to duplicate and fuses the whole chain into each of its consumers (weight-gradient matmul
    transposes, norm backward passes), so a stage of n blocks recomputes O(n^2) terms: in
    swin_tiny at 32x32 those fusions took a quarter of the step. Calling this on the output of
    each residual add ends every chain there. Values and gradients are unchanged.
    """
    if jax.default_backend() != "cpu":
        return x
    return _cotangent_barrier(x)


def drop_path_rates(drop_path_rate: float, depths: tuple[int, ...]) -> list[list[float]]:
    """Stochastic-depth rate per block, rising linearly from 0 to `drop_path_rate` over all blocks.

    Same schedule as timm's `calculate_drop_path_rates(rate, depths, stagewise=True)`.
    """
    rates = np.linspace(0.0, drop_path_rate, sum(depths)).tolist()
    bounds = np.cumsum((0, *depths))
    return [rates[a:b] for a, b in itertools.pairwise(bounds)]


def drop_path(x: jax.Array, rate: float, rng: jax.Array | None, train: bool) -> jax.Array:
    """Stochastic depth: zero the whole residual branch of each sample with probability `rate`.

    Surviving samples are scaled by 1/(1 - rate) so the expectation is unchanged (timm's
    `drop_path(..., scale_by_keep=True)`). Identity in eval mode or when `rate == 0`.
    """
    if not train or rate == 0.0:
        return x
    if rng is None:
        raise ValueError("drop path is active (train=True, rate > 0): pass a PRNG key as `rng`")
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


def block_rng(rng: jax.Array | None, index: int) -> jax.Array | None:
    """A distinct key for block number `index` (None stays None)."""
    return None if rng is None else jax.random.fold_in(rng, index)


class Stage(nnx.Module):
    """Base of a ConvNeXt or Swin stage: an optional `downsample`, then `blocks` in order.

    Subclasses set `self.downsample` (a module or None) and `self.blocks` (an nnx.List of
    modules called as `block(x, train=..., rng=...)`).
    """

    downsample: nnx.Module | None
    blocks: nnx.List

    def __call__(self, x: jax.Array, *, train: bool, rngs: Sequence[jax.Array | None]):
        if self.downsample is not None:
            x = self.downsample(x)
        for block, rng in zip(self.blocks, rngs, strict=True):
            x = block(x, train=train, rng=rng)
        return x


def run_stages(
    stages: Sequence[Stage], x: jax.Array, *, train: bool, rng: jax.Array | None
) -> jax.Array:
    """Runs `stages` in order; block number i of the whole network draws `fold_in(rng, i)`."""
    index = 0
    for stage in stages:
        rngs = [block_rng(rng, index + i) for i in range(len(stage.blocks))]
        index += len(stage.blocks)
        x = stage(x, train=train, rngs=rngs)
    return x


def resolve_depthwise_impl(
    impl: DepthwiseImpl, x_shape: tuple[int, ...] | None = None
) -> Literal["conv", "shift", "matmul"]:
    """The depthwise implementation to run for `impl` on the default backend.

    "auto" is the native grouped convolution on GPU/TPU. On CPU, where XLA's grouped
    convolution is slow, it is "matmul" for feature maps up to 16x16 (the whole ConvNeXt at
    32x32 inputs with patch_size >= 2) and "shift" for larger ones.
    """
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(f"depthwise_impl must be one of {DEPTHWISE_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if jax.default_backend() != "cpu":
        return "conv"
    if x_shape is None:
        return "shift"
    positions = x_shape[1] * x_shape[2]  # 'same' padding: output positions = input positions
    small = positions**2 <= MATMUL_MAX_POSITIONS_SQUARED
    return (
        "matmul" if small and positions**2 * x_shape[3] <= MATMUL_MAX_MATRIX_ELEMENTS else "shift"
    )


def _tap_hits_input(tap: int, padding: int, in_size: int, out_size: int) -> bool:
    """Whether kernel row/column `tap` ever reads a real (non-padding) input position."""
    first = tap - padding  # input index read for output position 0
    return first < in_size and first + out_size > 0


def _shifted_sum(x: jax.Array, taps: jax.Array, padding: int) -> jax.Array:
    """sum_ij pad(x)[:, i:i+Ho, j:j+Wo, :] * taps[i, j]: a depthwise cross-correlation.

    Taps that only ever read zero padding are skipped (at 1x1 or 2x2 feature maps most of a
    7x7 kernel does), which changes no number.
    """
    kh, kw, _ = taps.shape
    _, height, width, _ = x.shape
    out_h, out_w = height + 2 * padding - kh + 1, width + 2 * padding - kw + 1
    padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    out = jnp.zeros((x.shape[0], out_h, out_w, x.shape[3]), jnp.result_type(x, taps))
    for i in range(kh):
        if not _tap_hits_input(i, padding, height, out_h):
            continue
        for j in range(kw):
            if _tap_hits_input(j, padding, width, out_w):
                out = out + padded[:, i : i + out_h, j : j + out_w, :] * taps[i, j]
    return out


def _shifted_kernel_grad(x: jax.Array, dy: jax.Array, kh: int, kw: int, padding: int):
    """d loss / d taps[i, j, c] = sum_{b,h,w} pad(x)[b, h+i, w+j, c] * dy[b, h, w, c].

    kh*kw separate reductions are slow on XLA's CPU backend, so this is one matmul batched
    over channels: with the output cut into th x tw tiles (the whole map when it is at most
    16 x 16) and the matching (th+kh-1) x (tw+kw-1) input tiles,
    Z[c, u, v] = sum_{b, tile} x_tile[b, tile, u, c] * dy_tile[b, tile, v, c],
    and each tap is the sum of the entries of Z where input position u sits at offset (i, j)
    from output position v.
    """
    batch, out_h, out_w, channels = dy.shape
    th = out_h if out_h <= 16 else 8
    tw = out_w if out_w <= 16 else 8
    nh, nw = -(-out_h // th), -(-out_w // tw)
    in_th, in_tw = th + kh - 1, tw + kw - 1
    # Zero-extend both maps to whole tiles; the extra dy entries are zero and add nothing.
    dy = jnp.pad(dy, ((0, 0), (0, nh * th - out_h), (0, nw * tw - out_w), (0, 0)))
    extra_h, extra_w = nh * th - out_h, nw * tw - out_w
    padded = jnp.pad(
        x, ((0, 0), (padding, padding + extra_h), (padding, padding + extra_w), (0, 0))
    )
    x_tiles = jnp.stack(
        [
            padded[:, a * th : a * th + in_th, b * tw : b * tw + in_tw, :]
            for a in range(nh)
            for b in range(nw)
        ],
        axis=1,
    ).reshape(batch, nh * nw, in_th * in_tw, channels)
    dy_tiles = (
        dy.reshape(batch, nh, th, nw, tw, channels)
        .transpose(0, 1, 3, 2, 4, 5)
        .reshape(batch, nh * nw, th * tw, channels)
    )
    z = jnp.einsum("bnuc,bnvc->cuv", x_tiles, dy_tiles, precision=jax.lax.Precision.HIGHEST)
    h, w = np.meshgrid(np.arange(th), np.arange(tw), indexing="ij")
    i, j = np.meshgrid(np.arange(kh), np.arange(kw), indexing="ij")
    u = (h + i[..., None, None]) * in_tw + (w + j[..., None, None])  # (kh, kw, th, tw)
    flat_index = (u * (th * tw) + h * tw + w).reshape(kh * kw, th * tw)
    taps = z.reshape(channels, -1)[:, flat_index].sum(-1)  # (C, kh*kw)
    return taps.T.reshape(kh, kw, channels)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise_shift(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
    return _shifted_sum(x, kernel[:, :, 0, :], padding)


def _depthwise_shift_fwd(x, kernel, padding):
    return _shifted_sum(x, kernel[:, :, 0, :], padding), (x, kernel)


def _depthwise_shift_bwd(padding, residuals, dy):
    x, kernel = residuals
    kh, kw = kernel.shape[:2]
    # The input gradient is the same kind of correlation, of dy with the flipped kernel.
    dx = _shifted_sum(dy, kernel[::-1, ::-1, 0, :], kh - 1 - padding)
    dkernel = _shifted_kernel_grad(x, dy, kh, kw, padding)[:, :, None, :]
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_depthwise_shift.defvjp(_depthwise_shift_fwd, _depthwise_shift_bwd)


def _toeplitz_index(
    in_hw: tuple[int, int], out_hw: tuple[int, int], kh: int, kw: int, padding: int
):
    """Tap index (i * kw + j) linking input position u to output position v, and its validity.

    Output (hv, wv) reads input (hv + i - padding, wv + j - padding) through tap (i, j).
    """
    hu, wu = np.divmod(np.arange(in_hw[0] * in_hw[1]), in_hw[1])
    hv, wv = np.divmod(np.arange(out_hw[0] * out_hw[1]), out_hw[1])
    i = hu[:, None] - hv[None, :] + padding
    j = wu[:, None] - wv[None, :] + padding
    valid = (i >= 0) & (i < kh) & (j >= 0) & (j < kw)
    return np.where(valid, i * kw + j, 0), valid


def _depthwise_matmul(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
    """Depthwise correlation as one channel-batched matmul with a (C, H*W, Ho*Wo) Toeplitz matrix.

    Each channel's convolution is a linear map of its flattened feature map; its matrix holds
    the taps at (input, output) position pairs and zeros elsewhere. The matmul does H*W
    multiply-adds per output instead of kh*kw, a good trade for small maps, and, unlike the
    shifted sums, its backward pass is two matmuls plus a gather-transpose for the taps, which
    XLA neither slows down nor duplicates into neighbouring fusions.
    """
    batch, height, width, channels = x.shape
    kh, kw = kernel.shape[:2]
    out_h, out_w = height + 2 * padding - kh + 1, width + 2 * padding - kw + 1
    index, valid = _toeplitz_index((height, width), (out_h, out_w), kh, kw, padding)
    taps = kernel.reshape(kh * kw, channels).T  # (C, kh*kw)
    matrix = jnp.where(valid, taps[:, index], jnp.zeros((), taps.dtype))  # (C, HW, HoWo)
    x_cm = x.reshape(batch, height * width, channels).transpose(2, 0, 1)  # (C, B, HW)
    y = jnp.einsum("cbu,cuv->cbv", x_cm, matrix, precision=jax.lax.Precision.HIGHEST)
    return y.transpose(1, 2, 0).reshape(batch, out_h, out_w, channels)


def depthwise_conv2d(
    x: jax.Array, kernel: jax.Array, padding: int, impl: Literal["conv", "shift", "matmul"]
) -> jax.Array:
    """Stride-1 depthwise convolution of NHWC `x` with an HWIO kernel of shape (kh, kw, 1, C).

    All three implementations compute the same cross-correlation (as torch's Conv2d with
    groups=C) and agree to float32 rounding, in values and in gradients:
      "conv":   XLA's grouped convolution (feature_group_count=C); the fast path on GPU/TPU,
                very slow on CPU.
      "shift":  a sum of kh*kw shifted slices of the zero-padded input times per-channel taps,
                with a hand-written VJP (input gradient: the same shifted sum of the output
                gradient with the flipped kernel; kernel gradient: one channel-batched matmul).
                Being a custom_vjp it supports reverse-mode differentiation, not jax.jvp.
      "matmul": a channel-batched matmul with each channel's Toeplitz matrix (small maps).
    """
    kh, kw, _, channels = kernel.shape
    if impl == "conv":
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(1, 1),
            padding=((padding, padding), (padding, padding)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=channels,
        )
    if impl == "matmul":
        return _depthwise_matmul(x, kernel, padding)
    if impl != "shift":
        raise ValueError(f"unknown depthwise impl {impl!r}")
    if not 0 <= padding <= min(kh, kw) - 1:
        raise ValueError(f"shift depthwise conv needs 0 <= padding < kernel size, got {padding}")
    return _depthwise_shift(x, kernel, padding)


class DepthwiseConv(nnx.Module):
    """k x k depthwise convolution with bias, 'same' zero padding, stride 1 (ConvNeXt's conv_dw).

    Param layout is Flax's HWIO, ('kernel': (k, k, 1, C), 'bias': (C,)), whichever `impl` runs.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        *,
        impl: DepthwiseImpl = "auto",
        rngs: nnx.Rngs,
    ):
        resolve_depthwise_impl(impl)  # validate early
        self.kernel_size = kernel_size
        self.impl = impl
        self.kernel = nnx.Param(timm_normal(rngs.params(), (kernel_size, kernel_size, 1, channels)))
        self.bias = nnx.Param(jnp.zeros((channels,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        impl = resolve_depthwise_impl(self.impl, x.shape)
        y = depthwise_conv2d(x, self.kernel[...], (self.kernel_size - 1) // 2, impl)
        return y + self.bias[...]


class Linear(nnx.Linear):
    """nnx.Linear applied to a 2-D (tokens, features) view of its input."""

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x.reshape(-1, x.shape[-1]))
        return y.reshape(*x.shape[:-1], y.shape[-1])


def linear(in_features: int, out_features: int, *, use_bias: bool = True, rngs: nnx.Rngs):
    """nnx.Linear with timm's init (weight N(0, 0.02), bias 0)."""
    return Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        kernel_init=timm_normal,
        bias_init=zeros,
        rngs=rngs,
    )


def layer_norm(features: int, eps: float, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm over the last axis (biased variance, eps inside the sqrt, like torch).

    use_fast_variance=False computes E[(x - mean)^2] rather than E[x^2] - mean^2, as torch does;
    the fast form loses precision when |mean| >> std.
    """
    return nnx.LayerNorm(features, epsilon=eps, use_fast_variance=False, rngs=rngs)


class Mlp(nnx.Module):
    """fc1 -> exact GELU -> fc2 (timm's Mlp without dropout)."""

    def __init__(self, features: int, hidden_features: int, *, rngs: nnx.Rngs):
        self.fc1 = linear(features, hidden_features, rngs=rngs)
        self.fc2 = linear(hidden_features, features, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu(self.fc1(x)))
