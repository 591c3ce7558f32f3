"""Building blocks of the training program: methods, the step, parallel modes, checkpoints."""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lpwd_optax as lo
from lpwd_optax import models
from lpwd_optax.experiments import config, methods, train_lib, writers
from tests import _cifar_helpers as helpers

# ----------------------------------------------------------------------------------------------
# A toy convolutional model: cheap to compile, with kernels (decayed) and biases (not).


def toy_params(seed: int = 0) -> dict:
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "conv": {"kernel": 0.3 * jax.random.normal(k1, (3, 3, 3, 4)), "bias": jnp.zeros(4)},
        "head": {"kernel": 0.3 * jax.random.normal(k2, (4, 10)), "bias": jnp.zeros(10)},
    }


def toy_apply(params, images, train=False, rng=None):
    del train, rng
    x = jax.lax.conv_general_dilated(
        images, params["conv"]["kernel"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    x = jax.nn.gelu(x + params["conv"]["bias"]).mean((1, 2))
    return x @ params["head"]["kernel"] + params["head"]["bias"]


def toy_batch(n: int = 16, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(n, 8, 8, 3)).astype(np.float32),
        "label": rng.integers(0, 10, n).astype(np.int32),
    }


def build(name: str, optimizer: str = "adam", params=None) -> methods.Method:
    params = toy_params() if params is None else params
    return methods.build_method(
        name,
        optimizer=optimizer,
        learning_rate=0.05,
        weight_decay=0.1,
        params=params,
        apply_fn=toy_apply,
        example_batch=jnp.zeros((2, 8, 8, 3)),
        # The toy model has no normalization: WRS methods rescale its conv kernel as if a
        # normalization followed it.
        scale_invariant={
            "conv": {"kernel": True, "bias": False},
            "head": {"kernel": False, "bias": False},
        },
        wrs_every=2,
    )


# ----------------------------------------------------------------------------------------------
# Methods


@pytest.mark.parametrize("name", config.METHODS)
def test_two_stages_equal_the_chain(name):
    """The step's two stages compute exactly `optax.chain(*stages)`, state included."""
    method = build(name)
    params = toy_params()
    grads = jax.grad(lambda p: toy_apply(p, toy_batch()["image"]).sum())(params)

    @jax.jit
    def both(params, state):
        chained, chain_state = method.tx.update(grads, state, params)
        first, second = method.stages
        u, s1 = first.update(grads, state[0], params)
        staged, s2 = second.update(u, state[1], params)
        return chained, chain_state, staged, (s1, s2)

    state = method.tx.init(params)
    for _ in range(3):
        chained, chain_state, staged, staged_state = both(params, state)
        chex.assert_trees_all_close(chained, staged, rtol=0, atol=0)
        chex.assert_trees_all_equal_structs(chain_state, staged_state)
        params, state = optax.apply_updates(params, chained), chain_state


def test_placement_of_each_method():
    placements = {name: build(name).placement for name in config.METHODS}
    assert placements == dict(
        baseline="none",
        l2="first",
        adadecay="first",
        wd="last",
        rwd="last",
        pwd="last",
        lpwd="last",
        lwd="last",
        lpwd_reversed="last",
        lpwd_shuffled="last",
        wd_matched="last",
        wrs="last",
        wrs_ic="last",
        adamp="wrap",
        **{"wrs+adamp": "last"},
        cautious="last",
        corrected="last",
        adams="wrap",
        cpr="last",
        decay_to_init="last",
    )
    assert [n for n in config.METHODS if build(n).has_rop] == [
        "wd",
        "rwd",
        "pwd",
        "lpwd",
        "lwd",
        "lpwd_reversed",
        "lpwd_shuffled",
        "wd_matched",
        "wrs",
        "wrs_ic",
        "wrs+adamp",
        "cautious",
        "corrected",
        "cpr",
        "decay_to_init",
    ]


@pytest.mark.parametrize("optimizer", ["adam", "sgdm"])
def test_adamp_methods_use_the_projected_optimizer(optimizer):
    params = toy_params()
    grads = jax.grad(lambda p: toy_apply(p, toy_batch()["image"]).sum())(params)
    if optimizer == "adam":
        want_full, want_base = lo.adamp(0.05, weight_decay=0.1), lo.adamp(0.05)
    else:
        want_full = lo.sgdp(0.05, momentum=0.9, weight_decay=0.1)
        want_base = lo.sgdp(0.05, momentum=0.9)
    full = build("adamp", optimizer).stages[0]
    base = build("wrs+adamp", optimizer).stages[0]
    for got, want in ((full, want_full), (base, want_base)):
        chex.assert_trees_all_close(
            got.update(grads, got.init(params), params)[0],
            want.update(grads, want.init(params), params)[0],
            rtol=0,
            atol=0,
        )
    assert ("AdamP" if optimizer == "adam" else "SGDP") in build("adamp", optimizer).description


@pytest.mark.parametrize("name", ["pwd", "lpwd"])
def test_pre_decay_then_evaluate_recovers_the_weights(name):
    method = build(name)
    params = toy_params()
    stored = method.init_params(params)
    # Kernels are stored pre-decayed, biases (not in the default mask) untouched.
    assert float(jnp.abs(stored["conv"]["kernel"]).sum()) < float(
        jnp.abs(params["conv"]["kernel"]).sum()
    )
    chex.assert_trees_all_equal(stored["conv"]["bias"], params["conv"]["bias"])
    chex.assert_trees_all_close(method.eval_params(stored, 0), params, rtol=1e-6)


def test_lpwd_rates_grow_with_depth():
    method = build("lpwd")
    assert "conv/kernel" in method.description and "head/kernel" in method.description
    stored = method.init_params(toy_params())
    shrink = {
        k: float(jnp.linalg.norm(stored[k]["kernel"]) / jnp.linalg.norm(toy_params()[k]["kernel"]))
        for k in ("conv", "head")
    }
    assert shrink["head"] < shrink["conv"] < 1.0  # the deeper layer is decayed more


def test_unknown_method_and_optimizer():
    with pytest.raises(ValueError, match="unknown method"):
        build("nope")
    with pytest.raises(ValueError, match="unknown optimizer"):
        build("wd", optimizer="rmsprop")


# ----------------------------------------------------------------------------------------------
# The train step


def _one_step(name, batch=None):
    method = build(name)
    state = train_lib.create_train_state(toy_params(), method)
    step = jax.jit(train_lib.make_train_step(toy_apply, method, seed=0))
    return step(state, toy_batch() if batch is None else batch)


@pytest.mark.parametrize("name", ["wd", "lpwd", "l2", "baseline"])
def test_step_metrics(name):
    state, metrics = _one_step(name)
    assert int(state.step) == 1
    assert bool(metrics["finite"])
    assert np.isfinite(float(metrics["loss"])) and 0 <= float(metrics["accuracy"]) <= 1
    rop = float(metrics["rop"])
    if name in ("wd", "lpwd"):
        assert 0.0 <= rop <= 1.0
    else:
        assert math.isnan(rop)  # no separate decoupled penalty
    assert set(metrics["layers"]) == {"conv", "head"}
    assert set(metrics["layers"]["conv"]) == {"weight_norm", "update_norm", "effective_step"}


def test_step_flags_non_finite_gradients():
    batch = toy_batch()
    batch["image"][0, 0, 0, 0] = np.nan
    _, metrics = _one_step("wd", batch)
    assert not bool(metrics["finite"])


def test_wd_rop_matches_the_definition():
    """R_op from the step equals eq. 10-11 computed by hand from u and P = d * theta."""
    method = build("wd", optimizer="sgdm")
    params = toy_params()
    state = train_lib.create_train_state(params, method)
    batch = toy_batch()
    _, metrics = jax.jit(train_lib.make_train_step(toy_apply, method, 0))(state, batch)
    grads = jax.grad(
        lambda p: train_lib.cross_entropy_loss(toy_apply(p, batch["image"]), batch["label"]).mean()
    )(params)
    mask = {"conv": {"kernel": 1.0, "bias": 0.0}, "head": {"kernel": 1.0, "bias": 0.0}}
    opposing = total = 0.0
    for path in (("conv", "kernel"), ("conv", "bias"), ("head", "kernel"), ("head", "bias")):
        theta = np.asarray(params[path[0]][path[1]])
        u = -0.05 * np.asarray(grads[path[0]][path[1]])  # SGD's first step: momentum is empty
        p = mask[path[0]][path[1]] * 0.1 * 0.05 * theta
        opposing += np.abs(p)[(theta + u - p) ** 2 > (theta + u) ** 2].sum()
        total += np.abs(p).sum()
    np.testing.assert_allclose(float(metrics["rop"]), opposing / total, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# jit on a mesh, pmap and one device compute the same numbers


@pytest.fixture(scope="module")
def tiny_model():
    model = models.create_model(
        "convnext_atto_cifar", num_classes=10, seed=0, **helpers.TINY_OVERRIDES
    )
    return models.functional_model(model)


def test_sharded_jit_pmap_and_single_device_agree(tiny_model):
    assert jax.device_count() == 8, "tests/conftest.py provides 8 simulated CPU devices"
    fm = tiny_model
    method = methods.build_method(
        "lpwd",
        optimizer="adam",
        learning_rate=1e-3,
        weight_decay=0.5,
        params=fm.params,
        apply_fn=fm.apply,
        example_batch=jnp.zeros((2, 32, 32, 3)),
    )
    rng = np.random.default_rng(0)
    batches = [
        dict(
            image=rng.normal(size=(32, 32, 32, 3)).astype(np.float32),
            label=rng.integers(0, 10, 32).astype(np.int32),
        )
        for _ in range(4)
    ]
    results = {}
    for kind, devices in (("jit", jax.devices()), ("jit", jax.devices()[:1]), ("pmap", None)):
        parallel = train_lib.make_parallel(kind, fm.apply, method, seed=0, devices=devices)
        state = parallel.put_state(train_lib.create_train_state(fm.params, method))
        losses = []
        for batch in batches:
            state, metrics = parallel.train_step(state, parallel.put_batch(batch))
            losses.append(float(parallel.to_host(metrics["loss"])))
        params = parallel.checkpointable(state).params
        results[f"{kind}{len(devices) if devices else 8}"] = (
            jax.tree.map(np.asarray, params),
            losses,
        )
    reference_params, reference_losses = results.pop("jit1")
    for name, (params, losses) in results.items():
        np.testing.assert_allclose(losses, reference_losses, rtol=1e-5, err_msg=name)
        chex.assert_trees_all_close(params, reference_params, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# Evaluation, pytree conversion, checkpoints, writers, config


def test_pad_batch_and_evaluate_count_only_real_examples():
    params = toy_params()
    batch = toy_batch(n=10)
    padded = train_lib.pad_batch(batch, 16)
    assert padded["image"].shape[0] == 16 and padded["mask"].sum() == 10
    parallel = train_lib.make_parallel("jit", toy_apply, build("baseline"), 0)
    result = train_lib.evaluate(parallel, parallel.put_state(params), iter([batch, batch]), 16)
    logits = toy_apply(params, batch["image"])
    expected = 100.0 * float(jnp.mean(jnp.argmax(logits, -1) == batch["label"]))
    assert result["count"] == 20
    np.testing.assert_allclose(result["top1"], expected, rtol=1e-6)


def test_flat_and_nested_dicts_round_trip(tiny_model):
    state = train_lib.create_train_state(tiny_model.params, build("wd", params=tiny_model.params))
    flat = train_lib.flat_dict(tiny_model.params)
    assert "stem/conv/kernel" in flat and "head/fc/kernel" in flat
    back = train_lib.from_flat_dict(tiny_model.params, flat)
    chex.assert_trees_all_equal(back, tiny_model.params)
    nested = train_lib.nested_dict(state)
    assert isinstance(nested["params"]["stem"]["conv"]["kernel"], jax.Array)
    chex.assert_trees_all_equal(train_lib.from_nested_dict(state, nested), state)
    with pytest.raises(ValueError, match="missing"):
        train_lib.from_flat_dict(tiny_model.params, {k: v for k, v in list(flat.items())[1:]})


def _save_two(directory):
    ckpt = train_lib.Checkpointer(directory, max_to_keep=3)
    params = toy_params()
    for step in (1, 2):
        state = jax.tree.map(lambda x, s=step: x * s, params)
        ckpt.save(step, state, dict(step=step, fingerprint=train_lib.fingerprint(state)))
    ckpt.close()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    return params, abstract


def _verify(state, meta):
    got = train_lib.fingerprint(state)
    return None if math.isclose(got, meta["fingerprint"], rel_tol=1e-6) else "fingerprint"


def test_checkpointer_restores_latest(tmp_path):
    params, abstract = _save_two(tmp_path / "ck")
    step, state, meta = train_lib.Checkpointer(tmp_path / "ck").restore_latest(abstract, _verify)
    assert step == 2 and meta["step"] == 2
    chex.assert_trees_all_close(state, jax.tree.map(lambda x: 2 * x, params))


@pytest.mark.parametrize("damage", ["garbage", "delete", "silent"])
def test_checkpointer_falls_back_from_a_corrupted_latest(tmp_path, capsys, damage):
    params, abstract = _save_two(tmp_path / "ck")
    files = [
        f for f in glob.glob(str(tmp_path / "ck" / "2" / "**"), recursive=True) if os.path.isfile(f)
    ]
    if damage == "garbage":
        for f in files:
            with open(f, "wb") as fh:
                fh.write(b"not a checkpoint")
    elif damage == "delete":
        for f in files:
            if "/state/" in f:
                os.remove(f)
    else:  # readable files, wrong numbers: only the fingerprint notices
        meta = tmp_path / "ck" / "2" / "meta" / "metadata"
        record = json.loads(meta.read_text())
        record["fingerprint"] += 1.0
        meta.write_text(json.dumps(record))
    ckpt = train_lib.Checkpointer(tmp_path / "ck")
    step, state, _ = ckpt.restore_latest(abstract, _verify)
    assert step == 1
    chex.assert_trees_all_close(state, params)
    assert "checkpoint 2" in capsys.readouterr().out
    assert ckpt.all_steps() == [1]
    assert os.path.isdir(tmp_path / "ck.corrupted" / "2")


def test_jsonl_writer_truncates_on_resume_and_writes_nan_as_null(tmp_path):
    path = str(tmp_path / "m.jsonl")
    w = writers.JsonlWriter(path)
    for step in (10, 20, 30):
        w.write_scalars(step, dict(loss=np.float32(1.5), rop=float("nan")))
    w.close()
    w = writers.JsonlWriter(path, keep_up_to_step=20)
    w.write_scalars(30, dict(loss=0.5))
    w.close()
    records = writers.read_jsonl(path)
    assert [r["step"] for r in records] == [10, 20, 30]
    assert records[0] == dict(step=10, loss=1.5, rop=None) and records[2]["loss"] == 0.5


def test_config_flags_presets_and_help():
    help_text = config.build_parser().format_help()
    for field in dataclasses.fields(config.Config):
        assert f"--{field.name}" in help_text
    c = config.parse_config(["--preset=quickstart", "--epochs=2", "--optimizer=sgdm", "--lr=None"])
    assert (c.dataset, c.epochs, c.optimizer) == ("digits", 2, "sgdm")
    assert c.learning_rate == config.DEFAULT_LR["sgdm"]
    paper = config.parse_config([])
    assert (paper.epochs, paper.batch_size, paper.weight_decay) == (100, 512, 1e-2)
    assert paper.learning_rate == 1e-4
    with pytest.raises(SystemExit):
        config.parse_config(["--method=sgd"])
    with pytest.raises(ValueError, match="model_overrides"):
        config.parse_config(["--model_overrides={bad"])
