"""What the regimes study needs of the training program (class ranges, balanced subsets,
evaluation every k epochs, warm starts from the program's own checkpoints) and its pilot's rule."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from lpwd_optax.experiments import cifar, data, engine, report
from lpwd_optax.experiments.config import parse_config
from lpwd_optax.experiments.protocols import regimes
from tests import _cifar_helpers as helpers

# Each test decodes its datasets into a cache of the session (conftest.py).
pytestmark = pytest.mark.usefixtures("data_cache")


def _dataset(labels, num_classes):
    labels = np.asarray(labels, np.int32)
    images = np.zeros((len(labels), 32, 32, 3), np.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = np.divmod(np.arange(len(labels)), 256)
    return data.ArrayDataset(images, labels, num_classes, "toy")


def _index(ds):
    return ds.images[:, 0, 0, 0].astype(int) * 256 + ds.images[:, 0, 0, 1]


# ---------------------------------------------------------------------------------------------
# Class ranges and balanced subsets


@pytest.mark.parametrize(
    "text, classes",
    [
        ("0-4", (0, 1, 2, 3, 4)),
        ("5-9", (5, 6, 7, 8, 9)),
        ("0,2,4", (0, 2, 4)),
        ("7,1-2", (1, 2, 7)),
    ],
)
def test_parse_classes(text, classes):
    assert data.parse_classes(text) == classes


@pytest.mark.parametrize(
    "text, message",
    [
        ("4-2", "the range '4-2' is empty"),
        ("", "is not a class id or a range"),
        ("a-b", "is not a class id or a range"),
        ("1,1", "a class is named twice"),
        ("-1", "is not a class id or a range"),
    ],
)
def test_parse_classes_names_the_problem(text, message):
    with pytest.raises(data.DataError, match=message):
        data.parse_classes(text)


def test_select_classes_keeps_those_classes_relabelled_from_zero():
    ds = _dataset([0, 5, 3, 7, 5, 9, 2], 10)
    picked = data.select_classes(ds, (5, 7))
    assert picked.num_classes == 2
    np.testing.assert_array_equal(picked.labels, [0, 1, 0])
    np.testing.assert_array_equal(_index(picked), [1, 3, 4])  # stored order kept
    with pytest.raises(data.DataError, match="toy has classes 0-9; no class 12"):
        data.select_classes(ds, (5, 12))


def test_balanced_subset_is_balanced_and_drawn_by_its_own_seed():
    rng = np.random.default_rng(1)
    ds = _dataset(rng.integers(0, 4, 400), 4)
    a = data.balanced_subset(ds, 40, seed=0)
    assert np.bincount(a.labels, minlength=4).tolist() == [10, 10, 10, 10]
    index = _index(a)
    assert len(set(index)) == 40 and np.all(np.diff(index) > 0)  # distinct, stored order
    np.testing.assert_array_equal(a.labels, ds.labels[index])
    again = data.balanced_subset(ds, 40, seed=0)
    np.testing.assert_array_equal(again.images, a.images)
    other = data.balanced_subset(ds, 40, seed=1)
    assert not np.array_equal(other.images, a.images)


@pytest.mark.parametrize(
    "examples, message",
    [(42, "must be a positive multiple of the 4 classes"), (800, "needs 200 examples of class")],
)
def test_balanced_subset_errors(examples, message):
    ds = _dataset(np.arange(400) % 4, 4)
    with pytest.raises(data.DataError, match=message):
        data.balanced_subset(ds, examples, seed=0)


# ---------------------------------------------------------------------------------------------
# The training program


def _flags(out, cache_dir, *extra):
    return helpers.run_flags(out, cache_dir, "--method=wd", "--epochs=3", *extra)


@pytest.fixture(scope="module")
def first_half(tmp_path_factory, cache_dir):
    """A run on digits' classes 0-4, 250 training images, evaluated after epochs 2 and 3."""
    out = tmp_path_factory.mktemp("first_half") / "run"
    flags = _flags(out, cache_dir, "--classes=0-4", "--train_examples=250", "--eval_every=2")
    assert cifar.main(flags) == 0
    return out


