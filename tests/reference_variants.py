"""Independent references for the weight-decay variants: each paper's algorithm as a literal
loop in plain numpy (float64), written from the papers' update rules.

Nothing here imports lpwd_optax or optax. Params are flat dicts name -> np.ndarray; `decayed`
names the leaves that are decayed (or constrained). `grad_fn(theta, t)` gives the gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Params = dict[str, np.ndarray]


class AdamDirection:
    """Adam's direction `m_hat / (sqrt(v_hat) + eps)` (no learning rate, no sign)."""

    def __init__(self, b1=0.9, b2=0.999, eps=1e-8):
        self.b1, self.b2, self.eps = b1, b2, eps
        self.m: Params = {}
        self.v: Params = {}
        self.v_hat: Params = {}

    def step(self, t: int, g: Params) -> Params:
        out = {}
        for k, gk in g.items():
            m = self.b1 * self.m.get(k, 0.0) + (1 - self.b1) * gk
            v = self.b2 * self.v.get(k, 0.0) + (1 - self.b2) * gk * gk
            self.m[k], self.v[k] = m, v
            m_hat = m / (1 - self.b1 ** (t + 1))
            self.v_hat[k] = v / (1 - self.b2 ** (t + 1))
            out[k] = m_hat / (np.sqrt(self.v_hat[k]) + self.eps)
        return out


def _copy(theta0: Params) -> Params:
    return {k: np.asarray(v, np.float64).copy() for k, v in theta0.items()}


def cautious_adamw(
    theta0: Params, grad_fn, steps: int, lr: Callable[[int], float], wd: float, decayed: set[str]
) -> Params:
    """Chen et al. 2025, Algorithm 1: x <- x - eta_t (v + lambda I(v x >= 0) x), entrywise."""
    theta, adam = _copy(theta0), AdamDirection()
    for t in range(steps):
        v = adam.step(t, grad_fn(theta, t))
        for k in theta:
            x = theta[k]
            new = x.copy()
            for i in np.ndindex(x.shape):
                decay = wd * x[i] if (k in decayed and v[k][i] * x[i] >= 0) else 0.0
                new[i] = x[i] - lr(t) * (v[k][i] + decay)
            theta[k] = new
    return theta


def scheduled_adamw(
    theta0: Params,
    grad_fn,
    steps: int,
    lr: Callable[[int], float],
    wd: float,
    decayed: set[str],
    decay_factor: Callable[[int], float],
) -> Params:
    """AdamW whose decay multiplies theta by `1 - wd * decay_factor(t)` before the step.

    AdamC (Defazio et al. 2025): decay_factor(t) = eta_t^2 / eta_max. Independent decay
    (Loshchilov & Hutter; Wortsman et al. 2023): decay_factor(t) = eta_t / eta_max.
    """
    theta, adam = _copy(theta0), AdamDirection()
    for t in range(steps):
        v = adam.step(t, grad_fn(theta, t))
        for k in theta:
            if k in decayed:
                theta[k] = theta[k] * (1 - wd * decay_factor(t))
            theta[k] = theta[k] - lr(t) * v[k]
    return theta


def adams(
    theta0: Params, grad_fn, steps: int, lr: Callable[[int], float], wd: float, decayed: set[str]
) -> Params:
    """Xie et al. 2023, AdamS: v_bar = mean of v_hat over all params;
    theta <- theta - eta_t (m_hat / (sqrt(v_hat) + eps) + lambda / (sqrt(v_bar) + eps) theta)."""
    theta, adam = _copy(theta0), AdamDirection()
    for t in range(steps):
        v = adam.step(t, grad_fn(theta, t))
        entries = [x for k in sorted(adam.v_hat) for x in np.ravel(adam.v_hat[k])]
        v_bar = sum(entries) / len(entries)
        for k in theta:
            decay = wd / (np.sqrt(v_bar) + adam.eps) * theta[k] if k in decayed else 0.0
            theta[k] = theta[k] - lr(t) * (v[k] + decay)
    return theta


def adam_cpr(
    theta0: Params,
    grad_fn,
    steps: int,
    lr: Callable[[int], float],
    decayed: set[str],
    *,
    kappa_init: str,
    kappa_init_param: float,
    mu_lr: float,
    regularization: str,
    scale_by_lr: bool = False,
) -> Params:
    """Franke et al. (CPR), AdamCPR: after Adam's step, for each constrained matrix,
    mu <- max(0, mu + mu_lr' (R(theta) - kappa)), theta <- theta - mu grad R(theta).

    R is sum(theta^2) ("l2", mu_lr' = mu_lr / size) or the n-1 standard deviation ("std",
    mu_lr' = mu_lr). kappa: "uniform" (a constant), "dependent" (factor * R(theta_0)), or
    "warm_start" (R(theta) after the first s steps; the constraint acts from step s + 1)."""

    def stat(x):
        if regularization == "l2":
            return float(np.sum(x * x))
        mean = np.sum(x) / x.size
        return float(np.sqrt(np.sum((x - mean) ** 2) / (x.size - 1)))

    def stat_grad(x, r):
        if regularization == "l2":
            return 2 * x
        return (x - np.sum(x) / x.size) / ((x.size - 1) * r)

    theta, adam = _copy(theta0), AdamDirection()
    mu = dict.fromkeys(decayed, 0.0)
    if kappa_init == "uniform":
        kappa = dict.fromkeys(decayed, float(kappa_init_param))
    elif kappa_init == "dependent":
        kappa = {k: kappa_init_param * stat(theta[k]) for k in decayed}
    else:
        kappa = dict.fromkeys(decayed, 0.0)
    warm = int(kappa_init_param) if kappa_init == "warm_start" else 0
    for t in range(steps):
        v = adam.step(t, grad_fn(theta, t))
        step = t + 1
        for k in theta:
            theta[k] = theta[k] - lr(t) * v[k]
            if k not in decayed:
                continue
            if step > warm:
                r = stat(theta[k])
                rate = mu_lr / theta[k].size if regularization == "l2" else mu_lr
                mu[k] = max(0.0, mu[k] + rate * (r - kappa[k]))
                scale = lr(t) if scale_by_lr else 1.0
                theta[k] = theta[k] - scale * mu[k] * stat_grad(theta[k], r)
            elif step == warm:
                kappa[k] = stat(theta[k])
    return theta
