"""Tests of lpwd_optax.layerwise: depth labels (forward pass and paths), layer-wise rates, table."""

import doctest
import functools
import math
import re
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from lpwd_optax import layerwise
from lpwd_optax.layerwise import depth_labels, depth_table, layerwise_schedule, path_str
from lpwd_optax.models import convnext_rules, swin_rules

_SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)


def _labels_by_module(labels):
    """{module path: label}, checking that all leaves of a module share one label."""
    out = {}
    for path, label in jax.tree_util.tree_flatten_with_path(labels)[0]:
        assert type(label) is int, (path, label)
        module = path_str(path).rsplit("/", 1)[0]
        assert out.setdefault(module, label) == label, module
    return out


class Stack(nn.Module):
    """Dense layers called in the order of `names` (whatever their alphabetical order)."""

    names: tuple[str, ...]

    @nn.compact
    def __call__(self, x):
        for name in self.names:
            x = nn.tanh(nn.Dense(3, name=name)(x))
        return x


class Blocks(nn.Module):
    depth: int = 12

    def setup(self):
        self.stem = nn.Dense(4)
        self.blocks = [nn.Dense(4) for _ in range(self.depth)]  # blocks_0 .. blocks_11

    def __call__(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x


class ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        x = x + nn.Dense(4, name="up")(x)
        return nn.LayerNorm(name="a_norm")(x), None


class ScanNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(4, name="z_stem")(x)
        body = nn.scan(
            nn.remat(ScanBlock),
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=3,
        )
        x, _ = body(name="m_body")(x, None)
        return nn.Dense(2, name="b_head")(x)


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.z_in = nnx.Linear(2, 4, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(4, 4, rngs=rngs) for _ in range(11)])
        self.a_out = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x, *, train: bool = False):
        if train:  # Python branching on a static keyword must keep working
            x = x * 2.0
        x = self.z_in(x)
        for layer in self.layers:
            x = nnx.relu(layer(x))
        return self.a_out(x)


def _shapes(model, *args):
    return jax.eval_shape(model.init, jax.random.key(0), *args)


# --------------------------------------------------------------------------------------------
# Paths


def test_path_str():
    tree = {"a": [{"w": 1}], "b": (2,)}
    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert paths == ["a/0/w", "b/0"]
    assert path_str(("stages", 0, "blocks", 1, "mlp", "fc1", "kernel")) == (
        "stages/0/blocks/1/mlp/fc1/kernel"
    )
    assert path_str((jax.tree_util.GetAttrKey("conv"), jax.tree_util.GetAttrKey("value"))) == (
        "conv"
    )
    state = nnx.state(nnx.eval_shape(lambda: nnx.Linear(2, 3, rngs=nnx.Rngs(0))), nnx.Param)
    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert paths == ["bias", "kernel"]


# --------------------------------------------------------------------------------------------
# Forward mode


def test_dense_stack_from_init_is_in_call_order():
    names = ("zeta", "alpha", "mu", "beta")  # alphabetical order != call order
    model = Stack(names)
    x = jnp.ones((2, 3))
    variables = model.init(jax.random.key(0), x)
    expected = {f"params/{name}": i + 1 for i, name in enumerate(names)}
    assert _labels_by_module(depth_labels(variables, model.apply, x)) == expected

    # A bare params dict and an apply function around it give the same labels.
    bare = depth_labels(variables["params"], lambda p, x: model.apply({"params": p}, x), x)
    assert bare == depth_labels(variables, model.apply, x)["params"]
    # From paths alone the order is alphabetical, which is why the forward mode exists.
    assert _labels_by_module(depth_labels(variables)) == {
        f"params/{name}": i + 1 for i, name in enumerate(sorted(names))
    }


@_SETTINGS
@given(perm=st.integers(1, 8).flatmap(lambda k: st.permutations(range(k))))
def test_dense_stack_labels_are_one_to_k_in_call_order(perm):
    names = tuple(f"dense_{p}" for p in perm)
    model = Stack(names)
    x = jax.ShapeDtypeStruct((1, 3), jnp.float32)
    labels = depth_labels(_shapes(model, x), model.apply, x)
    assert _labels_by_module(labels) == {f"params/{n}": i + 1 for i, n in enumerate(names)}


