"""ConvNeXt (Liu et al., 2022, arXiv:2201.03545) in Flax NNX, numerically equal to timm's.

NHWC throughout. Architecture, for timm's default arguments:

    stem:    conv k=p, stride p (VALID) -> LayerNorm               (p = patch_size, 4 by default)
    stage s: [LayerNorm -> conv 2x2 stride 2 (VALID)]  (downsample; stages 1..3, and stage 0
             when patch_size == 2, as timm) -> depth_s x block
    block:   x + drop_path(gamma * fc2(gelu(fc1(LN(dwconv7x7(x))))))
    head:    global average pool -> LayerNorm -> fc

LayerNorms use eps 1e-6, GELU is the exact (erf) form, gamma (layer scale) starts at 1e-6, and
the drop-path rate rises linearly over the blocks from 0 to `drop_path_rate`. timm's `conv_mlp`
variants (atto..nano) compute the block MLP with 1x1 convolutions on NCHW tensors: in NHWC the
same numbers come from Dense layers, so `conv_mlp` only changes the shape of the timm weights the
converter reads and writes.

Param paths follow timm's module names: ('stem', 'conv', 'kernel'),
('stages', 1, 'downsample', 'norm', 'scale'), ('stages', 0, 'blocks', 1, 'mlp', 'fc1', 'kernel'),
('stages', 0, 'blocks', 1, 'gamma'), ('head', 'fc', 'kernel').
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
    DepthwiseConv,
    DepthwiseImpl,
    Mlp,
    Stage,
    drop_path,
    drop_path_rates,
    layer_norm,
    linear,
    residual_barrier,
    run_stages,
    timm_normal,
    zeros,
)

LN_EPS = 1e-6
# timm's nn.Sequential indices for the stem and the downsample layers.
TIMM_RENAMES = (
    ("stem.conv.", "stem.0."),
    ("stem.norm.", "stem.1."),
    ("downsample.norm.", "downsample.0."),
    ("downsample.conv.", "downsample.1."),
)

# timm's registered variants: depths, dims and whether timm builds the MLP from 1x1 convs.
CONVNEXT_VARIANTS: dict[str, dict] = {
    "convnext_atto": dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), conv_mlp=True),
    "convnext_femto": dict(depths=(2, 2, 6, 2), dims=(48, 96, 192, 384), conv_mlp=True),
    "convnext_pico": dict(depths=(2, 2, 6, 2), dims=(64, 128, 256, 512), conv_mlp=True),
    "convnext_nano": dict(depths=(2, 2, 8, 2), dims=(80, 160, 320, 640), conv_mlp=True),
    "convnext_tiny": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)),
    "convnext_small": dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768)),
    "convnext_base": dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)),
    "convnext_large": dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536)),
}

_ROOT = r"^(?:params/)?"  # linen's {"params": ...} collection, if present
_LAST = 1_000_000  # after every stage

# Group keys: the stem first, then (stage, position in the stage), then the head.
convnext_rules: tuple[tuple[str, GroupSpec], ...] = (
    (_ROOT + r"stem/", 0),
    (_ROOT + r"stages/(\d+)/downsample/", lambda m: (int(m[1]) + 1, 0)),
    (_ROOT + r"stages/(\d+)/blocks/(\d+)/", lambda m: (int(m[1]) + 1, int(m[2]) + 1)),
    (_ROOT + r"norm_pre/", (_LAST, 0)),
    (_ROOT + r"head/", (_LAST, 1)),
)
"""`depth_labels` rules for ConvNeXt, timm's `group_matcher` grouping: `stem` -> 1, each
stage's downsample then each block consecutive, `head` last."""


def _conv(in_features: int, out_features: int, size: int, *, rngs: nnx.Rngs) -> nnx.Conv:
    """Non-overlapping size x size conv with stride = size (patchify / downsample), timm init."""
    return nnx.Conv(
        in_features,
        out_features,
        kernel_size=(size, size),
        strides=(size, size),
        padding="VALID",
        kernel_init=timm_normal,
        bias_init=zeros,
        rngs=rngs,
    )


