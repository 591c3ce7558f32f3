"""The method registry: each of the paper's regularizers as (base optimizer, regularizer).

A method is applied as two optax stages so the training step sees both the base optimizer's
update `u` and the regularized one `u'`, and can measure the decay's penalty `P = u - u'`
(R_op, paper eq. 10-11). The stages are kept in chain order: `Method.tx` is exactly
`optax.chain(*Method.stages)`, and its state is the tuple of the stages' states.

- decoupled decays (wd, rwd, pwd, lpwd, wrs and the LPWD controls) see the base optimizer's
  final update and go LAST: `chain(base, T)`, with `learning_rate` passed so that
  `d_t = lambda * eta`;
- gradient-side penalties (l2, adadecay) must be normalized by the base optimizer like any
  gradient, so they go FIRST: `chain(T, base)`. Their penalty is transformed by Adam and has no
  separate `P`, so R_op is not defined for them (reported as NaN / null), nor for the baseline.
  For wrs, `P` is the whole change made by the regularizer stage, i.e. the rescaling of the
  kernels (which can grow weights, and so counts as opposing) plus WD on the other leaves.

WRS (wrs, wrs_ic, wrs+adamp) rescales only the kernels that the network makes scale-invariant,
as the WRS paper does for the kernels a normalization follows: the `scale_invariant` mask the
training program detects at the start (`lo.scale_sensitivity` below the tolerance of
`lo.scale_invariant_mask`, the table in layers.txt).
Every other leaf, the remaining kernels included, gets plain WD.

Controls for what in LPWD matters (all use LPWD's depth labels and its rates
`lambda * max_scale * i / n`; `decayed layers` are the layers with a leaf in the default decay
mask, i.e. a kernel):
- lwd: decoupled WD with LPWD's per-layer rates, no pre-decay: `chain(base, weight_decay(rates))`;
- lpwd_reversed: LPWD whose decayed layers take LPWD's rates in reverse depth order (the
  shallowest decayed layer gets the deepest one's rate);
- lpwd_shuffled: LPWD whose decayed layers take LPWD's rates in a fixed random order
  (`numpy.random.default_rng(permutation_seed).permutation`, the same for every run seed);
- wd_matched: WD at one rate, the parameter-count-weighted mean of LPWD's rates over the decayed
  leaves, so the same total decay is spread uniformly.
`Method.details` records the rates these derive (the matched rate, the permutation) for the
run's config.json.

AdamP (adamp; SGDP with `--optimizer=sgdm`) needs the raw gradient as well as the update, so it
replaces the base optimizer: its first stage is the whole optimizer with its decay, the second
the identity, and R_op is not defined. `wrs+adamp` is WRS with AdamP's projected update (no
AdamP decay) as the base: kernels are rescaled, the other leaves get WD, and R_op is WRS's.

PWD and LPWD store the pre-decayed weights `phi_t`; `Method.init_params` applies the first
pre-decay and `Method.eval_params` recovers the paper's weights `theta_t`, which are what is
evaluated and exported. For every other method both are the identity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

import lpwd_optax as lo
from lpwd_optax._common import leaves_with_paths

Params = Any


class Method(NamedTuple):
    name: str
    stages: tuple[optax.GradientTransformation, optax.GradientTransformation]
    # "last": decoupled (R_op defined), "first": gradient-side, "wrap": replaces the base
    # optimizer (AdamP), "none": baseline
    placement: str
    init_params: Callable[[Params], Params]  # theta_0 -> stored params
    eval_params: Callable[[Params, Any], Params]  # (stored params, step) -> evaluated weights
    description: str  # printable summary; LPWD includes its depth table
    predecayed: bool = False  # stores pre-decayed weights phi_t (PWD/LPWD): export theta_t too
    # JSON-able numbers the method derived from the params (rates, permutations), for config.json
    details: dict[str, Any] | None = None

    @property
    def tx(self) -> optax.GradientTransformation:
        return optax.chain(*self.stages)

    @property
    def has_rop(self) -> bool:
        return self.placement == "last"


def base_optimizer(
    name: str, learning_rate: float, *, projected: bool = False, weight_decay: float = 0.0
) -> optax.GradientTransformation:
    """The paper's base optimizers: Adam (0.9, 0.999, 1e-8) or SGD with momentum 0.9.

    With `projected`, their AdamP forms (AdamP / SGDP, decaying kernels by `weight_decay`).
    """
    if name == "adam":
        if projected:
            return lo.adamp(learning_rate, 0.9, 0.999, 1e-8, weight_decay=weight_decay)
        return optax.adam(learning_rate, b1=0.9, b2=0.999, eps=1e-8)
    if name == "sgdm":
        if projected:
            return lo.sgdp(learning_rate, momentum=0.9, weight_decay=weight_decay)
        return optax.sgd(learning_rate, momentum=0.9)
    raise ValueError(f"unknown optimizer {name!r}; expected 'adam' or 'sgdm'")


def _identity(params: Params, step: Any = None) -> Params:
    del step
    return params


def _not(mask: Params) -> Params:
    return jax.tree.map(lambda m: not m, mask)


# Methods that rescale the scale-invariant kernels and so need the `scale_invariant` mask.
RESCALING_METHODS = ("wrs", "wrs_ic", "wrs+adamp")
# LPWD-style methods that need LPWD's depth labels (a layer structure of the model).
LAYERWISE_METHODS = ("lpwd", "lwd", "lpwd_reversed", "lpwd_shuffled", "wd_matched")


def _leaf_list(tree: Params) -> list[Any]:
    return jax.tree.leaves(tree, is_leaf=lambda x: x is None)


def _labels_and_rates(labels: Params, rates: Params) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each leaf's depth labels and its rates, as arrays of the labels' shape (a stacked leaf
    holds one label per slice)."""
    out = []
    for d, r in zip(jax.tree.leaves(labels), jax.tree.leaves(rates)):
        d = np.asarray(d, np.int64)
        out.append((d, np.broadcast_to(np.asarray(r, np.float64), d.shape)))
    return out


