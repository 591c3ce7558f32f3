"""The weight-decay variants (cautious, corrected/AdamC, independent decay and its timescale,
stable/AdamS, CPR) against literal numpy loops of the papers' algorithms, and against the
authors' PyTorch code where a package implements it (marker `timm`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lpwd_optax as lo
from tests import reference_variants as ref

PEAK = 1e-2
# Warm-up then cosine decay: the learning rate moves on every one of the 20 steps.
SCHEDULE = optax.warmup_cosine_decay_schedule(0.0, PEAK, 4, 20, end_value=1e-3)
DECAYED = {"conv/kernel", "fc/kernel"}  # what the default mask decays


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "conv": {
            "kernel": rng.normal(size=(3, 3, 4, 8)).astype(np.float32),
            "bias": rng.normal(size=(8,)).astype(np.float32),
        },
        "fc": {
            "kernel": rng.normal(size=(8, 5)).astype(np.float32),
            "bias": rng.normal(size=(5,)).astype(np.float32),
        },
    }


def _flat(tree):
    return {k: np.asarray(v, np.float64) for k, v in lo._common.leaves_with_paths(tree)}


# Targets larger than the initial weights: the norms grow, so the CPR bounds get violated.
_TARGETS = {
    k: 2 * v + w for (k, v), w in zip(_flat(_params()).items(), _flat(_params(seed=7)).values())
}


def _grad_fn(theta, t):
    """Gradient of sum(log cosh(theta - target)) plus a step-dependent noise, so that the
    updates change sign from step to step (the cautious mask and Adam's moments see both)."""
    rng = np.random.default_rng(500 + t)
    return {
        k: np.tanh(theta[k] - _TARGETS[k]) + 0.3 * rng.normal(size=theta[k].shape)
        for k in sorted(theta)
    }


def _run(opt, steps=20, params=None):
    params = jax.tree.map(jnp.asarray, params or _params())
    treedef = jax.tree.structure(params)
    state = opt.init(params)
    update = jax.jit(opt.update)
    for t in range(steps):
        g = _grad_fn(_flat(params), t)
        grads = treedef.unflatten([jnp.asarray(g[k], jnp.float32) for k in _flat(params)])
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return _flat(params), state


def _assert_close(got, want, rtol=1e-5, atol=1e-6):
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol, err_msg=k)


def _max_diff(a, b):
    return max(np.abs(a[k] - b[k]).max() for k in a)


# ------------------------------------------------------------------------------------------
# Cautious weight decay


def test_cautious_weight_decay_follows_the_paper():
    wd = 2.0
    want = ref.cautious_adamw(_flat(_params()), _grad_fn, 20, SCHEDULE, wd, DECAYED)
    opt = optax.chain(optax.adam(SCHEDULE), lo.cautious_weight_decay(wd, learning_rate=SCHEDULE))
    got, _ = _run(opt)
    _assert_close(got, want)
    # The mask mattered: plain decoupled decay and no decay both end elsewhere.
    plain, _ = _run(optax.chain(optax.adam(SCHEDULE), lo.weight_decay(wd, learning_rate=SCHEDULE)))
    none, _ = _run(optax.adam(SCHEDULE))
    assert _max_diff(plain, want) > 1e-3 and _max_diff(none, want) > 1e-3


def test_cautious_weight_decay_decays_only_where_the_step_shrinks_the_weight():
    params = {"w": jnp.array([[2.0, 2.0, -2.0, -2.0, 3.0]])}
    u = {"w": jnp.array([[-1.0, 1.0, 1.0, -1.0, 0.0]])}
    mask = {"w": True}  # a (1, 5) leaf: the default mask (axes of size > 1) would skip it
    out, _ = lo.cautious_weight_decay(0.25, mask=mask).update(u, optax.EmptyState(), params)
    # Decayed where u * theta <= 0 (entries 0, 2 and the zero update), not where it is > 0.
    np.testing.assert_allclose(out["w"], [[-1.5, 1.0, 1.5, -1.0, -0.75]])


# ------------------------------------------------------------------------------------------
# Corrected weight decay (AdamC) and independent decay


def test_corrected_weight_decay_follows_adamc():
    wd = 4.0
    factor = lambda t: float(SCHEDULE(t)) ** 2 / PEAK
    want = ref.scheduled_adamw(_flat(_params()), _grad_fn, 20, SCHEDULE, wd, DECAYED, factor)
    got, _ = _run(lo.adamc(SCHEDULE, weight_decay=wd, max_learning_rate=PEAK))
    _assert_close(got, want)
    adamw = lambda t: float(SCHEDULE(t))
    plain = ref.scheduled_adamw(_flat(_params()), _grad_fn, 20, SCHEDULE, wd, DECAYED, adamw)
    assert _max_diff(plain, want) > 1e-3  # the correction mattered


