"""The method registry: each of the paper's regularizers as (base optimizer, regularizer).

A method is applied as two optax stages so the training step sees both the base optimizer's
update `u` and the regularized one `u'`, and can measure the decay's penalty `P = u - u'`
(R_op, paper eq. 10-11). The stages are kept in chain order: `Method.tx` is exactly
`optax.chain(*Method.stages)`, and its state is the tuple of the stages' states.

- decoupled decays (wd, rwd, pwd, lpwd, wrs) see the base optimizer's final update and go
  LAST: `chain(base, T)`, with `learning_rate` passed so that `d_t = lambda * eta`;
- gradient-side penalties (l2, adadecay) must be normalized by the base optimizer like any
  gradient, so they go FIRST: `chain(T, base)`. Their penalty is transformed by Adam and has no
  separate `P`, so R_op is not defined for them (reported as NaN / null), nor for the baseline.
  For wrs, `P` is the whole change made by the regularizer stage, i.e. the rescaling of the
  kernels (which can grow weights, and so counts as opposing) plus WD on the other leaves.

AdamP (adamp; SGDP with `--optimizer=sgdm`) needs the raw gradient as well as the update, so it
replaces the base optimizer: its first stage is the whole optimizer with its decay, the second
the identity, and R_op is not defined. `wrs+adamp` is WRS with AdamP's projected update (no
AdamP decay) as the base: kernels are rescaled, the other leaves get WD, and R_op is WRS's.

PWD and LPWD store the pre-decayed weights `phi_t`; `Method.init_params` applies the first
pre-decay and `Method.eval_params` recovers the paper's weights `theta_t`, which are what is
evaluated and exported. For every other method both are the identity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

import lpwd_optax as lo

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


def build_method(
    name: str,
    *,
    optimizer: str,
    learning_rate: float,
    weight_decay: float,
    params: Params,
    apply_fn: Callable[..., Any] | None = None,
    example_batch: Any = None,
    lpwd_max_scale: float = 2.0,
    adadecay_alpha: float = 4.0,
    wrs_every: int = 1,
    wrs_mode: str = "output",
    cpr_warm_start: int = 1000,
) -> Method:
    """Builds method `name` (see `config.METHODS`) around the base optimizer.

    Args:
      name: baseline | l2 | wd | rwd | pwd | lpwd | adadecay | wrs | adamp | wrs+adamp.
      optimizer: adam | sgdm.
      learning_rate: the constant learning rate eta.
      weight_decay: lambda.
      params: the initial params theta_0 (used for masks and LPWD's depth labels).
      apply_fn, example_batch: LPWD only: `apply_fn(params, example_batch)` is traced to order
        the layers by first use in the forward pass (`lo.depth_labels`).
      lpwd_max_scale, adadecay_alpha, wrs_every, wrs_mode, cpr_warm_start: method
        hyperparameters.

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
    if name in ("wrs", "wrs+adamp"):
        # As in the WRS paper: kernels are rescaled (default mask); norm scales and biases get
        # plain WD. wrs+adamp takes AdamP's projected update as the base.
        if name == "wrs+adamp":
            base = base_optimizer(optimizer, lr, projected=True)
        kernels = lo.default_decay_mask(params)
        reg = optax.chain(
            lo.weight_decay(lam, learning_rate=lr, mask=_not(kernels)),
            lo.weight_rescaling(wrs_every, mode=wrs_mode, mask=kernels),
        )
        return Method(
            name,
            (base, reg),
            "last",
            identity,
            identity,
            f"{description}, every={wrs_every}, mode={wrs_mode}",
        )
    if name in ("pwd", "lpwd"):
        rate: Any = lam
        if name == "lpwd":
            if apply_fn is None or example_batch is None:
                raise ValueError("lpwd needs apply_fn and example_batch to order the layers")
            labels = lo.depth_labels(params, apply_fn, example_batch)
            rate = lo.layerwise_schedule(labels, lam, max_scale=lpwd_max_scale)
            description += f", max_scale={lpwd_max_scale:g}\n" + lo.depth_table(
                params, labels, rate
            )
        reg = lo.pre_weight_decay(rate, learning_rate=lr)
        return Method(
            name,
            (base, reg),
            "last",
            lambda p: lo.pre_decay_params(p, rate, learning_rate=lr),
            lambda p, step: lo.evaluated_params(p, rate, step, learning_rate=lr),
            description,
            predecayed=True,
        )
    raise ValueError(f"unknown method {name!r}")


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
