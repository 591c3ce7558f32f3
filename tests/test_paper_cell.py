"""experiments/benchmarks/paper_cell.py: the epoch-by-epoch comparison and the time limit.

The program's full run (two training processes) is exercised by tests/test_device_check.py;
these tests check its arithmetic on hand-made records and its handling of a run that
outlasts its limit.
"""

from __future__ import annotations

import json
import sys

import pytest

from lpwd_optax.experiments.benchmarks import paper_cell


def _records(top1, times):
    return [
        {
            "epoch": i + 1,
            "step": 10 * (i + 1),
            "test_top1": t,
            "train_loss": 2.0 - i,
            "epoch_time_s": s,
        }
        for i, (t, s) in enumerate(zip(top1, times))
    ]


def test_summarize_compares_the_common_epochs():
    runs = {
        "wd": _records([10.0, 20.0, 30.0], [9.0, 2.0, 4.0]),
        "lpwd": _records([12.0, 18.0, 33.0, 40.0], [8.0, 1.0, 2.0, 5.0]),
    }
    summary = paper_cell.summarize(runs, steps=10, batch=8)
    assert summary["epochs_compared"] == 3
    wd, lpwd = summary["methods"]["wd"], summary["methods"]["lpwd"]
    # Fewer than 10 common epochs: best-10 is the mean over all of them.
    assert wd["best10_top1"] == pytest.approx(20.0)
    assert lpwd["best10_top1"] == pytest.approx(21.0)
    assert (wd["final_top1"], lpwd["final_top1"]) == (30.0, 33.0)
    # 80 images per epoch; epoch 1 (compilation) is left out of the median.
    assert [e["images_per_s"] for e in wd["epochs"]] == pytest.approx([80 / 9, 40.0, 20.0])
    assert wd["images_per_s_median"] == pytest.approx(30.0)
    assert lpwd["images_per_s_median"] == pytest.approx(40.0)  # median of 80, 40, 16
    diff = summary["lpwd_minus_wd"]
    assert diff["best10_top1"] == pytest.approx(1.0)
    assert diff["final_top1"] == pytest.approx(3.0)
    assert diff["per_epoch_top1"] == pytest.approx([2.0, -2.0, 3.0])


def test_best10_takes_the_ten_highest_epochs():
    top1 = [float(x) for x in range(1, 13)]  # 12 epochs: best 10 are 3..12
    runs = {"wd": _records(top1, [1.0] * 12), "lpwd": _records(top1[::-1], [1.0] * 12)}
    summary = paper_cell.summarize(runs, steps=1, batch=1)
    assert summary["methods"]["wd"]["best10_top1"] == pytest.approx(7.5)
    assert summary["methods"]["lpwd"]["best10_top1"] == pytest.approx(7.5)
    assert summary["lpwd_minus_wd"]["final_top1"] == pytest.approx(1.0 - 12.0)


def test_epochs_finished_skips_step_records_and_a_cut_line(tmp_path):
    lines = [
        json.dumps({"step": 20, "train/loss": 2.0}),
        json.dumps({"step": 40, "epoch": 1, "test_top1": 31.0}),
        '{"step": 80, "epoch": 2, "test_to',
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    assert [r["test_top1"] for r in paper_cell.epochs_finished(tmp_path)] == [31.0]
    assert paper_cell.epochs_finished(tmp_path / "missing") == []


def test_run_for_stops_a_run_at_its_limit(tmp_path):
    log = tmp_path / "log"
    rc, wall = paper_cell.run_for([sys.executable, "-c", "import time; time.sleep(60)"], 1.0, log)
    assert rc is None and wall < 30
    rc, _ = paper_cell.run_for([sys.executable, "-c", "print('done')"], 30.0, log)
    assert rc == 0 and log.read_text().strip() == "done"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--budget_s", "10"], "--budget_s must be at least 30, got 10"),
        (["--data", "/no/such.zip"], "--data: no such file or folder: /no/such.zip"),
    ],
)
def test_bad_flags_name_the_problem(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        paper_cell.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