def test_corrected_weight_decay_with_a_constant_learning_rate_is_weight_decay():
    for peak in (None, 1e-2):
        got, _ = _run(lo.adamc(1e-2, weight_decay=0.5, max_learning_rate=peak))
        want, _ = _run(optax.chain(optax.adam(1e-2), lo.weight_decay(0.5, learning_rate=1e-2)), 20)
        _assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_corrected_weight_decay_bad_arguments_are_named():
    with pytest.raises(ValueError, match="pass max_learning_rate"):
        lo.corrected_weight_decay(0.1, learning_rate=SCHEDULE)
    for peak in (0.0, -1e-3):
        with pytest.raises(ValueError, match="max_learning_rate must be > 0"):
            lo.corrected_weight_decay(0.1, learning_rate=SCHEDULE, max_learning_rate=peak)
    with pytest.raises(ValueError, match="rate must be a finite number >= 0"):
        lo.corrected_weight_decay(-0.1, learning_rate=1e-3)
    with pytest.raises(ValueError, match="per-step decay"):
        lo.corrected_weight_decay(300.0, learning_rate=1e-1, max_learning_rate=1e-2)


def test_independent_decay_is_weight_decay_with_the_rate_over_the_peak():
    wd = 0.05  # per step at the peak learning rate
    factor = lambda t: float(SCHEDULE(t)) / PEAK
    want = ref.scheduled_adamw(_flat(_params()), _grad_fn, 20, SCHEDULE, wd, DECAYED, factor)
    opt = optax.chain(optax.adam(SCHEDULE), lo.weight_decay(wd / PEAK, learning_rate=SCHEDULE))
    got, _ = _run(opt)
    _assert_close(got, want)


def test_rate_from_timescale_is_the_moving_average_timescale():
    eta, tau = 1e-2, 200
    rate = lo.rate_from_timescale(tau, learning_rate=eta)
    assert rate == pytest.approx(1 / (eta * tau))
    # With no update, tau steps shrink the weights by (1 - 1/tau)^tau, about 1/e.
    tx = lo.weight_decay(rate, learning_rate=eta)
    theta = {"w": jnp.ones((2, 2))}
    zero = {"w": jnp.zeros((2, 2))}
    for _ in range(tau):
        u, _ = tx.update(zero, optax.EmptyState(), theta)
        theta = optax.apply_updates(theta, u)
    np.testing.assert_allclose(theta["w"], (1 - 1 / tau) ** tau, rtol=1e-4)
    assert abs(float(theta["w"][0, 0]) - np.exp(-1)) < 2e-3
    # In epochs: tau_iter = tau_epoch * steps_per_epoch; without a learning rate, d = 1 / tau.
    assert lo.rate_from_timescale(4, learning_rate=eta, steps_per_epoch=50) == pytest.approx(rate)
    assert lo.rate_from_timescale(tau) == pytest.approx(1 / tau)


def test_rate_from_timescale_bad_arguments_are_named():
    with pytest.raises(ValueError, match="timescale must be a finite number > 0"):
        lo.rate_from_timescale(0)
    with pytest.raises(ValueError, match="below 1"):
        lo.rate_from_timescale(0.5)
    with pytest.raises(ValueError, match="learning_rate must be a finite number > 0"):
        lo.rate_from_timescale(10, learning_rate=-1e-3)
    with pytest.raises(TypeError, match="learning_rate must be a number"):
        lo.rate_from_timescale(10, learning_rate=SCHEDULE)
    with pytest.raises(ValueError, match="steps_per_epoch must be >= 1"):
        lo.rate_from_timescale(10, steps_per_epoch=0)
    with pytest.raises(TypeError, match="steps_per_epoch must be an int"):
        lo.rate_from_timescale(10, steps_per_epoch=2.5)


# ------------------------------------------------------------------------------------------
# Stable weight decay (AdamS)


def test_stable_weight_decay_follows_adams():
    wd = 0.05
    want = ref.adams(_flat(_params()), _grad_fn, 20, SCHEDULE, wd, DECAYED)
    got, _ = _run(lo.adams(SCHEDULE, weight_decay=wd))
    _assert_close(got, want)
    plain, _ = _run(optax.chain(optax.adam(SCHEDULE), lo.weight_decay(wd, learning_rate=SCHEDULE)))
    assert _max_diff(plain, want) > 1e-3  # the 1 / sqrt(mean v_hat) scale mattered
    # The wrapper around a user's Adam is the alias.
    wrapped, _ = _run(
        lo.stable_weight_decay(optax.adam(SCHEDULE), wd, b2=0.999, learning_rate=SCHEDULE)
    )
    _assert_close(wrapped, got, rtol=0, atol=0)


