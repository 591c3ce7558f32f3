"""experiments/stats.py against hand-worked numbers; study.py's plan, runs and report."""

from __future__ import annotations

import csv
import json
import math
import os

import pytest

from lpwd_optax.experiments import stats, study, study_report
from lpwd_optax.experiments.config import parse_config

CPU = study.PROTOCOLS["cpu"]
TINY = study.PROTOCOLS["tiny"]


def test_summarize_by_hand():
    # mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5; 5 / 3 -> std sqrt(5/3).
    s = stats.summarize([1.0, 2.0, 3.0, 4.0])
    assert (s.mean, s.n) == (2.5, 4)
    assert s.std == pytest.approx(1.2909944487358056, abs=1e-12)
    single = stats.summarize([7.0])
    assert single.mean == 7.0 and math.isnan(single.std)
    with pytest.raises(ValueError, match="at least one"):
        stats.summarize([])


def test_t_quantiles_from_tables():
    assert stats.t_quantile(0.95, 2) == pytest.approx(4.302653, abs=1e-6)
    assert stats.t_quantile(0.95, 1) == pytest.approx(12.706205, abs=1e-6)
    assert stats.t_quantile(0.95, 9) == pytest.approx(2.262157, abs=1e-6)


def test_paired_difference_by_hand():
    # Differences 2, 3, 1: mean 2, std 1, half-width 4.302653 / sqrt(3) = 2.484138.
    d = stats.paired_difference({0: 3.0, 1: 5.0, 2: 4.0}, {0: 1.0, 1: 2.0, 2: 3.0})
    assert d.n == 3 and d.mean == pytest.approx(2.0)
    assert (d.low, d.high) == pytest.approx((-0.484138, 4.484138), abs=1e-6)
    assert not d.significant
    # Differences 2, 2.5, 1.5: std 0.5, half-width 1.242069: the interval excludes 0.
    d = stats.paired_difference({0: 2.0, 1: 2.5, 2: 1.5}, {0: 0.0, 1: 0.0, 2: 0.0})
    assert (d.low, d.high) == pytest.approx((0.757931, 3.242069), abs=1e-6)
    assert d.significant and str(d) == "+2.00 [+0.76, +3.24] *"
    # Only shared seeds pair up; fewer than two give no interval.
    d = stats.paired_difference({0: 1.0, 1: 2.0, 5: 100.0}, {0: 0.0, 1: 0.0, 2: 50.0})
    assert d.n == 2 and d.mean == pytest.approx(1.5)
    assert stats.paired_difference({0: 1.0}, {0: 0.0, 1: 1.0}) is None


def test_paired_t_test_by_hand():
    # Differences 2, 3, 1: mean 2, std 1, t = 2 / (1 / sqrt(3)) = 3.4641. With 2 degrees of
    # freedom the t distribution's CDF is 1/2 + t / (2 sqrt(2 + t^2)), so the two-sided p is
    # 1 - t / sqrt(2 + t^2) = 1 - 3.4641 / sqrt(14) = 0.074180.
    test = stats.paired_t_test({0: 3.0, 1: 5.0, 2: 4.0}, {0: 1.0, 1: 2.0, 2: 3.0})
    assert test.n == 3 and test.mean == pytest.approx(2.0)
    assert test.t == pytest.approx(math.sqrt(12), abs=1e-12)
    assert test.p == pytest.approx(1 - math.sqrt(12) / math.sqrt(14), abs=1e-9)
    # One degree of freedom: the Cauchy distribution, p = 1 - 2 atan(|t|) / pi. Differences
    # 1 and 3: mean 2, std sqrt(2), t = 2 / (sqrt(2) / sqrt(2)) = 2.
    test = stats.paired_t_test({0: 1.0, 1: 3.0}, {0: 0.0, 1: 0.0})
    assert test.p == pytest.approx(1 - 2 * math.atan(2.0) / math.pi, abs=1e-9)
    # The p-value and the 95% interval agree: p < 0.05 exactly when the interval excludes 0.
    d = stats.paired_difference({0: 3.0, 1: 5.0, 2: 4.0}, {0: 1.0, 1: 2.0, 2: 3.0})
    assert not d.significant and test.p > 0.05
    constant = stats.paired_t_test({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0})
    assert (constant.p, constant.t) == (0.0, math.inf)
    assert stats.paired_t_test({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0}).p == 1.0
    assert stats.paired_t_test({0: 1.0}, {0: 0.0}) is None


def test_holm_by_hand():
    # Sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04, but never
    # below the previous step: 0.06). Back in the given order:
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1
    assert stats.holm([0.02]) == [0.02]
    assert stats.holm([]) == []
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        stats.holm([0.1, 1.5])


def test_cpu_plan_covers_every_part_once():
    runs = study.plan(CPU)
    counts = {part: sum(r.part == part for r in runs) for part in "abcdf"}
    assert counts == dict(a=27, b=6, c=12, d=15, f=6)
    assert len({r.directory for r in runs}) == len(runs)
    assert all(r.weight_decay == 0.0 for r in runs if r.method == "baseline")
    # The scaled strong cell matches the paper's cumulative decay d * T = 0.5 * 1e-3 * 9,800.
    assert CPU.strong_lr * max(CPU.strong_lambdas) * CPU.steps == pytest.approx(
        0.5 * 1e-3 * study.PAPER_STEPS, rel=0.03
    )
    for part in "abcf":
        assert {r.seed for r in runs if r.part == part} == set(CPU.seeds)
    # Every run's flags are valid flags of the training program.
    for run in runs:
        config = parse_config([*study.run_flags(CPU, "cifar10", run), "--output_dir=x"])
        assert config.method == run.method and config.seed == run.seed
        expected = CPU.steps if run.kind == "train" else CPU.rop_periods * CPU.rop_steps_per_period
        assert config.epochs * config.steps_per_epoch == expected