def test_classes_subset_and_eval_every_reach_the_run(first_half, cache_dir):
    with open(first_half / "summary.json") as f:
        summary = json.load(f)
    assert [r["epoch"] for r in summary["history"]] == [2, 3]
    assert summary["epochs"] == 3 and summary["evaluations"] == 2
    assert summary["steps"] == 3 * 3  # 250 images at batch 64: 3 steps per epoch
    config = parse_config(_flags(first_half, cache_dir, "--classes=0-4", "--train_examples=250"))
    train, test = cifar.load_data(config)
    assert train.num_classes == test.num_classes == 5
    assert np.bincount(train.labels).tolist() == [50] * 5
    full = data.load_dataset("digits", split="test")
    assert len(test) == int(np.sum(full.labels < 5)) and set(test.labels) == set(range(5))


def test_a_finished_run_with_eval_every_continues_for_more_epochs(first_half, tmp_path, cache_dir):
    run = helpers.copy_run(first_half, tmp_path / "run")
    flags = _flags(run, cache_dir, "--classes=0-4", "--train_examples=250", "--eval_every=2")
    flags = [f for f in flags if not f.startswith("--epochs")] + ["--epochs=5", "--resume"]
    assert cifar.main(flags) == 0
    with open(os.path.join(run, "summary.json")) as f:
        history = json.load(f)["history"]
    assert [r["epoch"] for r in history] == [2, 3, 4, 5]  # every 2nd epoch, and the last


def test_init_from_a_run_loads_its_weights_and_a_new_classifier(
    first_half, tmp_path, cache_dir, capsys
):
    source = helpers.read_params(first_half)  # the weights it evaluated last
    flags = _flags(tmp_path / "ft", cache_dir, "--classes=5-9", f"--init_from={first_half}")
    setup = cifar.build(parse_config(flags))
    from lpwd_optax.experiments import train_lib

    loaded = train_lib.flat_dict(setup.model.params)
    fresh = train_lib.flat_dict(
        cifar.build(parse_config(_flags(tmp_path / "x", cache_dir, "--classes=5-9"))).model.params
    )
    assert set(loaded) == set(source)
    for name, value in loaded.items():
        if name.startswith("head/fc/"):  # re-initialized: the same as a fresh run's
            np.testing.assert_array_equal(value, fresh[name])
        else:
            np.testing.assert_array_equal(value, source[name], err_msg=name)
    out = capsys.readouterr().out
    assert "--init_from: loaded the weights of" in out
    assert "the classifier (head/fc/bias, head/fc/kernel) is re-initialized" in out
    assert "classes 0-4, this run trains on digits classes 5-9" in out


def test_init_from_a_run_on_the_same_classes_keeps_its_classifier(first_half, tmp_path, cache_dir):
    flags = _flags(tmp_path / "ft", cache_dir, "--classes=0-4", f"--init_from={first_half}")
    loaded = cifar.build(parse_config(flags)).model.params
    from lpwd_optax.experiments import train_lib

    head = train_lib.flat_dict(loaded)["head/fc/kernel"]
    np.testing.assert_array_equal(head, helpers.read_params(first_half)["head/fc/kernel"])


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--train_examples=100000", "--train_examples=100000 needs 10000 examples of class 0"),
        ("--classes=4-2", "--classes: the range '4-2' is empty"),
        ("--classes=8-12", "digits has classes 0-9; no class 10"),
        ("--init_from={tmp}/nothing_here", "--init_from: no such file or directory"),
        ("--init_from={source}/checkpoints", "is neither a run directory of this program"),
        ('--model_overrides={{"dims": [8, 16], "depths": [1, 1], "kernel_size": 3}}', "not of"),
    ],
)
def test_errors_are_one_line_exit_2_and_leave_nothing(
    first_half, tmp_path, cache_dir, capsys, flag, message
):
    out = tmp_path / "run"
    flag = flag.format(tmp=tmp_path, source=first_half)
    extra = [flag] if "model_overrides" not in flag else [flag, f"--init_from={first_half}"]
    code = cifar.main(_flags(out, cache_dir, *extra))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(out)


