"""AdamP-style projection: no radial updates (and less decay) for scale-invariant weights.

A weight followed by a normalization layer is scale-invariant: the loss does not change when
it is multiplied by a constant, so its gradient is orthogonal to it. Momentum still carries a
radial component into the update, which only grows the weight's norm and so shrinks its
effective learning rate. AdamP (Heo et al.) detects such weights from the cosine similarity of
the gradient and the weight, removes the radial component of their update, and decays them less.

The test needs the raw gradient and the projection needs the optimizer's update, so the
projection wraps the optimizer (as `optax.masked` and `optax.MultiSteps` do) rather than
sitting before or after it in a chain.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from lpwd_optax import _common, structure
from lpwd_optax._common import MaskOrFn, Rate, ScalarOrSchedule
from lpwd_optax.structure import LayerStructure, LeafLayout

VIEWS = ("channel", "layer")


class ProjectionState(NamedTuple):
    """State of `project_scale_invariant`: the wrapped optimizer's, and a step count when the
    decay depends on the step."""

    inner_state: optax.OptState
    decay_state: _common.CountState | optax.EmptyState


def _view_axes(view: str, layout: LeafLayout) -> tuple[int, ...]:
    """The axes one vector of the view spans: "channel", one vector per output unit; "layer",
    the whole kernel (one slice of a stacked kernel)."""
    return layout.fan_in_axes if view == "channel" else layout.slice_axes


def _project_leaf(
    u: chex.Array,
    theta: chex.Array,
    g: chex.Array,
    views: Sequence[str],
    delta: float,
    eps: float,
    layout: LeafLayout,
) -> tuple[chex.Array, chex.Array]:
    """(`u` with its radial component removed in the first view that passes the test, whether
    any view passed); each slice of a stacked kernel is tested and projected on its own."""
    u, theta, g = (x.astype(jnp.float32) for x in (u, theta, g))
    layer_axes = layout.slice_axes
    out, done = u, jnp.zeros([1] * theta.ndim, bool)
    for view in views:
        axes = _view_axes(view, layout)
        norm = lambda x, axes=axes: jnp.sqrt(jnp.sum(jnp.square(x), axes, keepdims=True))
        theta_norm = norm(theta)
        cosine = jnp.abs(jnp.sum(g * theta, axes, keepdims=True)) / (
            jnp.maximum(norm(g), eps) * jnp.maximum(theta_norm, eps)
        )
        dim = math.prod(theta.shape[a] for a in axes)
        passes = jnp.max(cosine, layer_axes, keepdims=True) < delta / dim**0.5
        unit = theta / (theta_norm + eps)
        projected = u - unit * jnp.sum(unit * u, axes, keepdims=True)
        out = jnp.where(passes & ~done, projected, out)
        done = done | passes
    return out, done


def project_scale_invariant(
    inner: optax.GradientTransformation,
    *,
    weight_decay: Rate = 0.0,
    learning_rate: ScalarOrSchedule | None = None,
    delta: float = 0.1,
    wd_ratio: float = 0.1,
    eps: float = 1e-8,
    views: Sequence[str] = VIEWS,
    mask: MaskOrFn = None,
    layers: LayerStructure | None = None,
) -> optax.GradientTransformationExtraArgs:
    """AdamP's projection around an optimizer, with its decoupled weight decay.

    For each masked kernel `theta` with raw gradient `g` and inner update `u`, the views are
    tried in order ("channel": one vector per output channel; "layer": the whole kernel). The
    first view in which every vector has

    .. math::
      \\frac{|\\langle g, \\theta \\rangle|}{\\|g\\| \\, \\|\\theta\\|}
        < \\frac{\\delta}{\\sqrt{\\dim}}

    marks the kernel as scale-invariant; its update loses the radial component in that view,
    `u <- u - <theta_hat, u> theta_hat` with `theta_hat = theta / (||theta|| + eps)`, and its
    decay is scaled by `wd_ratio`:

    .. math::
      \\theta_{t+1} = \\theta_t + P(u_t) - r \\, d_t \\, \\theta_t,
      \\qquad r = \\text{wd\\_ratio if projected, else } 1,\\quad d_t = \\lambda_t \\eta_t

    Masked leaves that are not kernels (by their shapes, those with ndim < 2; with `layers`,
    those the forward pass does not use as kernels) are decayed with `r = 1` and never
    projected; unmasked leaves get `u` unchanged. Use this as the whole optimizer: it must see
    the raw gradient, so gradient transforms meant to act on the gradient (clipping) go inside
    `inner` or before it.
    Per-leaf `weight_decay` trees (from `layerwise_schedule`) decay each layer at its own rate.
    Extra arguments of `update` (`value=` for `optax.contrib.reduce_on_plateau`, `obj_fn=`
    for `optax.contrib.sophia`) go to `inner`, as optax's own wrappers pass them.

    Args:
      inner: the optimizer whose update is projected, with its learning rate applied
        (e.g. `optax.adam(lr)`).
      weight_decay: lambda; a float, a schedule or a per-leaf tree.
      learning_rate: eta; when given, `d_t = weight_decay * learning_rate(t)` (AdamW
        convention), else `d_t = weight_decay`.
      delta: the cosine threshold's numerator (AdamP's default 0.1).
      wd_ratio: the decay factor of projected kernels (AdamP's default 0.1).
      eps: guards the norms in the test and in `theta_hat`.
      views: the views to try, in order: ("channel", "layer") as in AdamP, or either alone.
      mask: which leaves are tested, projected and decayed; defaults to `default_decay_mask`,
        or with `layers` to its `decay_mask`.
      layers: optional `LayerStructure` (from `layer_structure`): the "channel" view is each
        output unit over the kernel's traced fan-in axes (any layout), the "layer" view one
        slice of a stacked kernel, and each slice is tested, projected and decayed on its own;
        only the traced kernels (and embeddings) are projected. Without it,
        `LayerStructure.from_shapes(params)`: Flax's layout, the output channel last.

    Returns:
      An `optax.GradientTransformationExtraArgs` whose state holds `inner`'s state and a
      step count when the decay depends on the step.

    Example:
      >>> import jax.numpy as jnp, optax, lpwd_optax
      >>> opt = lpwd_optax.project_scale_invariant(optax.adam(0.1))
      >>> params = {"kernel": jnp.array([[3.0, 3.0], [1.0, 1.0]])}  # two output channels
      >>> grads = {"kernel": jnp.array([[1.0, 1.0], [-3.0, -3.0]])}  # orthogonal to each
      >>> updates, _ = opt.update(grads, opt.init(params), params)
      >>> [round(x, 4) for x in updates["kernel"][:, 0].tolist()]  # Adam's is [-0.1, 0.1]
      [-0.04, 0.12]

    References:
      Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
      Scale-invariant Weights", ICLR 2021 (arXiv:2006.08217).
    """
    name = "project_scale_invariant"
    inner = optax.with_extra_args_support(inner)
    views = tuple(views)
    if not views or any(v not in VIEWS for v in views) or len(set(views)) < len(views):
        raise ValueError(f"{name}: views must be distinct names from {VIEWS}, got {views!r}.")
    for what, value in (("delta", delta), ("wd_ratio", wd_ratio), ("eps", eps)):
        _common.check_scalar_rate(value, f"{name} {what}")
    _common.check_rate(weight_decay, learning_rate, name, max_decay=1.0, strict=False)
    counted = _common.is_scheduled(weight_decay, learning_rate)
    per_layer = structure.resolve_layers(layers, mask, name)

    def resolved_for(params):
        resolved = _common.checked_resolution(
            params,
            name,
            mask=per_layer.mask,
            rate=weight_decay,
            learning_rate=learning_rate,
            max_decay=1.0,
            strict=False,
        )
        return resolved, jax.tree.structure(params).unflatten(per_layer.layouts(params))

    def init_fn(params):
        if params is None or jax.tree.leaves(params):
            resolved_for(params)
        return ProjectionState(inner.init(params), _common.init_step_state(counted))

    def update_fn(grads, state, params=None, **extra_args):
        resolved, layouts = resolved_for(params)
        updates, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
        step, decay_state = _common.step_and_advance(state.decay_state)
        decay = jax.tree.map(lambda r: _common.decay_at(r, learning_rate, step), resolved.rate)

        def rule(u, theta, d, g, layout):
            ratio = 1.0
            if layout.has_units:
                u, projected = _project_leaf(u, theta, g, views, delta, eps, layout)
                ratio = jnp.where(projected, wd_ratio, 1.0)
            return u - ratio * d * theta.astype(jnp.float32)

        updates = _common.map_masked(rule, updates, params, resolved.mask, decay, grads, layouts)
        return updates, ProjectionState(inner_state, decay_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _scale_by_adam_heo(
    b1: float, b2: float, eps: float, nesterov: bool, mu_dtype: Any | None
) -> optax.GradientTransformation:
    """Adam's direction as AdamP computes it; with nesterov, `(b1 m_t + (1 - b1) g_t) / (1 -
    b1^t)` over the bias-corrected second moment (optax's NAdam corrects the two terms with
    different powers)."""
    if not nesterov:
        return optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype)

    def init_fn(params):
        mu = otu.tree_zeros_like(params, dtype=mu_dtype)
        return optax.ScaleByAdamState(_common.init_count(), mu, otu.tree_zeros_like(params))

    def update_fn(updates, state, params=None):
        del params
        mu = otu.tree_update_moment(updates, state.mu, b1, 1)
        nu = otu.tree_update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count = optax.safe_increment(state.count)
        c1 = 1 - b1 ** count.astype(jnp.float32)
        c2 = 1 - b2 ** count.astype(jnp.float32)

        def direction(m, v, g):
            return (b1 * m + (1 - b1) * g) / c1 / (jnp.sqrt(v / c2) + eps)

        out = jax.tree.map(direction, mu, nu, updates)
        mu = otu.tree_cast(mu, mu_dtype)
        return out, optax.ScaleByAdamState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def adamp(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: Rate = 0.0,
    *,
    delta: float = 0.1,
    wd_ratio: float = 0.1,
    nesterov: bool = False,
    mu_dtype: Any | None = None,
    mask: MaskOrFn = None,
    layers: LayerStructure | None = None,
) -> optax.GradientTransformationExtraArgs:
    """AdamP: Adam with the scale-invariant projection and decoupled weight decay.

    `project_scale_invariant(adam, weight_decay=weight_decay, learning_rate=learning_rate)`,
    taking `optax.adamw`'s arguments. With `weight_decay=0` and no kernel judged
    scale-invariant it is `optax.adam`. `eps` is also the projection's eps, as in the
    reference implementation. Unlike `optax.adamw`, the default `mask` decays (and projects)
    only leaves with ndim > 1 (`default_decay_mask`).

    Args:
      learning_rate: eta, a float or a schedule.
      b1, b2, eps: Adam's hyperparameters.
      weight_decay: lambda, a float, a schedule or a per-leaf tree.
      delta, wd_ratio: the projection's threshold and decay factor (see
        `project_scale_invariant`).
      nesterov: AdamP's Nesterov form, `(b1 m_t + (1 - b1) g_t) / (1 - b1^t)` as the first
        moment.
      mu_dtype: the dtype of the first moment.
      mask: which leaves are tested, projected and decayed.
      layers: optional `LayerStructure`, see `project_scale_invariant`.

    Returns:
      An `optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp, lpwd_optax
      >>> opt = lpwd_optax.adamp(1e-3, weight_decay=1e-2)
      >>> state = opt.init({"w": jnp.ones((3, 2))})

    References:
      Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
      Scale-invariant Weights", ICLR 2021 (arXiv:2006.08217).
    """
    base = optax.chain(
        _scale_by_adam_heo(b1, b2, eps, nesterov, mu_dtype),
        optax.scale_by_learning_rate(learning_rate),
    )
    return project_scale_invariant(
        base,
        weight_decay=weight_decay,
        learning_rate=learning_rate,
        delta=delta,
        wd_ratio=wd_ratio,
        eps=eps,
        mask=mask,
        layers=layers,
    )


def sgdp(
    learning_rate: ScalarOrSchedule,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: Rate = 0.0,
    *,
    delta: float = 0.1,
    wd_ratio: float = 0.1,
    eps: float = 1e-8,
    mask: MaskOrFn = None,
    layers: LayerStructure | None = None,
) -> optax.GradientTransformationExtraArgs:
    """SGDP: SGD with momentum, the scale-invariant projection and decoupled weight decay.

    The reference implementation divides the decay by `1 - momentum`, the factor by which
    momentum amplifies a constant gradient: `d_t = weight_decay * learning_rate(t) / (1 -
    momentum)`.

    Args:
      learning_rate: eta, a float or a schedule.
      momentum: the heavy-ball coefficient, in [0, 1).
      nesterov: Nesterov momentum, `g_t + momentum * buf_t`, as in `optax.sgd`.
      weight_decay: lambda, a float, a schedule or a per-leaf tree.
      delta, wd_ratio, eps: see `project_scale_invariant`.
      mask: which leaves are tested, projected and decayed.
      layers: optional `LayerStructure`, see `project_scale_invariant`.

    Returns:
      An `optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp, lpwd_optax
      >>> opt = lpwd_optax.sgdp(0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
      >>> state = opt.init({"w": jnp.ones((3, 2))})

    References:
      Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
      Scale-invariant Weights", ICLR 2021 (arXiv:2006.08217).
    """
    _common.check_scalar_rate(momentum, "sgdp momentum", upper=1.0)
    scale = 1.0 / (1.0 - momentum)
    decay_lr = (
        (lambda t: learning_rate(t) * scale) if callable(learning_rate) else learning_rate * scale
    )
    # A concrete zero momentum keeps no trace (optax.sgd's momentum=None).
    no_momentum = not isinstance(momentum, jax.core.Tracer) and float(momentum) == 0.0
    if no_momentum or nesterov:
        base = optax.sgd(
            learning_rate, momentum=None if no_momentum else momentum, nesterov=nesterov
        )
    else:
        base = optax.chain(
            _projected_trace(momentum, VIEWS, delta, eps, mask, layers),
            optax.scale_by_learning_rate(learning_rate),
        )
    return project_scale_invariant(
        base,
        weight_decay=weight_decay,
        learning_rate=decay_lr,
        delta=delta,
        wd_ratio=wd_ratio,
        eps=eps,
        mask=mask,
        layers=layers,
    )


def _projected_trace(
    momentum: float,
    views: Sequence[str],
    delta: float,
    eps: float,
    mask: MaskOrFn,
    layers: LayerStructure | None,
) -> optax.GradientTransformation:
    """Heavy-ball momentum whose stored buffer is projected with the update.

    Without Nesterov, SGDP's update is the momentum buffer itself, and the reference
    implementation projects it in place: the radial component it removes from the update is
    removed from the momentum too. `buf_t = P(momentum * buf_{t-1} + g_t)`.
    """

    def init_fn(params):
        return optax.TraceState(trace=otu.tree_zeros_like(params))

    per_layer = structure.resolve_layers(layers, mask, "sgdp")

    def update_fn(grads, state, params=None):
        _common.require_params(params, "sgdp")
        resolved = _common.resolve(params, "sgdp", mask=per_layer.mask)
        layouts = jax.tree.structure(params).unflatten(per_layer.layouts(params))

        def leaf(g, buf, theta, m, layout):
            buf = momentum * buf + g
            if m and layout.has_units:
                buf = _project_leaf(buf, theta, g, views, delta, eps, layout)[0].astype(g.dtype)
            return buf

        trace = jax.tree.map(leaf, grads, state.trace, params, resolved.mask, layouts)
        return trace, optax.TraceState(trace=trace)

    return optax.GradientTransformation(init_fn, update_fn)
