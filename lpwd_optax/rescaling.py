"""Weight rescaling (WRS): periodically project kernels back to unit norm per channel."""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax

from lpwd_optax import _common, _ordering, structure
from lpwd_optax._common import MaskOrFn
from lpwd_optax.structure import LayerStructure, LeafLayout

_MODES = ("output", "input")


def _norm_axes(mode: str, layout: LeafLayout) -> tuple[int, ...]:
    # The axes the product contracts: all of them per output unit, or the input features alone.
    return layout.fan_in_axes if mode == "output" else layout.input_axes


def rescale_kernel(kernel: chex.Array, mode: str = "output", eps: float = 1e-12) -> chex.Array:
    """Scale `kernel` to unit L2 norm per output channel (or per (kh, kw, out) position).

    Args:
      kernel: a Flax kernel with ndim >= 2, output channel last, input channel second to last.
      mode: "output" normalizes over every axis but the last (WRS); "input" over the input
        axis only, one norm per (kh, kw, out) position (WRS(IC)).
      eps: guards all-zero channels, which stay zero.

    Returns:
      The rescaled kernel, in the kernel's dtype.
    """
    _check_mode(mode, "rescale_kernel")
    (layout,) = LayerStructure.from_shapes(kernel).leaves
    if not layout.has_units:
        raise ValueError(f"rescale_kernel needs a kernel (ndim >= 2), got shape {kernel.shape}.")
    return _rescaled(kernel, mode, layout, eps).astype(kernel.dtype)


def _rescaled(kernel: chex.Array, mode: str, layout: LeafLayout, eps: float = 1e-12) -> chex.Array:
    w = kernel.astype(jnp.float32)
    return w * _inverse_norms(w, mode, layout, eps)


def _inverse_norms(w: chex.Array, mode: str, layout: LeafLayout, eps: float = 1e-12) -> chex.Array:
    """`1 / max(||w||, eps)` per channel, shaped to broadcast against `w`: one division per
    channel, not per entry."""
    axes = _norm_axes(mode, layout)
    return 1.0 / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(w), axis=axes, keepdims=True)), eps)


def _check_mode(mode: str, name: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"{name}: mode must be one of {_MODES}, got {mode!r}.")


def _check_kernels(name: str, mask: Any, layouts: list[LeafLayout], given: bool) -> None:
    """A ValueError names the first masked leaf that is not a kernel with known fan-in axes
    (by its role in the `layers` given, or else by its shape)."""
    for m, layout in zip(jax.tree.leaves(mask), layouts):
        if not m or layout.has_units:
            continue
        if given:
            raise ValueError(
                f"{name}: '{layout.path}' is not a kernel whose fan-in axes the layer "
                f"structure shows (it has role {layout.role!r}); only kernels can be rescaled "
                "per output unit. Exclude it with `mask`."
            )
        raise ValueError(
            f"{name}: '{layout.path}' has shape {layout.shape}; only kernels (ndim >= 2) can "
            "be rescaled per channel. Exclude it with `mask`."
        )