# ---------------------------------------------------------------------------------------------
# The engine and the pilot's rule


def _finish(runs_dir, run, best10, epochs=None):
    os.makedirs(os.path.join(runs_dir, run.name), exist_ok=True)
    flag = [f for f in run.flags if f.startswith("--epochs=")]
    epochs = epochs if epochs is not None else int(flag[0].split("=")[1]) if flag else 1
    summary = dict(best10_mean=best10, best_top1=best10 + 1, epochs=epochs)
    with open(os.path.join(runs_dir, run.name, "summary.json"), "w") as f:
        json.dump(summary, f)


def test_a_run_is_finished_when_its_summary_covers_its_epochs(tmp_path):
    run = engine.Run("p", "a/b", ("--epochs=20",))
    assert not engine.is_finished(str(tmp_path), run)
    _finish(tmp_path, run, 50.0, epochs=10)
    assert not engine.is_finished(str(tmp_path), run)  # planned with more epochs: continue
    _finish(tmp_path, run, 50.0, epochs=20)
    assert engine.is_finished(str(tmp_path), run)
    needs = engine.Run("p", "c", ("--epochs=1",), needs=("a/b", "z"))
    assert engine.pending([needs], str(tmp_path)) == []  # "z" has not finished
    _finish(tmp_path, engine.Run("p", "z", ()), 1.0)
    assert engine.pending([needs], str(tmp_path)) == [needs]


def _gains(runs_dir, name, lam, diffs, part="pilot"):
    regime = regimes.REGIMES[name]
    for seed, diff in zip(regime.seeds, diffs):
        _finish(runs_dir, regimes.run(part, regime, "baseline", 0.0, seed, "", runs_dir), 50.0)
        _finish(runs_dir, regimes.run(part, regime, "wd", lam, seed, "", runs_dir), 50.0 + diff)


def test_the_rule_takes_the_largest_mean_gain_of_at_least_one_point(tmp_path):
    runs = str(tmp_path)
    _gains(runs, "r2", 0.05, [0.5, 0.7])
    _gains(runs, "r2", 0.5, [1.5, 0.9])  # mean 1.2
    _gains(runs, "r1", 5.0, [3.0])  # seed 1 missing: not complete, not chosen
    choice, table = regimes.choose(runs)
    assert choice == ("r2", 0.5)
    assert table[("r2", 0.5)]["mean"] == pytest.approx(1.2)
    assert not table[("r1", 5.0)]["complete"]
    _gains(runs, "r3", 0.05, [1.3])
    assert regimes.choose(runs)[0] == ("r3", 0.05)


def test_no_candidate_reaching_one_point_adds_sgd_momentum_on_r2(tmp_path):
    runs = str(tmp_path)
    dataset = "folder:/data"
    regimes_done = [("r2", 0.05), ("r2", 0.5), ("r1", 0.5), ("r1", 5.0), ("r3", 0.05)]
    _finish(runs, regimes.pretrain_run(dataset, runs), 80.0)
    for name, lam in regimes_done:
        _gains(runs, name, lam, [0.2, 0.1][: len(regimes.REGIMES[name].seeds)])
    assert regimes.choose(runs, include_sgdm=False)[0] is None
    plan = regimes.plan(dataset, runs)
    sgdm = [r for r in plan if r.part == "pilot_sgdm"]
    assert len(sgdm) == 6 and all("--optimizer=sgdm" in r.flags for r in sgdm)
    assert engine.pending(plan, runs) == sgdm


