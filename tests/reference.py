"""Independent references: the papers' algorithms as literal loops in plain numpy (float64).

Nothing here imports lpwd_optax or optax. Params are flat dicts name -> np.ndarray; `decay`
says which names are decayed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Params = dict[str, np.ndarray]


def loss_grad(theta: Params, targets: Params) -> Params:
    """Gradient of sum(log cosh(theta - target)): tanh(theta - target)."""
    return {k: np.tanh(theta[k] - targets[k]) for k in theta}


class Adam:
    def __init__(self, lr: Callable[[int], float], b1=0.9, b2=0.999, eps=1e-8):
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
        self.m: Params = {}
        self.v: Params = {}

    def step(self, t: int, g: Params) -> Params:
        u = {}
        for k, gk in g.items():
            m = self.b1 * self.m.get(k, 0.0) + (1 - self.b1) * gk
            v = self.b2 * self.v.get(k, 0.0) + (1 - self.b2) * gk * gk
            self.m[k], self.v[k] = m, v
            mhat = m / (1 - self.b1 ** (t + 1))
            vhat = v / (1 - self.b2 ** (t + 1))
            u[k] = -self.lr(t) * mhat / (np.sqrt(vhat) + self.eps)
        return u


class SGDMomentum:
    def __init__(self, lr: Callable[[int], float], momentum=0.9):
        self.lr, self.momentum = lr, momentum
        self.buf: Params = {}

    def step(self, t: int, g: Params) -> Params:
        u = {}
        for k, gk in g.items():
            self.buf[k] = gk + self.momentum * self.buf.get(k, 0.0)
            u[k] = -self.lr(t) * self.buf[k]
        return u


def run(
    method: str,
    theta0: Params,
    targets: Params,
    optimizer,
    steps: int,
    rate: Callable[[str, int], float],
    lr: Callable[[int], float] | None,
    decayed: set[str],
) -> Params:
    """Literal loops of each method; `rate(name, t)` is lambda for leaf `name` at step t.

    The per-step decay is d_t = rate * lr(t) when `lr` is given, else rate.
    """
    theta = {k: np.asarray(v, np.float64).copy() for k, v in theta0.items()}

    def d(k, t):
        return rate(k, t) * (lr(t) if lr is not None else 1.0)

    for t in range(steps):
        if method == "wd":  # theta_{t+1} = theta_t + u_t - d_t theta_t
            u = optimizer.step(t, loss_grad(theta, targets))
            theta = {
                k: theta[k] + u[k] - (d(k, t) * theta[k] if k in decayed else 0.0) for k in theta
            }
        elif method == "l2":  # g <- g + lambda theta
            g = loss_grad(theta, targets)
            g = {k: g[k] + (rate(k, t) * theta[k] if k in decayed else 0.0) for k in g}
            u = optimizer.step(t, g)
            theta = {k: theta[k] + u[k] for k in theta}
        elif method == "rwd":  # theta_{t+1} = (1 - d_t)(theta_t + u_t)
            u = optimizer.step(t, loss_grad(theta, targets))
            theta = {
                k: (1 - d(k, t)) * (theta[k] + u[k]) if k in decayed else theta[k] + u[k]
                for k in theta
            }
        elif method == "pwd":  # Algorithm 2 (and 3, with per-layer rates)
            pre = {k: (1 - d(k, t)) * theta[k] if k in decayed else theta[k] for k in theta}
            u = optimizer.step(t, loss_grad(pre, targets))
            theta = {k: pre[k] + u[k] for k in theta}
        else:
            raise ValueError(method)
    return theta


def adadecay_coefficients(grad: np.ndarray, alpha: float) -> np.ndarray:
    """Nakamura & Hong eq. 8-9 for one layer, entry by entry."""
    a = np.abs(grad).ravel().astype(np.float64)
    mean = a.sum() / a.size
    std = np.sqrt(((a - mean) ** 2).sum() / a.size)
    out = np.empty_like(a)
    for j in range(a.size):
        ghat = (a[j] - mean) / std if std > 0 else 0.0
        out[j] = 2.0 / (1.0 + np.exp(-alpha * ghat))
    return out.reshape(grad.shape)


def rescale_output_channels(kernel: np.ndarray) -> np.ndarray:
    """Unit L2 norm per output channel (last axis), one channel at a time."""
    out = np.empty_like(kernel, dtype=np.float64)
    for c in range(kernel.shape[-1]):
        w = kernel[..., c].astype(np.float64)
        out[..., c] = w / np.sqrt((w * w).sum())
    return out


def opposing_penalty_rate(theta, u, p) -> float:
    opp = tot = 0.0
    for th, uu, pp in zip(np.ravel(theta), np.ravel(u), np.ravel(p)):
        if (th + uu - pp) ** 2 > (th + uu) ** 2:
            opp += abs(pp)
        tot += abs(pp)
    return opp / tot if tot > 0 else 0.0


def _cosine(a: np.ndarray, b: np.ndarray, eps: float) -> float:
    a, b = a.ravel(), b.ravel()
    return abs(float(a @ b)) / (max(np.linalg.norm(a), eps) * max(np.linalg.norm(b), eps))


def adamp_projection(
    theta: np.ndarray, grad: np.ndarray, update: np.ndarray, delta: float, eps: float
) -> tuple[np.ndarray, str | None]:
    """Heo et al.'s projection of one kernel (output channel last): channel by channel if every
    channel passes the test, else the whole kernel if it passes; returns the view used."""
    channels = theta.shape[-1]
    channel_dim = theta.size // channels
    out = np.array(update, np.float64)
    if all(
        _cosine(grad[..., c], theta[..., c], eps) < delta / np.sqrt(channel_dim)
        for c in range(channels)
    ):
        for c in range(channels):
            w = theta[..., c] / (np.linalg.norm(theta[..., c]) + eps)
            out[..., c] -= w * (w.ravel() @ out[..., c].ravel())
        return out, "channel"
    if _cosine(grad, theta, eps) < delta / np.sqrt(theta.size):
        w = theta / (np.linalg.norm(theta) + eps)
        return out - w * (w.ravel() @ out.ravel()), "layer"
    return out, None


def run_adamp(
    theta0: Params,
    grad_fn: Callable[[Params, int], Params],
    steps: int,
    *,
    lr: float,
    weight_decay: float,
    delta: float = 0.1,
    wd_ratio: float = 0.1,
    eps: float = 1e-8,
    b1: float = 0.9,
    b2: float = 0.999,
) -> tuple[Params, list[dict[str, str | None]]]:
    """AdamP (Heo et al., Algorithm 2) on every leaf; returns the params and, per step, the
    view each kernel was projected in."""
    theta = {k: np.asarray(v, np.float64).copy() for k, v in theta0.items()}
    m = {k: np.zeros_like(v) for k, v in theta.items()}
    v = {k: np.zeros_like(x) for k, x in theta.items()}
    views = []
    for t in range(1, steps + 1):
        g = grad_fn(theta, t - 1)
        used = {}
        for k in theta:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            direction = (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
            ratio, used[k] = 1.0, None
            if theta[k].ndim >= 2:
                direction, used[k] = adamp_projection(theta[k], g[k], direction, delta, eps)
                ratio = wd_ratio if used[k] else 1.0
            theta[k] = theta[k] * (1 - lr * weight_decay * ratio) - lr * direction
        views.append(used)
    return theta, views
