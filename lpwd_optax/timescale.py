"""Weight decay as a timescale, and independent (learning-rate-free) decay.

Decoupled weight decay makes the weights an exponential moving average of the recent updates:
with per-step decay `d = eta * lambda`, `theta_{t+1} = (1 - d) theta_t + u_t`, whose memory is
`tau = 1 / d` iterations. Wang & Aitchison propose to choose `tau` (in iterations or, better
for transfer across dataset and batch sizes, in epochs) and derive `lambda` from it; this
module turns a timescale into the rate that the decay transforms take.

Independent weight decay, `theta <- theta - (eta_t / eta_max) lambda theta` (Loshchilov &
Hutter's original form, recommended by Wortsman et al.), needs no transform of its own: it is
`weight_decay(lambda / eta_max, learning_rate=schedule)`, whose per-step decay is
`lambda / eta_max * eta_t`.
"""

from __future__ import annotations

import numbers

import numpy as np


def _positive(value, what: str) -> float:
    if callable(value) or not isinstance(value, (numbers.Real, np.generic, np.ndarray)):
        raise TypeError(
            f"rate_from_timescale: {what} must be a number, got {type(value).__name__}."
        )
    v = float(value)
    if not (np.isfinite(v) and v > 0):
        raise ValueError(f"rate_from_timescale: {what} must be a finite number > 0, got {v}.")
    return v


def rate_from_timescale(
    timescale: float,
    *,
    learning_rate: float | None = None,
    steps_per_epoch: int | None = None,
) -> float:
    """The decay rate lambda whose moving-average timescale is `timescale`.

    The timescale of decoupled weight decay is `tau_iter = 1 / (eta * lambda)` iterations;
    in epochs, with `S` steps per epoch (dataset size over batch size),
    `tau_epoch = tau_iter / S`. So

    .. math::
      \\lambda = \\frac{1}{\\eta \\, \\tau_{\\text{iter}}}
               = \\frac{1}{\\eta \\, S \\, \\tau_{\\text{epoch}}}

    With `learning_rate=None` the result is the per-step decay itself (`eta = 1`): the rate
    for `weight_decay(rate)` without a learning rate, or for independent decay at the peak of
    the schedule (`weight_decay(rate / eta_max, learning_rate=schedule)`).

    Args:
      timescale: tau, in iterations, or in epochs when `steps_per_epoch` is given. The
        per-step decay `1 / tau_iter` must be at most 1.
      learning_rate: eta, the (peak) learning rate the decay is multiplied by; None for a
        decay not multiplied by a learning rate.
      steps_per_epoch: iterations per epoch; when given, `timescale` is in epochs.

    Returns:
      lambda, a float.

    Example:
      >>> import lpwd_optax
      >>> lpwd_optax.rate_from_timescale(1000, learning_rate=1e-3)  # 1 / (1e-3 * 1000)
      1.0
      >>> # CIFAR-10 at batch 128 (390 steps an epoch), a timescale of 10 epochs:
      >>> round(lpwd_optax.rate_from_timescale(10, learning_rate=1e-3, steps_per_epoch=390), 4)
      0.2564

    References:
      Wang & Aitchison, "How to set AdamW's weight decay as you scale model and dataset size",
      2024 (arXiv:2405.13698). Wortsman et al., "Small-scale proxies for large-scale
      Transformer training instabilities", 2023 (arXiv:2309.14322), on independent decay.
    """
    tau = _positive(timescale, "timescale")
    if steps_per_epoch is not None:
        if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, numbers.Integral):
            raise TypeError(
                f"rate_from_timescale: steps_per_epoch must be an int, got {steps_per_epoch!r}."
            )
        if steps_per_epoch < 1:
            raise ValueError(
                f"rate_from_timescale: steps_per_epoch must be >= 1, got {steps_per_epoch}."
            )
        tau *= int(steps_per_epoch)
    if tau < 1:
        raise ValueError(
            f"rate_from_timescale: a timescale of {tau} iterations is below 1; the per-step "
            "decay 1 / tau would exceed 1."
        )
    eta = 1.0 if learning_rate is None else _positive(learning_rate, "learning_rate")
    return 1.0 / (eta * tau)
