"""experiments/stats.py against hand-worked numbers; study.py's plan, runs and report."""

from __future__ import annotations

import csv
import json
import math
import os

import pytest

from lpwd_optax.experiments import controls, controls_report, stats, study, study_report
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


# ----------------------------------------------------------------------------------------------
# The controls protocol (experiments/controls.py) and its report.

CONTROLS = controls.PROTOCOLS["controls"]
CONTROLS_TINY = controls.PROTOCOLS["controls_tiny"]


def _write_summary(runs_dir, run, summary):
    os.makedirs(os.path.join(runs_dir, run.directory), exist_ok=True)
    with open(os.path.join(runs_dir, run.directory, "summary.json"), "w") as f:
        json.dump(summary, f)


def test_controls_lambdas_put_d_times_t_near_one():
    assert CONTROLS.steps == 2400 and CONTROLS.seeds == (0, 1, 2, 3, 4, 5)
    assert CONTROLS.sgd_lambdas == (
        (0.01, 0.042, 0.0042),
        (0.03, 0.014, 0.0014),
        (0.1, 0.0042, 0.00042),
    )
    for lr, decoupled, coupled in CONTROLS.sgd_lambdas:
        assert lr * decoupled * CONTROLS.steps == pytest.approx(1.0, abs=0.01)
        # Momentum 0.9 amplifies a gradient-side (coupled) decay 10-fold: the same d.
        assert coupled / (1 - CONTROLS.momentum) == pytest.approx(decoupled)


def test_controls_plan_before_and_after_the_pilot(tmp_path):
    runs_dir = str(tmp_path)
    runs = controls.plan(CONTROLS, runs_dir)
    # Before the pilot has finished: no part h.
    assert [r.part for r in runs[:3]] == ["p", "p", "p"]
    assert {r.part for r in runs} == {"p", "g1", "g2", "g3"}
    counts = {part: sum(r.part == part for r in runs) for part in ("p", "g1", "g2", "g3")}
    assert counts == dict(p=3, g1=24, g2=18, g3=12)
    reused = [r for r in runs if controls.is_reused(CONTROLS, r)]
    # Seeds 0-2 of WD and LPWD at lambda 2 and 0.5 and of the baseline: 15 runs.
    assert len(reused) == 15 and {r.seed for r in reused} == {0, 1, 2}
    assert {r.method for r in reused} == {"baseline", "wd", "lpwd"}
    assert len(runs) - len(reused) - 3 == 39
    # g1 in seed order, WD, LPWD, lwd, lpwd_reversed within a seed.
    g1 = [(r.seed, r.method) for r in runs if r.part == "g1"]
    assert g1[:4] == [(0, "wd"), (0, "lpwd"), (0, "lwd"), (0, "lpwd_reversed")]
    assert all(
        r.weight_decay == 2.0 for r in runs if r.part in ("g1", "g2") and r.method != "baseline"
    )
    assert all(r.weight_decay == 0.5 for r in runs if r.part == "g3")
    # The pilot: seed-0 SGD baselines at each lr; then part h at the best best-10.
    for run, best in zip(controls.pilot_runs(CONTROLS), (50.0, 56.0, 53.0)):
        _write_summary(runs_dir, run, dict(best10_mean=best))
    assert controls.chosen_lr(CONTROLS, runs_dir) == 0.03
    # A pilot run that diverged is never chosen, and the study does not run it again.
    pilot = controls.pilot_runs(CONTROLS)
    os.remove(os.path.join(runs_dir, pilot[1].directory, "summary.json"))
    assert controls.chosen_lr(CONTROLS, runs_dir) is None  # lr 0.03 has not finished
    with open(os.path.join(runs_dir, pilot[1].directory, "log.txt"), "w") as f:
        f.write("ERROR: non-finite loss or gradients at step 7 (loss=nan); stopping the run.\n")
    assert controls.has_diverged(runs_dir, pilot[1])
    assert controls.chosen_lr(CONTROLS, runs_dir) == 0.1
    _write_summary(runs_dir, pilot[1], dict(best10_mean=56.0))
    assert not controls.has_diverged(runs_dir, pilot[1])  # finished after all
    runs = controls.plan(CONTROLS, runs_dir)
    parts = [r.part for r in runs]
    assert parts == sorted(parts, key=["p", "g1", "h", "g2", "g3"].index)  # priority order
    h = [r for r in runs if r.part == "h"]
    assert len(h) == 20  # 7 methods x 3 seeds, less the pilot's lr-0.03 baseline (seed 0)
    rates = {r.method: r.weight_decay for r in h}
    assert rates == {
        "baseline": 0.0,
        "wd": 0.014,
        "adadecay": 0.0014,
        "wrs": 0.014,
        "wrs_ic": 0.014,
        "adamp": 0.0014,
        "wrs+adamp": 0.014,
    }
    assert all(r.optimizer == "sgdm" and r.lr == 0.03 for r in h)
    assert len({r.directory for r in runs}) == len(runs)
    # Every run's flags are valid flags of the training program, with its optimizer.
    for run in runs:
        config = parse_config([*study.run_flags(CONTROLS, "cifar10", run), "--output_dir=x"])
        assert (config.method, config.optimizer, config.seed) == (
            run.method,
            run.optimizer,
            run.seed,
        )
        assert config.epochs * config.steps_per_epoch == 2400 and config.batch_size == 128
        assert config.lpwd_permutation_seed == CONTROLS.permutation_seed