def test_blocks_10_and_11_come_last_in_path_and_forward_mode():
    model = Blocks()
    x = jnp.ones((1, 4))
    params = _shapes(model, x)["params"]
    path_labels = depth_labels(params)
    forward_labels = depth_labels(params, lambda p, x: model.apply({"params": p}, x), x)
    by_module = _labels_by_module(path_labels)
    assert by_module["blocks_10"] == 11
    assert by_module["blocks_11"] == 12
    assert by_module["stem"] == 13  # natural order: "blocks_*" < "stem"
    assert _labels_by_module(forward_labels) == {
        "stem": 1,
        **{f"blocks_{i}": i + 2 for i in range(12)},
    }
    # Both modes agree on the order of the blocks.
    blocks = lambda labels: [labels[f"blocks_{i}"]["kernel"] for i in range(12)]
    assert np.all(np.diff(blocks(path_labels)) > 0)
    assert np.all(np.diff(blocks(forward_labels)) > 0)


def test_nnx_state():
    model = nnx.eval_shape(lambda: NnxNet(nnx.Rngs(0)))
    graphdef, state = nnx.split(model, nnx.Param)
    apply_fn = lambda state, x, train: nnx.merge(graphdef, state)(x, train=train)
    x = jnp.ones((1, 2))

    labels = depth_labels(state, apply_fn, x, train=False)
    chex.assert_trees_all_equal_structs(labels, state)
    assert _labels_by_module(labels) == {
        "z_in": 1,
        **{f"layers/{i}": i + 2 for i in range(11)},
        "a_out": 13,
    }
    assert depth_labels(state, apply_fn, x, train=True) == labels
    # Path mode: integer keys sort numerically ("layers/10" after "layers/9").
    by_module = _labels_by_module(depth_labels(state))
    assert [by_module[f"layers/{i}"] for i in range(11)] == list(range(2, 13))
    assert (by_module["a_out"], by_module["z_in"]) == (1, 13)


def test_scan_and_remat_model():
    model = ScanNet()
    x = jnp.ones((2, 4))
    variables = _shapes(model, x)
    labels = depth_labels(variables, model.apply, x)
    body = labels["params"].pop("m_body")
    assert _labels_by_module(labels) == {"params/z_stem": 1, "params/b_head": 8}
    # The scan's three slices are three blocks, each at its unrolled twin's depth; the
    # (3, ...) leaves get int arrays that broadcast against them.
    for name, kernel_depths in (("up", [2, 4, 6]), ("a_norm", [3, 5, 7])):
        for leaf in body[name].values():
            assert leaf.dtype.kind == "i" and leaf.shape[0] == 3 and leaf.size == 3
            assert leaf.ravel().tolist() == kernel_depths


def test_control_flow_and_custom_derivatives_are_followed():
    @jax.custom_vjp
    def scale(x, w):
        return x * w

    scale.defvjp(lambda x, w: (x * w, (x, w)), lambda res, g: (g * res[1], g * res[0]))

    @jax.custom_jvp
    def shift(x, w):
        return x + w

    shift.defjvp(lambda primals, tangents: (shift(*primals), tangents[0] + tangents[1]))

    def apply_fn(p, x):
        x = jax.jit(lambda x, w: x @ w)(x, p["z"]["w"])
        x = jax.checkpoint(lambda x, w: jnp.sin(x @ w))(x, p["y"]["w"])
        x, _ = jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, p["x"]["w"])
        x = jax.lax.cond(x.sum() > 0, lambda x, w: x + w, lambda x, w: x - w, x, p["w"]["b"])
        body = lambda c: (c[0] * p["v"]["b"], c[1] + 1)
        x = jax.lax.while_loop(lambda c: c[1] < 2, body, (x, 0))[0]
        x = scale(x, p["u"]["b"])
        return shift(x, p["t"]["b"])

    params = {k: {"w": jnp.ones((3, 3))} for k in "zy"}
    params["x"] = {"w": jnp.ones((2, 3, 3))}
    params.update({k: {"b": jnp.ones((1, 3))} for k in "wvut"})
    labels = depth_labels(params, apply_fn, jnp.ones((1, 3)))
    assert labels["x"]["w"].ravel().tolist() == [3, 4]  # scanned over: one layer per slice
    labels["x"]["w"] = 3
    expected = {k: i + 1 for i, k in enumerate("zyx")}
    expected.update({k: i + 5 for i, k in enumerate("wvut")})
    assert _labels_by_module(labels) == expected


