"""The transforms inside optax's wrappers and aliases, each against optax's own equivalent or a
plain numpy loop: extra arguments through the wrappers, AdamS's second moment, an injected LPWD
rate, Equinox placeholder modules, schedule-free and Muon (docs/guides/optax_composition.md,
whose examples run here too)."""

from __future__ import annotations

import pathlib
import re

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lpwd_optax as lo

GUIDE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "guides" / "optax_composition.md"
LR, WD, B2, EPS = 0.05, 0.2, 0.999, 1e-8


def _params():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    return {
        "conv": {"kernel": jax.random.normal(k1, (3, 3, 2, 4)), "bias": jnp.zeros(4)},
        "fc": {"kernel": jax.random.normal(k2, (8, 4)), "bias": 0.1 * jnp.ones(4)},
        "pos": jax.random.normal(k3, (1, 4)),
    }


def _grads(params, step):
    key = jax.random.fold_in(jax.random.key(1), step)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _decayed(params):
    # timm's rule, by hand: more than one axis of size > 1.
    return jax.tree.map(lambda x: sum(n > 1 for n in x.shape) > 1, params)


def _all(params):
    return jax.tree.map(lambda _: True, params)


def _np(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


# ------------------------------------------------------------------------------------------
# Wrappers forward what they do not take (`value=`, `obj_fn=`) to the optimizer they wrap


WRAPPERS = {
    "stable_weight_decay": lambda: lo.stable_weight_decay(optax.adam(LR), WD, b2=B2),
    "adams": lambda: lo.adams(LR, weight_decay=WD),
    "project_scale_invariant": lambda: lo.project_scale_invariant(optax.adam(LR)),
    "adamp": lambda: lo.adamp(LR, weight_decay=WD),
    "sgdp": lambda: lo.sgdp(LR, momentum=0.9, weight_decay=WD),
}


@pytest.mark.parametrize("name", WRAPPERS)
def test_wrappers_take_extra_arguments(name):
    tx = WRAPPERS[name]()
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    params = _params()
    state = tx.init(params)
    plain, _ = tx.update(_grads(params, 0), state, params)
    extra, _ = tx.update(_grads(params, 0), state, params, value=jnp.asarray(1.0))
    chex.assert_trees_all_equal(extra, plain)  # what no inner optimizer takes is dropped


def test_stable_weight_decay_passes_the_loss_to_reduce_on_plateau():
    plateau = lambda: optax.contrib.reduce_on_plateau(factor=0.5, patience=1, cooldown=0)
    inner = optax.chain(optax.adam(LR, b2=B2), plateau())
    tx = lo.stable_weight_decay(
        optax.chain(optax.adam(LR, b2=B2), plateau()), WD, b2=B2, learning_rate=LR
    )
    params = _params()
    ours, ref = params, _np(params)
    state, ref_state = tx.init(params), inner.init(params)
    mask = _decayed(params)
    for t, loss in enumerate([3.0, 2.0, 2.5, 2.6, 2.7, 2.8]):  # a plateau from step 2 on
        grads, value = _grads(params, t), jnp.asarray(loss)
        updates, state = tx.update(grads, state, ours, value=value)
        ours = optax.apply_updates(ours, updates)
        # The reference: optax's own chain with the loss, and AdamS's decay by hand.
        base, ref_state = inner.update(
            grads, ref_state, jax.tree.map(jnp.asarray, ref), value=value
        )
        adam = ref_state[0][0]  # optax.adam: (ScaleByAdamState, EmptyState)
        nu = np.concatenate([np.ravel(v) for v in jax.tree.leaves(_np(adam.nu))])
        scale = WD * LR / (np.sqrt(np.mean(nu) / (1 - B2 ** int(adam.count))) + EPS)
        ref = jax.tree.map(
            lambda p, u, m, scale=scale: p + u - (scale * p if m else 0.0),
            ref,
            _np(base),
            mask,
        )
    assert float(state.inner_state[1].scale) < 1.0  # the plateau was seen through the wrapper
    chex.assert_trees_all_close(_np(ours), ref, rtol=1e-5, atol=1e-6)


def test_project_scale_invariant_passes_obj_fn_to_sophia():
    params = _params()

    def loss(p):
        return sum(jnp.sum(jnp.sin(x) * x) for x in jax.tree.leaves(p))

    sophia = lambda: optax.contrib.sophia(LR, update_interval=1)
    # delta = 0: no kernel is judged scale-invariant, so only the decay is added.
    tx = lo.project_scale_invariant(sophia(), weight_decay=WD, learning_rate=LR, delta=0.0)
    ref_tx = sophia()
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p, obj_fn=loss))
    ref_step = jax.jit(lambda p, s: ref_tx.update(jax.grad(loss)(p), s, p, obj_fn=loss))
    ours, ref = params, params
    state, ref_state = tx.init(params), ref_tx.init(params)
    mask = _decayed(params)
    for _ in range(3):
        updates, state = step(ours, state)
        ours = optax.apply_updates(ours, updates)
        base, ref_state = ref_step(ref, ref_state)
        ref = jax.tree.map(lambda p, u, m: p + u - (WD * LR * p if m else 0.0), ref, base, mask)
    chex.assert_trees_all_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_adamp_and_sgdp_take_the_loss_in_a_plateau_chain():
    params = _params()
    grads = _grads(params, 0)
    value = jnp.asarray(1.0)
    # delta = 0 leaves only the decoupled decay: AdamP is optax.adamw on the decayed leaves.
    adamp = lo.adamp(LR, weight_decay=WD, delta=0.0)
    got, _ = adamp.update(grads, adamp.init(params), params, value=value)
    adamw = optax.adamw(LR, weight_decay=WD, mask=_decayed(params))
    chex.assert_trees_all_close(got, adamw.update(grads, adamw.init(params), params)[0])
    # SGDP divides the decay by 1 - momentum.
    sgdp = lo.sgdp(LR, momentum=0.9, weight_decay=WD, delta=0.0)
    got, _ = sgdp.update(grads, sgdp.init(params), params, value=value)
    sgd = optax.sgd(LR, momentum=0.9)
    base, _ = sgd.update(grads, sgd.init(params), params)
    want = jax.tree.map(
        lambda u, p, m: u - (WD * LR / 0.1 * p if m else 0.0), base, params, _decayed(params)
    )
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------
# AdamS accepts a second moment shaped like the params, and nothing else


