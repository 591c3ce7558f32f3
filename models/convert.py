"""timm state_dict <-> Flax params, for any model that says where its params live in timm.

A model class converts when it defines (ConvNeXt and SwinTransformer do, each in its own file,
the way each timm model file owns its `checkpoint_filter_fn`):

    timm_param(path, shape) -> (key, layout)    where a Flax param lives in timm's state dict
    timm_checkpoint_filter(state_dict, layout) -> Adapted
                                                 the checkpoint moved to the model's geometry
    TIMM_CLASSIFIER = "head.fc"                  the classifier, re-initialized on a class change
    TIMM_BUFFERS = (...)                         key suffixes timm stores that are not weights

Names: `timm_key(path)` joins a Flax path with '.', with Flax's `kernel`/`scale` leaves named
timm's `weight`; a model renames what differs (ConvNeXt's `nn.Sequential` indices).

Layouts: 'conv' kernels OIHW (torch) <-> HWIO (Flax), depthwise (C,1,k,k) <-> (k,k,1,C);
'linear' weights (out, in) <-> (in, out); 'conv1x1', a 1x1 conv computing a linear layer,
(out, in, 1, 1) <-> (in, out); 'copy' for everything else (biases, norms, layer scale, Swin's
relative position bias table).

Two ways in:
- `load_timm_weights` / `from_timm`: a checkpoint of exactly the model's geometry and classes;
  anything else is refused, naming every missing, unexpected and mis-shaped key.
- `init_from_timm` / `adapt_timm_checkpoint`: a checkpoint of another geometry, adapted as
  `timm.create_model(name, pretrained=True, patch_size=..., img_size=..., window_size=...,
  num_classes=...)` would (see the model's `timm_checkpoint_filter`), the classifier
  re-initialized when the class count differs; every adaptation is reported in one line, and
  what cannot be adapted is still refused by name.

Files are read without unpickling arbitrary objects: safetensors, or torch checkpoints through
`torch.load(..., weights_only=True)`.

Example:
    model = models.create_model("convnext_tiny_cifar", num_classes=100)
    for line in models.init_from_timm(model, "convnext_tiny.fb_in22k.safetensors"):
        print(line)   # stem.0.weight: 4x4 patch kernel resampled to 2x2 ..., head.fc: ...
    sd = models.to_timm(model)   # back to a timm state dict of numpy arrays
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lpwd_optax.models.resample import resample_patch_kernel


class TimmEntry(NamedTuple):
    """Where one Flax param lives in a timm state dict, and how its layout changes."""

    path: tuple  # Flax param path, e.g. ('stages', 0, 'blocks', 1, 'mlp', 'fc1', 'kernel')
    key: str  # timm key, e.g. 'stages.0.blocks.1.mlp.fc1.weight'
    layout: str  # 'conv' (OIHW<->HWIO), 'linear' ((out,in)<->(in,out)), 'conv1x1' or 'copy'
    timm_shape: tuple[int, ...]


class Adapted(NamedTuple):
    """A timm state dict moved to a model's geometry."""

    state_dict: dict[str, np.ndarray]  # timm keys and layouts, the model's shapes
    kept: tuple[str, ...]  # model keys the checkpoint cannot fill: they keep the model's init
    notes: tuple[str, ...]  # one line per adaptation made


def timm_key(path: tuple) -> str:
    """The timm key of a Flax param path, before any model-specific renaming."""
    names = [str(p) for p in path]
    names[-1] = {"kernel": "weight", "scale": "weight"}.get(names[-1], names[-1])
    return ".".join(names)


def default_layout(path: tuple, shape: tuple[int, ...]) -> str:
    """'conv' for 4-d kernels, 'linear' for 2-d ones, 'copy' for the rest."""
    if path[-1] == "kernel":
        return {4: "conv", 2: "linear"}.get(len(shape), "copy")
    return "copy"