def test_stable_weight_decay_says_what_it_needs_of_the_inner_optimizer():
    params = jax.tree.map(jnp.asarray, _params())
    for inner, found in (
        (optax.sgd(0.1, momentum=0.9), 0),
        (optax.chain(optax.adam(0.1), optax.adam(0.1)), 2),
    ):
        tx = lo.stable_weight_decay(inner, 0.1, b2=0.999)
        with pytest.raises(ValueError, match=rf"a step `count` and a tree `nu`.*found {found}"):
            tx.init(params)
    with pytest.raises(ValueError, match="weight_decay rate must be a finite number >= 0"):
        lo.adams(1e-3, weight_decay=-1.0)
    with pytest.raises(ValueError, match=r"b2 must be < 1\.0"):
        lo.stable_weight_decay(optax.adam(1e-3), 0.1, b2=1.0)
    # Inside inject_hyperparams the Adam state is still found.
    inner = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
    tx = lo.stable_weight_decay(inner, 0.05, b2=0.999, learning_rate=1e-2)
    got, _ = _run(tx)
    want, _ = _run(lo.adams(1e-2, weight_decay=0.05))
    _assert_close(got, want, atol=1e-5)  # inject_hyperparams' float32 learning rate


# ------------------------------------------------------------------------------------------
# Constrained parameter regularization (CPR)

CPR_CASES = {
    # (kappa_init, kappa_init_param, regularization): a bound that is violated in 20 steps.
    "uniform-l2": ("uniform", 20.0, "l2"),
    "uniform-std": ("uniform", 0.8, "std"),
    "warm_start-l2": ("warm_start", 5, "l2"),
    "warm_start-std": ("warm_start", 5, "std"),
    "dependent-l2": ("dependent", 0.9, "l2"),
    "dependent-std": ("dependent", 0.9, "std"),
}


@pytest.mark.parametrize("scale_by_lr", [False, True])
@pytest.mark.parametrize("case", CPR_CASES)
def test_cpr_follows_the_paper(case, scale_by_lr):
    kappa_init, param, reg = CPR_CASES[case]
    mu_lr = 50.0 if scale_by_lr else 0.05
    kw = dict(kappa_init=kappa_init, kappa_init_param=param, mu_lr=mu_lr, regularization=reg)
    want = ref.adam_cpr(
        _flat(_params()), _grad_fn, 20, SCHEDULE, DECAYED, scale_by_lr=scale_by_lr, **kw
    )
    got, state = _run(lo.cpr(SCHEDULE, scale_by_learning_rate=scale_by_lr, **kw))
    _assert_close(got, want)
    assert state[1].multiplier.shape == (4,)  # one multiplier per leaf, no param-sized buffer
    unconstrained, _ = _run(optax.adam(SCHEDULE))
    assert _max_diff(unconstrained, want) > 1e-4  # the bound acted


def test_cpr_warm_start_sets_the_bound_from_the_weights_at_step_s():
    tx = lo.constrained_parameter_regularization("warm_start", 3, regularization="std")
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(4, 4)), jnp.float32)}
    state = tx.init(params)
    zero = {"w": jnp.zeros((4, 4))}
    for _ in range(3):
        u, state = tx.update(zero, state, params)
        np.testing.assert_array_equal(u["w"], 0.0)  # no pull before step s + 1
        assert float(state.multiplier[0]) == 0.0
    np.testing.assert_allclose(state.bound[0], np.std(np.asarray(params["w"]), ddof=1), rtol=1e-6)


def test_cpr_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"kappa_init must be one of .*'inflection_point'"):
        lo.constrained_parameter_regularization("inflection_point")
    with pytest.raises(ValueError, match="regularization must be one of"):
        lo.constrained_parameter_regularization("uniform", 1.0, regularization="l1")
    with pytest.raises(ValueError, match="number of warm-up steps, an int >= 1"):
        lo.constrained_parameter_regularization("warm_start", 2.5)
    with pytest.raises(ValueError, match="number of warm-up steps, an int >= 1"):
        lo.constrained_parameter_regularization("warm_start", 0)
    with pytest.raises(ValueError, match="kappa_init_param must be a finite number >= 0"):
        lo.constrained_parameter_regularization("uniform", -1.0)
    with pytest.raises(ValueError, match="mu_lr must be a finite number >= 0"):
        lo.constrained_parameter_regularization("uniform", 1.0, mu_lr=-1.0)
    every = lambda p: jax.tree.map(lambda _: True, p)
    tx = lo.constrained_parameter_regularization("uniform", 1.0, regularization="std", mask=every)
    with pytest.raises(ValueError, match=r"'w' has shape \(1,\); the std needs at least 2"):
        tx.init({"w": jnp.ones((1,))})


