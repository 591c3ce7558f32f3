"""experiments/stats.py against hand-worked numbers; the study engine (engine.py, report.py,
study.py) on the three protocols' plans, runs, records and reports."""

from __future__ import annotations

import csv
import json
import math
import os

import pytest

from lpwd_optax.experiments import engine, report, stats, study
from lpwd_optax.experiments.config import parse_config
from lpwd_optax.experiments.protocols import controls, cpu, protocols, regimes

CPU, TINY = cpu.CPU, cpu.TINY
TINY_PROTOCOL = cpu.PROTOCOLS["tiny"]


def _write_summary(runs_dir, run, summary):
    os.makedirs(os.path.join(runs_dir, run.name), exist_ok=True)
    with open(os.path.join(runs_dir, run.name, "summary.json"), "w") as f:
        json.dump(summary, f)


def _summary(best10, final, loss, steps, rop=None, epochs=2):
    """A finished run's summary.json with what the report reads: `epochs` evaluations, the last
    at `final` and `loss`."""
    history = [
        dict(
            epoch=i + 1,
            train_loss=loss + (epochs - 1 - i),
            test_top1=final - 3 * (epochs - 1 - i),
            rop=rop,
        )
        for i in range(epochs)
    ]
    return dict(
        best10_mean=best10,
        final_top1=final,
        best_top1=final,
        final_train_loss=loss,
        mean_rop=rop,
        steps=steps,
        epochs=epochs,
        wall_time_s=60.0,
        history=history,
    )


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


# ----------------------------------------------------------------------------------------------
# The first study (protocols/cpu.py)


def test_cpu_plan_covers_every_part_once(tmp_path):
    runs = cpu.plan(CPU, "cifar10", str(tmp_path))
    counts = {part: sum(r.part == part for r in runs) for part in "abcdfe"}
    assert counts == dict(a=27, b=6, c=12, d=15, f=6, e=3)
    trained = [r for r in runs if r.trains]
    assert len({r.name for r in trained}) == len(trained) == 66
    assert all(r.facts["weight_decay"] == 0.0 for r in runs if r.facts["method"] == "baseline")
    # The scaled strong cell matches the paper's cumulative decay d * T = 0.5 * 1e-3 * 9,800.
    assert CPU.strong_lr * max(CPU.strong_lambdas) * CPU.steps == pytest.approx(
        0.5 * 1e-3 * cpu.PAPER_STEPS, rel=0.03
    )
    for part in "abcf":
        assert {r.facts["seed"] for r in runs if r.part == part} == set(CPU.seeds)
    # Every run's flags are valid flags of the training program.
    for run in trained:
        config = parse_config([*run.flags, "--output_dir=x"])
        assert config.method == run.facts["method"] and config.seed == run.facts["seed"]
        short = run.facts["kind"] == "rop"
        expected = CPU.rop_periods * CPU.rop_steps_per_period if short else CPU.steps
        assert config.epochs * config.steps_per_epoch == expected == run.steps
    # Part e: zero-shot decay of each of part a's baselines, once it has finished here.
    zero_shot = [r for r in runs if r.part == "e"]
    assert [r.needs for r in zero_shot] == [(r.name,) for r in zero_shot]
    assert all(r.name.startswith("train/baseline-lr0.001-wd0-s") for r in zero_shot)
    assert engine.command(zero_shot[0], str(tmp_path))[-2:] == [
        f"--run_dir={tmp_path}/{zero_shot[0].name}",
        f"--lambdas={CPU.zero_shot_lambdas}",
    ]
    assert [r.name for r in engine.pending(runs, str(tmp_path))] == [r.name for r in trained]


