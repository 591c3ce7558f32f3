"""Smoke tests of the benchmark programs: tiny sizes, one repeat, valid JSON. No timings checked."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lpwd_optax.experiments.benchmarks import (
    bench_common,
    bench_matmul,
    bench_regularizers,
    bench_structure,
    bench_train_step,
)


def test_format_table_and_interleaved_timing():
    calls = []
    times = bench_common.time_interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=2, warmup=1
    )
    assert calls == ["a", "b", "b", "a", "a", "b"]  # round-robin, rotated, warm-up included
    assert {len(t["wall_s"]) for t in times.values()} == {2}
    table = bench_common.format_table(["name", "x"], [["a", 1.5], ["b", None]])
    assert "1.500" in table and "-" in table.splitlines()[-1]


def test_bench_regularizers_writes_json(tmp_path):
    out = tmp_path / "reg.json"
    report = bench_regularizers.main(
        [
            "--model", "convnext_atto", "--model-overrides", '{"dims": [16, 32], "depths": [1, 1]}',
            "--image-size", "32", "--steps", "1",
            "--repeats", "1", "--warmup", "0", "--out", str(out),
            "--only", "LPWD (layer-wise pre_weight_decay)",
        ]
    )  # fmt: skip
    loaded = json.loads(out.read_text())
    assert loaded["results"].keys() == report["results"].keys()
    assert set(loaded["results"]) == {"optax.adamw", "LPWD (layer-wise pre_weight_decay)"}
    for r in loaded["results"].values():
        assert r["step_wall_s"]["n"] == 1
        assert r["state_extra_bytes_vs_adam"] == 0  # constant hyperparameters: no state at all


def test_bench_regularizers_has_the_variants(tmp_path):
    variants = [
        "cautious_weight_decay",
        "corrected_weight_decay (AdamC, scheduled lr)",
        "stable_weight_decay (AdamS)",
        "constrained_parameter_regularization (CPR)",
    ]
    report = bench_regularizers.main(
        [
            "--model", "convnext_atto", "--model-overrides", '{"dims": [16, 32], "depths": [1, 1]}',
            "--image-size", "32", "--steps", "1",
            "--repeats", "1", "--warmup", "0", "--out", str(tmp_path / "reg.json"),
            "--only", *variants,
        ]
    )  # fmt: skip
    results = report["results"]
    assert set(results) == {"optax.adamw", *variants}
    for name in variants:
        assert np.isfinite(results[name]["ratio_wall_s"]) and results[name]["ratio_wall_s"] > 0
    for name in variants[2:]:  # AdamS and CPR: one extra param-sized read is the limit
        r = results[name]
        assert r["group"] == "extra read" and 1 < r["extra_read_limit"] < 2
        assert isinstance(r["meets_target"], bool)
    # Cautious WD keeps no state; the scheduled AdamC keeps a step count (4 bytes).
    assert results["cautious_weight_decay"]["state_extra_bytes_vs_adam"] == 0
    assert results["corrected_weight_decay (AdamC, scheduled lr)"]["state_extra_bytes_vs_adam"] == 4


def test_bench_train_step_writes_json(tmp_path):
    out = tmp_path / "train.json"
    bench_train_step.main(
        [
            "--models", "convnext_atto", "--depthwise", "shift", "--batch-size", "2",
            "--model-overrides", '{"dims": [8], "depths": [1], "kernel_size": 3}',
            "--steps", "1", "--repeats", "1", "--in-process", "--no-torch", "--out", str(out),
        ]
    )  # fmt: skip
    loaded = json.loads(out.read_text())
    (result,) = loaded["results"].values()
    assert result["framework"] == "flax" and result["depthwise_impl"] == "shift"
    assert result["images_per_s"]["n"] == 1 and result["images_per_s"]["median"] > 0
    assert result["trace_and_compile_s"] > 0 and result["peak_rss_mib_after_setup"] > 0


def test_bench_train_step_device_option(monkeypatch, capsys):
    args = bench_train_step.parse_args(["--models", "convnext_atto"])
    assert args.device == "cpu"  # the default: the CPU benchmark as it always ran
    argv = bench_train_step._child_argv(args, ["flax:convnext_atto:auto"], "out.json")
    assert argv[argv.index("--device") + 1] == "cpu"
    bench_train_step.check_jax_backend("cpu")  # the tests run JAX on CPU
    with pytest.raises(SystemExit, match="JAX runs on 'cpu'"):
        bench_train_step.check_jax_backend("cuda")
    monkeypatch.setattr(bench_train_step, "_cuda_available", lambda: False)
    with pytest.raises(SystemExit):
        bench_train_step.parse_args(["--device", "cuda"])
    assert "torch sees no CUDA device" in capsys.readouterr().err


def test_bench_train_step_configurations():
    assert bench_train_step.configurations("convnext_tiny", ["shift", "conv"], True) == [
        "flax:convnext_tiny:shift",
        "flax:convnext_tiny:conv",
        "torch:convnext_tiny",
    ]
    assert bench_train_step.configurations("swin_tiny", ["shift"], False) == ["flax:swin_tiny"]
    preset, timm_name, kwargs = bench_train_step.cifar_arguments("swin_tiny")
    assert preset == "swin_tiny_cifar" and timm_name.startswith("swin_tiny_patch4")
    assert kwargs == {"img_size": 32, "patch_size": 2, "window_size": 4}
    with pytest.raises(ValueError, match="no CIFAR preset"):
        bench_train_step.cifar_arguments("resnet50")


def _dot_general_cases():
    """(lhs shape, rhs shape, dimension numbers): plain, transposed operands, batched."""
    return [
        ((6, 4), (4, 5), (((1,), (0,)), ((), ()))),
        ((6, 4), (5, 4), (((1,), (1,)), ((), ()))),  # x @ w.T: an input gradient
        ((6, 4), (6, 5), (((0,), (0,)), ((), ()))),  # x.T @ dy: a weight gradient
        ((2, 3, 4, 5), (2, 3, 5, 4), (((3,), (2,)), ((0, 1), (0, 1)))),  # attention-like
    ]


def test_bench_matmul_finds_every_dot_of_a_compiled_function():
    import jax
    import jax.numpy as jnp

    cases = _dot_general_cases()

    def fn(*arrays):
        out = [
            jnp.sum(jnp.tanh(jax.lax.dot_general(a, b, dims)))  # keep the dots separate
            for (a, b), (_, _, dims) in zip(zip(arrays[::2], arrays[1::2]), cases)
        ]
        return sum(out)

    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s, np.float32) for lhs, rhs, _ in cases for s in (lhs, rhs)]
    found = bench_matmul.dots_in_hlo(jax.jit(fn).lower(*arrays).compile().as_text())
    assert sum(found.values()) == len(cases)
    assert {d.flops for d in found} == {
        2 * 6 * 4 * 5,
        2 * 2 * 3 * 4 * 5 * 4,
    }  # XLA may canonicalize operand order or dims, never the work
    for dot in found:
        # The einsum translation against XLA's own product on the found shapes.
        a = rng.standard_normal(dot.lhs, np.float32)
        b = rng.standard_normal(dot.rhs, np.float32)
        expected = np.asarray(jax.lax.dot_general(a, b, dot.dimension_numbers))
        np.testing.assert_allclose(np.einsum(dot.einsum(), a, b), expected, rtol=1e-5, atol=1e-5)
        assert expected.shape == dot.out


def test_bench_matmul_reads_operand_shapes_printed_inline():
    text = """HloModule m, entry_computation_layout={(f32[8,4]{1,0}, f32[5,4]{1,0})->f32[8,5]{1,0}}

