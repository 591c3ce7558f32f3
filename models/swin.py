"""Swin Transformer (Liu et al., 2021, arXiv:2103.14030) in Flax NNX, numerically equal to timm's.

NHWC throughout; layout as timm's current `SwinTransformer`:

    patch_embed: conv k=p stride p (VALID) -> LayerNorm
    layers[s]:   [PatchMerging (s > 0; at the START of the stage)] -> depth_s x block
    block:       x + dp(W-MSA(LN(x)))  then  x + dp(MLP(LN(x)))   (odd blocks: shifted windows)
    norm -> global average pool -> head.fc

Window attention has a learned relative position bias (a ((2Wh-1)(2Ww-1), heads) table read
through a fixed index) and, for shifted windows, timm's additive mask (-100 between tokens that
come from different regions of the cyclically shifted map). As in timm, a stage whose resolution
is not larger than the window uses a window equal to its resolution and no shift, so at
img_size=32, patch_size=2, window_size=4 the stages run at 16, 8, 4, 2 with windows 4, 4, 4, 2.
LayerNorm eps is 1e-5 (torch's default, which timm's Swin uses), GELU is exact, qkv has a bias,
and the drop-path rate rises linearly from 0 to `drop_path_rate` (timm's default 0.1).

Param paths follow timm's module names: ('patch_embed', 'proj', 'kernel'),
('layers', 1, 'downsample', 'reduction', 'kernel'),
('layers', 0, 'blocks', 1, 'attn', 'relative_position_bias_table'), ('norm', 'scale'),
('head', 'fc', 'kernel').
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lpwd_optax.layerwise import GroupSpec
from lpwd_optax.models.convert import (
    Adapted,
    TimmEntry,
    default_layout,
    resample_patch_entry,
    timm_key,
)
from lpwd_optax.models.layers import (
    Mlp,
    Stage,
    block_rng,
    drop_path,
    drop_path_rates,
    layer_norm,
    linear,
    residual_barrier,
    run_stages,
    timm_normal,
    torch_default_bias_init,
    torch_default_kernel_init,
)
from lpwd_optax.models.resample import (
    resize_relative_position_bias_table,
)

LN_EPS = 1e-5
MASK_VALUE = -100.0

SWIN_VARIANTS: dict[str, dict] = {
    "swin_tiny_patch4_window7_224": dict(
        embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)
    ),
    "swin_small_patch4_window7_224": dict(
        embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)
    ),
    "swin_base_patch4_window7_224": dict(
        embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)
    ),
}

_ROOT = r"^(?:params/)?"  # linen's {"params": ...} collection, if present
_LAST = 1_000_000  # after every stage

# Group keys: the patch embedding first, then (stage, position in the stage), then the head.
swin_rules: tuple[tuple[str, GroupSpec], ...] = (
    (_ROOT + r"(?:patch_embed|absolute_pos_embed)(?:/|$)", 0),
    (_ROOT + r"layers/(\d+)/downsample/", lambda m: (int(m[1]) + 1, 0)),
    (_ROOT + r"layers/(\d+)/blocks/(\d+)/", lambda m: (int(m[1]) + 1, int(m[2]) + 1)),
    (_ROOT + r"norm/", (_LAST, 0)),
    (_ROOT + r"head/", (_LAST, 1)),
)
"""`depth_labels` rules for Swin, timm's `group_matcher` grouping: `patch_embed` -> 1, each
stage's downsample then each block consecutive, `norm`, `head`."""

Pair = tuple[int, int]


def _pair(value: int | Sequence[int]) -> Pair:
    if isinstance(value, int):
        return (value, value)
    first, second = value
    return (int(first), int(second))


def window_and_shift(resolution: Pair, window: Pair, shift: Pair) -> tuple[Pair, Pair]:
    """timm's clamping: along an axis whose resolution <= window, window = resolution, no shift."""
    new_window = tuple(r if r <= w else w for r, w in zip(resolution, window))
    new_shift = tuple(0 if r <= w else s for r, w, s in zip(resolution, new_window, shift))
    return new_window, new_shift


