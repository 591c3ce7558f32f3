"""Smoke tests of the benchmark programs: tiny sizes, one repeat, valid JSON. No timings checked."""

from __future__ import annotations

import json

import pytest

from experiments import bench_common, bench_regularizers, bench_train_step


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
        assert r["state_extra_bytes_vs_adam"] <= 8  # step counts only, no param-sized buffers


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
