"""End-to-end tests of experiments/cifar.py: outputs, resume, corruption, NaNs, multi-process."""

from __future__ import annotations

import glob
import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from lpwd_optax.experiments import cifar, data, writers
from tests import _cifar_helpers as helpers

# Each test decodes its datasets into a cache of the session (conftest.py).
pytestmark = pytest.mark.usefixtures("data_cache")

SUMMARY_LINE = re.compile(
    r"^mean \+- std of the best 10 test top-1: \d+\.\d\d \+- \d+\.\d\d$", re.M
)
EPOCHS = 3
STEPS_PER_EPOCH = 4


def flags(out, cache_dir, *extra):
    return helpers.run_flags(out, cache_dir, "--method=lpwd", f"--epochs={EPOCHS}", *extra)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, cache_dir):
    """An uninterrupted LPWD run on digits; several tests compare against it."""
    out = tmp_path_factory.mktemp("full") / "run"
    assert cifar.main(flags(out, cache_dir)) == 0
    return out


def test_digits_run_writes_everything_and_learns(full_run, capsys):
    with open(full_run / "summary.json") as f:
        summary = json.load(f)
    assert SUMMARY_LINE.match(summary["summary_line"])
    history = summary["history"]
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]  # the loss falls
    assert all(0.0 <= r["rop"] <= 1.0 for r in history)  # defined for LPWD
    assert summary["steps"] == EPOCHS * STEPS_PER_EPOCH and summary["devices"] == 8
    model, cores = summary["machine"].rsplit(", ", 1)  # the CPU it trained on
    assert model and cores == f"{os.cpu_count()} cores"
    lines = writers.read_jsonl(str(full_run / "metrics.jsonl"))
    records = [r for r in lines if "epoch" in r]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    # Step records every --log_every_steps=2 steps, accuracy in percent like the epoch records.
    steps = [r for r in lines if "train/loss" in r]
    assert [r["step"] for r in steps] == list(range(2, EPOCHS * STEPS_PER_EPOCH + 1, 2))
    assert all(0 <= r["train/top1"] <= 100 for r in steps) and steps[-1]["train/top1"] > 1
    assert {"train_loss", "test_top1", "rop"} <= records[0].keys()
    assert any(k.startswith("layers/head/fc/") for k in records[0])
    assert glob.glob(str(full_run / "tensorboard" / "events.out.tfevents.*"))
    assert sorted(int(s) for s in os.listdir(full_run / "checkpoints")) == [4, 8, 12]
    assert os.path.isdir(full_run / "checkpoints" / "12" / "evaluated")  # PWD/LPWD's theta_t
    params = helpers.read_params(full_run)
    assert "head/fc/kernel" in params and params["head/fc/kernel"].shape == (8, 10)
    with open(full_run / "config.json") as f:
        assert json.load(f)["method"] == "lpwd"


def test_summary_line_is_printed(tmp_path, cache_dir, capsys):
    out = tmp_path / "run"
    assert cifar.main(flags(out, cache_dir, "--epochs=1", "--method=wd")) == 0
    stdout = capsys.readouterr().out
    assert SUMMARY_LINE.search(stdout)
    assert "epoch 1/1: train loss" in stdout and "R_op" in stdout