# ------------------------------------------------------------------------------------------
# The authors' PyTorch code: 20 steps of a small conv + dense model

PARITY_RTOL, PARITY_ATOL = 1e-10, 1e-12


def _schedule64(peak):
    """Warm-up then cosine decay, written so that it is float64 under x64 (optax's schedules
    return float32, whose rounding would be all the comparison sees)."""
    cosine = lambda t: peak * (0.1 + 0.45 * (1 + jnp.cos(jnp.pi * (t - 4) / 16)))
    return lambda t: jnp.where(t < 4, peak * t / 4, cosine(t))


def _torch_model(torch):
    torch.manual_seed(0)
    conv, fc = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Linear(4, 5)
    return torch.nn.ModuleDict({"conv": conv, "fc": fc}).double()


def _torch_forward(torch, model, x):
    h = torch.relu(model["conv"](x)).mean(dim=(2, 3))
    return model["fc"](h)


def _jax_params(model):
    conv, fc = model["conv"], model["fc"]
    t = lambda p: jnp.asarray(p.detach().numpy())
    return {
        "conv": {"kernel": t(conv.weight).transpose(2, 3, 1, 0), "bias": t(conv.bias)},
        "fc": {"kernel": t(fc.weight).T, "bias": t(fc.bias)},
    }