def decayed_layers(labels: Params, mask: Params) -> list[int]:
    """The depth labels, in increasing order, of the layers with at least one masked leaf."""
    found: set[int] = set()
    for d, m in zip(jax.tree.leaves(labels), jax.tree.leaves(mask)):
        if m:
            found.update(int(i) for i in np.unique(np.asarray(d)))
    return sorted(found)


def reassign_layer_rates(
    labels: Params, rates: Params, mask: Params, order: Sequence[int]
) -> tuple[Params, dict[int, int]]:
    """LPWD's rates moved between the decayed layers: layer `D[j]` takes layer `D[order[j]]`'s.

    `D` are the decayed layers in depth order (`decayed_layers`). Leaves of the other layers
    keep their rate (the mask leaves them undecayed anyway). A stacked leaf's labels and rates
    are arrays over its slices, and each slice is moved on its own.

    Returns:
      The new rate tree and the map {layer label: label whose rate it took}.
    """
    layers = decayed_layers(labels, mask)
    if sorted(order) != list(range(len(layers))):
        raise ValueError(
            f"order must be a permutation of range({len(layers)}) (one entry per decayed "
            f"layer), got {list(order)}"
        )
    pairs = _labels_and_rates(labels, rates)
    rate_of: dict[int, float] = {}
    for d, r in pairs:
        for i, v in zip(d.ravel().tolist(), r.ravel().tolist()):
            rate_of.setdefault(i, v)
    source = {layer: layers[j] for layer, j in zip(layers, order)}
    moved = lambda i, v: rate_of[source[i]] if i in source else v
    new = []
    for (d, r), old in zip(pairs, jax.tree.leaves(rates)):
        if d.ndim == 0:
            new.append(moved(int(d), old))
        else:
            new.append(np.vectorize(moved, otypes=[np.float64])(d, r))
    return jax.tree.unflatten(jax.tree.structure(labels), new), source