def test_resume_after_a_kill_equals_the_uninterrupted_run(tmp_path, cache_dir, full_run, capsys):
    out = tmp_path / "run"
    # Stop abruptly in the middle of epoch 2: only the epoch-1 checkpoint exists.
    assert cifar.main(flags(out, cache_dir, "--stop_after_steps=6")) == 3
    assert os.listdir(out / "checkpoints") == ["4"]
    assert not os.path.exists(out / "summary.json")
    # The checkpoint holds the wall time so far; mark it so the resumed summary must add it.
    meta_file = out / "checkpoints" / "4" / "meta" / "metadata"  # orbax's JsonSave
    with open(meta_file) as f:
        meta = json.load(f)
    assert meta["wall_time_s"] > 0
    with open(meta_file, "w") as f:
        json.dump({**meta, "wall_time_s": 1e6}, f)
    started = time.time()
    assert cifar.main(flags(out, cache_dir, "--resume")) == 0
    second_segment_s = time.time() - started
    assert "resumed at step 4" in capsys.readouterr().out
    assert helpers.max_abs_diff(helpers.read_params(out), helpers.read_params(full_run)) == 0.0
    with open(out / "summary.json") as f, open(full_run / "summary.json") as g:
        resumed, reference = json.load(f), json.load(g)
    assert [r["test_top1"] for r in resumed["history"]] == [
        r["test_top1"] for r in reference["history"]
    ]
    assert 1e6 < resumed["wall_time_s"] < 1e6 + second_segment_s  # both segments count
    records = writers.read_jsonl(str(out / "metrics.jsonl"))
    assert [r["epoch"] for r in records if "epoch" in r] == [1, 2, 3]
    assert [r["step"] for r in records if "train/loss" in r] == list(range(2, 13, 2))


def test_corrupted_latest_checkpoint_falls_back_to_the_previous(
    tmp_path, cache_dir, full_run, capsys
):
    out = helpers.copy_run(full_run, tmp_path / "run")
    for path in glob.glob(os.path.join(out, "checkpoints", "12", "state", "**"), recursive=True):
        if os.path.isfile(path):
            with open(path, "wb") as f:
                f.write(b"\0garbage")
    os.remove(os.path.join(out, "summary.json"))
    assert cifar.main(flags(out, cache_dir, "--resume")) == 0
    stdout = capsys.readouterr().out
    assert "checkpoint 12" in stdout and "corrupted" in stdout
    assert "resumed at step 8" in stdout
    # TensorBoard drops the points after step 8 that the first run wrote (purge at step 9),
    # as metrics.jsonl does.
    assert _purge_steps(os.path.join(out, "tensorboard"))[-1] == 9
    records = writers.read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in records if "epoch" in r] == [4, 8, 12]
    assert helpers.max_abs_diff(helpers.read_params(out), helpers.read_params(full_run)) == 0.0


def test_existing_checkpoints_need_resume(tmp_path, cache_dir, full_run, capsys):
    out = helpers.copy_run(full_run, tmp_path / "run")
    os.remove(os.path.join(out, "summary.json"))  # an interrupted run
    assert cifar.main(flags(out, cache_dir)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--resume" in err and len(err.splitlines()) == 1


def test_rerunning_a_finished_run_reports_it(tmp_path, cache_dir, full_run, capsys):
    out = helpers.copy_run(full_run, tmp_path / "run")
    assert cifar.main(flags(out, cache_dir, "--no-progress")) == 0
    stdout = capsys.readouterr().out
    assert "holds this finished run" in stdout and SUMMARY_LINE.search(stdout)
    assert cifar.main(flags(out, cache_dir, "--epochs=5")) == 2
    assert "other settings (epochs)" in capsys.readouterr().err


def test_a_second_run_cannot_write_the_same_directory(tmp_path, cache_dir, capsys):
    out = tmp_path / "run"
    os.makedirs(out)
    with open(out / "lock", "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}\n")  # a live owner: this process
    assert cifar.main(flags(out, cache_dir, "--epochs=1")) == 2
    assert f"another run (pid {os.getpid()}) is writing" in capsys.readouterr().err
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(out / "lock", "w") as f:
        f.write(f"{socket.gethostname()} {dead.pid}\n")  # a stale lock is taken over
    assert cifar.main(flags(out, cache_dir, "--epochs=1", "--method=wd")) == 0
    assert not os.path.exists(out / "lock")


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--dataset=folder:{tmp}/nowhere", "nowhere"),
        ("--model=no_such_model", "unknown model 'no_such_model'"),
        ("--weight_decay=-1", "--weight_decay must be >= 0"),
        ("--batch_size=60", "--batch_size=60 is not divisible by 8 devices"),
        ("--lr=1e10", "kernel': the per-step decay"),  # names a decayed leaf, never a bias
        ("--jacobian_probes=-1", "--jacobian_probes must be >= 0"),
    ],
)
def test_config_errors_are_one_line_exit_2_and_leave_nothing(
    tmp_path, cache_dir, capsys, flag, message
):
    out = tmp_path / "run"
    code = cifar.main(flags(out, cache_dir, flag.format(tmp=tmp_path), "--eval_batch_size=64"))
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(out)
    if "batch_size" in flag:
        assert "--num_devices=6 would work" in err