@pytest.mark.parametrize(
    "inner, found",
    [
        (optax.rmsprop(LR), r"found 0 \(ScaleByRmsState\(nu\)"),
        (optax.sm3(LR), r"found 0 \(ScaleBySM3State\(mu, nu\)"),
        (
            optax.novograd(LR),
            r"ScaleByNovogradState\(count, mu, nu\), whose nu holds .* shape \(\)",
        ),
        (optax.contrib.sophia(LR), r"SophiaState\(.*\), whose nu estimates the Hessian diagonal"),
        (optax.chain(optax.adam(LR), optax.adam(LR)), r"found 2 \(ScaleByAdamState"),
        (optax.sgd(LR, momentum=0.9), r"found 0 \(TraceState\(trace\)"),
    ],
    ids=["rmsprop", "sm3", "novograd", "sophia", "two_adams", "sgd"],
)
def test_stable_weight_decay_refuses_what_is_no_second_moment(inner, found):
    tx = lo.stable_weight_decay(inner, WD, b2=B2)
    with pytest.raises(ValueError, match=r"exactly one second moment.*" + found):
        tx.init(_params())


def test_stable_weight_decay_takes_a_bias_corrected_rms():
    # scale_by_rms with a step count keeps `count` and `nu` shaped like the params.
    params = _params()
    inner = optax.chain(
        optax.scale_by_rms(B2, EPS, bias_correction=True), optax.scale_by_learning_rate(LR)
    )
    tx = lo.stable_weight_decay(inner, WD, b2=B2, learning_rate=LR)
    grads = _grads(params, 0)
    got, _ = tx.update(grads, tx.init(params), params)
    g = _np(grads)
    nu = np.concatenate([np.ravel((1 - B2) * x**2) for x in jax.tree.leaves(g)])
    scale = WD * LR / (np.sqrt(np.mean(nu) / (1 - B2)) + EPS)
    want = jax.tree.map(
        lambda g, p, m: -LR * g / np.sqrt(g**2 + EPS) - (scale * p if m else 0.0),
        g,
        _np(params),
        _decayed(params),
    )
    chex.assert_trees_all_close(_np(got), want, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------
# An injected LPWD rate: one trace, the new rate from the next step on


def test_injected_lpwd_rate_changes_without_recompiling():
    params = {f"l{i}": {"kernel": jnp.full((3, 2), 1.0 + i, jnp.float32)} for i in range(3)}
    depths = lo.depth_labels(params)  # l0, l1, l2 -> 1, 2, 3

    def lpwd(learning_rate, rate):
        return lo.lpwd_adam(learning_rate, lo.layerwise_schedule(depths, rate))

    tx = optax.inject_hyperparams(lpwd)(learning_rate=LR, rate=0.5)
    update = jax.jit(chex.assert_max_traces(tx.update, n=1))
    chex.clear_trace_counter()
    adam = optax.adam(LR)
    state, adam_state = tx.init(params), adam.init(params)
    ours, ref = params, _np(params)
    rates = [0.5, 0.5, 0.5, 2.0, 2.0, 0.0, 0.0]
    for t, rate in enumerate(rates):
        state.hyperparams["rate"] = jnp.full_like(state.hyperparams["rate"], rate)
        grads = _grads(params, t)
        updates, state = update(grads, state, ours)
        ours = optax.apply_updates(ours, updates)
        # PWD by hand on optax.adam's step: phi <- (1 - d_{t+1}) (phi + u), d = lr * rate_i.
        u, adam_state = adam.update(grads, adam_state)
        ref = {
            name: {"kernel": (1 - LR * rate * 2.0 * depth / 3) * (ref[name]["kernel"] + step)}
            for depth, name in enumerate(sorted(ref), start=1)
            for step in [np.asarray(u[name]["kernel"], np.float64)]
        }
        chex.assert_trees_all_close(_np(ours), ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Equinox models with modules that hold no arrays


class _Static(eqx.Module):
    tag: str = eqx.field(static=True, default="placeholder")

    def __call__(self, x):
        return x


class _Net(eqx.Module):
    hidden: eqx.nn.Linear
    postnorm: eqx.Module
    extra: eqx.Module
    out: eqx.nn.Linear

    def __init__(self, key, placeholders=True):
        k1, k2 = jax.random.split(key)
        self.hidden = eqx.nn.Linear(4, 8, key=k1)
        self.postnorm = eqx.nn.Identity() if placeholders else None
        self.extra = _Static() if placeholders else None
        self.out = eqx.nn.Linear(8, 3, key=k2)

    def __call__(self, x):
        x = jax.nn.relu(self.hidden(x))
        if self.postnorm is not None:
            x = self.extra(self.postnorm(x))
        return self.out(x)


def _eqx(placeholders):
    params, static = eqx.partition(_Net(jax.random.key(0), placeholders), eqx.is_array)
    return params, lambda p, x: jax.vmap(eqx.combine(p, static))(x)


def test_equinox_placeholders_take_a_tree_map_mask():
    params, _ = _eqx(placeholders=True)
    mask = jax.tree.map(lambda x: x.ndim > 1, params)  # keeps the Identity and _Static nodes
    tx = optax.chain(optax.sgd(LR), lo.weight_decay(WD, learning_rate=LR, mask=mask))
    grads = _grads(params, 0)
    got, _ = tx.update(grads, tx.init(params), params)
    want = [
        -LR * g - (LR * WD * p if p.ndim > 1 else 0.0)
        for g, p in zip(jax.tree.leaves(_np(grads)), jax.tree.leaves(_np(params)))
    ]
    chex.assert_trees_all_close([np.asarray(x, np.float64) for x in jax.tree.leaves(got)], want)


TWIN_TRANSFORMS = {
    "weight_decay": lambda layers: optax.chain(
        optax.adam(LR), lo.weight_decay(WD, learning_rate=LR)
    ),
    "lpwd": lambda layers: optax.chain(
        optax.adam(LR),
        lo.pre_weight_decay(
            lo.layerwise_schedule(layers.depths, WD), learning_rate=LR, mask=layers.decay_mask
        ),
    ),
    "adamp": lambda layers: lo.adamp(LR, weight_decay=WD, layers=layers),
    "weight_rescaling": lambda layers: optax.chain(
        optax.adam(LR), lo.weight_rescaling(1, layers=layers)
    ),
}


@pytest.mark.parametrize("name", TWIN_TRANSFORMS)
def test_equinox_placeholders_change_nothing(name):
    # The model with Identity and a static-only module, and its twin without them, from the
    # same weights, follow the same trajectory.
    x = jnp.ones((2, 4))
    runs = []
    for placeholders in (True, False):
        params, apply = _eqx(placeholders)
        layers = lo.layer_structure(params, apply, x)
        tx = TWIN_TRANSFORMS[name](layers)
        state = tx.init(params)
        for t in range(3):
            updates, state = tx.update(_grads(params, t), state, params)
            params = optax.apply_updates(params, updates)
        runs.append(jax.tree.leaves(params))
    chex.assert_trees_all_close(*runs, rtol=0, atol=0)
    assert jax.tree.leaves(_eqx(True)[0]) and len(runs[0]) == 4


# ------------------------------------------------------------------------------------------
# Schedule-free: the decay inside the wrapper is schedule_free_adamw's weight decay


def _schedule_free_loop(params, grads, lr, b1, *, inside, outside):
    """Schedule-free AdamW (Adam without momentum) in numpy: the decay `inside` the wrapper
    adds `-lr_t * inside * y_t` to z's step; the one `outside` subtracts `lr_t * outside * y_t`
    from the params the wrapper hands out. Returns (y_t, x_t) after every step."""
    y = _np(params)
    z = dict(y)
    x = dict(y)
    v = {k: np.zeros_like(a) for k, a in y.items()}
    weight_sum, max_lr, out = 0.0, 0.0, []
    for t, g in enumerate(grads):
        g = _np(g)
        max_lr = max(max_lr, float(lr(t + 1)))  # the wrapper counts steps from 1
        weight_sum += max_lr**2
        c = max_lr**2 / weight_sum if weight_sum else 0.0
        eta = float(lr(t))  # the wrapped chain counts from 0
        new = {}
        for k in y:
            v[k] = B2 * v[k] + (1 - B2) * g[k] ** 2
            step = g[k] / (np.sqrt(v[k] / (1 - B2 ** (t + 1))) + EPS)
            z_next = z[k] - eta * (step + inside * y[k])
            x_prev = (y[k] - (1 - b1) * z[k]) / b1
            x[k] = (1 - c) * x_prev + c * z_next
            new[k] = b1 * x[k] + (1 - b1) * z_next - eta * outside * y[k]
            z[k] = z_next
        y = new
        out.append((dict(y), {k: (y[k] - (1 - b1) * z[k]) / b1 for k in y}))
    return out


def _run(tx, params, grads, eval_state=lambda s: s):
    state, out = tx.init(params), []
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        evaluated = optax.contrib.schedule_free_eval_params(eval_state(state), params)
        out.append((_np(params), _np(evaluated)))
    return out


def _inside(lr, b1, w, mask):
    return optax.contrib.schedule_free(
        optax.chain(
            optax.scale_by_rms(B2, EPS, eps_in_sqrt=False, bias_correction=True),
            optax.scale_by_learning_rate(lr),
            lo.weight_decay(w, learning_rate=lr, mask=mask),
        ),
        lr,
        b1=b1,
    )


def test_decay_inside_schedule_free_is_its_weight_decay():
    params = {"w": jax.random.normal(jax.random.key(2), (4, 3)), "b": jnp.ones(3)}
    grads = [_grads(params, t) for t in range(25)]
    lr = optax.warmup_constant_schedule(0.0, LR, warmup_steps=5)
    b1, w = 0.9, 0.5
    alias = _run(
        optax.contrib.schedule_free_adamw(LR, warmup_steps=5, b1=b1, weight_decay=w), params, grads
    )
    inside = _run(_inside(lr, b1, w, _all), params, grads)
    loop = _schedule_free_loop(params, grads, lr, b1, inside=w, outside=0.0)
    for t in range(len(grads)):
        chex.assert_trees_all_close(inside[t], alias[t], rtol=1e-5, atol=1e-6)  # y and x
        chex.assert_trees_all_close(inside[t], loop[t], rtol=1e-4, atol=1e-5)
    # The default mask decays by timm's rule: the bias is left alone.
    timm = _run(_inside(lr, b1, w, None), params, grads)
    assert np.abs(timm[-1][0]["b"] - inside[-1][0]["b"]).max() > 1e-3
    # SGD inside is schedule_free_sgd's weight decay too.
    sgd = optax.contrib.schedule_free(
        optax.chain(optax.sgd(LR), lo.weight_decay(w, learning_rate=LR, mask=_all)), LR
    )
    chex.assert_trees_all_close(
        _run(sgd, params, grads[:10]),
        _run(optax.contrib.schedule_free_sgd(LR, weight_decay=w), params, grads[:10]),
        rtol=1e-5,
        atol=1e-6,
    )


def test_decay_after_schedule_free_decays_the_average():
    params = {"w": jax.random.normal(jax.random.key(2), (4, 3)), "b": jnp.ones(3)}
    grads = [_grads(params, t) for t in range(25)]
    b1, w = 0.9, 0.5
    after = optax.chain(
        optax.contrib.schedule_free_adamw(LR, b1=b1, weight_decay=0.0),
        lo.weight_decay(w, learning_rate=LR, mask=_all),
    )
    with pytest.raises(AttributeError):  # the chain's state is a tuple
        _run(after, params, grads[:1])
    got = _run(after, params, grads, eval_state=lambda s: s[0])
    lr = optax.constant_schedule(LR)
    loop = _schedule_free_loop(params, grads, lr, b1, inside=0.0, outside=w)
    for t in range(len(grads)):
        chex.assert_trees_all_close(got[t], loop[t], rtol=1e-4, atol=1e-5)
    alias = _run(optax.contrib.schedule_free_adamw(LR, b1=b1, weight_decay=w), params, grads)
    assert np.abs(got[-1][1]["w"] - alias[-1][1]["w"]).max() > 1e-3  # another method


# ------------------------------------------------------------------------------------------
# Muon decays its 2-D leaves; the 2-D mask makes the chain equal it


def test_muon_weight_decay_is_the_two_d_mask():
    params = _params()
    two_d = lambda p: jax.tree.map(lambda x: x.ndim == 2, p)
    runs = {
        "muon": optax.contrib.muon(LR, weight_decay=WD),
        "two_d": optax.chain(
            optax.contrib.muon(LR), lo.weight_decay(WD, learning_rate=LR, mask=two_d)
        ),
        "default": optax.chain(optax.contrib.muon(LR), lo.weight_decay(WD, learning_rate=LR)),
    }
    out = {}
    for name, tx in runs.items():
        p, state, update = params, tx.init(params), jax.jit(tx.update)
        for t in range(4):
            updates, state = update(_grads(params, t), state, p)
            p = optax.apply_updates(p, updates)
        out[name] = p
    chex.assert_trees_all_close(out["two_d"], out["muon"], rtol=1e-6, atol=1e-7)
    # The default mask decays the conv kernel and skips the (1, C) embedding; muon the reverse.
    differs = jax.tree.map(
        lambda a, b: bool(np.abs(a - b).max() > 1e-4), out["default"], out["muon"]
    )
    assert differs == {
        "conv": {"kernel": True, "bias": False},
        "fc": {"kernel": False, "bias": False},
        "pos": True,
    }


# ------------------------------------------------------------------------------------------
# The guide's examples run and compute what it says


def _guide(*headings):
    """Runs the python block of each section named, after the first section's (the imports,
    `params` and `grads`), in one namespace."""
    text = GUIDE.read_text()
    namespace: dict = {}
    for heading in ("Wrappers pass extra arguments through", *headings):
        pattern = rf"\n#{{2,3}} {re.escape(heading)}\n(.*?)(?=\n#{{2,3}} |\Z)"
        section = re.search(pattern, text, re.S)
        (block,) = re.findall(r"```python\n(.*?)```", section.group(1), re.S)
        exec(compile(block, str(GUIDE), "exec"), namespace)
    return namespace


def test_guide_wrapper_and_injection_examples_run():
    namespace = _guide("Injected rates, LPWD's included")
    assert float(namespace["state"].hyperparams["rate"]) == pytest.approx(5e-3)
    assert namespace["update"]._cache_size() == 1  # the new rate did not recompile


def test_guide_schedule_free_recipe_is_schedule_free_adamw():
    namespace = _guide("Inside the wrapper: schedule-free's own weight decay")
    params = {"w": jax.random.normal(jax.random.key(3), (4, 3)), "b": jnp.ones(3)}
    grads = [jax.tree.map(lambda x: 1e3 * x, _grads(params, t)) for t in range(30)]
    alias = optax.contrib.schedule_free_adamw(1e-3, warmup_steps=100, weight_decay=0.05)
    chex.assert_trees_all_close(
        _run(namespace["opt"], params, grads), _run(alias, params, grads), rtol=1e-5, atol=1e-6
    )


def test_guide_muon_mask_is_muon_weight_decay():
    ours = _guide("Muon")["opt"]
    ref = optax.contrib.muon(0.02, weight_decay=0.1)
    params = _params()
    p, q, state, ref_state = params, params, ours.init(params), ref.init(params)
    for t in range(3):
        updates, state = ours.update(_grads(params, t), state, p)
        p = optax.apply_updates(p, updates)
        updates, ref_state = ref.update(_grads(params, t), ref_state, q)
        q = optax.apply_updates(q, updates)
    chex.assert_trees_all_close(p, q, rtol=1e-6, atol=1e-7)