def test_cpu_report_from_runs_with_known_numbers(tmp_path):
    runs_dir = str(tmp_path / "runs")
    runs = cpu.plan(TINY, "digits", runs_dir)
    # LPWD's final top-1 beats WD's by 2 and 3; WD is baseline + 1 in each seed.
    final = {"baseline": 50.0, "wd": 51.0, "lpwd": 53.0, "rwd": 51.5, "pwd": 52.0, "l2": 49.0}
    for run in runs:
        if not run.trains:
            continue
        f = run.facts
        top1 = final[f["method"]] + f["seed"]
        extra = 1.0 if (f["method"] == "lpwd" and f["seed"] == 1) else 0.0
        if f["method"] == "pwd" and f["weight_decay"] == 0.5:
            extra = (1.0, 2.0)[f["seed"]]  # PWD - RWD grows from lambda 0.05 to 0.5 by 1 and 2
        rop = 0.01 if f["method"] == "wd" else 0.0
        loss = 1.0 - 0.1 * f["seed"]
        _write_summary(runs_dir, run, _summary(top1, top1 + extra, loss, TINY.steps, rop))
    results = str(tmp_path / "results")
    report.write_report(TINY_PROTOCOL, "digits", runs_dir, results)

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
    with open(os.path.join(results, "rop_grid.csv")) as f:
        rop = list(csv.DictReader(f))
    assert [(r["kind"], r["method"]) for r in rop][:2] == [("rop", "rwd"), ("rop", "wd")]
    text = open(os.path.join(results, "results.md")).read()
    assert "| lpwd - wd | 0.001 | 0.5 |" in text
    assert "| pwd - rwd | 0.001 | 0.05 | 0.5 | " in text
    # Part a of the tiny protocol: 2 seeds x (baseline + 4 methods), 60 s each.
    assert "| a | 10 of 10 | 0.17 |" in text
    for name in ("fig_strong_curves", "fig_ablation", "fig_lambda_sweep", "fig_rop_grid"):
        assert os.path.getsize(os.path.join(results, f"{name}.png")) > 10_000
    assert not os.path.exists(os.path.join(results, "fig_zero_shot.png"))  # no part e yet
    with open(os.path.join(results, "runs.jsonl")) as f:
        assert len(f.readlines()) == sum(r.trains for r in runs)
    # Part e: zero-shot decay of the two baselines -> its table and figure.
    for run in (r for r in runs if r.part == "e"):
        top1 = {0.0: 50.0 + run.facts["seed"], 0.05: 20.0}
        with open(os.path.join(runs_dir, run.name, run.output), "w") as f:
            json.dump({"results": [{"lambda_s": k, "top1": v} for k, v in top1.items()]}, f)
    tables = report.write_report(TINY_PROTOCOL, "digits", runs_dir, results)
    assert [(r["lambda_s"], r["top1"], r["n"]) for r in tables["zero_shot"]] == [
        (0.0, 50.5, 2),
        (0.05, 20.0, 2),
    ]
    assert tables["zero_shot"][1]["factor"] == pytest.approx(0.95**100)
    assert os.path.getsize(os.path.join(results, "fig_zero_shot.png")) > 10_000


