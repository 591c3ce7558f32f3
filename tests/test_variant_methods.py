"""The training program's methods for the weight-decay variants build the intended chains."""

from __future__ import annotations

import chex
import jax
import optax
import pytest

import lpwd_optax as lo
from lpwd_optax.experiments import config, methods
from tests.test_train_lib import build, toy_apply, toy_batch, toy_params

LR, LAM = 0.05, 0.1  # what `build` passes


def _expected(name):
    adam = optax.adam(LR, b1=0.9, b2=0.999, eps=1e-8)
    if name == "cautious":
        return optax.chain(adam, lo.cautious_weight_decay(LAM, learning_rate=LR))
    if name == "corrected":
        return optax.chain(adam, lo.corrected_weight_decay(LAM, learning_rate=LR))
    if name == "adams":
        return lo.adams(LR, weight_decay=LAM)
    return optax.chain(adam, lo.constrained_parameter_regularization("warm_start", 2))


@pytest.mark.parametrize("name", methods.VARIANTS)
def test_each_variant_method_builds_its_chain(name):
    assert name in config.METHODS
    params = toy_params()
    method = methods.build_method(
        name,
        optimizer="adam",
        learning_rate=LR,
        weight_decay=LAM,
        params=params,
        apply_fn=toy_apply,
        example_batch=None,
        cpr_warm_start=2,
    )
    want = _expected(name)
    got_state, want_state = method.tx.init(params), want.init(params)
    p_got = p_want = params
    grad = jax.grad(lambda p: toy_apply(p, toy_batch()["image"]).sum())
    for _ in range(4):  # past CPR's warm start
        u_got, got_state = method.tx.update(grad(p_got), got_state, p_got)
        u_want, want_state = want.update(grad(p_want), want_state, p_want)
        chex.assert_trees_all_close(u_got, u_want, rtol=0, atol=0)
        p_got, p_want = optax.apply_updates(p_got, u_got), optax.apply_updates(p_want, u_want)
    # The regularizer acted: plain Adam moves the kernels elsewhere.
    adam, p_adam = optax.adam(LR), params
    adam_state = adam.init(params)
    for _ in range(4):
        u, adam_state = adam.update(grad(p_adam), adam_state, p_adam)
        p_adam = optax.apply_updates(p_adam, u)
    diff = jax.tree.map(lambda a, b: float(abs(a - b).max()), p_got, p_adam)
    assert max(jax.tree.leaves(diff)) > 1e-6
    assert method.placement == ("wrap" if name == "adams" else "last")


def test_adams_needs_adam():
    with pytest.raises(ValueError, match="adams needs --optimizer=adam"):
        build("adams", optimizer="sgdm")


def test_the_program_accepts_each_variant_and_the_cpr_flag():
    for name in methods.VARIANTS:
        cfg = config.Config(method=name, cpr_warm_start=10)
        assert cfg.method == name and cfg.cpr_warm_start == 10


def test_every_method_flag_has_one_builder_in_the_registry():
    assert set(methods.REGISTRY) == set(config.METHODS)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        build("nope")