@pytest.mark.parametrize("parallel", ["jit", "pmap"])
def test_scale_invariant_layers_and_the_jacobian_norm_are_logged(
    tmp_path, cache_dir, capsys, parallel
):
    out = tmp_path / "run"
    extra = [f"--parallel={parallel}", "--jacobian_probes=4", "--jacobian_examples=16"]
    assert cifar.main(flags(out, cache_dir, "--epochs=2", *extra)) == 0
    assert "scale-invariant layers: " in capsys.readouterr().out
    # layers.txt: every layer with a kernel, its (finite) scale sensitivity and the verdict.
    with open(out / "layers.txt") as f:
        rows = [
            line.split() for line in f if re.match(r"^\S+\s+\d\.\d\de[+-]\d\d\s+(yes|no)$", line)
        ]
    table = {name: (float(s), verdict == "yes") for name, s, verdict in rows}
    assert set(table) == {
        "stem/conv",
        "stages/0/downsample/conv",
        "stages/0/blocks/0/conv_dw",
        "stages/0/blocks/0/mlp/fc1",
        "stages/0/blocks/0/mlp/fc2",
        "head/fc",
    }
    assert all(np.isfinite(s) and s >= 0 for s, _ in table.values())
    assert table["stem/conv"][1] and table["stages/0/blocks/0/conv_dw"][1]  # LayerNorm follows
    assert not table["head/fc"][1] and not table["stages/0/blocks/0/mlp/fc1"][1]
    invariant = {name for name, (_, yes) in table.items() if yes}
    # Each epoch: the effective learning rate of exactly the scale-invariant layers, and the
    # Jacobian norm with its standard error.
    records = [r for r in writers.read_jsonl(str(out / "metrics.jsonl")) if "epoch" in r]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        effective_lr = {k.split("/", 1)[1].rsplit("/", 1)[0] for k in r if "effective_lr" in k}
        assert effective_lr == invariant
        assert all(np.isfinite(r[f"layers/{name}/effective_lr"]) for name in invariant)
        assert 0 < r["jacobian/norm_sq"] < np.inf
        assert 0 < r["jacobian/norm_sq_stderr"] < r["jacobian/norm_sq"]
    # Diagnostics do not change the run: a finished run is reported whatever they are set to.
    assert cifar.main(flags(out, cache_dir, "--epochs=2", f"--parallel={parallel}")) == 0
    assert "holds this finished run" in capsys.readouterr().out


def test_lpwd_per_layer_rates_go_to_the_run_directory(full_run):
    with open(full_run / "method.txt") as f:
        table = f.read()
    assert "lpwd" in table and "head/fc/kernel" in table


def test_progress_without_a_terminal_prints_plain_step_lines(tmp_path, cache_dir, capsys):
    out = tmp_path / "run"
    assert cifar.main(flags(out, cache_dir, "--epochs=1", "--method=lpwd")) == 0
    stdout = capsys.readouterr().out
    assert "\r" not in stdout
    assert "step 2 (epoch 1/1): loss " in stdout and "step 4 (epoch 1/1)" in stdout
    assert "per-layer rates: " in stdout and "head/fc/kernel" not in stdout