def test_casts_and_reshapes_are_not_uses():
    # Mixed precision: every param is cast (and one reshaped) before the forward pass starts.
    model = Stack(("c", "b", "a"))
    x = jnp.ones((1, 3))
    params = _shapes(model, x)

    def apply_fn(p, x):
        p = jax.tree.map(lambda w: w.astype(jnp.bfloat16), p)
        p = jax.jit(lambda p: jax.tree.map(lambda w: w.reshape(w.shape), p))(p)
        return model.apply(p, x.astype(jnp.bfloat16))

    assert _labels_by_module(depth_labels(params, apply_fn, x)) == {
        "params/c": 1,
        "params/b": 2,
        "params/a": 3,
    }


def test_layers_read_side_by_side_share_a_depth():
    # Depth is the dataflow's: b_9 and b_10 are read together, `a` reads what they make.
    params = {"b_10": {"w": jnp.ones(2)}, "b_9": {"w": jnp.ones(2)}, "a": {"w": jnp.ones(2)}}
    apply_fn = lambda p, x: jnp.concatenate([p["b_10"]["w"], p["b_9"]["w"]]).sum() * p["a"]["w"]
    labels = depth_labels(params, apply_fn, jnp.ones(2))
    assert labels == {"b_9": {"w": 1}, "b_10": {"w": 1}, "a": {"w": 2}}


def test_unused_params_get_the_last_label_with_a_warning():
    params = {"used_2": {"w": jnp.ones(2)}, "unused": {"w": jnp.ones(2)}, "used_1": {"w": 1.0}}
    apply_fn = lambda p, x: (x * p["used_1"]["w"]) @ p["used_2"]["w"]
    with pytest.warns(UserWarning, match=r"never used 1 params \(e.g. unused/w\)"):
        labels = depth_labels(params, apply_fn, jnp.ones(2))
    assert labels == {"used_1": {"w": 1}, "used_2": {"w": 2}, "unused": {"w": 3}}


def test_apply_fn_that_uses_no_params_is_an_error():
    with pytest.raises(ValueError, match="used none of the params"):
        depth_labels({"a": {"w": jnp.ones(2)}}, lambda p, x: x, jnp.ones(2))


def test_apply_fn_that_raises_gives_a_clear_error():
    model = Stack(("a", "b"))
    params = _shapes(model, jnp.ones((1, 3)))
    with pytest.raises(ValueError, match=r"could not trace apply_fn apply.*shapes and dtypes") as e:
        depth_labels(params, model.apply, jnp.ones((1, 7)))  # wrong input width
    assert e.value.__cause__ is not None

    def broken(p, x):
        raise RuntimeError("boom")

    with pytest.raises(ValueError, match=r"broken.*RuntimeError: boom"):
        depth_labels(params, broken, jnp.ones((1, 3)))


def test_deterministic_python_ints():
    model = Blocks(depth=3)
    x = jnp.ones((1, 4))
    params = _shapes(model, x)
    runs = [depth_labels(params, model.apply, x) for _ in range(2)]
    assert runs[0] == runs[1]
    assert all(type(v) is int for v in jax.tree.leaves(runs[0]))


# --------------------------------------------------------------------------------------------
# Rules


