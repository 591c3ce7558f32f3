"""Diagnostics: the opposing-penalty rate R_op, per-layer norms and effective learning rates,
scale invariance detected from the forward pass, and the Jacobian norm."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lpwd_optax import _common, structure
from lpwd_optax.structure import LayerStructure


def penalties(updates: optax.Updates, regularized_updates: optax.Updates) -> optax.Updates:
    """The penalty `P = u - u'` a LAST-placed transform applied: `theta_{t+1} = theta + u - P`.

    Args:
      updates: `u`, the base optimizer's update (the transform's input).
      regularized_updates: `u'`, the transform's output.

    Returns:
      `P`, shaped like the updates.
    """
    return jax.tree.map(lambda u, r: u - r, updates, regularized_updates)


def opposing_penalty_rate(
    params: optax.Params, updates: optax.Updates, penalties: optax.Updates
) -> chex.Array:
    """R_op: the share of penalty mass that pushes weights away from zero.

    An entry receives an opposing penalty when the penalty increases its magnitude after the
    update:

    .. math::
      (\\theta_j + u_j - P_j)^2 > (\\theta_j + u_j)^2, \\qquad
      R_{op} = \\frac{\\sum_{j\\ \\mathrm{opposing}} |P_j|}{\\sum_j |P_j|}

    WD's penalty `d_t theta_t` opposes when the update has crossed zero; RWD's
    `d_t (theta_t + u_t)` never does. Returns 0 when there is no penalty at all.

    Args:
      params: `theta_t`.
      updates: `u_t`, the base optimizer's update before the penalty.
      penalties: `P_t`, e.g. from `penalties(u, u')`.

    Returns:
      A float32 scalar in [0, 1].

    Example:
      >>> import jax.numpy as jnp, lpwd_optax
      >>> theta, u = {"w": jnp.array([1.0, 1.0])}, {"w": jnp.array([-0.5, -1.5])}
      >>> p = {"w": 0.1 * theta["w"]}                      # WD's penalty
      >>> float(lpwd_optax.opposing_penalty_rate(theta, u, p))  # entry 1 crossed zero
      0.5

    References:
      "Layer-wise Pre-Weight Decay", ICLR 2024 submission (openreview), eq. 10-11.
    """
    opposing, total = jnp.zeros([], jnp.float32), jnp.zeros([], jnp.float32)
    for theta, u, p in zip(
        jax.tree.leaves(params), jax.tree.leaves(updates), jax.tree.leaves(penalties)
    ):
        moved = theta.astype(jnp.float32) + u.astype(jnp.float32)
        p = p.astype(jnp.float32)
        mass = jnp.abs(p)
        opposing += jnp.sum(jnp.where(jnp.square(moved - p) > jnp.square(moved), mass, 0.0))
        total += jnp.sum(mass)
    return jnp.where(total > 0, opposing / jnp.where(total > 0, total, 1.0), 0.0)


def module_key(path: str) -> str:
    """The module a leaf is reported under: its module (`a/b/kernel` -> `a/b`), or a leaf at
    the root under its own path (`w` -> `w`: a flat tree of kernels is not one module)."""
    return structure.module_path(path) or path


def layer_statistics(
    params: optax.Params,
    updates: optax.Updates,
    *,
    learning_rate: chex.Numeric | None = None,
    scale_invariant: Any | None = None,
    layers: LayerStructure | None = None,
) -> dict[str, dict[str, Any]]:
    """Per-module weight norm, update norm, effective step and effective learning rate.

    For a module with weights `theta` (all its leaves: kernel and bias) and final update `u`:

    .. math::
      \\mathrm{effective\\_step} = \\frac{\\|u\\|}{\\|\\theta\\|}, \\qquad
      \\mathrm{effective\\_lr} = \\frac{\\eta}{\\|\\theta\\|^2}

    If the network's output does not depend on the scale of `theta` (a normalization follows
    it, see `scale_invariant_mask`), its gradient is orthogonal to `theta` and scales as
    `1 / ||theta||`, so an SGD step of rate `eta` moves the direction `theta / ||theta||` as a
    step of rate `eta / ||theta||^2` on the unit sphere would (Zhang et al., first mechanism):
    weight decay shrinks `||theta||` and so raises this effective learning rate. For other
    modules, and for adaptive optimizers, `effective_lr` is a formula, not a rate; the
    effective step is the optimizer-independent measure. Cheap reductions: log them every N
    steps.

    Args:
      params: `theta_t`.
      updates: the final updates `u_t` (what `optax.apply_updates` adds).
      learning_rate: `eta`; if given, each module also reports `effective_lr`.
      scale_invariant: a tree of bools shaped like `params` (e.g. from `scale_invariant_mask`);
        if given, each module also reports `scale_invariant`, True when any of its leaves is.
      layers: optional `LayerStructure`: a stacked module (its leaves sliced by a scan)
        reports one value per slice, arrays over its stacked axes, slice `i` equal to what its
        unrolled twin's module `i` reports.

    Returns:
      `{module_key(path): {"weight_norm", "update_norm", "effective_step"}}`, float32 scalars (or
      arrays over a stacked module's slices), plus
      `"effective_lr"` (float32; 0 for an all-zero module, like `effective_step`) and
      `"scale_invariant"` (a Python bool) when asked for.

    Example:
      >>> import jax.numpy as jnp, lpwd_optax
      >>> stats = lpwd_optax.layer_statistics({"fc": {"kernel": jnp.ones((2, 2))}},
      ...                                     {"fc": {"kernel": jnp.full((2, 2), 0.1)}},
      ...                                     learning_rate=0.1,
      ...                                     scale_invariant={"fc": {"kernel": True}})
      >>> [round(float(stats["fc"][k]), 6) for k in ("effective_step", "effective_lr")]
      [0.1, 0.025]
      >>> stats["fc"]["scale_invariant"]
      True

    References:
      Zhang, Wang, Xu & Grosse, "Three Mechanisms of Weight Decay Regularization", ICLR 2019
      (arXiv:1810.12281).
    """
    leaves = _common.leaves_with_paths(params)
    flags = [False] * len(leaves)
    if scale_invariant is not None:
        flags = _common.flatten_like_params(scale_invariant, params, "scale_invariant")
    layouts = structure.layouts(layers, params, "layer_statistics")
    sq_w: dict[str, Any] = {}
    sq_u: dict[str, Any] = {}
    stacking: dict[str, tuple] = {}
    invariant: dict[str, bool] = {}
    for (path, theta), u, flag, layout in zip(leaves, jax.tree.leaves(updates), flags, layouts):
        key = module_key(path)
        axes = layout.slice_axes
        slices = tuple(layout.shape[a] for a in layout.stacked_axes)
        if stacking.setdefault(key, slices) != slices:
            raise ValueError(
                f"layer_statistics: '{path}' has {slices or 'no'} stacked slices, other leaves "
                f"of its module '{key}' {stacking[key] or 'none'}; they cannot be summed per "
                "slice."
            )
        sq = lambda x, axes=axes: jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axes)
        sq_w[key] = sq_w.get(key, 0.0) + sq(theta)
        sq_u[key] = sq_u.get(key, 0.0) + sq(u)
        invariant[key] = invariant.get(key, False) or bool(flag)
    stats = {}
    for key in sq_w:
        w2, u = sq_w[key], jnp.sqrt(sq_u[key])
        nonzero = w2 > 0
        safe_w2 = jnp.where(nonzero, w2, 1.0)
        w = jnp.sqrt(w2)
        stats[key] = {
            "weight_norm": w,
            "update_norm": u,
            "effective_step": jnp.where(nonzero, u / jnp.sqrt(safe_w2), 0.0),
        }
        if learning_rate is not None:
            stats[key]["effective_lr"] = jnp.where(nonzero, learning_rate / safe_w2, 0.0)
        if scale_invariant is not None:
            stats[key]["scale_invariant"] = invariant[key]
    return stats


# scale_invariant_mask's threshold. ConvNeXt-atto (LayerNorm eps 1e-6) at init: kernels followed
# by a LayerNorm measure 2e-7 to 5e-3 (the eps term), every other kernel 0.08 to 1.6.
SCALE_INVARIANCE_TOL = 0.02


def scale_sensitivity(
    apply_fn: Callable[[Any, chex.Array], chex.Array],
    params: Any,
    inputs: chex.Array,
    *,
    num_probes: int = 8,
    key: chex.PRNGKey | None = None,
    layers: LayerStructure | None = None,
) -> Any:
    """How much scaling each kernel changes the outputs, relative to changing its direction.

    A kernel's module `m` (the kernel and its bias, `theta_m`, with `d_m` entries) is scaled
    as a whole; `J_m = d f / d theta_m` is the Jacobian of every output for the batch of
    `inputs`. Scaling changes the outputs at the rate `J_m theta_m`; a random direction `v` of
    the same norm changes them by `E ||J_m v||^2 = ||theta_m||^2 ||J_m||_F^2 / d_m`. The
    sensitivity is their ratio:

    .. math::
      s_m = \\frac{\\sqrt{d_m}\\, \\|J_m \\theta_m\\|}{\\|\\theta_m\\|\\, \\|J_m\\|_F}
          \\approx \\sqrt{\\frac{d_m \\sum_k \\langle g_k, \\theta_m \\rangle^2}
          {\\|\\theta_m\\|^2 \\sum_k \\|g_k\\|^2}}, \\qquad
      g_k = J_m^\\top w_k, \\quad w_k \\sim N(0, I)

    (one `jax.vjp` per probe `w_k` gives `g_k` for every module at once). `s_m = 0` when the
    outputs do not depend on the scale of `theta_m` (`f(c theta_m) = f(theta_m)` for `c > 0`
    implies `J_m theta_m = 0`), `s_m ~ 1` when scaling is no different from any other change.
    It is `sqrt(d_m)` times the RMS cosine between `theta_m` and the output gradients, the
    quantity AdamP thresholds with the loss gradient (`cos < delta / sqrt(d)`).

    Why not compare `f(2 theta_m)` with `f(theta_m)`: the difference is also small when the
    module barely matters, e.g. every kernel inside a ConvNeXt block at init, whose output is
    multiplied by a layer scale of 1e-6; the ratio here divides that factor out. A normalization
    with an `eps` (LayerNorm, BatchNorm) is only approximately invariant: it contributes
    `s ~ eps / Var(h)` for its input `h`, larger when weight decay has shrunk the kernel.

    The model must be in evaluation mode or normalize with batch statistics that `apply_fn`
    computes from `inputs`; drop path or dropout would make the probes disagree.

    Args:
      apply_fn: `apply_fn(params, inputs) -> outputs`.
      params: the model's params (a linen params dict or an `nnx.State`).
      inputs: a batch of inputs; a few examples suffice.
      num_probes: output probes `w_k`. The estimate of `s_m^2` is about `s_m^2 chi^2_K / K`
        for `K` probes: with 8, it falls below a quarter of `s_m` with probability 2e-4.
      key: PRNG key of the probes; default `jax.random.key(0)`.
      layers: optional `LayerStructure`: the kernels are the traced ones (role "kernel"),
        and every slice of a stacked module is scaled on its own.

    Returns:
      A tree shaped like `params` of Python floats: `s_m` on every leaf with `ndim >= 2` (a
      kernel; with `layers`, every traced kernel, and for a stacked one a float array that
      broadcasts against it, one value per slice), NaN on the others and where `theta_m` or
      the gradients are zero.

    Example:
      >>> import jax, lpwd_optax
      >>> def f(p, x):  # a normalized hidden layer, then a linear read-out
      ...   h = x @ p["hidden"]["kernel"]
      ...   h = (h - h.mean(-1, keepdims=True)) / h.std(-1, keepdims=True)
      ...   return h @ p["out"]["kernel"]
      >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
      >>> params = {"hidden": {"kernel": jax.random.normal(k1, (4, 8))},
      ...           "out": {"kernel": jax.random.normal(k2, (8, 3))}}
      >>> s = lpwd_optax.scale_sensitivity(f, params, jax.random.normal(k3, (16, 4)))
      >>> s["hidden"]["kernel"] < 1e-5, 0.3 < s["out"]["kernel"] < 3
      (True, True)

    References:
      Zhang, Wang, Xu & Grosse, "Three Mechanisms of Weight Decay Regularization", ICLR 2019
      (arXiv:1810.12281); Heo et al., "AdamP" (arXiv:2006.08217) for the cosine test.
    """
    key = jax.random.key(0) if key is None else key
    leaves, treedef = jax.tree.flatten(params)
    modules = [module_key(path) for path, _ in _common.leaves_with_paths(params)]
    layouts = structure.layouts(layers, params, "scale_sensitivity")
    axes = [x.slice_axes for x in layouts]

    @jax.jit
    def radial_and_squared(params, inputs, key):
        outputs, vjp = jax.vjp(lambda p: apply_fn(p, inputs), params)

        def probe(k):
            (grads,) = vjp(jax.random.normal(k, outputs.shape, outputs.dtype))
            pairs = []
            for g, theta, a in zip(jax.tree.leaves(grads), jax.tree.leaves(params), axes):
                g, theta = g.astype(jnp.float32), theta.astype(jnp.float32)
                pairs.append((jnp.sum(g * theta, a), jnp.sum(g * g, a)))  # per slice
            return pairs

        return jax.lax.map(probe, jax.random.split(key, num_probes))  # per leaf, (probes, ...)

    sums = radial_and_squared(params, inputs, key)
    radial, squared, theta2, size = {}, {}, {}, {}
    for m, theta, (r, q), a in zip(modules, leaves, sums, axes):
        theta = np.asarray(theta, np.float64)
        radial[m] = radial.get(m, 0.0) + np.asarray(r, np.float64)
        squared[m] = squared.get(m, 0.0) + np.asarray(q, np.float64).sum(axis=0)
        theta2[m] = theta2.get(m, 0.0) + np.sum(np.square(theta), axis=a)
        size[m] = size.get(m, 0) + math.prod(theta.shape[i] for i in a)

    def sensitivity(m: str, theta: Any, layout: Any) -> Any:
        denominator = theta2[m] * squared[m]
        ok = (denominator > 0) & (layout.role == "kernel")
        safe = np.where(ok, denominator, 1.0)
        s = np.where(ok, np.sqrt(size[m] * np.sum(np.square(radial[m]), axis=0) / safe), np.nan)
        if not layout.stacked_axes:
            return float(s)
        return s.reshape([n if i in layout.stacked_axes else 1 for i, n in enumerate(theta.shape)])

    return jax.tree.unflatten(
        treedef, [sensitivity(m, t, x) for m, t, x in zip(modules, leaves, layouts)]
    )


def scale_invariant_mask(
    apply_fn: Callable[[Any, chex.Array], chex.Array],
    params: Any,
    inputs: chex.Array,
    *,
    tol: float = SCALE_INVARIANCE_TOL,
    num_probes: int = 8,
    key: chex.PRNGKey | None = None,
    layers: LayerStructure | None = None,
) -> Any:
    """Which kernels the network's outputs are (numerically) invariant to the scale of.

    A kernel is scale-invariant when `f(c theta_m) = f(theta_m)` for every `c > 0`, with
    `theta_m` the kernel and its module's bias: the case when a normalization (LayerNorm,
    BatchNorm in training mode, weight normalization) follows the module. Detected from the
    forward pass as `scale_sensitivity(...) < tol`: see there for the measure and for why it
    is not the plain relative change of the outputs.

    The default `tol = 0.02` sits between what ConvNeXt-atto gives at init for kernels followed
    by a LayerNorm (2e-7 to 5e-3; the norm's `eps` keeps it from 0) and for all others (0.08
    and up; in copies only 8 or 16 channels wide, some MLP kernels measure 0.03). A
    normalization whose input variance nears its `eps` stops being scale-invariant, and the
    mask says so. The answer holds for the params it is given: in a ConvNeXt at init, whose
    blocks are scaled by 1e-6, the downsample convolutions come out invariant too (each feeds
    the next stage's LayerNorm almost alone); with trained layer scales they do not.

    Args:
      apply_fn: `apply_fn(params, inputs) -> outputs`, in evaluation mode (or batch-statistics
        normalization computed from `inputs`).
      params: the model's params (a linen params dict or an `nnx.State`).
      inputs: a batch of inputs; a few examples suffice.
      tol: the threshold on the sensitivity.
      num_probes: output probes, see `scale_sensitivity`.
      key: PRNG key of the probes; default `jax.random.key(0)`.
      layers: optional `LayerStructure`: the traced kernels, each slice of a stacked kernel
        measured on its own; a stacked kernel is True when every slice is invariant (a
        warning names a kernel whose slices disagree).

    Returns:
      A tree of Python bools shaped like `params`: True on the scale-invariant kernels, False on
      the other kernels and on every leaf with `ndim < 2`. It fits `layer_statistics`'s
      `scale_invariant` and optax's masks.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, lpwd_optax
      >>> class Net(nn.Module):
      ...   @nn.compact
      ...   def __call__(self, x):
      ...     x = nn.LayerNorm()(nn.Dense(8, name="normalized")(x))
      ...     x = nn.relu(nn.Dense(8, name="hidden")(x))
      ...     return nn.Dense(2, name="out")(x)
      >>> x = jax.random.normal(jax.random.key(1), (16, 4))
      >>> params = Net().init(jax.random.key(0), x)["params"]
      >>> mask = lpwd_optax.scale_invariant_mask(
      ...     lambda p, x: Net().apply({"params": p}, x), params, x)
      >>> mask["normalized"]["kernel"], mask["hidden"]["kernel"], mask["out"]["kernel"]
      (True, False, False)
      >>> mask["normalized"]["bias"]
      False

    References:
      Zhang, Wang, Xu & Grosse, "Three Mechanisms of Weight Decay Regularization", ICLR 2019
      (arXiv:1810.12281); Heo et al., "AdamP" (arXiv:2006.08217).
    """
    sensitivity = scale_sensitivity(
        apply_fn, params, inputs, num_probes=num_probes, key=key, layers=layers
    )
    flat, treedef = jax.tree_util.tree_flatten_with_path(sensitivity)
    out = []
    for path, s in flat:
        below = np.asarray(s) < tol
        if below.any() and not below.all():
            warnings.warn(
                f"scale_invariant_mask: the slices of '{_common.path_str(path)}' disagree "
                f"({int(below.sum())} of {below.size} invariant); it is marked not invariant.",
                stacklevel=2,
            )
        out.append(bool(below.all()))
    return jax.tree_util.tree_unflatten(treedef, out)


class JacobianNorm(NamedTuple):
    """An estimate of the mean squared Frobenius norm of the input-output Jacobian."""

    mean: chex.Array  # the estimate, averaged over the inputs
    stderr: chex.Array  # its standard error over the random projections
    num_probes: int


def jacobian_norm(
    apply_fn: Callable[[Any, chex.Array], chex.Array],
    params: Any,
    inputs: chex.Array,
    key: chex.PRNGKey,
    *,
    num_probes: int = 8,
) -> JacobianNorm:
    """Mean over `inputs` of `||d f(x) / d x||_F^2`, estimated with random projections.

    For one input `x` with Jacobian `J` (outputs x input entries) and a probe `v ~ N(0, I)` over
    the outputs, `E ||J^T v||^2 = tr(J J^T) = ||J||_F^2`, so each probe gives an unbiased
    estimate. One `jax.vjp` of the batched function gives `J_i^T v_i` for every input at once
    (inputs must not interact in `apply_fn`: evaluation mode). The weight-decay paper of Zhang
    et al. relates this norm to the generalization effect of weight decay (its second
    mechanism).

    Args:
      apply_fn: `apply_fn(params, inputs) -> outputs`, the batch axis first on both.
      params: the model's params.
      inputs: a batch of inputs `(B, ...)`.
      key: PRNG key of the probes.
      num_probes: probes per input; the standard error is taken over the probes' batch means.

    Returns:
      A `JacobianNorm` with the estimate and its standard error (NaN for one probe).

    Example:
      >>> import jax, jax.numpy as jnp, lpwd_optax
      >>> w = jnp.array([[1.0, 2.0], [0.0, 3.0]])  # f(x) = x @ w, ||J||_F^2 = 14
      >>> est = lpwd_optax.jacobian_norm(lambda w, x: x @ w, w, jnp.ones((4, 2)),
      ...                                jax.random.key(0), num_probes=4096)
      >>> bool(abs(est.mean - 14.0) < 5 * est.stderr)
      True

    References:
      Zhang, Wang, Xu & Grosse, "Three Mechanisms of Weight Decay Regularization", ICLR 2019
      (arXiv:1810.12281).
    """
    outputs, vjp = jax.vjp(lambda x: apply_fn(params, x), inputs)
    batch = inputs.shape[0]

    def probe(k):
        v = jax.random.normal(k, outputs.shape, outputs.dtype)
        (jt_v,) = vjp(v)
        return jnp.sum(jnp.square(jt_v.astype(jnp.float32))) / batch

    samples = jax.lax.map(probe, jax.random.split(key, num_probes))
    mean = jnp.mean(samples)
    stderr = (
        jnp.std(samples, ddof=1) / jnp.sqrt(num_probes)
        if num_probes > 1
        else jnp.array(jnp.nan, jnp.float32)
    )
    return JacobianNorm(mean, stderr, num_probes)
