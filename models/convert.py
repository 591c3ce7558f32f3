"""timm state_dict <-> Flax params for the ConvNeXt and Swin ports.

Names: a Flax path joined with '.' is the timm key, except that Flax's `kernel`/`scale` leaves
are timm's `weight`, and ConvNeXt's `stem.{conv,norm}` / `downsample.{norm,conv}` are timm's
`nn.Sequential` indices `stem.{0,1}` / `downsample.{0,1}`.

Layouts: conv kernels OIHW (torch) <-> HWIO (Flax), depthwise (C,1,k,k) <-> (k,k,1,C); linear
weights (out, in) <-> (in, out); the MLP of timm's `conv_mlp` ConvNeXts is a 1x1 conv,
(out, in, 1, 1) <-> (in, out). Everything else (biases, norms, layer scale, Swin's relative
position bias table) is copied as is.

Files are read without unpickling arbitrary objects: safetensors, or torch checkpoints through
`torch.load(..., weights_only=True)`.

Example:
    model = models.create_model("convnext_tiny")
    models.load_timm_weights(model, "convnext_tiny.safetensors")   # or a .pth, or a state dict
    sd = models.to_timm(model)   # back to a timm state dict of numpy arrays
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lpwd_optax.models.convnext import ConvNeXt
from lpwd_optax.models.swin import SwinTransformer

# Buffers that older timm / original checkpoints store but that the ports recompute.
DERIVED_BUFFERS = ("relative_position_index", "attn_mask")


class TimmEntry(NamedTuple):
    """Where one Flax param lives in a timm state dict, and how its layout changes."""

    path: tuple  # Flax param path, e.g. ('stages', 0, 'blocks', 1, 'mlp', 'fc1', 'kernel')
    key: str  # timm key, e.g. 'stages.0.blocks.1.mlp.fc1.weight'
    layout: str  # 'conv' (OIHW<->HWIO), 'linear' ((out,in)<->(in,out)), 'conv1x1' or 'copy'
    timm_shape: tuple[int, ...]


def _timm_key(model: nnx.Module, path: tuple) -> str:
    names = [str(p) for p in path]
    names[-1] = {"kernel": "weight", "scale": "weight"}.get(names[-1], names[-1])
    key = ".".join(names)
    if isinstance(model, ConvNeXt):
        for flax_name, timm_name in (
            ("stem.conv.", "stem.0."),
            ("stem.norm.", "stem.1."),
            ("downsample.norm.", "downsample.0."),
            ("downsample.conv.", "downsample.1."),
        ):
            key = key.replace(flax_name, timm_name)
    return key


def timm_layout(model: nnx.Module) -> dict[str, TimmEntry]:
    """timm key -> TimmEntry for every param of a ConvNeXt or SwinTransformer."""
    if not isinstance(model, ConvNeXt | SwinTransformer):
        raise TypeError(f"no timm layout for {type(model).__name__}")
    conv_mlp = isinstance(model, ConvNeXt) and model.conv_mlp
    layout = {}
    for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = tuple(param.shape)
        key = _timm_key(model, path)
        if path[-1] == "kernel" and len(shape) == 4:
            kind, timm_shape = "conv", (shape[3], shape[2], shape[0], shape[1])
        elif path[-1] == "kernel" and len(shape) == 2:
            is_mlp = len(path) >= 3 and path[-3] == "mlp"
            kind = "conv1x1" if conv_mlp and is_mlp else "linear"
            timm_shape = (shape[1], shape[0]) + ((1, 1) if kind == "conv1x1" else ())
        else:
            kind, timm_shape = "copy", shape
        layout[key] = TimmEntry(path, key, kind, timm_shape)
    return layout


def _to_flax_layout(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        return value.transpose(2, 3, 1, 0)
    if kind == "conv1x1":
        return value[:, :, 0, 0].T
    if kind == "linear":
        return value.T
    return value


def _to_timm_layout(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        return value.transpose(3, 2, 0, 1)
    if kind == "conv1x1":
        return value.T[:, :, None, None]
    if kind == "linear":
        return value.T
    return value


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; avoid importing torch here
        value = value.detach().cpu()
        if not value.dtype.is_floating_point or value.element_size() >= 4:
            return value.numpy()
        return value.float().numpy()  # bfloat16/float16 have no (or a lossy) numpy view
    return np.asarray(value)


def read_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A timm state dict as numpy arrays, from a mapping or a file.

    Files: `.safetensors` (read with safetensors.numpy), anything else through
    `torch.load(path, map_location="cpu", weights_only=True)`, which refuses arbitrary pickled
    objects. A checkpoint dict that wraps the weights under 'state_dict' or 'model' is unwrapped.
    """
    if isinstance(source, Mapping):
        state = source
    else:
        path = os.fspath(source)
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file

            state = load_file(path)
        else:
            import torch

            state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    return {str(k): _as_numpy(v) for k, v in state.items()}


def from_timm(model: nnx.Module, source: str | os.PathLike | Mapping[str, Any]) -> nnx.State:
    """The model's params (an `nnx.State` of `nnx.Param`) filled from a timm state dict.

    Raises:
      ValueError: naming every missing, unexpected and mis-shaped key (all at once), e.g. after
        a wrong variant, a different num_classes, or a truncated/corrupted file.
    """
    state_dict = read_state_dict(source)
    layout = timm_layout(model)
    missing = sorted(set(layout) - set(state_dict))
    unexpected = sorted(
        k for k in state_dict if k not in layout and k.rsplit(".", 1)[-1] not in DERIVED_BUFFERS
    )
    misshaped = [
        f"{k}: expected {entry.timm_shape}, got {tuple(state_dict[k].shape)}"
        for k, entry in layout.items()
        if k in state_dict and tuple(state_dict[k].shape) != entry.timm_shape
    ]
    if missing or unexpected or misshaped:
        lines = [f"timm state dict does not match {type(model).__name__}:"]
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("mis-shaped keys", misshaped),
        ):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items))
        raise ValueError("\n".join(lines))

    # tree.map gives new Variable objects: the model itself is left untouched.
    params = jax.tree.map(lambda leaf: leaf, nnx.state(model, nnx.Param))
    flat = dict(nnx.to_flat_state(params))
    for key, entry in layout.items():
        target = flat[entry.path]
        value = _to_flax_layout(state_dict[key], entry.layout)
        target.set_value(jnp.asarray(value, dtype=target.dtype))
    return params


def load_timm_weights(model: nnx.Module, source: str | os.PathLike | Mapping[str, Any]):
    """Load a timm state dict (file or mapping) into `model` in place; returns the model."""
    nnx.update(model, from_timm(model, source))
    return model


def to_timm(model: nnx.Module, params: nnx.State | None = None) -> dict[str, np.ndarray]:
    """A timm state dict (numpy, float32) of `model`'s params, or of `params` laid out like it."""
    params = nnx.state(model, nnx.Param) if params is None else params
    flat = {path: np.asarray(value.get_value()) for path, value in nnx.to_flat_state(params)}
    return {
        key: np.ascontiguousarray(_to_timm_layout(flat[entry.path], entry.layout))
        for key, entry in timm_layout(model).items()
    }