def _timm_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    if layout == "conv":
        return (shape[3], shape[2], shape[0], shape[1])
    if layout == "linear":
        return (shape[1], shape[0])
    if layout == "conv1x1":
        return (shape[1], shape[0], 1, 1)
    return shape


def timm_layout(model: nnx.Module) -> dict[str, TimmEntry]:
    """timm key -> TimmEntry for every param of a model that defines `timm_param`."""
    if not hasattr(model, "timm_param"):
        raise TypeError(f"no timm layout for {type(model).__name__}")
    layout = {}
    for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = tuple(param.shape)
        key, kind = model.timm_param(path, shape)
        layout[key] = TimmEntry(path, key, kind, _timm_shape(shape, kind))
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


def resample_patch_entry(
    state_dict: dict[str, np.ndarray], layout: Mapping[str, TimmEntry], key: str
) -> str | None:
    """Resamples a patch-embedding kernel `state_dict[key]` (in place) to the model's patch
    size; returns the one-line note, or None when the key is absent or already fits."""
    if key not in state_dict or key not in layout:
        return None
    old, new = state_dict[key].shape, layout[key].timm_shape
    if old[:2] != new[:2] or old[2:] == new[2:]:
        return None
    state_dict[key] = resample_patch_kernel(state_dict[key], new[2:])
    return (
        f"{key}: {old[2]}x{old[3]} patch kernel resampled to {new[2]}x{new[3]} "
        "(pseudo-inverse of a bicubic resize)"
    )


def read_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A timm state dict as numpy arrays, from a mapping or a file.

    Files: `.safetensors` (read with safetensors.numpy), anything else through
    `torch.load(path, map_location="cpu", weights_only=True)`, which refuses arbitrary pickled
    objects. A checkpoint dict that wraps the weights under 'state_dict' or 'model' is unwrapped.

    Raises:
      FileNotFoundError: no such file.
      ValueError: in one line, for a file that is not one of these (truncated, corrupted, or a
        pickle that needs arbitrary code to load).
    """
    if isinstance(source, Mapping):
        state = source
    else:
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no checkpoint file {path}")
        safetensors = path.endswith(".safetensors")
        try:
            if safetensors:
                from safetensors.numpy import load_file

                state = load_file(path)
            else:
                import torch

                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            kind = "safetensors" if safetensors else "a torch file with weights_only=True"
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"cannot read {path} as {kind}: {reason}") from e
    for wrapper in ("state_dict", "model"):
        if isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    return {str(k): _as_numpy(v) for k, v in state.items()}


def from_timm(
    model: nnx.Module,
    source: str | os.PathLike | Mapping[str, Any],
    *,
    keep: Collection[str] = (),
) -> nnx.State:
    """The model's params (an `nnx.State` of `nnx.Param`) filled from a timm state dict.

    Args:
      model: a model that defines `timm_param` (it is not modified).
      source: a state dict or a file (see `read_state_dict`) of exactly the model's shapes.
      keep: timm keys the state dict may lack; those params keep the model's values.

    Raises:
      ValueError: naming every missing, unexpected and mis-shaped key (all at once), e.g. after
        a wrong variant, a different num_classes, or a truncated/corrupted file.
    """
    state_dict = read_state_dict(source)
    layout = timm_layout(model)
    buffers = tuple(getattr(model, "TIMM_BUFFERS", ()))
    missing = sorted(set(layout) - set(state_dict) - set(keep))
    unexpected = sorted(
        k for k in state_dict if k not in layout and k.rsplit(".", 1)[-1] not in buffers
    )
    misshaped = [
        f"{k}: expected {entry.timm_shape}, got {tuple(state_dict[k].shape)}"
        for k, entry in layout.items()
        if k in state_dict and tuple(state_dict[k].shape) != entry.timm_shape
    ]
    if missing or unexpected or misshaped:
        problems = [
            f"{title} ({len(items)}): " + ", ".join(items)
            for title, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("mis-shaped keys", misshaped),
            )
            if items
        ]
        raise ValueError(
            f"timm state dict does not match {type(model).__name__}: " + "; ".join(problems)
        )

    # tree.map gives new Variable objects: the model itself is left untouched.
    params = jax.tree.map(lambda leaf: leaf, nnx.state(model, nnx.Param))
    flat = dict(nnx.to_flat_state(params))
    for key, entry in layout.items():
        if key not in state_dict:
            continue
        target = flat[entry.path]
        value = _to_flax_layout(state_dict[key], entry.layout)
        target.set_value(jnp.asarray(value, dtype=target.dtype))
    return params


def load_timm_weights(model: nnx.Module, source: str | os.PathLike | Mapping[str, Any]):
    """Load a timm state dict (file or mapping) into `model` in place; returns the model."""
    nnx.update(model, from_timm(model, source))
    return model


def _adapt_classifier(
    state_dict: dict[str, np.ndarray], layout: dict[str, TimmEntry], classifier: str
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Drops a classifier of another class count (timm's `load_pretrained` does the same)."""
    keys = [k for k in (f"{classifier}.weight", f"{classifier}.bias") if k in layout]
    shapes = {k: tuple(state_dict[k].shape) for k in keys if k in state_dict}
    if shapes and all(shape == layout[k].timm_shape for k, shape in shapes.items()):
        return (), ()
    classes = layout[keys[0]].timm_shape[0]
    if shapes:
        found = next(iter(shapes.values()))[0]
        for k in shapes:
            del state_dict[k]
        reason = f"the checkpoint has {found} classes, the model {classes}"
    else:
        reason = "the checkpoint has no classifier"
    note = f"{classifier}: {reason}: classifier left at the model's initialization"
    return tuple(keys), (note,)


