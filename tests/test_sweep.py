"""experiments/sweep.py on a 2-cell grid, then zero_shot_decay.py and plots.py on its runs."""

from __future__ import annotations

import csv
import json
import os

import pytest

from lpwd_optax.experiments import plots, sweep, zero_shot_decay
from tests import _cifar_helpers as helpers


def test_grid_follows_table2():
    cells = sweep.build_grid(
        datasets=["cifar10"],
        models=["m"],
        optimizers=["adam", "sgdm"],
        methods=["baseline", "wd"],
        lrs="table2",
        weight_decays="table2",
        seeds=[0],
    )
    # baseline: one cell per lr; wd: 5 lr x 7 lambda; for each optimizer.
    assert len(cells) == 2 * (5 + 5 * 7)
    assert {c.lr for c in cells if c.optimizer == "sgdm"} == {0.1, 0.05, 0.01, 0.005, 0.001}
    assert {c.weight_decay for c in cells if c.method == "wd"} == set(sweep.TABLE2_WEIGHT_DECAYS)
    base = sweep.build_grid(
        datasets=["cifar10"],
        models=["m"],
        optimizers=["adam"],
        methods=["lpwd"],
        lrs="base",
        weight_decays="base",
        seeds=[0],
    )
    assert [(c.lr, c.weight_decay) for c in base] == [(1e-4, 1e-2)]
    assert len({c.name for c in cells}) == len(cells)


def test_table_picks_the_best_cell_per_method():
    cell = dict(dataset="d", model="m", optimizer="adam", weight_decay=0.1)
    rows = [
        dict(cell, method="wd", lr=1e-3, status="ok", best10_mean=80.0, best10_std=1.0),
        dict(cell, method="wd", lr=1e-4, status="ok", best10_mean=82.5, best10_std=0.5),
        dict(cell, method="lpwd", lr=1e-4, status="missing"),
    ]
    table = sweep.table_markdown(rows)
    assert "| wd | 82.50 +- 0.50 (lr 0.0001, λ 0.1) |" in table
    assert "| lpwd | - |" in table


@pytest.mark.slow
def test_two_cell_sweep_resumes_and_tabulates_then_figures(tmp_path, cache_dir, capsys):
    out = tmp_path / "sweep"
    shared = [
        helpers.TINY_MODEL_FLAGS[1],
        "--batch_size=64",
        "--steps_per_epoch=4",
        "--eval_batch_size=128",
        "--epochs=2",
        f"--compilation_cache_dir={cache_dir}",
    ]
    argv = [
        f"--output_dir={out}",
        "--datasets=digits",
        "--models=convnext_atto_cifar",
        "--methods=wd,lpwd",
        "--optimizers=adam",
        "--lrs=3e-3",
        "--weight_decays=0.5",
        "--parallel_processes=2",
        "--",
        *shared,
    ]
    assert sweep.main(argv) == 0
    first = capsys.readouterr().out
    assert "2 cells: 0 finished, 2 to run" in first
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["status"]) for r in rows] == [("wd", "ok"), ("lpwd", "ok")]
    assert all(0 <= float(r["best10_mean"]) <= 100 for r in rows)
    table = (out / "table.md").read_text()
    assert "| wd |" in table and "| lpwd |" in table and "+-" in table
    assert (out / "table.csv").exists()

    # Resumable: finished cells are skipped.
    assert sweep.main(argv) == 0
    assert "2 cells: 2 finished, 0 to run" in capsys.readouterr().out

    run_dirs = [r["run_dir"] for r in rows]
    # Fig. 3a on one run: no training, accuracy after decaying the weights.
    assert (
        zero_shot_decay.main(
            [
                f"--run_dir={run_dirs[0]}",
                "--lambdas=0,0.05",
                "--steps=20",
                "--batch_size=120",
                f"--compilation_cache_dir={cache_dir}",
            ]
        )
        == 0
    )
    with open(os.path.join(run_dirs[0], "zero_shot_decay.json")) as f:
        zero_shot = json.load(f)["results"]
    with open(os.path.join(run_dirs[0], "summary.json")) as f:
        final_top1 = json.load(f)["final_top1"]
    assert zero_shot[0]["lambda_s"] == 0.0
    assert zero_shot[0]["top1"] == pytest.approx(final_top1, abs=1e-6)  # no decay: unchanged

    # Figures.
    figs = tmp_path / "figs"
    assert plots.main(["curves", *run_dirs, f"--output_dir={figs}"]) == 0
    assert plots.main(["rop", *run_dirs, f"--output_dir={figs}"]) == 0
    assert plots.main(["rop_grid", str(out), "--method=wd", f"--output_dir={figs}"]) == 0
    zero_shot_json = os.path.join(run_dirs[0], "zero_shot_decay.json")
    assert plots.main(["zero_shot", zero_shot_json, f"--output_dir={figs}"]) == 0
    assert plots.main(["heatmap", str(out), f"--output_dir={figs}", "--diff=lpwd,wd"]) == 0
    for name in ("fig1_curves", "fig2_rop", "fig2_rop_grid_wd", "fig3a_zero_shot"):
        assert (figs / f"{name}.png").stat().st_size > 1000
    assert [p.name for p in figs.glob("heatmap_*.png")] == [
        "heatmap_digits_convnext_atto_cifar_adam.png"
    ]
    # By default a figure goes to the (first) run's directory.
    assert plots.main(["curves", *run_dirs]) == 0
    assert os.path.exists(os.path.join(run_dirs[0], "fig1_curves.png"))


