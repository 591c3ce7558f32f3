"""experiments/benchmarks/device_check.sh --quick on CPU: every part runs and writes its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "device_check.sh"


@pytest.mark.slow
def test_device_check_quick_writes_json(tmp_path):
    out = tmp_path / "check"
    # A user's environment: not the 8 simulated devices of conftest.py.
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHON"] = sys.executable
    env["LPWD_OPTAX_CACHE"] = str(tmp_path / "cache")
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--quick", "--no_install", "--output_dir", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log

    check = json.loads((out / "device_check.json").read_text())
    assert check["device"] == "cpu" and check["quick"] is True
    statuses = {p["part"]: p["status"] for p in check["parts"]}
    parts = ["devices", "train_step", "regularizers", "paper_cell"]
    assert statuses == dict.fromkeys(parts, "ok"), log

    devices = json.loads((out / "devices.json").read_text())
    assert devices["ok"] and devices["jax"]["backend"] == "cpu"
    assert "JAX   " in proc.stdout and "runs on cpu" in proc.stdout

    step = json.loads((out / "train_step.json").read_text())
    assert step["device"] == "cpu"
    flax = step["results"]["flax:convnext_atto:auto"]
    assert flax["device"].startswith("cpu") and flax["images_per_s"]["median"] > 0
    if step["torch_available"]:
        assert step["results"]["torch:convnext_atto"]["device"] == "cpu"
        assert flax["vs_timm"] > 0

    regularizers = json.loads((out / "regularizers.json").read_text())
    assert "LPWD (layer-wise pre_weight_decay)" in regularizers["results"]
    assert regularizers["machine"]["jax_backend"] == "cpu"

    cell = json.loads((out / "paper_cell.json").read_text())
    assert cell["finished"] and "--model=convnext_tiny_cifar" in cell["flags"]
    epochs = cell["epochs_compared"]
    assert 2 >= epochs == cell["runs"]["wd"]["epochs_finished"] >= 1  # --quick passes --epochs 2
    for method in ("wd", "lpwd"):
        run = cell["methods"][method]
        assert len(run["epochs"]) == epochs
        assert all(0 <= e["test_top1"] <= 100 for e in run["epochs"])


def test_device_check_rejects_unknown_arguments(tmp_path):
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--output-dir", str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "unknown argument --output-dir" in proc.stderr
