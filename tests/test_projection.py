"""AdamP's projection (`project_scale_invariant`, `adamp`, `sgdp`) against a literal numpy loop
of the paper's algorithm and against the authors' PyTorch implementation."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lpwd_optax as lo
from tests import reference

EVERY_LEAF = lambda p: jax.tree.map(lambda _: True, p)


def _params(seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"conv": (3, 3, 4, 8), "conv_whole": (3, 3, 4, 8), "fc": (8, 5), "bias": (5,)}
    return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def _grads(theta, step):
    """Gradients that make "conv" scale-invariant per output channel, "conv_whole" only as a
    whole kernel, and leave "fc" a generic kernel (what a normalization after each would do)."""
    rng = np.random.default_rng(1000 + step)
    out = {}
    for k in sorted(theta):  # jax orders dict keys; every caller draws in one order
        w = np.asarray(theta[k], np.float64)
        g = rng.normal(size=w.shape)
        if k == "conv":
            axes = tuple(range(w.ndim - 1))
            g -= (g * w).sum(axes, keepdims=True) / (w * w).sum(axes, keepdims=True) * w
        elif k == "conv_whole":
            g -= (g * w).sum() / (w * w).sum() * w
        elif k == "fc":  # clearly not orthogonal (a random direction would pass now and then)
            g += w
        out[k] = g.astype(np.float32)
    return out


def _run(opt, params, steps):
    params = {k: jnp.asarray(v) for k, v in params.items()}
    state = opt.init(params)
    update = jax.jit(opt.update)
    for t in range(steps):
        grads = {k: jnp.asarray(v) for k, v in _grads(jax.device_get(params), t).items()}
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return jax.device_get(params)


def test_adamp_follows_the_literal_algorithm():
    theta0 = _params()
    kw = dict(lr=1e-2, weight_decay=0.5)
    want, views = reference.run_adamp(theta0, _grads, 20, **kw)
    # Every path of the algorithm is taken: channel view, whole-kernel view, no projection.
    assert {v["conv"] for v in views} == {"channel"}
    assert {v["conv_whole"] for v in views} == {"layer"}
    assert {v["fc"] for v in views} == {None}

    opt = lo.adamp(kw["lr"], weight_decay=kw["weight_decay"], mask=EVERY_LEAF)
    got = _run(opt, theta0, 20)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=2e-5)


def test_without_scale_invariant_kernels_adamp_is_adamw():
    rng = np.random.default_rng(3)
    params = {"fc": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32), "b": jnp.zeros(4)}
    mask = lo.default_decay_mask(params)
    ours, theirs = lo.adamp(1e-2, weight_decay=0.3), optax.adamw(1e-2, weight_decay=0.3, mask=mask)
    s_ours, s_theirs = ours.init(params), theirs.init(params)
    p_ours = p_theirs = params
    for _ in range(5):
        grads = jax.tree.map(lambda x: x + 1.0, p_ours)  # far from orthogonal to the weights
        u, s_ours = ours.update(grads, s_ours, p_ours)
        v, s_theirs = theirs.update(grads, s_theirs, p_theirs)
        p_ours, p_theirs = optax.apply_updates(p_ours, u), optax.apply_updates(p_theirs, v)
    chex.assert_trees_all_close(p_ours, p_theirs, rtol=1e-6, atol=1e-7)


class ConvNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        # LayerNorm over the channels makes the whole kernel, not each channel, scale-invariant.
        x = nn.LayerNorm()(nn.Conv(8, (3, 3), use_bias=False)(x))
        return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


def test_on_a_normalized_conv_the_update_has_no_radial_component():
    model = ConvNorm()
    x = jax.random.normal(jax.random.key(0), (4, 6, 6, 2))
    y = jnp.array([0, 1, 2, 1])
    params = model.init(jax.random.key(1), x)["params"]
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, x), y
    ).mean()

    def radial(opt):  # <theta, u> / (||theta|| ||u||) for the conv kernel after 3 steps
        state, p = opt.init(params), params
        for _ in range(3):
            u, state = opt.update(jax.grad(loss)(p), state, p)
            p_before, p = p, optax.apply_updates(p, u)
        w, u = p_before["Conv_0"]["kernel"], u["Conv_0"]["kernel"]
        return abs(float(jnp.vdot(w, u) / (jnp.linalg.norm(w) * jnp.linalg.norm(u))))

    assert radial(optax.adam(1e-2)) > 1e-3  # Adam's update does have a radial part
    assert radial(lo.adamp(1e-2)) < 1e-5
    # The dense head is not scale-invariant: its update is Adam's.
    grads = jax.grad(loss)(params)
    ours, _ = lo.adamp(1e-2).update(grads, lo.adamp(1e-2).init(params), params)
    adam, _ = optax.adam(1e-2).update(grads, optax.adam(1e-2).init(params), params)
    chex.assert_trees_all_close(ours["Dense_0"], adam["Dense_0"], rtol=1e-6)


def test_views_choose_where_the_radial_component_is_removed():
    theta = _params()
    grads = _grads(theta, 0)
    params = {k: jnp.asarray(v) for k, v in theta.items()}
    g = {k: jnp.asarray(v) for k, v in grads.items()}
    u = jax.tree.map(lambda x: -0.1 * jnp.sign(x + 0.3), g)  # an update with a radial part

    # An "optimizer" that always returns u.
    inner = optax.GradientTransformation(
        lambda p: optax.EmptyState(), lambda *_: (u, optax.EmptyState())
    )
    for views in [("channel", "layer"), ("layer",), ("channel",)]:
        opt = lo.project_scale_invariant(inner, views=views, mask=EVERY_LEAF)
        out, _ = opt.update(g, opt.init(params), params)
        w, x = theta["conv"].astype(np.float64), np.asarray(u["conv"], np.float64)
        if views[0] == "channel":
            want, _ = reference.adamp_projection(w, grads["conv"], x, 0.1, 1e-8)
        else:  # the whole kernel: grads orthogonal per channel are orthogonal as a whole
            unit = w / (np.linalg.norm(w) + 1e-8)
            want = x - unit * (unit.ravel() @ x.ravel())
        np.testing.assert_allclose(out["conv"], want, rtol=1e-5, atol=1e-6)
        # conv_whole passes only the whole-kernel test; fc passes none.
        expect_whole = "layer" in views
        changed = not np.allclose(out["conv_whole"], u["conv_whole"])
        assert changed == expect_whole, views
        np.testing.assert_array_equal(out["fc"], u["fc"])


def test_per_leaf_rates_decay_each_layer_at_its_own_rate():
    params = {k: jnp.asarray(v) for k, v in _params().items()}
    grads = {k: jnp.asarray(v) for k, v in _grads(_params(), 0).items()}
    rates = {"conv": 0.2, "conv_whole": 0.0, "fc": 0.4, "bias": 0.0}
    zero = lo.adamp(1e-2)
    ours = lo.adamp(1e-2, weight_decay=rates)
    base, _ = zero.update(grads, zero.init(params), params)
    out, _ = ours.update(grads, ours.init(params), params)
    # conv is projected (decay times wd_ratio = 0.1); fc is not.
    np.testing.assert_allclose(
        out["conv"], base["conv"] - 0.1 * 0.2 * 1e-2 * params["conv"], atol=1e-7
    )
    np.testing.assert_allclose(out["fc"], base["fc"] - 0.4 * 1e-2 * params["fc"], atol=1e-7)
    np.testing.assert_array_equal(out["conv_whole"], base["conv_whole"])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="views must be distinct names"):
        lo.project_scale_invariant(optax.sgd(0.1), views=("rows",))
    with pytest.raises(ValueError, match="views must be distinct names"):
        lo.project_scale_invariant(optax.sgd(0.1), views=())
    with pytest.raises(ValueError, match="delta must be a finite number >= 0"):
        lo.adamp(1e-3, delta=-1.0)
    with pytest.raises(ValueError, match="wd_ratio must be a finite number >= 0"):
        lo.adamp(1e-3, wd_ratio=float("nan"))
    with pytest.raises(ValueError, match=r"sgdp momentum must be < 1\.0"):
        lo.sgdp(0.1, momentum=1.0)
    with pytest.raises(ValueError, match="per-step decay"):
        lo.adamp(0.5, weight_decay=4.0)
    opt = lo.adamp(1e-3)
    with pytest.raises(ValueError, match="needs the current params"):
        opt.update({"w": jnp.ones((2, 2))}, opt.init({"w": jnp.ones((2, 2))}))


# ------------------------------------------------------------------------------------------
# The authors' PyTorch implementation (the `adamp` package)


def _to_torch_layout(x):
    # Flax (kh, kw, in, out) / (in, out) -> PyTorch (out, in, kh, kw) / (out, in).
    x = np.asarray(x)
    if x.ndim == 4:
        return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    return np.ascontiguousarray(x.T) if x.ndim == 2 else x


@pytest.mark.timm
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("name", ["adamp", "sgdp"])
def test_matches_the_reference_pytorch_implementation(name, nesterov):
    torch = pytest.importorskip("torch")
    ref = pytest.importorskip("adamp")
    theta0 = _params()
    if name == "adamp":
        hp = dict(lr=1e-2, weight_decay=0.5, nesterov=nesterov)
        ours = lambda **kw: lo.adamp(
            hp["lr"], weight_decay=hp["weight_decay"], nesterov=nesterov, mask=EVERY_LEAF, **kw
        )
        theirs = lambda ps: ref.AdamP(ps, **hp)
    else:
        hp = dict(lr=0.1, momentum=0.9, weight_decay=0.05, nesterov=nesterov)
        ours = lambda **kw: lo.sgdp(
            hp["lr"], hp["momentum"], nesterov, hp["weight_decay"], mask=EVERY_LEAF, **kw
        )
        theirs = lambda ps: ref.SGDP(ps, **hp)

    tensors = {k: torch.tensor(_to_torch_layout(v), requires_grad=True) for k, v in theta0.items()}
    opt = theirs(list(tensors.values()))
    for t in range(20):
        grads = _grads(
            {k: _from_torch(v.detach().numpy(), theta0[k]) for k, v in tensors.items()}, t
        )
        for k, v in tensors.items():
            v.grad = torch.tensor(_to_torch_layout(grads[k]))
        opt.step()
    want = {k: _from_torch(v.detach().numpy(), theta0[k]) for k, v in tensors.items()}

    got = _run(ours(), theta0, 20)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
    # The projection mattered: without it the scale-invariant kernels end elsewhere.
    plain = _run(ours(delta=0.0), theta0, 20)
    for k in ("conv", "conv_whole"):
        assert np.abs(plain[k] - want[k]).max() > 1e-2, k


def _from_torch(x, like):
    if like.ndim == 4:
        return np.ascontiguousarray(x.transpose(2, 3, 1, 0))
    return np.ascontiguousarray(x.T) if like.ndim == 2 else x