def test_controls_reuse_the_first_studys_records(tmp_path):
    runs_dir = str(tmp_path / "runs")
    runs = controls.plan(CONTROLS, runs_dir)
    with pytest.raises(ValueError, match="--reuse_from"):
        controls.materialize_reused(CONTROLS, runs, runs_dir, None)
    first = os.path.join(
        os.path.dirname(__file__), "..", "experiments", "results", "cifar10_cpu", "runs.jsonl"
    )
    assert controls.materialize_reused(CONTROLS, runs, runs_dir, first) == 15
    run = study.StudyRun("g1", "wd", 1e-3, 2.0, 0)
    with open(os.path.join(runs_dir, run.directory, "summary.json")) as f:
        summary = json.load(f)
    assert summary["best10_mean"] == pytest.approx(53.111) and summary["reused_from"]
    assert len(summary["history"]) == 15
    assert controls.materialize_reused(CONTROLS, runs, runs_dir, first) == 0  # done once
    bad = tmp_path / "bad.jsonl"
    bad.write_text("")
    with pytest.raises(ValueError, match=r"0 records of wd-lr0\.001-wd2-s0"):
        controls.materialize_reused(CONTROLS, runs, str(tmp_path / "other"), str(bad))


def _fake_controls_summary(best10, final, loss, steps):
    history = [dict(epoch=1, train_loss=loss + 1, test_top1=final - 3, rop=None)]
    history.append(dict(epoch=2, train_loss=loss, test_top1=final, rop=None))
    return dict(
        best10_mean=best10,
        final_top1=final,
        best_top1=final,
        final_train_loss=loss,
        mean_rop=None,
        steps=steps,
        wall_time_s=60.0,
        history=history,
    )