def rescale_params(
    params: optax.Params,
    *,
    mode: str = "output",
    mask: MaskOrFn = None,
    layers: LayerStructure | None = None,
):
    """Every selected kernel of `params` rescaled to unit L2 norm per channel (`rescale_kernel`).

    WRS with no cost on the steps it skips: train with the base optimizer alone and rescale
    the params after every `every`-th update, either in the train step, after
    `optax.apply_updates`::

      params = jax.lax.cond((t + 1) % every == 0, rescale, lambda p: p, params)

    or in a jitted call of its own, `params = rescale(params)`, with
    `rescale = functools.partial(rescale_params, mode=..., mask=...)`. Both give the same
    sequence of weights as `chain(opt, weight_rescaling(every))`:
    `theta_{t+1} = rescale(theta_t + u_t)` when `(t + 1) % every == 0`, `theta_t + u_t`
    otherwise. The transform has to return an update, so its conditional sits between the
    optimizer's update and the params: XLA must write the update to memory for it and read it
    back, even on a step that skips the rescale (about 1.2x an `optax.adamw` step's bytes).
    Here the conditional takes the new params, which the step writes anyway, so a skipped step
    costs what the plain optimizer step does (experiments/bench_regularizers.py measures the
    three forms).

    Args:
      params: the param tree, after the optimizer's update.
      mode: "output" (WRS) or "input" (WRS(IC)), as in `weight_rescaling`.
      mask: a pytree of bools or a callable; defaults to `default_decay_mask` (kernels), or
        with `layers` to its decayed kernels.
      layers: optional `LayerStructure`: each output unit is normalized over the axes the
        forward pass contracts (any layout: Equinox's `(out, in)`, stacked `(L, in, out)`).
        Without it, `LayerStructure.from_shapes(params)`: Flax's layout, the output channel last.

    Returns:
      A tree like `params`: the selected kernels rescaled, every other leaf unchanged.

    Example:
      >>> import jax, jax.numpy as jnp, lpwd_optax
      >>> params = {"kernel": jnp.full((3, 2), 2.0), "bias": jnp.ones(2)}
      >>> new = jax.jit(lpwd_optax.rescale_params)(params)
      >>> round(float(jnp.linalg.norm(new["kernel"][:, 0])), 6), float(new["bias"][0])
      (1.0, 1.0)
    """
    name = "rescale_params"
    _check_mode(mode, name)
    per_layer = structure.resolve_layers(layers, mask, name, roles=("kernel",))
    resolved = _common.resolve(params, name, mask=per_layer.mask)
    layouts = per_layer.layouts(params)
    _check_kernels(name, resolved.mask, layouts, given=layers is not None)
    rule = lambda p, _, layout: _rescaled(p, mode, layout)
    per_leaf = jax.tree.structure(params).unflatten(layouts)
    return _common.map_masked(rule, params, params, resolved.mask, per_leaf)