def _convnext_like_params():
    w = np.zeros((2, 2))
    block = {"dwconv": {"kernel": w}, "mlp": {"fc1": {"kernel": w}, "fc2": {"kernel": w}}}
    return {
        "stem": {"conv": {"kernel": w}, "norm": {"scale": np.zeros(2)}},
        "stages": {
            0: {"blocks": {0: block, 1: block}},
            1: {"downsample": {"conv": {"kernel": w}}, "blocks": {i: block for i in range(11)}},
        },
        "head": {"norm": {"scale": np.zeros(2)}, "fc": {"kernel": w}},
    }


def _convnext_expected():
    expected = {"stem": 1, "stages/0/blocks/0": 2, "stages/0/blocks/1": 3}
    expected["stages/1/downsample"] = 4
    expected.update({f"stages/1/blocks/{i}": 5 + i for i in range(11)})
    expected["head"] = 16
    return expected


def _label_of(labels, prefix):
    found = {
        label
        for path, label in jax.tree_util.tree_flatten_with_path(labels)[0]
        if path_str(path).startswith(prefix + "/")
    }
    assert len(found) == 1, (prefix, found)
    return found.pop()


@pytest.mark.parametrize("prefix", ["", "params"])
def test_convnext_rules(prefix):
    params = _convnext_like_params()
    if prefix:
        params = {prefix: params}
    labels = depth_labels(params, rules=convnext_rules)
    for module, label in _convnext_expected().items():
        assert _label_of(labels, f"{prefix}/{module}".lstrip("/")) == label, module
    assert max(jax.tree.leaves(labels)) == 16


def test_swin_rules():
    w = np.zeros((2, 2))
    block = {"attn": {"qkv": {"kernel": w}, "relative_position_bias_table": w}, "norm1": {}}
    block["norm1"] = {"scale": np.zeros(2)}
    params = {
        "patch_embed": {"proj": {"kernel": w}},
        "layers": {
            0: {"blocks": {0: block, 1: block}},
            1: {"downsample": {"norm": {"scale": np.zeros(2)}}, "blocks": {0: block}},
        },
        "norm": {"scale": np.zeros(2)},
        "head": {"fc": {"kernel": w}},
    }
    labels = depth_labels(params, rules=swin_rules)
    expected = {
        "patch_embed": 1,
        "layers/0/blocks/0": 2,
        "layers/0/blocks/1": 3,
        "layers/1/downsample": 4,
        "layers/1/blocks/0": 5,
        "norm": 6,
        "head": 7,
    }
    for module, label in expected.items():
        assert _label_of(labels, module) == label, module


def test_rules_group_modules_and_accept_all_group_kinds():
    params = {
        "embed": {"w": 0},
        "block_2": {"a": {"w": 0}, "b": {"w": 0}},
        "block_10": {"a": {"w": 0}},
        "out": {"w": 0},
    }
    rules = [
        (r"^embed/", -1),
        (r"^block_(\d+)/", None),  # the regex groups as ints
        (re.compile(r"^out/"), lambda m: (math.inf,)),
    ]
    labels = depth_labels(params, rules=rules)
    assert labels == {
        "embed": {"w": 1},
        "block_2": {"a": {"w": 2}, "b": {"w": 2}},
        "block_10": {"a": {"w": 3}},
        "out": {"w": 4},
    }


