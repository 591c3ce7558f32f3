"""Layer-wise learning-rate decay: layers far from the output take smaller steps.

Fine-tuning recipes for pretrained vision models (BEiT, ConvNeXt, DeiT III, MAE) scale the
learning rate of layer `l` of `n` by `gamma ** (n - l)`: the head keeps the full rate and every
layer below it a factor `gamma` less than the one above, so the early layers, whose features
transfer best, move least. timm implements it as `layer_decay` (one optimizer param group per
layer, from a hand-written `group_matcher` per model). Here the layers come from the forward
pass (`layer_structure`, or any depth labels), with one layer per slice of a stacked leaf, and
the scaling is one transform.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lpwd_optax import _common, structure
from lpwd_optax.structure import LayerStructure

__all__ = ["layerwise_lr_decay", "layerwise_lr_scales"]


def _depth_leaves(layers: Any, where: str) -> tuple[list[Any], Any]:
    """Each leaf's depth (an int, or an int array over a stacked leaf's slices) and the
    tree structure, from a `LayerStructure` or a tree of depth labels."""
    if isinstance(layers, LayerStructure):
        return [x.depth for x in layers.leaves], layers.treedef
    if layers is None or _common.is_function(layers):
        raise TypeError(
            f"{where}: layers must be a LayerStructure (from layer_structure) or a tree of "
            f"depth labels (from depth_labels), got {type(layers).__name__}."
        )
    return structure.check_depths(layers)


def _exponents(depths: list[Any]) -> list[np.ndarray]:
    """`n - l` per leaf (per slice), with `n` the deepest layer: 0 for the output layer."""
    n = max(int(np.max(d)) for d in depths)
    return [np.asarray(n - np.asarray(d), np.int32) for d in depths]


def _check_matches(layers: Any, depths: list[Any], tree: Any, where: str) -> None:
    """A ValueError naming the first leaf of `tree` (params or updates) that the layers or
    depth labels were not built for."""
    if isinstance(layers, LayerStructure):
        layers.layouts_for(tree, where)
        return
    _common.flatten_like_params(layers, tree, f"{where} depths")
    for (path, leaf), depth in zip(_common.leaves_with_paths(tree), depths):
        shape = tuple(np.shape(leaf))
        fits = np.ndim(depth) <= len(shape) and all(
            d in (1, n) for d, n in zip(np.shape(depth)[::-1], shape[::-1])
        )
        if not fits:
            raise ValueError(
                f"{where}: the depths at '{path}' have shape {np.shape(depth)}, which does not "
                f"broadcast against the leaf's {shape} (one depth per slice of a stacked leaf, "
                "size 1 on the other axes, as depth_labels gives)."
            )


def _scale(
    decay: chex.Numeric, exponent: np.ndarray, min_scale: chex.Numeric, dtype: Any
) -> chex.Array:
    s = jnp.power(jnp.asarray(decay, dtype), jnp.asarray(exponent, dtype))
    return jnp.maximum(s, jnp.asarray(min_scale, dtype))


def _check_hyperparameters(decay: Any, min_scale: Any, where: str) -> None:
    _common.check_scalar_rate(decay, f"{where} decay")
    _common.check_scalar_rate(min_scale, f"{where} min_scale")
    if not isinstance(min_scale, jax.core.Tracer) and float(min_scale) > 1:
        raise ValueError(f"{where} min_scale must be <= 1, got {float(min_scale)}.")


def layerwise_lr_scales(
    layers: LayerStructure | Any, decay: chex.Numeric, *, min_scale: chex.Numeric = 0.0
) -> Any:
    """Each leaf's learning-rate multiplier `max(min_scale, decay ** (n - l))`, as a tree.

    The multipliers `layerwise_lr_decay` applies, for a table or to scale another
    transform's rate: a multiplicative decay (`real_time_weight_decay`, `pre_weight_decay`,
    LPWD) placed after `layerwise_lr_decay` decays each layer with its own scaled learning
    rate, as timm's AdamW does, when its per-leaf `rate` is multiplied by these.

    Args:
      layers: a `LayerStructure` (from `layer_structure`) or a tree of depth labels `1..n`
        (from `depth_labels`; int arrays over a stacked leaf's slices).
      decay: gamma, the factor between a layer's multiplier and the next deeper one's, >= 0.
      min_scale: a floor on every multiplier, in [0, 1] (timm's `layer_decay_min_scale`).

    Returns:
      A tree shaped like the params: a float per leaf, or a float array (shaped like the
      leaf's depths) for a stacked leaf; jax arrays when `decay` is traced.

    Example:
      >>> import lpwd_optax
      >>> lpwd_optax.layerwise_lr_scales({"stem": 1, "block": 2, "head": 3}, 0.5)
      {'block': 0.5, 'head': 1.0, 'stem': 0.25}

    References:
      Bao et al., "BEiT: BERT Pre-Training of Image Transformers" (arXiv:2106.08254), layer-wise
      learning-rate decay; timm's `param_groups_layer_decay`.
    """
    where = "layerwise_lr_scales"
    _check_hyperparameters(decay, min_scale, where)
    depths, treedef = _depth_leaves(layers, where)
    concrete = not any(isinstance(x, jax.core.Tracer) for x in (decay, min_scale))
    scales = []
    for e in _exponents(depths):
        if concrete:
            s = np.maximum(float(min_scale), float(decay) ** e.astype(np.float64))
            scales.append(s if e.ndim else float(s))
        else:
            scales.append(_scale(decay, e, min_scale, jnp.result_type(float)))
    return jax.tree_util.tree_unflatten(treedef, scales)


def layerwise_lr_decay(
    decay: chex.Numeric,
    layers: LayerStructure | Any,
    *,
    min_scale: chex.Numeric = 0.0,
) -> optax.GradientTransformation:
    """Layer-wise learning-rate decay: each layer's update scaled by `decay ** (n - l)`.

    For a leaf (or a stacked leaf's slice) at depth `l` of `n` layers:

    .. math::
      u_t \\leftarrow s_l \\, u_t, \\qquad s_l = \\max\\bigl(s_{min},\\; \\gamma^{\\,n - l}\\bigr)

    The output layer (`l = n`) keeps its update, the first layer's is scaled by
    `gamma ** (n - 1)`. This is timm's `layer_decay` with layer ids `l - 1`: timm numbers its
    layers `0..n-1` and scales layer `i`'s learning rate by `max(min_scale, gamma ** (n - 1 -
    i))`, every parameter of the layer alike (weight-decayed or not). Any `depth_labels` grouping
    may be passed; the forward pass's depths (`layer_structure`) make every module a layer, so
    a `gamma` tuned for timm's one-layer-per-block grouping decays faster here (see the guide).

    Where it goes: after the optimizer, on the update with its learning rate applied.

    - LAST, after an additive decay (`optax.adamw`, `weight_decay`, `cautious_weight_decay`):
      the decay is scaled with the update, which is timm's convention (PyTorch's AdamW decays
      each param group with the group's learning rate: `theta <- theta - s eta (lambda theta
      + m/v)`).
    - Before a transform that must see the final update (`weight_rescaling`,
      `constrained_parameter_regularization`, `real_time_weight_decay`, `pre_weight_decay`):
      those keep their own equation on the scaled update. Their decay `d_t = rate * eta_t`
      then uses the base learning rate; multiply a decay's per-leaf `rate` by
      `layerwise_lr_scales(layers, decay)` to give each layer its scaled learning rate there.

    Args:
      decay: gamma >= 0, usually 0.65-0.9; a traced value under `optax.inject_hyperparams`.
      layers: a `LayerStructure` (from `layer_structure`) or a tree of depth labels `1..n`
        shaped like the params (from `depth_labels`; int arrays over a stacked leaf's slices).
      min_scale: a floor on every multiplier, in [0, 1] (timm's `layer_decay_min_scale`).

    Returns:
      An `optax.GradientTransformation` with `optax.EmptyState`; it does not need the params.

    Example:
      >>> import jax.numpy as jnp, optax, lpwd_optax
      >>> depths = {"stem": 1, "block": 2, "head": 3}
      >>> opt = optax.chain(optax.sgd(1.0), lpwd_optax.layerwise_lr_decay(0.5, depths))
      >>> params = {k: jnp.zeros(2) for k in depths}
      >>> grads = {k: -jnp.ones(2) for k in depths}
      >>> updates, _ = opt.update(grads, opt.init(params), params)
      >>> {k: float(v[0]) for k, v in updates.items()}
      {'block': 0.5, 'head': 1.0, 'stem': 0.25}

    References:
      Bao et al., "BEiT: BERT Pre-Training of Image Transformers" (arXiv:2106.08254), layer-wise
      learning-rate decay; Clark et al., "ELECTRA" (arXiv:2003.10555); timm's
      `param_groups_layer_decay` (`create_optimizer_v2(..., layer_decay=...)`).
    """
    where = "layerwise_lr_decay"
    _check_hyperparameters(decay, min_scale, where)
    depths, _ = _depth_leaves(layers, where)
    exponents = _exponents(depths)

    def init_fn(params):
        # optax.tree_utils.tree_map_params inits with a placeholder that has no leaves.
        if params is not None and jax.tree.leaves(params):
            _check_matches(layers, depths, params, where)
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        _check_matches(layers, depths, updates, where)
        leaves, treedef = jax.tree.flatten(updates)
        scaled = []
        for u, e in zip(leaves, exponents):
            acc = jnp.promote_types(u.dtype, jnp.float32)
            scaled.append((u.astype(acc) * _scale(decay, e, min_scale, acc)).astype(u.dtype))
        return treedef.unflatten(scaled), state

    return optax.GradientTransformation(init_fn, update_fn)
