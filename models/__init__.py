"""Flax NNX ports of timm's ConvNeXt and Swin Transformer, picked by name.

    model = create_model("convnext_atto", num_classes=10, seed=0, drop_path_rate=0.1)
    fm = functional_model(model)
    logits = fm.apply(fm.params, images_nhwc, train=False, rng=None)

Names are timm's (`convnext_{atto,femto,pico,nano,tiny,small,base,large}`,
`swin_{tiny,small,base}_patch4_window7_224`) plus 32x32-input presets `<variant>_cifar`
(`convnext_tiny_cifar`, `swin_tiny_cifar`, ...): ConvNeXt with a 2x2 stem (stages at 8, 4, 2, 1),
Swin with img_size=32, patch_size=2, window_size=4 (stages at 16, 8, 4, 2).

Fine-tuning from a timm checkpoint of another geometry (224-pixel ImageNet weights into a
`*_cifar` preset, another class count): `init_from_timm(model, path)` (see models/convert.py).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any, NamedTuple

# First: without flax, one ImportError that says which extra installs it.
from lpwd_optax.models import _requirements  # noqa: F401

# isort: split
import jax
from flax import nnx

from lpwd_optax.models.convert import (
    Adapted,
    adapt_timm_checkpoint,
    from_timm,
    init_from_timm,
    load_timm_weights,
    read_state_dict,
    timm_layout,
    to_timm,
)
from lpwd_optax.models.convnext import CONVNEXT_VARIANTS, ConvNeXt, convnext_rules
from lpwd_optax.models.swin import SWIN_VARIANTS, SwinTransformer, swin_rules

__all__ = [
    "Adapted",
    "ConvNeXt",
    "FunctionalModel",
    "SwinTransformer",
    "adapt_timm_checkpoint",
    "convnext_rules",
    "create_model",
    "from_timm",
    "functional_model",
    "init_from_timm",
    "list_models",
    "load_timm_weights",
    "read_state_dict",
    "swin_rules",
    "timm_layout",
    "to_timm",
]

CONVNEXT_CIFAR = dict(patch_size=2)
SWIN_CIFAR = dict(img_size=32, patch_size=2, window_size=4)
CIFAR_NUM_CLASSES = 10
IMAGENET_NUM_CLASSES = 1000


def _registry() -> dict[str, tuple[type[nnx.Module], dict[str, Any], int]]:
    """name -> (class, constructor kwargs, default num_classes)."""
    models = {}
    for name, kwargs in CONVNEXT_VARIANTS.items():
        models[name] = (ConvNeXt, kwargs, IMAGENET_NUM_CLASSES)
        models[f"{name}_cifar"] = (ConvNeXt, {**kwargs, **CONVNEXT_CIFAR}, CIFAR_NUM_CLASSES)
    for name, kwargs in SWIN_VARIANTS.items():
        models[name] = (SwinTransformer, kwargs, IMAGENET_NUM_CLASSES)
        short = name.split("_patch")[0]  # swin_tiny_patch4_window7_224 -> swin_tiny
        models[f"{short}_cifar"] = (SwinTransformer, {**kwargs, **SWIN_CIFAR}, CIFAR_NUM_CLASSES)
    return models


_MODELS = _registry()


def list_models(pattern: str = "*") -> list[str]:
    """Sorted model names matching a shell-style `pattern`, e.g. `list_models("*_cifar")`."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def create_model(
    name: str, num_classes: int | None = None, seed: int = 0, **overrides: Any
) -> nnx.Module:
    """Build a model by name with params initialized from `seed`.

    Args:
      name: one of `list_models()`.
      num_classes: classifier outputs; None means 1000 for timm names, 10 for `*_cifar` presets.
      seed: PRNG seed of the initialization.
      **overrides: constructor arguments, e.g. drop_path_rate=0.1, depthwise_impl="shift",
        patch_size=2 (ConvNeXt also accepts `stem_patch_size`), img_size=32, window_size=4.

    Returns:
      An `nnx.Module` called as `model(images_nhwc, train=False, rng=None) -> logits`.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    cls, kwargs, default_classes = _MODELS[name]
    overrides = dict(overrides)
    if cls is ConvNeXt and "stem_patch_size" in overrides:
        overrides["patch_size"] = overrides.pop("stem_patch_size")
    num_classes = default_classes if num_classes is None else num_classes
    return cls(**{**kwargs, **overrides}, num_classes=num_classes, rngs=nnx.Rngs(seed))


class FunctionalModel(NamedTuple):
    """A model as a pure function of its params.

    apply(params, images, train=False, rng=None) -> logits; params: nnx.State of nnx.Param.
    """

    apply: Callable[..., jax.Array]
    params: nnx.State


def functional_model(model: nnx.Module) -> FunctionalModel:
    """Split `model` into a pure `apply` function and its params (jit/pmap/grad-able).

    `rng` (a PRNG key) is needed only when train=True and the model has drop path.
    """
    graphdef, params = nnx.split(model, nnx.Param)

    def apply(
        params: nnx.State, images: jax.Array, train: bool = False, rng: jax.Array | None = None
    ) -> jax.Array:
        return nnx.merge(graphdef, params)(images, train=train, rng=rng)

    return FunctionalModel(apply, params)