def test_rules_in_forward_mode_group_but_order_by_use():
    model = Blocks(depth=4)
    x = jnp.ones((1, 4))
    params = _shapes(model, x)["params"]
    apply_fn = lambda p, x: model.apply({"params": p}, x)
    # Pair the blocks; group values deliberately disagree with the call order.
    rules = [(r"^blocks_(\d+)/", lambda m: -(int(m[1]) // 2)), (r"^stem/", 100)]
    labels = depth_labels(params, apply_fn, x, rules=rules)
    assert _labels_by_module(labels) == {
        "stem": 1,
        "blocks_0": 2,
        "blocks_1": 2,
        "blocks_2": 3,
        "blocks_3": 3,
    }


def test_rule_errors():
    params = {"stem": {"w": 0}, "head": {"w": 0}}
    with pytest.raises(ValueError, match="no rule matches the param 'head/w'"):
        depth_labels(params, rules=[(r"^stem/", 0)])
    with pytest.raises(TypeError, match="number or a tuple of numbers"):
        depth_labels(params, rules=[(r".*", "first")])
    with pytest.raises(TypeError, match=r"\(regex, group\) pair"):
        depth_labels(params, rules=[r".*"])
    with pytest.raises(ValueError, match="not a valid regex"):
        depth_labels(params, rules=[(r"(", 0)])
    with pytest.raises(TypeError, match="sequence of"):
        depth_labels(params, rules=r".*")


@pytest.mark.parametrize(
    "name, rules", [("convnext_atto_cifar", convnext_rules), ("swin_tiny_cifar", swin_rules)]
)
def test_real_models_rules_match_the_forward_pass(name, rules):
    import models

    # Abstract params (ShapeDtypeStructs): nothing is initialized, tracing is enough.
    create = functools.partial(models.create_model, name, num_classes=10, seed=0)
    fm = models.functional_model(nnx.eval_shape(create))
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    by_rules = depth_labels(fm.params, rules=rules)
    by_forward = depth_labels(fm.params, fm.apply, x, rules=rules, train=False, rng=None)
    assert by_rules == by_forward
    assert max(jax.tree.leaves(by_rules)) > 10


# --------------------------------------------------------------------------------------------
# Layer-wise rates


class LayerwiseScheduleTest(parameterized.TestCase):
    def test_rates_increase_with_depth_up_to_max_scale_times_rate(self):
        depths = {"a": 1, "b": {"c": 2, "d": 2}, "e": 4}
        rates = layerwise_schedule(depths, 0.01, max_scale=3.0)
        chex.assert_trees_all_close(rates, {"a": 0.0075, "b": {"c": 0.015, "d": 0.015}, "e": 0.03})
        assert all(type(r) is float for r in jax.tree.leaves(rates))
        assert max(jax.tree.leaves(rates)) == pytest.approx(3.0 * 0.01)

    def test_default_max_scale_is_two(self):
        rates = layerwise_schedule([1, 2, 3, 4], 0.5)
        np.testing.assert_allclose(rates, [0.25, 0.5, 0.75, 1.0])

    def test_schedule_leaves(self):
        schedule = lambda step: 0.1 * 0.5**step
        rates = layerwise_schedule({"a": 1, "b": 2}, schedule)
        assert callable(rates["a"]) and callable(rates["b"])
        for step in range(3):
            assert rates["a"](step) == pytest.approx(schedule(step) * 1.0)
            assert rates["b"](step) == pytest.approx(schedule(step) * 2.0)
        # Jittable like any optax schedule.
        assert float(jax.jit(rates["b"])(jnp.asarray(1))) == pytest.approx(0.1)

    def test_works_on_nnx_labels(self):
        state = nnx.state(nnx.eval_shape(lambda: NnxNet(nnx.Rngs(0))), nnx.Param)
        rates = layerwise_schedule(depth_labels(state), 1e-2)
        chex.assert_trees_all_equal_structs(rates, state)

    @parameterized.named_parameters(
        ("negative_rate", {"a": 1}, -0.1, 2.0, ValueError, "rate must be a finite number >= 0"),
        ("nan_rate", {"a": 1}, float("nan"), 2.0, ValueError, "rate must be a finite"),
        ("string_rate", {"a": 1}, "0.1", 2.0, TypeError, "rate must be a float"),
        ("zero_max_scale", {"a": 1}, 0.1, 0.0, ValueError, "max_scale must be"),
        ("float_depth", {"a": 1.0}, 0.1, 2.0, TypeError, "depth at 'a' must be an int"),
        ("bool_depth", {"a": True}, 0.1, 2.0, TypeError, "depth at 'a' must be an int"),
        ("float_array_depth", {"a": np.ones(2)}, 0.1, 2.0, TypeError, "depth at 'a' must hold"),
        ("zero_array_depth", {"a": np.zeros(2, int)}, 0.1, 2.0, ValueError, "depth at 'a' must"),
        ("zero_depth", {"a": {"b": 0}}, 0.1, 2.0, ValueError, "depth at 'a/b' must be >= 1"),
        ("empty_depths", {}, 0.1, 2.0, ValueError, "no leaves"),
    )
    def test_bad_input(self, depths, rate, max_scale, error, message):
        with pytest.raises(error, match=re.escape(message)):
            layerwise_schedule(depths, rate, max_scale=max_scale)


@_SETTINGS
@given(
    k=st.integers(1, 12),
    rate=st.floats(0.0, 10.0, allow_nan=False),
    max_scale=st.floats(0.1, 5.0),
)
def test_layerwise_rates_property(k, rate, max_scale):
    model = Stack(tuple(f"l{i}" for i in range(k)))
    x = jax.ShapeDtypeStruct((1, 3), jnp.float32)
    labels = depth_labels(_shapes(model, x), model.apply, x)
    rates = layerwise_schedule(labels, rate, max_scale=max_scale)
    by_depth = [rates["params"][f"l{i}"]["kernel"] for i in range(k)]
    np.testing.assert_allclose(by_depth, [rate * max_scale * (i + 1) / k for i in range(k)])
    assert np.all(np.diff(by_depth) >= 0)
    assert max(by_depth) == pytest.approx(rate * max_scale)
    assert min(by_depth) == pytest.approx(rate * max_scale / k)


# --------------------------------------------------------------------------------------------
# Table


def test_depth_table():
    model = Stack(("second_b", "first_a"))
    x = jnp.ones((1, 3))
    params = _shapes(model, x)
    labels = depth_labels(params, model.apply, x)
    table = depth_table(params, labels, layerwise_schedule(labels, 0.1))
    lines = table.splitlines()
    assert lines[0].split() == ["label", "path", "shape", "rate"]
    assert [line.split()[:2] for line in lines[1:5]] == [
        ["1", "params/second_b/bias"],
        ["1", "params/second_b/kernel"],
        ["2", "params/first_a/bias"],
        ["2", "params/first_a/kernel"],
    ]
    assert "(3, 3)" in lines[2] and lines[2].endswith("0.1")
    assert lines[-1] == "2 layers; rate 0.1 at depth 1 (shallowest) up to 0.2 at depth 2 (deepest)."

    scheduled = depth_table(params, labels, layerwise_schedule(labels, lambda t: 0.1))
    assert "0.2 (t=0)" in scheduled
    assert depth_table(params, labels).splitlines()[-1] == "2 layers."
    assert "0.5" in depth_table(params, labels, 0.5)


def test_depth_table_mismatch_names_the_path():
    params = {"a": {"w": np.zeros(2)}, "b": {"w": np.zeros(2)}}
    with pytest.raises(ValueError, match="'a/v' in the labels but 'a/w' in the params"):
        depth_table(params, {"a": {"v": 1}, "b": {"w": 2}})
    with pytest.raises(ValueError, match="'b/w' is in the params only"):
        depth_table(params, {"a": {"w": 1}})


# --------------------------------------------------------------------------------------------
# Misc


def test_bad_params_and_arguments():
    with pytest.raises(ValueError, match="params is None"):
        depth_labels(None)
    with pytest.raises(ValueError, match="no leaves"):
        depth_labels({})
    with pytest.raises(TypeError, match="without an apply_fn"):
        depth_labels({"a": {"w": 0}}, None, jnp.ones(2))
    with pytest.raises(TypeError, match="apply_fn must be callable"):
        depth_labels({"a": {"w": 0}}, "model.apply", jnp.ones(2))


def test_docstring_examples():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = doctest.testmod(layerwise, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


def test_public_names():
    assert set(layerwise.__all__) == {
        "depth_labels",
        "depth_table",
        "layerwise_schedule",
        "path_str",
    }