def test_controls_report_says_which_readings_are_final(tmp_path):
    # Part g1 alone (seeds 0-2 of the tiny protocol): 4 of the 12 named comparisons have data.
    # A reading is final only if no p-values of the other 8 could move its Holm-adjusted p
    # across 0.05: that p lies between p and 12 p.
    p = CONTROLS_TINY
    runs_dir, results = str(tmp_path / "runs"), str(tmp_path / "results")
    best = {
        "wd": lambda s: 50.0,
        "lpwd": lambda s: 53.0 + 0.5 * s,  # - WD: 3, 3.5, 4
        "lwd": lambda s: 50.0 + (1.0, -1.0, 0.5)[s],  # - WD: 1, -1, 0.5
        "lpwd_reversed": lambda s: 47.0,  # LPWD - it: 6, 6.5, 7
    }
    for run in controls.plan(p, runs_dir):
        if run.part == "g1":
            b = best[run.method](run.seed)
            _write_summary(runs_dir, run, _fake_controls_summary(b, b + 1, 1.0, p.steps))
    tables = controls_report.write_report(p, "digits", runs_dir, results)
    rows = {r["comparison"]: r for r in tables["comparisons"] if r["named"]}
    assert sorted(rows) == ["LPWD - WD", "LPWD - lpwd_reversed", "LPWD - lwd", "lwd - WD"]
    # Paired t with 2 dof: p = 1 - t / sqrt(2 + t^2), t = mean / (0.5 / sqrt 3).
    p_of = lambda mean: 1 - (t := mean / (0.5 / math.sqrt(3))) / math.sqrt(2 + t * t)
    assert rows["LPWD - WD"]["p"] == pytest.approx(p_of(3.5))  # 0.0067: 12 p = 0.08
    assert rows["LPWD - lpwd_reversed"]["p"] == pytest.approx(p_of(6.5))  # 0.0020: 12 p = 0.024
    readings = {c: (r["outcome"], r["final"]) for c, r in rows.items()}
    assert readings == {
        "LPWD - WD": ("holds", False),  # Holm over the 4 with data: 3 p = 0.020
        "LPWD - lpwd_reversed": ("holds", True),
        "lwd - WD": ("not shown", True),  # p = 0.80: never below 0.05
        "LPWD - lwd": ("shown (interval excludes 0)", True),  # differences 2, 4.5, 3.5
    }
    text = open(os.path.join(results, "results.md")).read()
    assert "| holds (provisional) |" in text and "| not shown (final) |" in text
    assert "| none has data yet |" in text  # no baseline or wd_matched run yet


def test_controls_report_from_runs_with_known_numbers(tmp_path):
    p = CONTROLS_TINY
    runs_dir, results = str(tmp_path / "runs"), str(tmp_path / "results")
    for run, best in zip(controls.pilot_runs(p), (40.0, 45.0)):  # lr 0.1 wins
        _write_summary(runs_dir, run, _fake_controls_summary(best, best, 1.0, p.steps))
    # Seed 0 of the first-study cells is reused: write it as a reused record.
    base = {"baseline": 60.0, "wd": 50.0, "lpwd": 53.0, "lwd": 52.0, "lpwd_reversed": 49.0}
    base.update({"lpwd_shuffled": 51.0, "wd_matched": 48.0})
    sgd = {"baseline": 45.0, "wd": 46.0, "adadecay": 46.5, "wrs": 47.0, "wrs_ic": 45.5}
    sgd.update({"adamp": 46.0, "wrs+adamp": 48.0})
    for run in controls.plan(p, runs_dir):
        if run.part == "p":
            continue
        table = sgd if run.optimizer == "sgdm" else base
        # LPWD - WD per seed: 3, 3.5, 4 (the seed adds 0.5 to LPWD only).
        best = table[run.method] + (0.5 * run.seed if run.method == "lpwd" else 0.0)
        summary = _fake_controls_summary(best, best + 1, 1.0 - 0.01 * run.seed, p.steps)
        if controls.is_reused(p, run):
            summary["reused_from"] = "first-study/runs.jsonl"
        _write_summary(runs_dir, run, summary)
    tables = controls_report.write_report(p, "digits", runs_dir, results)
    rows = {r["comparison"]: r for r in tables["comparisons"]}
    lpwd_wd = rows["LPWD - WD"]
    # Differences 3, 3.5, 4: mean 3.5, std 0.5, t = 3.5 / (0.5 / sqrt 3) = 12.124, 2 dof:
    # p = 1 - t / sqrt(2 + t^2).
    t = 3.5 / (0.5 / math.sqrt(3))
    assert lpwd_wd["best10_mean"] == pytest.approx(3.5) and lpwd_wd["n"] == 3
    assert lpwd_wd["p"] == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-6)
    named = [r for r in tables["comparisons"] if r["named"]]
    assert len(named) == 12  # 7 of part g, 5 of part h
    want = stats.holm([r["p"] for r in named])
    assert [r["p_holm"] for r in named] == pytest.approx(want)
    # A constant difference has p = 0: lwd - WD = 2 in every seed.
    assert rows["lwd - WD"]["p"] == 0.0 and rows["lwd - WD"]["outcome"] == "holds"
    # LPWD - lwd: 1, 1.5, 2; its interval excludes 0, so "not shown" fails.
    assert rows["LPWD - lwd"]["outcome"] == "shown (interval excludes 0)"
    assert rows["SGDP+WRS - WRS"]["best10_mean"] == pytest.approx(1.0)
    assert (
        rows["WRS - WD"]["lr"] == 0.1 and rows["WRS - WD"]["weight_decay_a"] == 1.7
    )  # 1 / (0.1 * 6 steps)
    assert rows["AdaDecay - WD"]["weight_decay_a"] == 0.17
    assert not rows["WD - baseline"]["named"] and "p_holm" not in rows["WD - baseline"]
    text = open(os.path.join(results, "results.md")).read()
    assert "Part h's lr: 0.1." in text and "| g | LPWD - WD | > 0 | +3.50 [" in text
    with open(os.path.join(results, "cells.csv")) as f:
        cells = {
            (r["optimizer"], r["method"], float(r["weight_decay"])): r for r in csv.DictReader(f)
        }
    assert cells[("adam", "wd", 2.0)]["n"] == "3" and cells[("adam", "wd", 2.0)]["reused"] == "1"
    assert float(cells[("sgdm", "baseline", 0.0)]["best10_mean"]) == pytest.approx(45.0)
    for name in ("fig_controls", "fig_part_h", "fig_lpwd_lwd_wd_curves"):
        assert os.path.getsize(os.path.join(results, f"{name}.png")) > 10_000