def test_r1_waits_for_a_pretraining_that_reached_its_target(tmp_path):
    runs = str(tmp_path)
    pretrain = regimes.pretrain_run("folder:/data", runs)
    assert not any(r.name.startswith("pilot/r1-wd") for r in regimes.plan("folder:/data", runs))
    _finish(runs, pretrain, 60.0)  # best 61% < 75%: ten more epochs, R1 not yet planned
    again = regimes.pretrain_run("folder:/data", runs)
    assert "--epochs=30" in again.flags and not engine.is_finished(runs, again)
    assert not any(r.name.startswith("pilot/r1-wd") for r in regimes.plan("folder:/data", runs))
    _finish(runs, again, 76.0)
    r1 = [r for r in regimes.plan("folder:/data", runs) if r.name.startswith("pilot/r1-")]
    assert len(r1) == 1 + 6 and all(
        f"--init_from={runs}/{regimes.PRETRAIN}" in r.flags for r in r1[1:]
    )


def _settle_pilot(runs, dataset, gains_by_candidate):
    _finish(runs, regimes.pretrain_run(dataset, runs), 80.0)
    for (name, lam), diffs in gains_by_candidate.items():
        _gains(runs, name, lam, diffs)


def test_the_pilot_table_marks_a_choice_only_once_every_pilot_run_has_finished(tmp_path):
    runs, dataset = str(tmp_path), "folder:/data"
    _settle_pilot(runs, dataset, {("r1", 5.0): [3.0, 2.2], ("r1", 0.5): [0.4, 0.3]})
    _gains(runs, "r2", 0.05, [1.1, -1.2])
    _gains(runs, "r2", 0.5, [-1.0, -1.9])
    results = report.Results(regimes.PROTOCOL, dataset, runs, [], {})
    rows = {(r["regime"], r["weight_decay"]): r for r in regimes.pilot_rows(results)}
    # R1 at lambda 5 leads (+2.6), but R3 has not run: the rule has not chosen yet.
    assert rows[("r1", 5.0)]["mean"] == pytest.approx(2.6) and rows[("r1", 5.0)]["complete"]
    assert not any(r["chosen"] for r in rows.values()) and regimes.decision(runs) is None
    _gains(runs, "r3", 0.05, [0.5])
    rows = {(r["regime"], r["weight_decay"]): r for r in regimes.pilot_rows(results)}
    assert [k for k, r in rows.items() if r["chosen"]] == [("r1", 5.0)]


def test_the_protocol_follows_the_pilots_choice_and_reuses_its_runs(tmp_path):
    runs, dataset = str(tmp_path), "folder:/data"
    candidates = {("r2", 0.05): [0.2, 0.4], ("r2", 0.5): [1.4, 1.8], ("r1", 0.5): [0.1, 0.0]}
    candidates |= {("r1", 5.0): [0.5, 0.3], ("r3", 0.05): [0.2]}
    assert regimes.protocol(dataset, runs) == []
    _settle_pilot(runs, dataset, candidates)
    assert regimes.decision(runs) == ("r2", 0.5, False)
    plan = regimes.plan(dataset, runs)
    main = [r for r in plan if r.part == "main"]
    assert len(main) == 6 * 5 - 4  # baseline and WD seeds 0-1 are the pilot's runs
    cells = {(r.facts["method"], r.facts["weight_decay"], r.facts["seed"]) for r in main}
    assert ("lpwd", 0.5, 5) in cells and ("wd", 0.5, 2) in cells and ("wd", 0.5, 1) not in cells
    assert ("baseline", 0.0, 3) in cells and "decay_to_init" not in {c[0] for c in cells}
    robust = [r for r in plan if r.part == "robust"]
    assert {(r.facts["method"], r.facts["weight_decay"]) for r in robust} == {
        ("wd", 0.125),
        ("lpwd", 0.125),
        ("wd", 2.0),
        ("lpwd", 2.0),
    }
    assert len(robust) == 12
    assert engine.pending(plan, runs)[0].part == "main"