def mass_weighted_rate(params: Params, rates: Params, mask: Params) -> float:
    """The parameter-count-weighted mean rate over the masked leaves:
    `sum_l n_l lambda_l / sum_l n_l`, with `n_l` the number of entries of leaf `l` (of each
    slice, for a stacked leaf with one rate per slice)."""
    total = 0
    weighted = 0.0
    for theta, r, m in zip(jax.tree.leaves(params), jax.tree.leaves(rates), jax.tree.leaves(mask)):
        if m:
            total += int(np.size(theta))
            weighted += float(np.sum(np.broadcast_to(np.asarray(r, np.float64), np.shape(theta))))
    if total == 0:
        raise ValueError("mass_weighted_rate: the mask selects no leaf")
    return weighted / total


def build_method(
    name: str,
    *,
    optimizer: str,
    learning_rate: float,
    weight_decay: float,
    params: Params,
    layers: lo.LayerStructure | None = None,
    apply_fn: Callable[..., Any] | None = None,
    example_batch: Any = None,
    scale_invariant: Params | None = None,
    lpwd_max_scale: float = 2.0,
    lpwd_permutation_seed: int = 0,
    adadecay_alpha: float = 4.0,
    wrs_every: int = 1,
    wrs_mode: str = "output",
    cpr_warm_start: int = 1000,
) -> Method:
    """Builds method `name` (see `config.METHODS`) around the base optimizer.

    Args:
      name: baseline | l2 | wd | rwd | pwd | lpwd | lwd | lpwd_reversed | lpwd_shuffled |
        wd_matched | adadecay | wrs | wrs_ic | adamp | wrs+adamp.
      optimizer: adam | sgdm.
      learning_rate: the constant learning rate eta.
      weight_decay: lambda.
      params: the initial params theta_0 (used for masks and LPWD's depth labels).
      layers: LPWD and its controls: the model's `lo.layer_structure`, whose per-slice depths
        (`layers.depths`, the layers in order of first use in the forward pass) and default
        decay mask (`layers.decay_mask`) they use.
      apply_fn, example_batch: without `layers`, LPWD and its controls trace
        `apply_fn(params, example_batch)` to build it.
      scale_invariant: WRS methods only: a tree of bools shaped like `params`, True on the
        kernels the network is scale-invariant to (`lo.scale_invariant_mask`); only those are
        rescaled.
      lpwd_max_scale, lpwd_permutation_seed, adadecay_alpha, wrs_every, wrs_mode,
        cpr_warm_start: method hyperparameters (wrs_ic always uses mode "input").

    Returns:
      A `Method`.
    """
    base = base_optimizer(optimizer, learning_rate)
    lr, lam = learning_rate, weight_decay
    identity = _identity
    description = f"{name} ({optimizer}, lr={lr:g}, lambda={lam:g})"

    if name in VARIANTS:
        return _variant(name, base, optimizer, lr, lam, description, cpr_warm_start)
    if name == "baseline":
        return Method(name, (base, optax.identity()), "none", identity, identity, description)
    if name == "l2":
        return Method(
            name, (lo.l2_regularization(lam), base), "first", identity, identity, description
        )
    if name == "adadecay":
        reg = lo.adaptive_weight_decay(lam, alpha=adadecay_alpha)
        return Method(
            name,
            (reg, base),
            "first",
            identity,
            identity,
            f"{description}, alpha={adadecay_alpha:g}",
        )
    plain_decays = {"wd": lo.weight_decay, "rwd": lo.real_time_weight_decay}
    if name in plain_decays:
        reg = plain_decays[name](lam, learning_rate=lr)
        return Method(name, (base, reg), "last", identity, identity, description)
    if name == "adamp":
        optimizer_name = "AdamP" if optimizer == "adam" else "SGDP"
        full = base_optimizer(optimizer, lr, projected=True, weight_decay=lam)
        return Method(
            name,
            (full, optax.identity()),
            "wrap",
            identity,
            identity,
            f"{description}: {optimizer_name}, delta=0.1, wd_ratio=0.1",
        )
    if name in RESCALING_METHODS:
        return _rescaling_method(
            name, base, optimizer, lr, lam, params, scale_invariant, wrs_every, wrs_mode
        )
    if name not in ("pwd", *LAYERWISE_METHODS):
        raise ValueError(f"unknown method {name!r}")

    rate: Any = lam
    mask: Params = None  # PWD: the library's default decay mask
    details: dict[str, Any] = {}
    if name in LAYERWISE_METHODS:
        if layers is None:
            if apply_fn is None or example_batch is None:
                raise ValueError(
                    f"{name} needs layers (lo.layer_structure) or apply_fn and example_batch "
                    "to order the layers"
                )
            layers = lo.layer_structure(params, apply_fn, example_batch)
        labels, mask = layers.depths, layers.decay_mask
        rate = lo.layerwise_schedule(labels, lam, max_scale=lpwd_max_scale)
        description += f", max_scale={lpwd_max_scale:g}"
        num_decayed = len(decayed_layers(labels, mask))
        order: list[int] | None = None
        if name == "lpwd_reversed":
            order = list(range(num_decayed))[::-1]
        elif name == "lpwd_shuffled":
            order = [
                int(j)
                for j in np.random.default_rng(lpwd_permutation_seed).permutation(num_decayed)
            ]
            description += f", permutation_seed={lpwd_permutation_seed}"
            details["permutation_seed"] = lpwd_permutation_seed
        if order is not None:
            rate, source = reassign_layer_rates(labels, rate, mask, order)
            details["rate_taken_from_layer"] = {str(k): v for k, v in source.items()}
            description += "; decayed layers take LPWD's rates of layers " + ", ".join(
                f"{k}<-{v}" for k, v in source.items()
            )
        mean_rate = mass_weighted_rate(params, rate, mask)
        details["mass_weighted_rate"] = mean_rate
        details["mass_weighted_rate_over_lambda"] = mean_rate / lam if lam else None
        if name == "wd_matched":
            lpwd_table = lo.depth_table(params, labels, rate)
            details["matched_rate"] = mean_rate
            reg = lo.weight_decay(mean_rate, learning_rate=lr, mask=mask)
            return Method(
                name,
                (base, reg),
                "last",
                identity,
                identity,
                f"wd_matched ({optimizer}, lr={lr:g}, lambda={lam:g}): WD at {mean_rate:.6g}, "
                f"the parameter-weighted mean of LPWD's rates over the decayed leaves "
                f"({mean_rate / lam:.4f} lambda)\nLPWD's rates:\n{lpwd_table}"
                if lam
                else f"wd_matched ({optimizer}, lr={lr:g}, lambda=0): WD at 0",
                details=details,
            )
        description += (
            f"; parameter-weighted mean rate over the decayed leaves {mean_rate:.6g}\n"
            + lo.depth_table(params, labels, rate)
        )
        if name == "lwd":
            reg = lo.weight_decay(rate, learning_rate=lr, mask=mask)
            return Method(
                name, (base, reg), "last", identity, identity, description, details=details
            )
    reg = lo.pre_weight_decay(rate, learning_rate=lr, mask=mask)
    return Method(
        name,
        (base, reg),
        "last",
        lambda p: lo.pre_decay_params(p, rate, learning_rate=lr, mask=mask),
        lambda p, step: lo.evaluated_params(p, rate, step, learning_rate=lr, mask=mask),
        description,
        predecayed=True,
        details=details or None,
    )