def adapt_timm_checkpoint(
    model: nnx.Module, source: str | os.PathLike | Mapping[str, Any]
) -> Adapted:
    """A timm checkpoint moved to `model`'s geometry and classes, without touching the model.

    The model's `timm_checkpoint_filter` resamples what its geometry changes (patch size,
    window size, image size); a classifier of another class count is dropped and the model's
    own (freshly initialized) classifier kept, as timm does when `num_classes` differs.
    """
    state_dict = read_state_dict(source)
    layout = timm_layout(model)
    adapted = model.timm_checkpoint_filter(state_dict, layout)
    state_dict = dict(adapted.state_dict)
    kept, notes = _adapt_classifier(state_dict, layout, model.TIMM_CLASSIFIER)
    return Adapted(state_dict, adapted.kept + kept, adapted.notes + notes)


def init_from_timm(model: nnx.Module, source: str | os.PathLike | Mapping[str, Any]) -> list[str]:
    """Load a timm checkpoint of any geometry into `model` in place, for fine-tuning.

    Args:
      model: a ConvNeXt or SwinTransformer (any model defining the timm hooks).
      source: a timm state dict or a file (safetensors, or torch through weights_only=True).

    Returns:
      The adaptations made, one line each (empty when the checkpoint matched as it was).

    Raises:
      ValueError: naming the keys that could not be adapted (another variant, other channels).
    """
    adapted = adapt_timm_checkpoint(model, source)
    nnx.update(model, from_timm(model, adapted.state_dict, keep=adapted.kept))
    return list(adapted.notes)


def to_timm(model: nnx.Module, params: nnx.State | None = None) -> dict[str, np.ndarray]:
    """A timm state dict (numpy, float32) of `model`'s params, or of `params` laid out like it."""
    params = nnx.state(model, nnx.Param) if params is None else params
    flat = {path: np.asarray(value.get_value()) for path, value in nnx.to_flat_state(params)}
    return {
        key: np.ascontiguousarray(_to_timm_layout(flat[entry.path], entry.layout))
        for key, entry in timm_layout(model).items()
    }