def test_controls_study_is_restored_from_its_committed_report(tmp_path, capsys):
    p = CONTROLS_TINY
    runs_dir, results = str(tmp_path / "runs"), str(tmp_path / "results")
    for run, best in zip(controls.pilot_runs(p), (40.0, 45.0)):  # lr 0.1: part h is planned
        _write_summary(runs_dir, run, _fake_controls_summary(best, best, 1.0, p.steps))
    finished = []
    for index, run in enumerate(controls.plan(p, runs_dir)):
        if run.part == "p" or index % 3 == 0:  # some runs have not finished
            continue
        summary = _fake_controls_summary(50.0 + index, 51.0 + index, 1.0 / index, p.steps)
        if controls.is_reused(p, run):
            summary["reused_from"] = "first-study/runs.jsonl"
        _write_summary(runs_dir, run, summary)
        finished.append(run)
    assert any(r.part == "h" for r in finished)
    controls_report.write_report(p, "digits", runs_dir, results)
    committed = os.path.join(results, "runs.jsonl")
    # The runs directory is lost; the committed report brings back every trained run.
    lost = str(tmp_path / "fresh")
    trained = [r for r in finished if not controls.is_reused(p, r)]
    assert controls.restore(p, lost, committed) == 2 + len(trained)
    restored = {r.directory for r in controls.plan(p, lost) if study.is_finished(lost, r)}
    assert restored == {r.directory for r in [*controls.pilot_runs(p), *trained]}
    for run in trained:
        summary = study._summary(lost, run)
        assert summary["restored_from"] == os.path.abspath(committed)
        assert summary["best10_mean"] == study._summary(runs_dir, run)["best10_mean"]
    # The reused seeds come back from the first study as before; then the records agree.
    reused = [r for r in finished if controls.is_reused(p, r)]
    for run in reused:
        _write_summary(lost, run, study._summary(runs_dir, run))

    def strip(records):
        return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in records]

    assert strip(controls.records(p, lost)) == strip(controls.records(p, runs_dir))
    assert controls.restore(p, lost, committed) == 0  # nothing left to restore
    # Through the program: restored, then only reported.
    argv = ["--protocol=controls_tiny", f"--output_dir={tmp_path / 'cli'}", "--report_only"]
    assert study.main([*argv, f"--restore_from={committed}"]) == 0
    assert f"restored {2 + len(trained)} finished runs from {committed}" in capsys.readouterr().out
    # A file that is not this protocol's report: one-line errors naming the problem.
    assert study.main([*argv, f"--restore_from={tmp_path / 'none.jsonl'}"]) == 2
    assert "--restore_from: no such file" in capsys.readouterr().err
    with open(committed) as f:
        record = json.loads(f.readline())
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({**record, "steps": 2400}) + "\n")
    with pytest.raises(ValueError, match="has 2400 steps; the protocol 'controls_tiny' has 6"):
        controls.restore(p, str(tmp_path / "x"), str(other))
    other.write_text(json.dumps({**record, "seed": 9}) + "\n")
    with pytest.raises(ValueError, match="does not plan"):
        controls.restore(p, str(tmp_path / "y"), str(other))
    other.write_text(json.dumps(record) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match="two records"):
        controls.restore(p, str(tmp_path / "z"), str(other))