def test_non_finite_gradients_stop_the_run_and_keep_the_last_good_checkpoint(
    tmp_path, cache_dir, monkeypatch, capsys
):
    real_batches = data.batches

    def poisoned(ds, *args, epoch, train=True, **kwargs):
        for batch in real_batches(ds, *args, epoch=epoch, train=train, **kwargs):
            if train and epoch == 1:
                batch["image"][:] = np.nan
            yield batch

    monkeypatch.setattr(data, "batches", poisoned)
    out = tmp_path / "run"
    assert cifar.main(flags(out, cache_dir)) == 1
    err = capsys.readouterr().err
    assert "non-finite loss or gradients at step 5" in err
    assert "last good checkpoint is step 4" in err
    assert os.listdir(out / "checkpoints") == ["4"]
    assert not os.path.exists(out / "summary.json")


def test_image_folder_run_with_pmap(tmp_path, cache_dir, capsys):
    root = helpers.write_image_folder(tmp_path / "images")
    out = tmp_path / "run"
    flags = [
        f"--dataset=folder:{root}",
        "--parallel=pmap",
        "--method=wd",
        "--optimizer=sgdm",
        "--lr=0.05",
        "--batch_size=24",
        "--eval_batch_size=24",
    ]
    code = cifar.main(helpers.run_flags(out, cache_dir, *flags, "--epochs=3"))
    assert code == 0
    stdout = capsys.readouterr().out
    assert SUMMARY_LINE.search(stdout)
    with open(out / "summary.json") as f:
        summary = json.load(f)
    assert summary["history"][-1]["train_loss"] < summary["history"][0]["train_loss"]
    assert summary["history"][0]["rop"] is not None
    assert os.path.isdir(out / "checkpoints" / "9")
    # The pmap run resumes from its own checkpoints too.
    assert cifar.main(helpers.run_flags(out, cache_dir, *flags, "--epochs=4", "--resume")) == 0
    assert "resumed at step 9" in capsys.readouterr().out


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cifar.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--model",
        "--dataset",
        "--optimizer",
        "--method",
        "--lr",
        "--weight_decay",
        "--epochs",
        "--batch_size",
        "--seed",
        "--output_dir",
        "--data_dir",
        "--parallel",
        "--resume",
        "--coordinator_address",
        "--num_processes",
        "--process_id",
        "--steps_per_epoch",
        "--preset",
        "--jacobian_probes",
    ):
        assert flag in text


def _purge_steps(logdir: str) -> list[int]:
    """The steps of the 'start' session logs in a TensorBoard log directory: TensorBoard drops
    every earlier point at or after such a step (tensorboardX's purge_step)."""
    from tensorboardX.proto import event_pb2

    steps = []
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            content = f.read()
        offset = 0
        while offset < len(content):  # TFRecord framing: length, crc, data, crc
            length = int.from_bytes(content[offset : offset + 8], "little")
            event = event_pb2.Event.FromString(content[offset + 12 : offset + 12 + length])
            offset += 16 + length
            if event.HasField("session_log") and event.session_log.status == 1:  # START
                steps.append(event.step)
    return steps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_together_and_agree(tmp_path, cache_dir, full_run):
    """Two processes (2 CPU devices each) with jax.distributed on localhost: both end with the
    same weights, equal to the single-process 8-device run of the same configuration."""
    out = tmp_path / "run"
    port = _free_port()
    worker = os.path.join(os.path.dirname(__file__), "_multiprocess_worker.py")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                worker,
                "2",
                "--",
                *flags(out, cache_dir),
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=400)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-3000:]
        results.append(json.loads(text.split("RESULT ", 1)[1].splitlines()[0]))
    assert [r["process_index"] for r in results] == [0, 1]
    assert all(r["process_count"] == 2 and r["devices"] == 4 for r in results)
    assert results[0]["fingerprint"] == results[1]["fingerprint"]
    assert results[0]["top1"] == results[1]["top1"]
    with open(full_run / "summary.json") as f:
        single = json.load(f)
    np.testing.assert_allclose(
        results[0]["train_loss"], [r["train_loss"] for r in single["history"]], rtol=1e-5
    )
    assert helpers.max_abs_diff(helpers.read_params(out), helpers.read_params(full_run)) < 1e-5