class Stem(nnx.Module):
    """Patchify convolution followed by LayerNorm."""

    def __init__(self, in_chans: int, dim: int, patch_size: int, *, rngs: nnx.Rngs):
        self.conv = _conv(in_chans, dim, patch_size, rngs=rngs)
        self.norm = layer_norm(dim, LN_EPS, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(self.conv(x))


class Downsample(nnx.Module):
    """LayerNorm, then a stride-2 2x2 convolution (1x1 when the stage keeps the resolution)."""

    def __init__(self, in_dim: int, out_dim: int, stride: int, *, rngs: nnx.Rngs):
        self.norm = layer_norm(in_dim, LN_EPS, rngs=rngs)
        self.conv = _conv(in_dim, out_dim, 2 if stride > 1 else 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(self.norm(x))


class ConvNeXtBlock(nnx.Module):
    """Depthwise 7x7 -> LN -> MLP (4x, GELU) -> layer scale, with a drop-path residual."""

    def __init__(
        self,
        dim: int,
        *,
        kernel_size: int = 7,
        mlp_ratio: float = 4.0,
        ls_init_value: float | None = 1e-6,
        drop_path_rate: float = 0.0,
        depthwise_impl: DepthwiseImpl = "auto",
        rngs: nnx.Rngs,
    ):
        self.conv_dw = DepthwiseConv(dim, kernel_size, impl=depthwise_impl, rngs=rngs)
        self.norm = layer_norm(dim, LN_EPS, rngs=rngs)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), rngs=rngs)
        self.gamma = None if ls_init_value is None else nnx.Param(jnp.full((dim,), ls_init_value))
        self.drop_path_rate = drop_path_rate

    def __call__(self, x: jax.Array, *, train: bool = False, rng: jax.Array | None = None):
        y = self.mlp(self.norm(self.conv_dw(x)))
        if self.gamma is not None:
            y = y * self.gamma[...]
        return residual_barrier(x + drop_path(y, self.drop_path_rate, rng, train))