def _jax_loss(params, x, labels):
    h = jax.lax.conv_general_dilated(
        x, params["conv"]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    h = jax.nn.relu(h + params["conv"]["bias"]).mean(axis=(1, 2))
    logits = h @ params["fc"]["kernel"] + params["fc"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _batch(t):
    rng = np.random.default_rng(900 + t)
    return rng.normal(size=(8, 8, 8, 3)), rng.integers(0, 5, size=8)


def _train_both(torch, make_torch_opt, opt, schedule=None, steps=20):
    """(ours, theirs) after `steps` steps from the same init and batches, as flat numpy dicts
    in the JAX layout; `schedule(t)` sets the torch groups' learning rate at step t.

    Both sides run in float64, so that what is compared is the optimizers' arithmetic, not
    the float32 rounding of two convolution implementations (which 20 Adam steps amplify)."""
    with jax.enable_x64(True):
        model = _torch_model(torch)
        params = _jax_params(model)
        torch_opt = make_torch_opt(model)
        state = opt.init(params)
        grad_fn = jax.jit(jax.grad(_jax_loss))
        update = jax.jit(opt.update)
        for t in range(steps):
            x, labels = _batch(t)
            if schedule is not None:
                for group in torch_opt.param_groups:
                    group["lr"] = float(schedule(t))
            torch_opt.zero_grad()
            logits = _torch_forward(torch, model, torch.tensor(x.transpose(0, 3, 1, 2)))
            torch.nn.functional.cross_entropy(logits, torch.tensor(labels)).backward()
            torch_opt.step()
            grads = grad_fn(params, jnp.asarray(x), jnp.asarray(labels))
            updates, state = update(grads, state, params)
            params = optax.apply_updates(params, updates)
        assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(params))
        return _flat(params), _flat(_jax_params(model))


def _groups(model):
    """timm's split: ndim > 1 weights decayed, biases not (our default mask)."""
    params = list(model.parameters())
    return [p for p in params if p.ndim > 1], [p for p in params if p.ndim <= 1]


@pytest.mark.timm
def test_adamc_matches_timm():
    torch = pytest.importorskip("torch")
    timm_optim = pytest.importorskip("timm.optim")
    wd = 2.0
    make = lambda m: timm_optim.create_optimizer_v2(m, opt="adamc", lr=PEAK, weight_decay=wd)
    ours, theirs = _train_both(
        torch,
        make,
        lo.adamc(_schedule64(PEAK), weight_decay=wd, max_learning_rate=PEAK),
        _schedule64(PEAK),
    )
    _assert_close(ours, theirs, rtol=PARITY_RTOL, atol=PARITY_ATOL)
    # timm's corrected decay mattered: its plain AdamW ends elsewhere.
    make_w = lambda m: timm_optim.create_optimizer_v2(m, opt="adamw", lr=PEAK, weight_decay=wd)
    _, adamw = _train_both(
        torch,
        make_w,
        lo.adamc(_schedule64(PEAK), weight_decay=wd, max_learning_rate=PEAK),
        _schedule64(PEAK),
    )
    assert _max_diff(adamw, theirs) > 1e-4


@pytest.mark.timm
def test_adams_matches_pytorch_optimizer():
    torch = pytest.importorskip("torch")
    po = pytest.importorskip("pytorch_optimizer")
    wd = 0.05

    def make(model):
        decay, no_decay = _groups(model)
        groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
        return po.AdamS(groups, lr=PEAK, weight_decay=wd)

    ours, theirs = _train_both(
        torch, make, lo.adams(_schedule64(PEAK), weight_decay=wd), _schedule64(PEAK)
    )
    _assert_close(ours, theirs, rtol=PARITY_RTOL, atol=PARITY_ATOL)
    plain, _ = _train_both(torch, make, optax.adam(_schedule64(PEAK)), _schedule64(PEAK))
    assert _max_diff(plain, theirs) > 1e-4  # the decay mattered


class _Float64Scalars:
    """The torch module as pytorch-cpr sees it, with `torch.float` meaning float64: the
    package creates its multipliers and bounds with `dtype=torch.float`."""

    def __init__(self, torch):
        self._torch = torch
        self.float = torch.float64

    def __getattr__(self, name):
        return getattr(self._torch, name)


@pytest.mark.timm
@pytest.mark.parametrize("scalars", ["as published", "float64"])
@pytest.mark.parametrize("scale_by_lr", [False, True])
@pytest.mark.parametrize("case", CPR_CASES)
def test_cpr_matches_pytorch_cpr(case, scale_by_lr, scalars, monkeypatch):
    torch = pytest.importorskip("torch")
    pytorch_cpr = pytest.importorskip("pytorch_cpr")
    kappa_init, param, reg = CPR_CASES[case]
    if kappa_init == "uniform":  # bounds the small model's matrices violate
        param = 0.5 if reg == "l2" else 0.1
    mu_lr = 50.0 if scale_by_lr else 0.5
    schedule = _schedule64(5e-2)  # a larger peak: the model's norms grow after the warm start
    if scalars == "float64":
        monkeypatch.setattr(pytorch_cpr.adamcpr, "torch", _Float64Scalars(torch))

    def make(model):
        decay, no_decay = _groups(model)
        groups = [{"params": decay, "regularize": True}, {"params": no_decay, "regularize": False}]
        return pytorch_cpr.AdamCPR(
            groups,
            lr=5e-2,
            kappa_init_method=kappa_init,
            kappa_init_param=param,
            reg_function=reg,
            kappa_update=mu_lr,
            reg_by_lr=scale_by_lr,
        )

    ours = lo.cpr(
        schedule,
        kappa_init=kappa_init,
        kappa_init_param=param,
        mu_lr=mu_lr,
        regularization=reg,
        scale_by_learning_rate=scale_by_lr,
    )
    got, want = _train_both(torch, make, ours, schedule)
    if scalars == "float64":
        _assert_close(got, want, rtol=PARITY_RTOL, atol=PARITY_ATOL)
        return
    # As published, pytorch-cpr keeps mu, kappa and mu_lr / size as float32 tensors even for
    # float64 params; their rounding (relative 6e-8) bounds the agreement.
    _assert_close(got, want, rtol=1e-6, atol=1e-7)
    plain, _ = _train_both(torch, make, optax.adam(schedule), schedule)
    assert _max_diff(plain, want) > 1e-4  # the bound acted


def test_cpr_step_keeps_a_few_kernels_in_memory():
    """XLA writes each kernel's `theta + u` to memory for its norm; the kernels are computed one
    after another, so those temporaries take at most two kernels' bytes, however many kernels
    there are (XLA:CPU's buffer assignment; computed side by side, all ten)."""
    if jax.default_backend() != "cpu":
        return
    params = {f"k{i}": jax.ShapeDtypeStruct((256, 512), jnp.float32) for i in range(10)}
    opt = optax.chain(optax.adam(1e-3), lo.constrained_parameter_regularization("uniform", 1.0))

    def step(p, s, g):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = jax.eval_shape(opt.init, params)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()
    assert compiled.memory_analysis().temp_size_in_bytes <= 2 * 256 * 512 * 4 + 2**16