def test_r1_adds_decay_to_init_and_no_winner_runs_the_best_with_a_caveat(tmp_path):
    runs, dataset = str(tmp_path), "folder:/data"
    candidates = {("r2", 0.05): [0.2, 0.4], ("r2", 0.5): [0.4, 0.3], ("r1", 0.5): [0.1, 0.0]}
    candidates |= {("r1", 5.0): [0.9, 0.8], ("r3", 0.05): [0.2]}
    _settle_pilot(runs, dataset, candidates)
    assert regimes.decision(runs) is None  # SGD-momentum on R2 first
    _gains(runs, "r2_sgdm", 0.0017, [0.1, 0.2], part="pilot_sgdm")
    _gains(runs, "r2_sgdm", 0.017, [0.3, 0.2], part="pilot_sgdm")
    assert regimes.decision(runs) == ("r1", 5.0, True)
    main = [r for r in regimes.plan(dataset, runs) if r.part == "main"]
    assert sum(r.facts["method"] == "decay_to_init" for r in main) == 6
    assert all(f"--init_from={runs}/{regimes.PRETRAIN}" in r.flags for r in main)


def _machines_csv(directory, cpu_of_run):
    with open(os.path.join(directory, engine.MACHINES), "w") as f:
        f.write("run,cpu\n" + "".join(f"{run},{cpu}\n" for run, cpu in cpu_of_run.items()))


def test_same_machine_leaves_out_the_seeds_whose_runs_trained_on_different_cpus(tmp_path):
    runs, dataset = str(tmp_path), "folder:/data"
    _settle_pilot(runs, dataset, {("r1", 5.0): [2.0, 2.0], ("r1", 0.5): [0.4, 0.3]})
    _gains(runs, "r2", 0.05, [0.1, -1.2])
    _gains(runs, "r2", 0.5, [-1.0, -1.9])
    _gains(runs, "r3", 0.05, [0.5])
    assert regimes.decision(runs) == ("r1", 5.0, False)
    # WD at 60 + seed; LPWD one point above it where both ran on "b", five below where not.
    lpwd_minus_wd = {0: -5.0, 1: -5.0, 2: 1.0, 3: 1.2, 4: 0.8, 5: 1.0}
    cells, cpu = {}, {}
    for r in regimes.plan(dataset, runs):
        method, seed = r.facts.get("method"), r.facts.get("seed")
        if method not in ("wd", "lpwd") or r.facts["weight_decay"] != 5.0:
            continue
        value = 60.0 + seed + (lpwd_minus_wd[seed] if method == "lpwd" else 0.0)
        record = dict(best10_mean=value, final_top1=value, final_train_loss=0.1)
        cells.setdefault(regimes.cell(regimes.REGIMES["r1"], method, 5.0), {})[seed] = record
        cpu[r.name] = "a" if method == "wd" and seed < 2 else "b"  # the pilot's WD runs on "a"
    results = report.Results(regimes.PROTOCOL, dataset, runs, [], cells)
    assert regimes.same_machine(results) == []  # no machines.csv: no check to make
    planned = report.compare(lambda res: regimes.comparisons(res.runs_dir), True)(results)
    assert {r["comparison"]: r["n"] for r in planned}["LPWD - WD"] == 6
    _machines_csv(runs, cpu)
    [row] = regimes.same_machine(results)
    assert row["comparison"] == "LPWD - WD" and row["n"] == 4
    assert row["best10_mean"] == pytest.approx(1.0) and row["outcome"] == "holds"
    del cpu["main/r1-lpwd-lr0.0001-wd5-s5"]  # a run of unknown machine drops its seed
    _machines_csv(runs, cpu)
    assert regimes.same_machine(results)[0]["n"] == 3
    lpwd = cells[regimes.cell(regimes.REGIMES["r1"], "lpwd", 5.0)]
    lpwd[5]["machine"] = "b"  # a record's own machine needs no row
    assert regimes.same_machine(results)[0]["n"] == 4
    lpwd[4]["machine"] = "c"  # and comes before the row
    assert regimes.same_machine(results)[0]["n"] == 3