def weight_rescaling(
    every: int,
    *,
    mode: str = "output",
    mask: MaskOrFn = None,
    layers: LayerStructure | None = None,
) -> optax.GradientTransformation:
    """Weight rescaling (WRS): after every `every`-th update, kernels get unit norm per channel.

    .. math::
      \\theta_{t+1} = \\begin{cases}
        \\mathrm{rescale}(\\theta_t + u_t) & (t + 1) \\bmod k = 0 \\\\
        \\theta_t + u_t & \\text{otherwise}
      \\end{cases}

    so the transform emits `rescale(theta + u) - theta` on those steps and `u` otherwise. In a
    network with BatchNorm after each conv the rescale does not change the function, but it
    resets the effective learning rate that a growing weight norm would shrink. Parameters
    outside the mask (norm scales, biases) are meant to get ordinary weight decay: chain a
    `weight_decay` with the complementary mask. Place it LAST in a chain. `rescale_params`
    after `optax.apply_updates` gives the same weights, and its skipped steps cost nothing.

    BatchNorm in eval mode: the function is unchanged only in train mode, where BatchNorm
    normalizes with the batch's statistics. Its running statistics were gathered at the old
    kernel scale, so right after a rescale they are stale and eval accuracy swings until they
    catch up. Re-estimate them before evaluating (forward passes in train mode over training
    batches; for a bias-free conv feeding BatchNorm, scaling channel c's running mean by its
    rescale factor and its running variance by the factor squared is exact), or leave out of
    `mask` the kernels whose output is normalized with running statistics.

    Args:
      every: k >= 1, the rescaling period in steps.
      mode: "output" (WRS: per output channel, over all other axes) or "input" (WRS(IC): per
        (kh, kw, out) position, over the input axis).
      mask: a pytree of bools or a callable; defaults to `default_decay_mask` (kernels), or
        with `layers` to its decayed kernels.
      layers: optional `LayerStructure` (from `layer_structure`): each output unit is
        normalized over the axes the forward pass contracts, whatever the layout (an Equinox
        `Linear`'s rows over `in`, a `Conv2d`'s output channels over `(in, kh, kw)`, each slice
        of a stacked kernel on its own); "input" mode over the input-feature axes. Without it,
        `LayerStructure.from_shapes(params)`: Flax's layout, the output channel last.

    Returns:
      An `optax.GradientTransformation` whose state is the step count, or empty for
      `every=1` (which rescales on every step).

    Example:
      >>> import jax.numpy as jnp, optax, lpwd_optax
      >>> opt = optax.chain(optax.sgd(0.1), lpwd_optax.weight_rescaling(1))
      >>> params = {"kernel": jnp.full((3, 2), 2.0)}
      >>> updates, _ = opt.update({"kernel": jnp.zeros((3, 2))}, opt.init(params), params)
      >>> round(float(jnp.linalg.norm((params["kernel"] + updates["kernel"])[:, 0])), 6)
      1.0

    References:
      Liu et al., "Weight Rescaling: Effective and Robust Regularization for Deep Neural
      Networks with Batch Normalization" (arXiv:2102.03497).
    """
    name = "weight_rescaling"
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"{name}: every must be an int >= 1, got {every!r}.")
    _check_mode(mode, name)
    per_layer = structure.resolve_layers(layers, mask, name, roles=("kernel",))

    def resolved_for(params):
        resolved = _common.checked_resolution(params, name, mask=per_layer.mask)
        layouts = per_layer.layouts(params)
        _check_kernels(name, resolved.mask, layouts, given=layers is not None)
        return resolved, layouts

    def init_fn(params):
        # optax.tree_utils.tree_map_params inits with a placeholder that has no leaves.
        if params is None or jax.tree.leaves(params):
            resolved_for(params)
        return _common.init_step_state(every > 1)

    def rescaled_update(u, theta, layout):
        """`(rescale(theta + u) - theta, the channels' inverse norms)`, in float32."""
        w = theta.astype(jnp.float32) + u.astype(jnp.float32)
        inverse_norms = _inverse_norms(w, mode, layout)
        return w * inverse_norms - theta, inverse_norms

    def update_fn(updates, state, params=None):
        resolved, layouts = resolved_for(params)
        step, state = _common.step_and_advance(state)
        leaves, treedef = jax.tree.flatten(updates)
        thetas = treedef.flatten_up_to(params)
        masks = treedef.flatten_up_to(resolved.mask)
        kernels = [(i, layout) for i, (m, layout) in enumerate(zip(masks, layouts)) if m]

        # Kernel by kernel (see `_ordering`): each kernel's pass waits for the previous one's
        # norms, so XLA keeps a few kernels' `theta + u` in memory at a time, not all.
        def rescale_all(leaves, thetas):
            out, token = list(leaves), None
            for i, layout in kernels:
                u = _ordering.after(leaves[i], token)
                new, inverse_norms = rescaled_update(u, thetas[i], layout)
                out[i], token = new.astype(u.dtype), _ordering.first_entry(inverse_norms)
            return out

        if every == 1:  # no conditional, which XLA could not fuse across
            return treedef.unflatten(rescale_all(leaves, thetas)), state
        due = (step + 1) % every == 0

        # A skipped step computes no norm; the update passes through the conditional, which
        # needs it in memory. On CPU one conditional per kernel, in turn, so that one or two
        # kernels' updates are in memory at a time; elsewhere one for all kernels (a GPU
        # conditional reads its predicate back to the host).
        def per_kernel(leaves, thetas, due):
            out, token = list(leaves), None
            for i, layout in kernels:
                u = _ordering.after(leaves[i], token)
                rescale = lambda u, theta, layout=layout: rescaled_update(u, theta, layout)[
                    0
                ].astype(u.dtype)
                out[i] = jax.lax.cond(due, rescale, lambda u, theta: u, u, thetas[i])
                token = _ordering.first_entry(out[i])
            return out

        def together(leaves, thetas, due):
            return jax.lax.cond(due, rescale_all, lambda leaves, thetas: leaves, leaves, thetas)

        out = jax.lax.platform_dependent(leaves, thetas, due, cpu=per_kernel, default=together)
        return treedef.unflatten(out), state

    return optax.GradientTransformation(init_fn, update_fn)