def test_controls_report_alone_rebuilds_the_committed_tables(tmp_path, capsys):
    """On a machine without the runs: --restore_from and --reuse_from with --report_only give
    the committed tables (all 77 runs, the 15 reused ones included), training nothing."""
    results = os.path.join(os.path.dirname(__file__), "..", "experiments", "results")
    committed = os.path.join(results, "cifar10_cpu_controls")
    out = tmp_path / "results"
    argv = [
        "--protocol=controls",
        f"--output_dir={tmp_path / 'runs'}",
        f"--results_dir={out}",
        f"--reuse_from={os.path.join(results, 'cifar10_cpu', 'runs.jsonl')}",
        f"--restore_from={os.path.join(committed, 'runs.jsonl')}",
        "--report_only",
    ]
    assert study.main(argv) == 0
    for name in ("cells.csv", "comparisons.csv", "pilot.csv"):
        with open(out / name) as got, open(os.path.join(committed, name)) as want:
            assert got.read() == want.read(), name
    text = (out / "results.md").read_text()
    assert "77 of 77 planned runs finished (15 reused from the first study; 62 trained" in text
    # Without the first study's records the reused cells cannot be filled in: exit 2.
    argv[3] = f"--reuse_from={tmp_path / 'none.jsonl'}"
    argv[1] = f"--output_dir={tmp_path / 'other'}"
    assert study.main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: --reuse_from: no such file: {tmp_path / 'none.jsonl'}" in err


@pytest.mark.slow
def test_controls_pilot_runs_then_part_h_is_planned(tmp_path, capsys):
    runs_dir = str(tmp_path / "runs")
    p = CONTROLS_TINY
    assert controls.run_study(p, "digits", runs_dir, ["p"], None) == 0
    lr = controls.chosen_lr(p, runs_dir)
    best = {r.lr: study._summary(runs_dir, r)["best10_mean"] for r in controls.pilot_runs(p)}
    assert lr == max(best, key=lambda k: (best[k], -k))
    h = [r for r in controls.plan(p, runs_dir) if r.part == "h"]
    assert len(h) == 13 and {r.lr for r in h} == {lr}
    assert study.main(["--protocol=controls_tiny", f"--output_dir={runs_dir}", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "part p: 2 runs (0 reused from the first study), 2 trained, 0 to run" in out
    assert f"part h: lr {lr:g} (the pilot's best best-10)" in out
    # Without --reuse_from the reused cells cannot be filled in: a one-line error, exit 2.
    assert study.main(["--protocol=controls_tiny", f"--output_dir={runs_dir}", "--parts=g1"]) == 2
    assert "--reuse_from" in capsys.readouterr().err