def relative_position_index(window: Pair) -> np.ndarray:
    """(N, N) int index into the bias table for every query/key pair of a window (N = Wh*Ww)."""
    win_h, win_w = window
    coords = np.stack(np.meshgrid(np.arange(win_h), np.arange(win_w), indexing="ij")).reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N), query minus key
    return (rel[0] + win_h - 1) * (2 * win_w - 1) + (rel[1] + win_w - 1)


def window_partition(x: jax.Array, window: Pair) -> jax.Array:
    """(B, H, W, C) -> (B * H/Wh * W/Ww, Wh * Ww, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window[0], window[0], w // window[1], window[1], c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window[0] * window[1], c)


def window_reverse(windows: jax.Array, window: Pair, height: int, width: int) -> jax.Array:
    """Inverse of `window_partition`."""
    c = windows.shape[-1]
    x = windows.reshape(-1, height // window[0], width // window[1], window[0], window[1], c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


def shifted_window_mask(padded_size: Pair, window: Pair, shift: Pair) -> np.ndarray:
    """(num_windows, N, N) additive mask: 0 within a region of the rolled map, else -100."""
    regions = np.zeros(padded_size, np.float32)
    label = 0
    for hs in (slice(0, -window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None)):
        for ws in (slice(0, -window[1]), slice(-window[1], -shift[1]), slice(-shift[1], None)):
            regions[hs, ws] = label
            label += 1
    windows = window_partition(regions[None, :, :, None], window)[..., 0]  # (nW, N)
    windows = np.asarray(windows)
    diff = windows[:, None, :] - windows[:, :, None]
    return np.where(diff != 0, MASK_VALUE, 0.0).astype(np.float32)


def _softmax(logits: jax.Array, axis: int) -> jax.Array:
    shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis, keepdims=True))
    e = jnp.exp(shifted)
    return e / jnp.sum(e, axis, keepdims=True)


@jax.custom_vjp
def attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """softmax(q k^T + bias) v over the last two axes; q, k, v: (..., N, d), bias: (..., N, N).

    Leading axes of `bias` broadcast against the trailing leading axes of q (windows, heads).
    Plain autodiff of this needs two products that contract the query axis of a stored
    operand, (d logits)^T q and p^T (d out); XLA:CPU hands matmuls with a transposed left
    operand to a slow generic loop (about 5x slower than the library kernel at these sizes).
    The VJP below recomputes p^T and (d logits)^T from their own products instead, so every
    matmul has the form the fast kernel takes; the extra work is two (N x N) products.
    """
    return _attention_fwd(q, k, v, bias)[0]


def _attention_fwd(q, k, v, bias):
    p = _softmax(jnp.einsum("...qd,...kd->...qk", q, k) + bias, -1)
    return jnp.einsum("...qk,...kd->...qd", p, v), (q, k, v, bias, p)


def _attention_bwd(residuals, g):
    q, k, v, bias, p = residuals
    # The same logits, transposed, from their own product (softmax over the key axis, -2).
    p_t = _softmax(jnp.einsum("...kd,...qd->...kq", k, q) + jnp.swapaxes(bias, -1, -2), -2)
    dp = jnp.einsum("...qd,...kd->...qk", g, v)
    dp_t = jnp.einsum("...kd,...qd->...kq", v, g)
    row = jnp.sum(dp * p, -1)  # softmax backward: d logits = p * (dp - sum_k dp * p)
    dlogits = p * (dp - row[..., None])
    dlogits_t = p_t * (dp_t - row[..., None, :])
    dq = jnp.einsum("...qk,...kd->...qd", dlogits, k)
    dk = jnp.einsum("...kq,...qd->...kd", dlogits_t, q)
    dv = jnp.einsum("...kq,...qd->...kd", p_t, g)
    dbias = jnp.sum(dlogits.reshape(-1, *bias.shape), axis=0)
    return dq, dk, dv, dbias.reshape(bias.shape)


attention.defvjp(_attention_fwd, _attention_bwd)


class WindowAttention(nnx.Module):
    """Multi-head self-attention inside windows, with a relative position bias."""

    def __init__(
        self, dim: int, num_heads: int, window: Pair, *, qkv_bias: bool = True, rngs: nnx.Rngs
    ):
        self.num_heads = num_heads
        self.window = window
        table_size = (2 * window[0] - 1) * (2 * window[1] - 1)
        self.relative_position_bias_table = nnx.Param(
            timm_normal(rngs.params(), (table_size, num_heads))
        )
        self.qkv = linear(dim, 3 * dim, use_bias=qkv_bias, rngs=rngs)
        self.proj = linear(dim, dim, rngs=rngs)

    def relative_position_bias(self) -> jax.Array:
        """(heads, N, N) bias gathered from the table."""
        index = relative_position_index(self.window).reshape(-1)
        n = self.window[0] * self.window[1]
        bias = self.relative_position_bias_table[...][index].reshape(n, n, self.num_heads)
        return bias.transpose(2, 0, 1)

    def __call__(self, x: jax.Array, mask: np.ndarray | None = None) -> jax.Array:
        """x: (B * num_windows, N, C); mask: (num_windows, N, N) additive, or None."""
        batch, n, c = x.shape
        heads, head_dim = self.num_heads, c // self.num_heads
        qkv = self.qkv(x).reshape(batch, n, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
        bias = self.relative_position_bias()[None]  # (1, heads, N, N)
        if mask is not None:
            bias = bias + jnp.asarray(mask)[:, None]  # (num_windows, heads, N, N)
        windowed = (-1, bias.shape[0], heads, n, head_dim)
        q, k, v = (t.reshape(windowed) for t in (qkv[0] * head_dim**-0.5, qkv[1], qkv[2]))
        out = attention(q, k, v, bias).reshape(batch, heads, n, head_dim)
        return self.proj(out.transpose(0, 2, 1, 3).reshape(batch, n, c))


class SwinBlock(nnx.Module):
    """(Shifted-)window attention and MLP, each pre-norm with a drop-path residual."""

    def __init__(
        self,
        dim: int,
        resolution: Pair,
        num_heads: int,
        window: Pair,
        shift: Pair,
        *,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        rngs: nnx.Rngs,
    ):
        self.resolution = resolution
        self.window, self.shift = window_and_shift(resolution, window, shift)
        self.drop_path_rate = drop_path_rate
        self.norm1 = layer_norm(dim, LN_EPS, rngs=rngs)
        self.attn = WindowAttention(dim, num_heads, self.window, qkv_bias=qkv_bias, rngs=rngs)
        self.norm2 = layer_norm(dim, LN_EPS, rngs=rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), rngs=rngs)

    def _window_attention(self, x: jax.Array) -> jax.Array:
        _, height, width, _ = x.shape
        shift, window = self.shift, self.window
        has_shift = any(shift)
        if has_shift:
            x = jnp.roll(x, (-shift[0], -shift[1]), axis=(1, 2))
        pad_h = (window[0] - height % window[0]) % window[0]
        pad_w = (window[1] - width % window[1]) % window[1]
        x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        padded = (height + pad_h, width + pad_w)
        mask = shifted_window_mask(padded, window, shift) if has_shift else None
        windows = self.attn(window_partition(x, window), mask)
        x = window_reverse(windows, window, *padded)[:, :height, :width, :]
        if has_shift:
            x = jnp.roll(x, shift, axis=(1, 2))
        return x

    def __call__(self, x: jax.Array, *, train: bool = False, rng: jax.Array | None = None):
        rate = self.drop_path_rate
        x = x + drop_path(self._window_attention(self.norm1(x)), rate, block_rng(rng, 0), train)
        x = residual_barrier(x)
        x = x + drop_path(self.mlp(self.norm2(x)), rate, block_rng(rng, 1), train)
        return residual_barrier(x)


class PatchMerging(nnx.Module):
    """2x2 neighbourhood -> concatenated channels -> LayerNorm -> linear (no bias) to `out_dim`.

    Channel order of the concatenation is timm's (and the original's): (0,0), (1,0), (0,1), (1,1)
    as (row, column) offsets, i.e. the column offset varies slowest.
    """

    def __init__(self, dim: int, out_dim: int, *, rngs: nnx.Rngs):
        self.norm = layer_norm(4 * dim, LN_EPS, rngs=rngs)
        self.reduction = linear(4 * dim, out_dim, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
        h, w = h + h % 2, w + w % 2
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5)
        return self.reduction(self.norm(x.reshape(b, h // 2, w // 2, 4 * c)))


class SwinStage(Stage):
    """Optional patch merging, then `depth` blocks alternating plain and shifted windows."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        resolution: Pair,
        *,
        depth: int,
        downsample: bool,
        num_heads: int,
        window: Pair,
        drop_path_rates: Sequence[float],
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        rngs: nnx.Rngs,
    ):
        if downsample:
            self.downsample = PatchMerging(dim, out_dim, rngs=rngs)
            resolution = ((resolution[0] + 1) // 2, (resolution[1] + 1) // 2)
        else:
            if dim != out_dim:
                raise ValueError(f"a stage without downsample keeps its width ({dim} != {out_dim})")
            self.downsample = None
        self.resolution = resolution
        shift = (window[0] // 2, window[1] // 2)
        self.blocks = nnx.List(
            [
                SwinBlock(
                    out_dim,
                    resolution,
                    num_heads,
                    window,
                    (0, 0) if i % 2 == 0 else shift,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop_path_rate=drop_path_rates[i],
                    rngs=rngs,
                )
                for i in range(depth)
            ]
        )


class PatchEmbed(nnx.Module):
    """Non-overlapping patch projection (conv, PyTorch default init as in timm) and LayerNorm."""

    def __init__(self, in_chans: int, dim: int, patch_size: Pair, *, rngs: nnx.Rngs):
        fan_in = in_chans * patch_size[0] * patch_size[1]
        self.proj = nnx.Conv(
            in_chans,
            dim,
            kernel_size=patch_size,
            strides=patch_size,
            padding="VALID",
            kernel_init=torch_default_kernel_init,
            bias_init=torch_default_bias_init(fan_in),
            rngs=rngs,
        )
        self.norm = layer_norm(dim, LN_EPS, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(self.proj(x))


class Head(nnx.Module):
    """Global average pool -> fc (timm's ClassifierHead, avg pool, no dropout)."""

    def __init__(self, dim: int, num_classes: int, *, rngs: nnx.Rngs):
        self.fc = linear(dim, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc(jnp.mean(x, axis=(1, 2)))


class SwinTransformer(nnx.Module):
    """Swin Transformer classifier on NHWC images; `model(x, train=False, rng=None) -> logits`.

    Args:
      img_size: input size the model is built for (int or (H, W)); inputs must match it.
      patch_size: patch embedding size (4 for ImageNet, 2 for 32x32 inputs).
      window_size: attention window (7 for ImageNet, 4 for 32x32 inputs), clamped per stage.
      embed_dim, depths, num_heads: width of stage 0 (doubled each stage), blocks and heads.
      num_classes, in_chans: classifier outputs, input channels.
      mlp_ratio, qkv_bias: MLP expansion, bias on the qkv projection.
      drop_path_rate: stochastic-depth rate of the last block (linear from 0); timm's default 0.1.
      rngs: initialization randomness.
    """

    def __init__(
        self,
        *,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 4,
        window_size: int | Sequence[int] = 7,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        num_classes: int = 1000,
        in_chans: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.1,
        rngs: nnx.Rngs,
    ):
        depths, num_heads = tuple(depths), tuple(num_heads)
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        self.window_size = _pair(window_size)
        self.depths = depths
        self.num_classes = num_classes
        self.drop_path_rate = drop_path_rate
        if any(i % p for i, p in zip(self.img_size, self.patch_size)):
            raise ValueError(f"img_size {self.img_size} not divisible by patch {self.patch_size}")
        grid = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        dims = [embed_dim * 2**i for i in range(len(depths))]

        self.patch_embed = PatchEmbed(in_chans, dims[0], self.patch_size, rngs=rngs)
        rates = drop_path_rates(drop_path_rate, depths)
        layers, in_dim, resolution = [], dims[0], grid
        for i, (depth, dim, heads) in enumerate(zip(depths, dims, num_heads, strict=True)):
            stage = SwinStage(
                in_dim,
                dim,
                resolution,
                depth=depth,
                downsample=i > 0,
                num_heads=heads,
                window=self.window_size,
                drop_path_rates=rates[i],
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                rngs=rngs,
            )
            layers.append(stage)
            in_dim, resolution = dim, stage.resolution
        self.layers = nnx.List(layers)
        self.norm = layer_norm(dims[-1], LN_EPS, rngs=rngs)
        self.head = Head(dims[-1], num_classes, rngs=rngs)

    # timm conversion (models/convert.py): names, layouts and the checkpoint filter.
    TIMM_CLASSIFIER = "head.fc"
    # Buffers that timm and the original checkpoints store but that the port recomputes.
    TIMM_BUFFERS = ("relative_position_index", "attn_mask")

    def timm_param(self, path: tuple, shape: tuple[int, ...]) -> tuple[str, str]:
        """timm key and layout of a Flax param (the names are timm's module names)."""
        return timm_key(path), default_layout(path, shape)

    def timm_checkpoint_filter(
        self, state_dict: dict[str, np.ndarray], layout: dict[str, TimmEntry]
    ) -> Adapted:
        """A timm Swin checkpoint moved to this model's patch, window and image size.

        As timm's `swin_transformer.checkpoint_filter_fn` (the path of
        `timm.create_model(name, pretrained=True, img_size=..., patch_size=...,
        window_size=...)`):
        - `patch_embed.proj.weight` of another patch size is resampled (`resample_patch_kernel`,
          timm's `resample_patch_embed`, bicubic, antialiased);
        - every `relative_position_bias_table` of another size is resized to its block's window
          (`resize_relative_position_bias_table`), including the windows clamped to a small
          stage's resolution (at img_size 32, patch 2, window 4: 4, 4, 4, 2). The relative
          position index and shift masks are not weights: the model computes its own.
        """
        state_dict, notes = dict(state_dict), []
        embed = "patch_embed.proj.weight"
        note = resample_patch_entry(state_dict, layout, embed)
        if note is not None:
            notes.append(note)
        for key, entry in layout.items():
            if not key.endswith("relative_position_bias_table") or key not in state_dict:
                continue
            table = state_dict[key]
            if table.shape == entry.timm_shape or table.shape[1:] != entry.timm_shape[1:]:
                continue  # matching, or another head count: from_timm names the key
            stage, block = self.layers[entry.path[1]], entry.path[3]
            window = stage.blocks[block].window
            side = round(table.shape[0] ** 0.5)
            try:
                state_dict[key] = resize_relative_position_bias_table(table, window)
            except ValueError:
                continue  # not a square window's table: from_timm names the key
            clamped = (
                f" (clamped to the stage's {stage.resolution[0]}x{stage.resolution[1]} tokens)"
                if window != self.window_size
                else ""
            )
            notes.append(
                f"{key}: window {(side + 1) // 2}x{(side + 1) // 2} -> {window[0]}x{window[1]}"
                f"{clamped}, table resized ({table.shape[0]} -> {entry.timm_shape[0]} offsets)"
            )
        return Adapted(state_dict, (), tuple(notes))

    def features(
        self, x: jax.Array, *, train: bool = False, rng: jax.Array | None = None
    ) -> jax.Array:
        """Patch embedding, stages and final norm: (B, H/32*, W/32*, C) tokens."""
        if tuple(x.shape[1:3]) != self.img_size:
            raise ValueError(f"input size {tuple(x.shape[1:3])} != model img_size {self.img_size}")
        x = self.patch_embed(x)
        x = run_stages(self.layers, x, train=train, rng=rng)
        return self.norm(x)

    def __call__(
        self, x: jax.Array, *, train: bool = False, rng: jax.Array | None = None
    ) -> jax.Array:
        return self.head(self.features(x, train=train, rng=rng))