def test_a_record_has_the_machine_of_its_summary_when_the_summary_has_one(tmp_path):
    runs = str(tmp_path)
    pretrain = regimes.pretrain_run("folder:/data", runs)
    summary = dict(best10_mean=80.0, best_top1=81.0, epochs=20, steps=3900, history=[])
    os.makedirs(os.path.join(runs, pretrain.name))
    for machine in (None, "Intel(R) Xeon(R) Processor, 2 cores"):
        with open(os.path.join(runs, pretrain.name, "summary.json"), "w") as f:
            json.dump(summary if machine is None else {**summary, "machine": machine}, f)
        [record] = engine.records(regimes.PROTOCOL, runs)
        assert record.get("machine", None) == machine and record["best10_mean"] == 80.0


def test_restore_brings_back_the_machines_beside_the_record(tmp_path):
    committed, runs = tmp_path / "committed", tmp_path / "runs"
    committed.mkdir()
    (committed / "runs.jsonl").write_text("")
    _machines_csv(committed, {"pilot/r1-pretrain": "a"})
    assert engine.restore(regimes.PROTOCOL, str(runs), str(committed / "runs.jsonl")) == 0
    assert engine.machines(str(runs)) == {"pilot/r1-pretrain": "a"}
    _machines_csv(committed, {"pilot/r1-pretrain": "b"})  # the runs directory's own is kept
    engine.restore(regimes.PROTOCOL, str(runs), str(committed / "runs.jsonl"))
    assert engine.machines(str(runs)) == {"pilot/r1-pretrain": "a"}


# ---------------------------------------------------------------------------------------------
# The methods fine-tuning adds: decay_to_init and --layer_decay


def _mlp():
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(nn.relu(nn.Dense(4)(nn.relu(nn.Dense(5)(x)))))

    x = jnp.ones((2, 6))
    model = MLP()
    params = model.init(jax.random.key(0), x)["params"]
    return params, lambda p, x: model.apply({"params": p}, x), x


def _one_update(tx, params, seed=1):
    import jax

    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(seed), p.shape), params)
    return tx.update(grads, tx.init(params), params)[0]


def test_decay_to_init_method_and_layer_decay_scale_the_optimizer_stage():
    import jax
    import optax

    import lpwd_optax as lo
    from lpwd_optax.experiments import methods

    params, apply, x = _mlp()
    layers = lo.layer_structure(params, apply, x)
    lr, lam = 1e-2, 0.5

    def build(name, **kw):
        return methods.build_method(
            name,
            optimizer="adam",
            learning_rate=lr,
            weight_decay=lam,
            params=params,
            layers=layers,
            **kw,
        )

    # decay_to_init: the optimizer's update, then lo.decay_to_init anchored at the start.
    moved = jax.tree.map(lambda p: p + 1.0, params)
    method = build("decay_to_init")
    state = method.tx.init(params)
    grads = jax.tree.map(jax.numpy.ones_like, params)
    got = method.tx.update(grads, state, moved)[0]
    adam = optax.adam(lr).update(grads, optax.adam(lr).init(params), moved)[0]
    mask = lo.default_decay_mask(params)
    want = jax.tree.map(lambda u, m: u - lr * lam * 1.0 if m else u, adam, mask)
    chex_close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    jax.tree.map(chex_close, got, want)

    # --layer_decay 0.5: each layer's Adam update scaled by 0.5 ** (n - depth), then WD.
    got = _one_update(build("wd", layer_decay=0.5).tx, params)
    n = max(int(np.max(d)) for d in jax.tree.leaves(layers.depths))
    scaled = jax.tree.map(
        lambda u, d: u * 0.5 ** (n - np.asarray(d)),
        _one_update(optax.adam(lr), params),
        layers.depths,
    )
    want = jax.tree.map(lambda u, p, m: u - lr * lam * p if m else u, scaled, params, mask)
    jax.tree.map(chex_close, got, want)
    assert "layer-wise lr decay 0.5" in build("wd", layer_decay=0.5).description