def _fake_summary(run: study.StudyRun, top1: list[float], loss: float, rop) -> dict:
    history = [
        dict(epoch=i + 1, train_loss=loss + 1.0 / (i + 1), test_top1=t, rop=rop)
        for i, t in enumerate(top1)
    ]
    history[-1]["train_loss"] = loss
    best = sorted(top1, reverse=True)[:10]
    return dict(
        best10_mean=sum(best) / len(best),
        final_top1=top1[-1],
        best_top1=max(top1),
        final_train_loss=loss,
        mean_rop=rop,
        steps=TINY.steps,
        wall_time_s=60.0,
        history=history,
    )


def test_report_from_runs_with_known_numbers(tmp_path):
    runs_dir = str(tmp_path / "runs")
    runs = study.plan(TINY)
    # LPWD's final top-1 beats WD's by 2, 3 and (seed 2 missing) -; WD is baseline + 1 each seed.
    final = {"baseline": 50.0, "wd": 51.0, "lpwd": 53.0, "rwd": 51.5, "pwd": 52.0, "l2": 49.0}
    for run in runs:
        top1 = final[run.method] + run.seed
        extra = 1.0 if (run.method == "lpwd" and run.seed == 1) else 0.0
        if run.method == "pwd" and run.weight_decay == 0.5:
            extra = (1.0, 2.0)[run.seed]  # PWD - RWD grows from lambda 0.05 to 0.5 by 1 and 2
        rop = 0.01 if run.method == "wd" else 0.0
        summary = _fake_summary(run, [top1 - 5, top1 + extra], 1.0 - 0.1 * run.seed, rop)
        os.makedirs(os.path.join(runs_dir, run.directory))
        with open(os.path.join(runs_dir, run.directory, "summary.json"), "w") as f:
            json.dump(summary, f)
    results = str(tmp_path / "results")
    study_report.write_report(TINY, "digits", runs, runs_dir, results)

    with open(os.path.join(results, "comparisons.csv")) as f:
        rows = {(r["comparison"], float(r["weight_decay"])): r for r in csv.DictReader(f)}
    lpwd_wd = rows[("lpwd - wd", 0.5)]
    # Per-seed final differences: 2 and 3 -> mean 2.5, std 0.7071, t(0.975, 1) = 12.7062.
    assert float(lpwd_wd["final_top1"]) == pytest.approx(2.5)
    assert float(lpwd_wd["final_top1_low"]) == pytest.approx(2.5 - 12.706205 * 0.5, abs=1e-5)
    assert lpwd_wd["final_top1_significant"] == "False"
    wd_base = rows[("wd - baseline", 0.5)]
    assert float(wd_base["final_top1"]) == pytest.approx(1.0)
    assert wd_base["final_top1_significant"] == "True"  # a constant difference: zero width
    with open(os.path.join(results, "growth.csv")) as f:
        growth = {r["comparison"]: r for r in csv.DictReader(f)}
    pwd_rwd = growth["pwd - rwd"]
    assert (float(pwd_rwd["from_lambda"]), float(pwd_rwd["to_lambda"])) == (0.05, 0.5)
    # Per-seed changes of the final top-1 difference: 1 and 2 -> mean 1.5, std 0.7071.
    assert float(pwd_rwd["final_top1"]) == pytest.approx(1.5)
    assert float(pwd_rwd["final_top1_high"]) == pytest.approx(1.5 + 12.706205 * 0.5, abs=1e-5)
    assert float(pwd_rwd["final_train_loss"]) == pytest.approx(0.0)  # the losses do not move
    assert float(growth["lpwd - wd"]["final_top1"]) == pytest.approx(0.0)
    assert pwd_rwd["n"] == "2"
    with open(os.path.join(results, "cells.csv")) as f:
        cells = {(r["method"], float(r["weight_decay"])): r for r in csv.DictReader(f)}
    assert float(cells[("wd", 0.5)]["final_top1"]) == pytest.approx(51.5)
    assert float(cells[("wd", 0.5)]["final_top1_std"]) == pytest.approx(math.sqrt(0.5))
    assert cells[("wd", 0.5)]["n"] == "2"
    text = open(os.path.join(results, "results.md")).read()
    assert "| lpwd - wd | 0.001 | 0.5 |" in text
    assert "| pwd - rwd | 0.001 | 0.05 -> 0.5 | " in text
    # Part a of the tiny protocol: 2 seeds x (baseline + 4 methods), 60 s each.
    assert "| a | 10 of 10 | 0.17 |" in text
    for name in ("fig_strong_curves", "fig_ablation", "fig_lambda_sweep", "fig_rop_grid"):
        assert os.path.getsize(os.path.join(results, f"{name}.png")) > 10_000
    assert not os.path.exists(os.path.join(results, "fig_zero_shot.png"))  # no part e yet
    with open(os.path.join(results, "runs.jsonl")) as f:
        assert len(f.readlines()) == len(runs)


@pytest.mark.slow
def test_one_run_then_resumed_study_skips_it(tmp_path, capsys):
    runs_dir = str(tmp_path / "runs")
    run = study.plan(TINY)[0]
    code, _ = study.launch(TINY, "digits", run, runs_dir)
    assert code == 0, open(os.path.join(runs_dir, run.directory, "log.txt")).read()
    with open(os.path.join(runs_dir, run.directory, "summary.json")) as f:
        summary = json.load(f)
    assert summary["steps"] == TINY.steps and summary["epochs"] == TINY.periods
    assert study.main(["--protocol=tiny", f"--output_dir={runs_dir}", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "part a: 10 runs, 1 finished, 9 to run" in out