def _is_depthwise(kernel: Any) -> bool:
    """A depthwise convolution kernel (kh, kw, 1, C): one input entry per output channel."""
    return np.ndim(kernel) == 4 and np.shape(kernel)[2] == 1


def _rescaling_method(
    name, base, optimizer, lr, lam, params, scale_invariant, wrs_every, wrs_mode
) -> Method:
    """WRS: the scale-invariant kernels are rescaled, every other leaf gets plain WD."""
    if scale_invariant is None:
        raise ValueError(
            f"{name} needs the scale_invariant mask (lo.scale_invariant_mask): it rescales only "
            "the kernels the network is scale-invariant to"
        )
    invariant = jax.tree.map(bool, scale_invariant)
    if jax.tree.structure(invariant) != jax.tree.structure(params):
        raise ValueError(f"{name}: scale_invariant must have the structure of params")
    for (path, theta), m in zip(leaves_with_paths(params), jax.tree.leaves(invariant)):
        if m and np.ndim(theta) < 2:
            raise ValueError(f"{name}: scale_invariant marks '{path}', which is not a kernel")
    if name == "wrs+adamp":
        base = base_optimizer(optimizer, lr, projected=True)
    mode = "input" if name == "wrs_ic" else wrs_mode
    rescalings = []
    if mode == "input":
        # Per input channel (WRS(IC)), except depthwise kernels (kh, kw, 1, C): with one input
        # entry per output channel, the input-channel norm is one entry and would set every
        # weight to +-1; their input and output channel are the same channel, rescaled as one.
        depthwise = jax.tree.map(lambda m, t: m and _is_depthwise(t), invariant, params)
        regular = jax.tree.map(lambda m, d: m and not d, invariant, depthwise)
        if any(jax.tree.leaves(regular)):
            rescalings.append(lo.weight_rescaling(wrs_every, mode="input", mask=regular))
        if any(jax.tree.leaves(depthwise)):
            rescalings.append(lo.weight_rescaling(wrs_every, mode="output", mask=depthwise))
    elif any(jax.tree.leaves(invariant)):
        rescalings.append(lo.weight_rescaling(wrs_every, mode=mode, mask=invariant))
    reg = optax.chain(lo.weight_decay(lam, learning_rate=lr, mask=_not(invariant)), *rescalings)
    rescaled = [
        path for (path, _), m in zip(leaves_with_paths(params), jax.tree.leaves(invariant)) if m
    ]
    return Method(
        name,
        (base, reg),
        "last",
        _identity,
        _identity,
        f"{name} ({optimizer}, lr={lr:g}, lambda={lam:g}), every={wrs_every}, mode={mode}: "
        f"rescales the {len(rescaled)} scale-invariant kernels (layers.txt), plain WD on every "
        f"other leaf\nrescaled: " + ", ".join(rescaled),
        details={"rescaled": rescaled, "mode": mode},
    )