@pytest.mark.slow
def test_one_run_then_resumed_study_skips_it(tmp_path, capsys):
    runs_dir = str(tmp_path / "runs")
    run = cpu.plan(TINY, "digits", runs_dir)[0]
    code, _ = engine.launch(run, runs_dir)
    assert code == 0, open(os.path.join(runs_dir, run.name, "log.txt")).read()
    summary = engine.summary(runs_dir, run)
    assert summary["steps"] == TINY.steps and summary["epochs"] == TINY.periods
    assert study.main(["--protocol=tiny", f"--output_dir={runs_dir}", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "part a: 10 runs, 1 finished, 9 to run" in out


def test_parts_are_a_list_or_letters():
    assert study.parse_parts(TINY_PROTOCOL, "ab") == ["a", "b"]
    assert study.parse_parts(TINY_PROTOCOL, "a,e") == ["a", "e"]
    p = controls.PROTOCOLS["controls"]
    assert study.parse_parts(p, "g1") == ["g1"] and study.parse_parts(p, "p,h") == ["p", "h"]
    with pytest.raises(ValueError, match="not parts of 'controls'"):
        study.parse_parts(p, "g4")


# ----------------------------------------------------------------------------------------------
# The controls study (protocols/controls.py) and its report.

CONTROLS = controls.CONTROLS
CONTROLS_TINY = controls.CONTROLS_TINY
P_CONTROLS = controls.PROTOCOLS["controls"]
P_TINY = controls.PROTOCOLS["controls_tiny"]


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
    runs = controls.plan(CONTROLS, "cifar10", runs_dir)
    # Before the pilot has finished: no part h.
    assert [r.part for r in runs[:3]] == ["p", "p", "p"]
    assert {r.part for r in runs} == {"p", "g1", "g2", "g3"}
    counts = {part: sum(r.part == part for r in runs) for part in ("p", "g1", "g2", "g3")}
    assert counts == dict(p=3, g1=24, g2=18, g3=12)
    reused = [r for r in runs if controls.is_reused(CONTROLS, r)]
    # Seeds 0-2 of WD and LPWD at lambda 2 and 0.5 and of the baseline: 15 runs.
    assert len(reused) == 15 and {r.facts["seed"] for r in reused} == {0, 1, 2}
    assert {r.facts["method"] for r in reused} == {"baseline", "wd", "lpwd"}
    assert len(runs) - len(reused) - 3 == 39
    # g1 in seed order, WD, LPWD, lwd, lpwd_reversed within a seed.
    g1 = [(r.facts["seed"], r.facts["method"]) for r in runs if r.part == "g1"]
    assert g1[:4] == [(0, "wd"), (0, "lpwd"), (0, "lwd"), (0, "lpwd_reversed")]
    assert all(
        r.facts["weight_decay"] == 2.0
        for r in runs
        if r.part in ("g1", "g2") and r.facts["method"] != "baseline"
    )
    assert all(r.facts["weight_decay"] == 0.5 for r in runs if r.part == "g3")
    # The pilot: seed-0 SGD baselines at each lr; then part h at the best best-10.
    pilot = controls.pilot_runs(CONTROLS)
    for run, best in zip(pilot, (50.0, 56.0, 53.0)):
        _write_summary(runs_dir, run, dict(best10_mean=best, epochs=15))
    assert controls.chosen_lr(CONTROLS, runs_dir) == 0.03
    # A pilot run that diverged is never chosen, and the study does not run it again.
    os.remove(os.path.join(runs_dir, pilot[1].name, "summary.json"))
    assert controls.chosen_lr(CONTROLS, runs_dir) is None  # lr 0.03 has not finished
    with open(os.path.join(runs_dir, pilot[1].name, "log.txt"), "w") as f:
        f.write("ERROR: non-finite loss or gradients at step 7 (loss=nan); stopping the run.\n")
    assert engine.has_diverged(runs_dir, pilot[1])
    assert controls.chosen_lr(CONTROLS, runs_dir) == 0.1
    _write_summary(runs_dir, pilot[1], dict(best10_mean=56.0, epochs=15))
    assert not engine.has_diverged(runs_dir, pilot[1])  # finished after all
    runs = controls.plan(CONTROLS, "cifar10", runs_dir)
    parts = [r.part for r in runs]
    assert parts == sorted(parts, key=["p", "g1", "h", "g2", "g3"].index)  # priority order
    h = [r for r in runs if r.part == "h"]
    assert len(h) == 20  # 7 methods x 3 seeds, less the pilot's lr-0.03 baseline (seed 0)
    rates = {r.facts["method"]: r.facts["weight_decay"] for r in h}
    assert rates == {
        "baseline": 0.0,
        "wd": 0.014,
        "adadecay": 0.0014,
        "wrs": 0.014,
        "wrs_ic": 0.014,
        "adamp": 0.0014,
        "wrs+adamp": 0.014,
    }
    assert all(r.facts["optimizer"] == "sgdm" and r.facts["lr"] == 0.03 for r in h)
    assert len({r.name for r in runs}) == len(runs)
    # Every run's flags are valid flags of the training program, with its optimizer.
    for run in runs:
        config = parse_config([*run.flags, "--output_dir=x"])
        f = run.facts
        assert (config.method, config.optimizer, config.seed) == (
            f["method"],
            f["optimizer"],
            f["seed"],
        )
        assert config.epochs * config.steps_per_epoch == 2400 and config.batch_size == 128
        assert config.lpwd_permutation_seed == CONTROLS.permutation_seed


def test_controls_reuse_the_first_studys_records(tmp_path):
    runs_dir = str(tmp_path / "runs")
    runs = controls.plan(CONTROLS, "cifar10", runs_dir)
    with pytest.raises(ValueError, match="--reuse_from"):
        engine.write_reused(P_CONTROLS, runs, runs_dir, None)
    first = os.path.join(
        os.path.dirname(__file__), "..", "experiments", "results", "cifar10_cpu", "runs.jsonl"
    )
    assert engine.write_reused(P_CONTROLS, runs, runs_dir, first) == 15
    summary = engine.summary(runs_dir, "train/wd-lr0.001-wd2-s0")
    assert summary["best10_mean"] == pytest.approx(53.111) and summary["reused_from"]
    assert len(summary["history"]) == 15 and summary["epochs"] == 15
    assert engine.write_reused(P_CONTROLS, runs, runs_dir, first) == 0  # done once
    bad = tmp_path / "bad.jsonl"
    bad.write_text("")
    with pytest.raises(ValueError, match=r"0 records of train/wd-lr0\.001-wd2-s0"):
        engine.write_reused(P_CONTROLS, runs, str(tmp_path / "other"), str(bad))


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
    for run in controls.plan(p, "digits", runs_dir):
        if run.part == "g1":
            b = best[run.facts["method"]](run.facts["seed"])
            _write_summary(runs_dir, run, _summary(b, b + 1, 1.0, p.steps))
    tables = report.write_report(P_TINY, "digits", runs_dir, results)
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
    assert "| g | WD - baseline |" not in text  # no baseline run yet
    assert "part h: planned once the pilot (part p) has finished" in text


def test_controls_report_from_runs_with_known_numbers(tmp_path):
    p = CONTROLS_TINY
    runs_dir, results = str(tmp_path / "runs"), str(tmp_path / "results")
    for run, best in zip(controls.pilot_runs(p), (40.0, 45.0)):  # lr 0.1 wins
        _write_summary(runs_dir, run, _summary(best, best, 1.0, p.steps))
    # Seed 0 of the first-study cells is reused: write it as a reused record.
    base = {"baseline": 60.0, "wd": 50.0, "lpwd": 53.0, "lwd": 52.0, "lpwd_reversed": 49.0}
    base.update({"lpwd_shuffled": 51.0, "wd_matched": 48.0})
    sgd = {"baseline": 45.0, "wd": 46.0, "adadecay": 46.5, "wrs": 47.0, "wrs_ic": 45.5}
    sgd.update({"adamp": 46.0, "wrs+adamp": 48.0})
    for run in controls.plan(p, "digits", runs_dir):
        if run.part == "p":
            continue
        f = run.facts
        table = sgd if f["optimizer"] == "sgdm" else base
        # LPWD - WD per seed: 3, 3.5, 4 (the seed adds 0.5 to LPWD only).
        best = table[f["method"]] + (0.5 * f["seed"] if f["method"] == "lpwd" else 0.0)
        summary = _summary(best, best + 1, 1.0 - 0.01 * f["seed"], p.steps)
        if controls.is_reused(p, run):
            summary["reused_from"] = "first-study/runs.jsonl"
        _write_summary(runs_dir, run, summary)
    tables = report.write_report(P_TINY, "digits", runs_dir, results)
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
    assert "part h: lr 0.1 (the pilot's best best-10)" in text
    assert "| g | LPWD - WD | > 0 | +3.50 [" in text
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
        _write_summary(runs_dir, run, _summary(best, best, 1.0, p.steps))
    finished = []
    for index, run in enumerate(controls.plan(p, "digits", runs_dir)):
        if run.part == "p" or index % 3 == 0:  # some runs have not finished
            continue
        summary = _summary(50.0 + index, 51.0 + index, 1.0 / index, p.steps)
        if controls.is_reused(p, run):
            summary["reused_from"] = "first-study/runs.jsonl"
        _write_summary(runs_dir, run, summary)
        finished.append(run)
    assert any(r.part == "h" for r in finished)
    report.write_report(P_TINY, "digits", runs_dir, results)
    committed = os.path.join(results, "runs.jsonl")
    # The runs directory is lost; the committed report brings back every trained run.
    lost = str(tmp_path / "fresh")
    trained = [r for r in finished if not controls.is_reused(p, r)]
    assert engine.restore(P_TINY, lost, committed) == 2 + len(trained)
    plan = controls.plan(p, "digits", lost)
    restored = {r.name for r in plan if engine.is_finished(lost, r)}
    assert restored == {r.name for r in [*controls.pilot_runs(p), *trained]}
    for run in trained:
        summary = engine.summary(lost, run)
        assert summary["restored_from"] == os.path.abspath(committed)
        assert summary["best10_mean"] == engine.summary(runs_dir, run)["best10_mean"]
    # The reused seeds come back from the first study as before; then the records agree.
    for run in finished:
        if controls.is_reused(p, run):
            _write_summary(lost, run, engine.summary(runs_dir, run))

    def strip(records):
        return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in records]

    assert strip(engine.records(P_TINY, lost)) == strip(engine.records(P_TINY, runs_dir))
    assert engine.restore(P_TINY, lost, committed) == 0  # nothing left to restore
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
        engine.restore(P_TINY, str(tmp_path / "x"), str(other))
    other.write_text(json.dumps({**record, "seed": 9}) + "\n")
    with pytest.raises(ValueError, match="does not plan"):
        engine.restore(P_TINY, str(tmp_path / "y"), str(other))
    other.write_text(json.dumps(record) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match="two records"):
        engine.restore(P_TINY, str(tmp_path / "z"), str(other))


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
    assert engine.run_all(P_TINY, "digits", runs_dir, ["p"]) == 0
    lr = controls.chosen_lr(p, runs_dir)
    best = {
        r.facts["lr"]: engine.summary(runs_dir, r)["best10_mean"] for r in controls.pilot_runs(p)
    }
    assert lr == max(best, key=lambda k: (best[k], -k))
    h = [r for r in controls.plan(p, "digits", runs_dir) if r.part == "h"]
    assert len(h) == 13 and {r.facts["lr"] for r in h} == {lr}
    assert study.main(["--protocol=controls_tiny", f"--output_dir={runs_dir}", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "part p: 2 runs (0 reused from the first study), 2 finished, 0 to run" in out
    assert f"part h: lr {lr:g} (the pilot's best best-10)" in out
    # Without --reuse_from the reused cells cannot be filled in: a one-line error, exit 2.
    assert study.main(["--protocol=controls_tiny", f"--output_dir={runs_dir}", "--parts=g1"]) == 2
    assert "--reuse_from" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The regimes study (protocols/regimes.py): its plan is its own; the engine reports it.


def test_every_protocol_is_one_engine_protocol():
    assert sorted(protocols()) == ["controls", "controls_tiny", "cpu", "regimes", "tiny"]
    assert regimes.PROTOCOL.plan is regimes.plan
    for name, protocol in protocols().items():
        assert protocol.name == name and protocol.cell_columns
        assert {t.name for t in protocol.tables}.isdisjoint({"runs", "cells"})


def test_regimes_report_the_pilots_rule_then_the_named_comparisons(tmp_path, capsys):
    runs_dir, results = str(tmp_path / "runs"), str(tmp_path / "results")
    pretrain = regimes.pretrain_run("digits", runs_dir)
    _write_summary(runs_dir, pretrain, dict(_summary(70, 80, 0.5, 3900, epochs=20), best_top1=80))
    gain = {("r2", 0.5): (1.4, 1.8), ("r2", 0.05): (0.2, 0.4), ("r1", 0.5): (0.1, 0.0)}
    gain |= {("r1", 5.0): (0.5, 0.3), ("r3", 0.05): (0.2,)}
    for (name, lam), diffs in gain.items():
        regime = regimes.REGIMES[name]
        for seed, diff in zip(regime.seeds, diffs):
            for method, rate, best in (("baseline", 0.0, 50.0), ("wd", lam, 50.0 + diff)):
                run = regimes.run("pilot", regimes.REGIMES[name], method, rate, seed, "", runs_dir)
                steps = 3900 if name == "r2" else 1900 if name == "r1" else 10920
                epochs = regimes.REGIMES[name].epochs
                _write_summary(runs_dir, run, _summary(best, best, 1.0, steps, epochs=epochs))
    assert regimes.decision(runs_dir) == ("r2", 0.5, False)
    # Every main and robust run: LPWD 2 points above WD (and above the other controls), WD 1.5
    # above the baseline; at 4 lambda LPWD loses 1 point and WD 3 (seed 2: 4).
    best = {"baseline": 50.0, "wd": 51.5, "lpwd": 53.5, "lwd": 53.0, "lpwd_reversed": 51.0}
    for run in regimes.plan("digits", runs_dir):
        f = run.facts
        if run.part not in ("main", "robust"):
            continue
        b = best[f["method"]] + 0.1 * f["seed"]
        if f["weight_decay"] == 2.0:
            b -= 1.0 if f["method"] == "lpwd" else 3.0 + (f["seed"] == 2)
        _write_summary(runs_dir, run, _summary(b, b, 1.0, 3900, epochs=100))
    tables = report.write_report(regimes.PROTOCOL, "digits", runs_dir, results)
    pilot = {(r["regime"], r["weight_decay"]): r for r in tables["pilot"]}
    assert pilot[("r2", 0.5)]["chosen"] and pilot[("r2", 0.5)]["mean"] == pytest.approx(1.6)
    assert pilot[("r3", 0.05)]["differences"] == "+0.20" and not pilot[("r3", 0.05)]["chosen"]
    rows = {r["comparison"]: r for r in tables["comparisons"]}
    assert rows["WD - baseline"]["n"] == 6 and rows["WD - baseline"]["outcome"] == "holds"
    # Seeds 0 and 1 of WD are the pilot's runs (51.4, 51.8): LPWD - WD is 2.1, 1.8, then 2.
    assert rows["LPWD - WD"]["best10_mean"] == pytest.approx((2.1 + 1.8 + 4 * 2.0) / 6)
    drop = rows["LPWD's drop to lambda 2 - WD's"]
    # WD drops 2.9, 3.2 (from the pilot's runs) and 4.0; LPWD 1 in each seed.
    assert drop["best10_mean"] == pytest.approx(-(1.9 + 2.2 + 3.0) / 3) and drop["n"] == 3
    assert drop["outcome"] == "holds" and drop["final"]
    assert "LPWD - decay_to_init" not in rows  # R1 only
    text = open(os.path.join(results, "results.md")).read()
    assert "the pilot chose r2 at lambda 0.5 (WD - baseline +1.60 best-10)" in text
    for name in ("fig_main", "fig_curves", "fig_robust"):
        assert os.path.getsize(os.path.join(results, f"{name}.png")) > 10_000
    assert study.main(["--protocol=regimes", f"--output_dir={runs_dir}", "--dry_run"]) == 0
    assert "part main: 26 runs, 26 finished, 0 to run" in capsys.readouterr().out