ENTRY %main (a: f32[8,4], b: f32[5,4]) -> f32[8,5] {
  %a = f32[8,4]{1,0} parameter(0)
  %b = f32[5,4]{1,0} parameter(1)
  ROOT %d = f32[8,5]{1,0} dot(f32[8,4]{1,0} %a, f32[5,4]{1,0} %b), lhs_contracting_dims={1}, rhs_contracting_dims={1}
}
"""  # noqa: E501
    (dot,) = bench_matmul.dots_in_hlo(text)
    assert (dot.lhs, dot.rhs, dot.lhs_contracting, dot.rhs_contracting) == (
        (8, 4),
        (5, 4),
        (1,),
        (1,),
    )
    assert dot.out == (8, 5) and dot.einsum() == "ab,cb->ac"
    with pytest.raises(ValueError, match="has no shape"):
        bench_matmul.dots_in_hlo(
            text.replace("%a = f32[8,4]{1,0} parameter(0)", "").replace(
                "dot(f32[8,4]{1,0} %a", "dot(%a"
            )
        )


@pytest.mark.parametrize("lhs,rhs,dims", _dot_general_cases())
def test_bench_matmul_einsum_matches_dot_general(lhs, rhs, dims):
    import jax

    (lc, rc), (lb, rb) = dims
    dot = bench_matmul.Dot("f32", lhs, rhs, lb, rb, lc, rc)
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(lhs, np.float32), rng.standard_normal(rhs, np.float32)
    expected = np.asarray(jax.lax.dot_general(a, b, dims))
    assert dot.out == expected.shape
    assert dot.flops == 2 * expected.size * int(np.prod([lhs[d] for d in lc]))
    np.testing.assert_allclose(np.einsum(dot.einsum(), a, b), expected, rtol=1e-5, atol=1e-5)


def test_bench_matmul_rejects_mismatched_dims():
    with pytest.raises(ValueError, match="contracting dimensions differ"):
        bench_matmul.Dot("f32", (6, 4), (5, 5), (), (), (1,), (0,))
    with pytest.raises(ValueError, match="batch dimensions differ"):
        bench_matmul.Dot("f32", (2, 6, 4), (3, 4, 5), (0,), (0,), (2,), (1,))


@pytest.mark.parametrize("with_torch", [False, True])
def test_bench_matmul_writes_json(tmp_path, with_torch):
    if with_torch:
        pytest.importorskip("torch")
    out = tmp_path / "mm.json"
    overrides = {"embed_dim": 8, "depths": [1, 1], "num_heads": [1, 2]}
    report = bench_matmul.main(
        [
            "--model", "swin_tiny", "--batch-size", "2", "--model-overrides",
            json.dumps(overrides), "--repeats", "1", "--no-steps", "--out", str(out),
            *([] if with_torch else ["--no-torch"]),
        ]
    )  # fmt: skip
    loaded = json.loads(out.read_text())
    assert loaded["totals"]["dots_per_step"] == sum(r["count_per_step"] for r in report["dots"])
    # Per block: qkv, proj, fc1, fc2 (forward, input and weight gradients) and two attention
    # products with their gradients; plus patch merging and the head.
    assert loaded["totals"]["dots_per_step"] >= 2 * (4 * 3 + 2 * 3)
    for r in loaded["dots"]:
        assert r["gflop"] > 0 and r["xla_s"] > 0 and r["xla_eigen_s"] > 0
        assert r["xla_best_s"] == min(r["xla_s"], r["xla_eigen_s"])
    assert loaded["torch_available"] == with_torch
    if with_torch:
        assert all(r["torch_s"] > 0 for r in loaded["dots"])
        assert loaded["totals"]["torch_matmul_s_per_step"] > 0


def test_bench_structure_writes_json(tmp_path, capsys):
    out = tmp_path / "structure.json"
    report = bench_structure.main(
        [
            "--blocks",
            "2",
            "--width",
            "16",
            "--batch",
            "2",
            "--tokens",
            "4",
            "--repeats",
            "1",
            "--out",
            str(out),
        ]
    )
    # Per block: norm, q/k/v (one depth: they read one input), out, norm, two Dense.
    assert json.loads(out.read_text())["layers"] == report["layers"] == 15
    assert set(report["structure"]) == {"stacked", "unrolled"}
    assert report["xla_costs"]["lpwd"]["flops"] > 0
    assert "2 scanned blocks" in capsys.readouterr().out