# --------------------------------------------------------------------------------------------
# The weight-decay variants of 2023-2025

VARIANTS = ("cautious", "corrected", "adams", "cpr")


def _variant(
    name: str,
    base: optax.GradientTransformation,
    optimizer: str,
    lr: float,
    lam: float,
    description: str,
    cpr_warm_start: int,
) -> Method:
    """Cautious WD, corrected WD (AdamC) and CPR go LAST, after the base optimizer; AdamS
    reads Adam's second moment, so it replaces the base optimizer (R_op is not defined)."""
    identity = _identity
    if name == "cautious":
        reg = lo.cautious_weight_decay(lam, learning_rate=lr)
        return Method(name, (base, reg), "last", identity, identity, description)
    if name == "corrected":
        # The program's learning rate is constant, so eta_t^2 / eta_max = eta: d_t = lambda eta.
        reg = lo.corrected_weight_decay(lam, learning_rate=lr, max_learning_rate=lr)
        note = ", decay lambda * lr^2 / lr_max (= lambda * lr at a constant lr)"
        return Method(name, (base, reg), "last", identity, identity, description + note)
    if name == "adams":
        if optimizer != "adam":
            raise ValueError(
                "adams needs --optimizer=adam (AdamS reads Adam's second moment), "
                f"got {optimizer!r}"
            )
        full = lo.adams(lr, 0.9, 0.999, 1e-8, weight_decay=lam)
        note = ": AdamS, decay over sqrt(mean v_hat)"
        return Method(
            name, (full, optax.identity()), "wrap", identity, identity, description + note
        )
    if name == "cpr":
        reg = lo.constrained_parameter_regularization("warm_start", cpr_warm_start)
        note = f": CPR, kappa warm start after {cpr_warm_start} steps, mu_lr=1 (lambda unused)"
        return Method(name, (base, reg), "last", identity, identity, description + note)
    raise ValueError(f"unknown method {name!r}")
