"""The committed studies rebuild from their committed record: `lpwd-study --report_only
--restore_from=<the study's runs.jsonl>` (and, for the controls study, `--reuse_from` the first
study's) on an empty runs directory writes every committed table byte for byte, training
nothing, and draws every figure that has data.

Not rebuilt: the first study's zero_shot.csv and fig_zero_shot.png, whose inputs are the
zero_shot_decay.json files of the trained runs' directories (part e), not in runs.jsonl; and
results.md, whose layout is the report writer's (its numbers are those of the tables).
"""

from __future__ import annotations

import os

import pytest

from lpwd_optax.experiments import study

RESULTS = os.path.join(os.path.dirname(__file__), "..", "experiments", "results")
STUDIES = {
    # results folder: (protocol, study to reuse, tables, figures, every run finished)
    "cifar10_cpu": (
        "cpu",
        None,
        ("cells", "comparisons", "growth", "rop_grid"),
        ("fig_strong_curves", "fig_ablation", "fig_lambda_sweep", "fig_rop_grid"),
        True,
    ),
    "cifar10_cpu_controls": (
        "controls",
        "cifar10_cpu",
        ("cells", "comparisons", "pilot"),
        ("fig_controls", "fig_part_h", "fig_lpwd_lwd_wd_curves"),
        True,
    ),
    "cifar10_cpu_regimes": (
        "regimes",
        None,
        ("cells", "comparisons", "pilot", "same_machine"),
        ("fig_main", "fig_curves", "fig_robust"),
        True,
    ),
}


@pytest.mark.parametrize("folder", sorted(STUDIES))
def test_committed_tables_rebuild_byte_identical_from_runs_jsonl(folder, tmp_path, capsys):
    protocol, reused, tables, figures, finished = STUDIES[folder]
    committed = os.path.join(RESULTS, folder)
    out = tmp_path / "results"
    argv = [
        f"--protocol={protocol}",
        "--data=../shared/data/cifar10-jpeg.zip",  # only named, never read
        f"--output_dir={tmp_path / 'runs'}",
        f"--results_dir={out}",
        f"--restore_from={os.path.join(committed, 'runs.jsonl')}",
        "--report_only",
    ]
    if reused:
        argv.append(f"--reuse_from={os.path.join(RESULTS, reused, 'runs.jsonl')}")
    assert study.main(argv) == 0
    if finished:  # nothing left to train (a study in progress has)
        assert "total to run: 0 of" in capsys.readouterr().out
    for name in (*(f"{t}.csv" for t in tables), "runs.csv", "runs.jsonl"):
        with open(out / name, "rb") as got, open(os.path.join(committed, name), "rb") as want:
            assert got.read() == want.read(), name
    for name in figures:
        assert (out / f"{name}.png").stat().st_size > 10_000, name