def _fake_run(run_dir, **config) -> str:
    """A finished run directory as experiments.cifar leaves it (only what readers use)."""
    base = dict(
        dataset="digits",
        model="m",
        optimizer="adam",
        method="wd",
        seed=0,
        batch_size=64,
        learning_rate=1e-3,
        weight_decay=0.5,
        epochs=2,
    )
    base.update(config)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(base, f)
    history = [dict(epoch=1, train_loss=2.0, test_top1=40.0, rop=0.01)]
    history.append(dict(epoch=2, train_loss=1.0, test_top1=50.0, rop=0.02))
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(dict(r, step=2 * r["epoch"])) + "\n" for r in history)
    summary = dict(
        best10_mean=45.0,
        best10_std=5.0,
        best_top1=50.0,
        final_top1=50.0,
        mean_rop=0.015,
        epochs=2,
        wall_time_s=1.0,
        config=base,
        history=history,
    )
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f)
    return str(run_dir)


def test_labels_name_what_differs_and_rop_says_what_it_skipped(tmp_path, capsys):
    a = _fake_run(tmp_path / "a", dataset="folder:/data/cifar10-jpeg.zip")
    b = _fake_run(tmp_path / "b", dataset="folder:/data/other.zip", batch_size=128)
    c = _fake_run(tmp_path / "c", method="baseline")
    labels = plots.run_labels([plots.load_config(d) for d in (a, b, c)])
    assert labels == [
        "wd cifar10-jpeg batch=64",
        "wd other batch=128",
        "baseline digits batch=64",
    ]
    assert plots.slug("cifar10-jpeg convnext adam") == "cifar10-jpeg_convnext_adam"
    skipped = plots.plot_rop([a, c], str(tmp_path / "rop.png"))
    assert skipped == [f"{c}: baseline has no decoupled penalty, so no R_op"]
    assert "skipped " in capsys.readouterr().out


def test_print_commands_then_table_of_runs_made_elsewhere(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = [f"--output_dir={out}", "--datasets=digits", "--models=m", "--optimizers=adam"]
    argv += ["--methods=wd,lpwd", "--lrs=1e-3", "--weight_decays=0.5,0.05"]
    assert sweep.main([*argv, "--print_commands", "--", "--epochs=2"]) == 0
    commands = capsys.readouterr().out.splitlines()
    assert len(commands) == 4 and all(c.startswith("lpwd-cifar --epochs=2 ") for c in commands)
    assert all("--output_dir=" + str(out) in c for c in commands)
    # Runs made on other machines, copied back under any names, are tabulated.
    _fake_run(out / "host1" / "run_a", method="wd", weight_decay=0.5)
    _fake_run(out / "host2" / "run_b", method="lpwd", weight_decay=0.05)
    assert sweep.main([*argv, "--table_only"]) == 0
    table = capsys.readouterr().out
    assert "| wd | 45.00 +- 5.00 (lr 0.001, λ 0.5) |" in table
    assert "| lpwd | 45.00 +- 5.00 (lr 0.001, λ 0.05) |" in table
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