class ConvNeXtStage(Stage):
    """Optional downsample, then `depth` blocks at `out_dim` channels."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        depth: int,
        stride: int,
        drop_path_rates: Sequence[float],
        block_kwargs: dict,
        rngs: nnx.Rngs,
    ):
        needs_downsample = in_dim != out_dim or stride > 1
        self.downsample = (
            Downsample(in_dim, out_dim, stride, rngs=rngs) if needs_downsample else None
        )
        self.blocks = nnx.List(
            [
                ConvNeXtBlock(out_dim, drop_path_rate=rate, rngs=rngs, **block_kwargs)
                for rate in drop_path_rates[:depth]
            ]
        )


class Head(nnx.Module):
    """Global average pool -> LayerNorm -> fc (timm's NormMlpClassifierHead, no hidden layer)."""

    def __init__(self, dim: int, num_classes: int, init_scale: float, *, rngs: nnx.Rngs):
        self.norm = layer_norm(dim, LN_EPS, rngs=rngs)
        self.fc = linear(dim, num_classes, rngs=rngs)
        if init_scale != 1.0:
            self.fc.kernel[...] = self.fc.kernel[...] * init_scale

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc(self.norm(jnp.mean(x, axis=(1, 2))))


def stage_strides(patch_size: int, num_stages: int = 4, output_stride: int = 32) -> list[int]:
    """timm's rule: stage 0 downsamples only after a stride-2 stem, later stages always do."""
    strides, current = [], patch_size
    for i in range(num_stages):
        stride = 2 if current == 2 or i > 0 else 1
        if current >= output_stride and stride > 1:
            raise ValueError(
                f"patch_size={patch_size} makes timm switch to dilated convolutions in stage {i} "
                "(output_stride=32); that is not ported"
            )
        current *= stride
        strides.append(stride)
    return strides


class ConvNeXt(nnx.Module):
    """ConvNeXt classifier on NHWC images; `model(x, train=False, rng=None) -> logits`.

    Args:
      depths, dims: blocks and channels per stage (see `CONVNEXT_VARIANTS`).
      num_classes: classifier outputs.
      in_chans: input channels.
      patch_size: stem patch size (timm's `patch_size`); 4 for 224x224 ImageNet inputs, 2 or 1
        for 32x32 inputs. As in timm, patch_size=2 adds a stride-2 downsample to stage 0.
      kernel_size: depthwise kernel size.
      ls_init_value: layer-scale init (None disables layer scale).
      conv_mlp: timm's 1x1-conv MLP flag; same numbers, it only sets the timm weight layout.
      drop_path_rate: stochastic-depth rate of the last block (linear from 0).
      head_init_scale: factor on the initial classifier weights.
      depthwise_impl: "auto" (CPU-fast "matmul"/"shift" forms on CPU, the native grouped conv
        elsewhere), or one of "conv", "shift", "matmul"; see `models.layers.depthwise_conv2d`.
      rngs: initialization randomness.
    """

    def __init__(
        self,
        *,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        num_classes: int = 1000,
        in_chans: int = 3,
        patch_size: int = 4,
        kernel_size: int = 7,
        ls_init_value: float | None = 1e-6,
        conv_mlp: bool = False,
        drop_path_rate: float = 0.0,
        head_init_scale: float = 1.0,
        depthwise_impl: DepthwiseImpl = "auto",
        rngs: nnx.Rngs,
    ):
        depths, dims = tuple(depths), tuple(dims)
        if len(depths) != len(dims):
            raise ValueError(f"depths {depths} and dims {dims} differ in length")
        self.depths = depths
        self.dims = dims
        self.num_classes = num_classes
        self.patch_size = patch_size
        self.conv_mlp = conv_mlp
        self.drop_path_rate = drop_path_rate

        self.stem = Stem(in_chans, dims[0], patch_size, rngs=rngs)
        block_kwargs = dict(
            kernel_size=kernel_size, ls_init_value=ls_init_value, depthwise_impl=depthwise_impl
        )
        rates = drop_path_rates(drop_path_rate, depths)
        strides = stage_strides(patch_size, len(depths))
        stages, in_dim = [], dims[0]
        for depth, dim, stride, stage_rates in zip(depths, dims, strides, rates, strict=True):
            stages.append(
                ConvNeXtStage(
                    in_dim,
                    dim,
                    depth=depth,
                    stride=stride,
                    drop_path_rates=stage_rates,
                    block_kwargs=block_kwargs,
                    rngs=rngs,
                )
            )
            in_dim = dim
        self.stages = nnx.List(stages)
        self.head = Head(dims[-1], num_classes, head_init_scale, rngs=rngs)

    # timm conversion (models/convert.py): names, layouts and the checkpoint filter.
    TIMM_CLASSIFIER = "head.fc"
    TIMM_BUFFERS: tuple[str, ...] = ()

    def timm_param(self, path: tuple, shape: tuple[int, ...]) -> tuple[str, str]:
        """timm key and layout of a Flax param; conv_mlp models hold the MLP as 1x1 convs."""
        key = timm_key(path)
        for flax_name, timm_name in TIMM_RENAMES:
            key = key.replace(flax_name, timm_name)
        layout = default_layout(path, shape)
        if self.conv_mlp and layout == "linear" and len(path) >= 3 and path[-3] == "mlp":
            layout = "conv1x1"
        return key, layout

    def timm_checkpoint_filter(
        self, state_dict: dict[str, np.ndarray], layout: dict[str, TimmEntry]
    ) -> Adapted:
        """A timm ConvNeXt checkpoint moved to this model's stem patch size.

        - `stem.0.weight` of another patch size is resampled (`resample_patch_kernel`, timm's
          `resample_patch_embed` with bicubic antialiased resizing, as timm's Swin and ViT
          filters do);
        - patch_size=2 gives stage 0 a stride-2 downsample that a patch-4 checkpoint lacks:
          it keeps the model's initialization, as timm's non-strict load leaves missing keys.

        timm itself does neither: its ConvNeXt filter only renames Facebook checkpoints, and
        `timm.create_model("convnext_tiny", pretrained=True, patch_size=2)` fails on the stem's
        size mismatch. This is what its other filters would do. The LPWD paper plausibly
        fine-tuned at timm's geometry (patch 4 on 32x32 inputs: stages at 8, 4, 2, 1, the same
        as patch 2 reaches after stage 0's downsample), where only the classifier changes.
        """
        state_dict, kept, notes = dict(state_dict), [], []
        stem = "stem.0.weight"
        note = resample_patch_entry(state_dict, layout, stem)
        if note is not None:
            notes.append(note)
        new_downsample = [k for k in layout if k.startswith("stages.0.downsample.")]
        if new_downsample and not any(k in state_dict for k in new_downsample):
            kept += new_downsample
            notes.append(
                f"stages.0.downsample: not in the checkpoint (patch_size={self.patch_size} "
                "downsamples in stage 0): left at the model's initialization"
            )
        return Adapted(state_dict, tuple(kept), tuple(notes))

    def features(
        self, x: jax.Array, *, train: bool = False, rng: jax.Array | None = None
    ) -> jax.Array:
        """Stem and stages: NHWC feature map of the last stage."""
        return run_stages(self.stages, self.stem(x), train=train, rng=rng)

    def __call__(
        self, x: jax.Array, *, train: bool = False, rng: jax.Array | None = None
    ) -> jax.Array:
        return self.head(self.features(x, train=train, rng=rng))
