r"""Train a ConvNeXt or Swin on CIFAR with one of the LPWD paper's regularizers.

One run of the LPWD paper's CIFAR experiments: constant learning rate, Adam or SGD-momentum, a
regularizer from `lpwd_optax`, evaluation every epoch, and at the end the line
`mean +- std of the best 10 test top-1: XX.XX +- Y.YY` plus `summary.json`.

Offline quick start (scikit-learn's digits, a small ConvNeXt, a few minutes on a laptop CPU):

    lpwd-cifar --preset=quickstart

The paper's setting (ConvNeXt-T, CIFAR-10 from tensorflow-datasets, Adam, LPWD):

    lpwd-cifar --dataset=cifar10 --method=lpwd --output_dir=runs/c10_lpwd

The program is one flat loop over steps (`train_and_evaluate`): a step, then the periodic
actions (finite check, progress, metric lines every --log_every_steps, and at the end of each
epoch evaluation and a checkpoint). Everything it reports goes through one writer: JSON lines,
TensorBoard events and the console.

A run reads from its flags to its checkpoint in four files: config.py (every flag, `Config`),
this one (`build`: data, model, method; then the loop), methods.py (`--method` -> one builder of
`methods.REGISTRY`) and train_lib.py (the train state, the step, the devices, `Checkpointer`).
The data (`data/`) and the metric writers (`writers.py`) are called by name.

Outputs in --output_dir: config.json, metrics.jsonl (per epoch: train loss, test top-1 (%),
mean R_op, per-layer norms and effective steps, the effective learning rate eta / ||theta||^2
of the scale-invariant layers and, with --jacobian_probes, the input-output Jacobian norm; per
logging interval: train/loss, train/top1 (%)), tensorboard/, checkpoints/ (orbax, one per
epoch), final_params.npz (the evaluated weights; for PWD/LPWD theta_t, not the stored phi_t),
summary.json, layers.txt (which layers are scale-invariant, detected at the start from the
forward pass, and every param leaf's role, depth and decay as `lo.layer_structure` reads them
from the one trace that LPWD's depths and the decay mask come from) and, for LPWD, method.txt
(its per-layer rates).
R_op is reported for the decoupled methods (wd, rwd, pwd, lpwd, lwd, lpwd_reversed,
lpwd_shuffled, wd_matched, wrs, wrs_ic, wrs+adamp); for baseline, l2, adadecay and adamp it is
undefined and written as null. config.json also holds `method_details`, what the method derived
from the model: wd_matched's rate, lpwd_shuffled's permutation, the kernels WRS rescales.

Rerunning a finished run's command reports its result; a run that was stopped continues with
--resume. A configuration error (bad flag value, missing data, a batch that does not split over
the devices) is reported in one line with exit status 2 before anything is written.

Multi-host: start one process per host with --coordinator_address=HOST:PORT
--num_processes=N --process_id=I; each process reads its own slice of every global batch.
"""

from __future__ import annotations

if __name__ == "__main__":  # started as a script or as experiments.cifar: see _entry.py
    from lpwd_optax.experiments import _entry

    _entry.run(__file__)

import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import lpwd_optax as lo
from lpwd_optax import models
from lpwd_optax._common import leaves_with_paths
from lpwd_optax.diagnostics import SCALE_INVARIANCE_TOL, module_key
from lpwd_optax.experiments import data, methods, train_lib, writers
from lpwd_optax.experiments.config import Config, ConfigError, parse_config, to_dict

SUMMARY_FORMAT = "mean +- std of the best 10 test top-1: {mean:.2f} +- {std:.2f}"
# Flags that change how a run is executed or reported, not what it computes.
EXECUTION_FLAGS = (
    "resume",
    "progress",
    "stop_after_steps",
    "compilation_cache_dir",
    "log_every_steps",
    "keep_checkpoints",
    "coordinator_address",
    "num_processes",
    "process_id",
    "output_dir",
    "jacobian_probes",
    "jacobian_examples",
)
# Training images on which the scale-invariant layers are detected (lo.scale_sensitivity).
SCALE_PROBE_EXAMPLES = 16


class NonFiniteError(FloatingPointError):
    """The loss or the gradients stopped being finite."""


class Preempted(RuntimeError):
    """--stop_after_steps was reached (a simulated kill, for testing --resume)."""


def best_k_summary(top1: Sequence[float], k: int = 10) -> tuple[float, float]:
    """Mean and (population) std of the k best per-epoch test accuracies."""
    best = sorted(top1, reverse=True)[:k]
    return float(np.mean(best)), float(np.std(best))


def select_devices(num_devices: int | None) -> list[jax.Device]:
    """All devices, or the first `num_devices` of every process."""
    if num_devices is None:
        return jax.devices()
    return [
        d
        for p in range(jax.process_count())
        for d in sorted(jax.local_devices(process_index=p), key=lambda d: d.id)[:num_devices]
    ]


class Setup(NamedTuple):
    """Everything a run needs, built and checked before anything is written."""

    train_ds: data.ArrayDataset
    test_ds: data.ArrayDataset
    model: models.FunctionalModel
    method: methods.Method
    parallel: train_lib.Parallel
    devices: list[jax.Device]
    steps_per_epoch: int
    eval_batch_size: int
    # lo.scale_sensitivity of each module with a traced kernel (an array over a stacked one's
    # slices)
    scale_sensitivity: dict[str, Any]
    layers: lo.LayerStructure  # the one trace of the forward pass the method was built from


def build(config: Config) -> Setup:
    """Loads the data, model and method and checks the batch geometry; ConfigError if wrong."""
    try:
        train_ds, test_ds = load_data(config)
        network = models.create_model(
            config.model,
            num_classes=train_ds.num_classes,
            seed=config.seed,
            drop_path_rate=config.drop_path_rate,
            **config.overrides,
        )
        if config.init_from:  # before the method: PWD/LPWD pre-decay from the loaded weights
            for note in warm_start(network, config):
                print(f"--init_from: {note}", flush=True)
        model = models.functional_model(network)
        example = jnp.zeros((2, *train_ds.images.shape[1:]), jnp.float32)
        # One trace of the forward pass: LPWD's depths, the decay mask and the kernels.
        layers = lo.layer_structure(model.params, model.apply, example)
        # The scale-invariant kernels, measured on real images (layers.txt; WRS rescales them).
        sensitivity = lo.scale_sensitivity(
            model.apply, model.params, first_images(train_ds, SCALE_PROBE_EXAMPLES), layers=layers
        )
        invariant = jax.tree.map(_invariant, sensitivity)
        method = methods.build_method(
            config.method,
            optimizer=config.optimizer,
            learning_rate=config.learning_rate,
            weight_decay=config.weight_decay,
            params=model.params,
            layers=layers,
            scale_invariant=invariant if config.method in methods.RESCALING_METHODS else None,
            lpwd_max_scale=config.lpwd_max_scale,
            lpwd_permutation_seed=config.lpwd_permutation_seed,
            adadecay_alpha=config.adadecay_alpha,
            wrs_every=config.wrs_every,
            wrs_mode=config.wrs_mode,
            cpr_warm_start=config.cpr_warm_start,
            layer_decay=config.layer_decay,
        )
        # The optimizer checks its rates against the params (e.g. d_t < 1 on decayed leaves).
        jax.eval_shape(lambda p: train_lib.create_train_state(p, method), model.params)
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError) as e:
        raise ConfigError(str(e)) from e
    kernels = {  # a module's kernel and bias share its sensitivity
        module_key(path): s
        for (path, s), x in zip(leaves_with_paths(sensitivity), layers.leaves)
        if x.role == "kernel"
    }
    devices = select_devices(config.num_devices)
    parallel = train_lib.make_parallel(
        config.parallel,
        model.apply,
        method,
        config.seed,
        devices=devices if config.num_devices else None,
    )
    shards = jax.process_count() * parallel.local_device_count
    eval_batch_size = config.eval_batch_size or config.batch_size
    for name, size in (("batch_size", config.batch_size), ("eval_batch_size", eval_batch_size)):
        if size % shards:
            fits = [n for n in range(1, parallel.local_device_count + 1) if size % n == 0]
            raise ConfigError(
                f"--{name}={size} is not divisible by {shards} devices ({jax.process_count()} "
                f"processes x {parallel.local_device_count}); --num_devices={max(fits)} "
                f"would work"
            )
    steps_per_epoch = data.num_batches(train_ds, config.batch_size)
    if steps_per_epoch == 0:
        raise ConfigError(
            f"the training set ({len(train_ds.labels)} examples) is smaller than one batch "
            f"({config.batch_size}); lower --batch_size"
        )
    if config.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.steps_per_epoch)
    return Setup(
        train_ds,
        test_ds,
        model,
        method,
        parallel,
        devices,
        steps_per_epoch,
        eval_batch_size,
        kernels,
        layers,
    )


def load_data(config: Config) -> tuple[data.ArrayDataset, data.ArrayDataset]:
    """The training and test splits, restricted to --classes and --train_examples."""
    train_ds = data.load_dataset(config.dataset, data_dir=config.data_dir, split="train")
    test_ds = data.load_dataset(config.dataset, data_dir=config.data_dir, split="test")
    if config.classes is not None:
        classes = data.parse_classes(config.classes)
        train_ds, test_ds = (
            data.select_classes(train_ds, classes),
            data.select_classes(test_ds, classes),
        )
    if config.train_examples is not None:
        train_ds = data.balanced_subset(train_ds, config.train_examples, config.subset_seed)
    return train_ds, test_ds


def warm_start(network: Any, config: Config) -> list[str]:
    """Loads --init_from into `network` in place; returns what was adapted, a line each.

    A file is a timm checkpoint (`models.init_from_timm`). A directory is a run of this program
    (`train_lib.read_run_weights`): it must be of the same --model and --model_overrides;
    its classifier is kept only when it was trained on the same classes of the same dataset.
    """
    path = os.path.expanduser(config.init_from)
    if not os.path.exists(path):
        raise ConfigError(f"--init_from: no such file or directory: {path}")
    if not os.path.isdir(path):
        return models.init_from_timm(network, path)
    weights, source, where = train_lib.read_run_weights(path)
    theirs = (source.get("model"), source.get("model_overrides", ""))
    if theirs != (config.model, config.model_overrides):
        raise ConfigError(
            f"--init_from: {where} is a checkpoint of {theirs[0]} {theirs[1] or ''}".rstrip()
            + f", not of --model={config.model} {config.model_overrides}".rstrip()
        )
    params = nnx.state(network, nnx.Param)
    ours = train_lib.flat_dict(params)
    classifier = {
        "/".join(entry.path)
        for key, entry in models.timm_layout(network).items()
        if key.startswith(network.TIMM_CLASSIFIER + ".")
    }
    same_classes = (source.get("dataset"), source.get("classes")) == (
        config.dataset,
        config.classes,
    ) and all(weights.get(n, np.zeros(0)).shape == ours[n].shape for n in classifier)
    loaded = {}
    for name, leaf in ours.items():
        if name in classifier and not same_classes:
            loaded[name] = leaf
        elif name in weights and weights[name].shape == np.shape(leaf):
            loaded[name] = weights[name]
        else:
            got = weights[name].shape if name in weights else "no such weight"
            raise ConfigError(
                f"--init_from: {where} does not fit {config.model}: {name} is {got}, the model's "
                f"is {tuple(np.shape(leaf))}"
            )
    nnx.update(network, train_lib.from_flat_dict(params, loaded))
    notes = [f"loaded the weights of {where}"]
    if not same_classes:
        notes.append(
            f"the classifier ({', '.join(sorted(classifier))}) is re-initialized: the checkpoint "
            f"was trained on {source.get('dataset')} classes {source.get('classes') or 'all'}, "
            f"this run trains on {config.dataset} classes {config.classes or 'all'}"
        )
    return notes


def first_images(ds: data.ArrayDataset, n: int) -> np.ndarray:
    """The first `n` images of `ds` in stored order, normalized as the model sees them."""
    batch = data.batches(ds, min(n, len(ds)), seed=0, epoch=0, train=False, prefetch=0)
    return next(iter(batch))["image"]


def scale_invariant_modules(setup: Setup) -> list[str]:
    """The modules whose kernels `lo.scale_invariant_mask` marks."""
    return [m for m, s in setup.scale_sensitivity.items() if _invariant(s)]


def _invariant(sensitivity: Any) -> bool:
    """Scale-invariant: below the tolerance (in every slice, for a stacked kernel)."""
    return bool(np.all(np.asarray(sensitivity) < SCALE_INVARIANCE_TOL))


def finished_summary(config: Config) -> dict[str, Any] | None:
    """The summary of a finished run of this configuration in output_dir, if there is one."""
    path = os.path.join(config.output_dir, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        summary = json.load(f)
    ours, theirs = to_dict(config), summary.get("config", {})
    defaults = to_dict(Config())  # a flag added after the run was made: it ran the default
    differ = [
        k for k in ours if k not in EXECUTION_FLAGS and ours[k] != theirs.get(k, defaults.get(k))
    ]
    if config.resume and differ == ["epochs"] and config.epochs > summary["epochs"]:
        return None  # a finished run continued for more epochs
    if differ:
        raise ConfigError(
            f"{config.output_dir} holds a finished run with other settings ({', '.join(differ)}"
            "); choose another --output_dir"
        )
    return summary


def train_and_evaluate(config: Config) -> dict[str, Any]:
    """Runs (or resumes, or reports the finished) run of `config` and returns its summary."""
    start_time = time.time()
    is_main = jax.process_index() == 0
    done = finished_summary(config)
    if done is not None:
        if is_main:
            print(f"{config.output_dir} holds this finished run (nothing to do):")
            print(done["summary_line"], flush=True)
        return done
    setup = build(config)
    parallel, out = setup.parallel, config.output_dir
    steps_per_epoch, total_steps = setup.steps_per_epoch, setup.steps_per_epoch * config.epochs

    with train_lib.OutputLock(out, enabled=is_main):
        ckpt = train_lib.Checkpointer(
            os.path.join(out, "checkpoints"), max_to_keep=config.keep_checkpoints
        )
        start_step, host_state, history, earlier_s = _initial_state(config, setup, ckpt)
        start_time -= earlier_s  # the wall time of the segments before a resume counts too
        state = parallel.put_state(host_state)
        progress = writers.Progress(
            total_steps,
            start_step,
            steps_per_epoch,
            enabled=is_main and config.progress and sys.stderr.isatty(),
        )
        writer = _writer(config, start_step, progress) if is_main else writers.MultiWriter([])
        if is_main:
            _describe(config, setup, start_step, progress.print)
        invariant = set(scale_invariant_modules(setup))
        jacobian = _jacobian_norm(config, setup) if is_main and config.jacobian_probes else None

        batches, sums, previous, period_start = None, None, None, time.time()
        try:
            for step in range(start_step, total_steps):
                epoch = step // steps_per_epoch
                if batches is None:
                    batches = _train_batches(config, setup.train_ds, epoch)
                if sums is None:
                    period_start = time.time()
                state, metrics = parallel.train_step(state, parallel.put_batch(next(batches)))
                running = {k: metrics[k] for k in ("loss", "accuracy", "rop")}
                sums = running if sums is None else jax.tree.map(jnp.add, sums, running)
                if previous is not None:  # checked while this step runs: one stays in flight
                    progress.train_step(step, _check_finite(parallel, previous, step, ckpt))
                previous = metrics

                if (step + 1) % config.log_every_steps == 0:
                    _write_step(writer, step + 1, parallel.to_host(running), epoch)
                if config.stop_after_steps and step + 1 - start_step >= config.stop_after_steps:
                    raise Preempted(
                        f"stopped after {step + 1 - start_step} steps (--stop_after_steps)"
                    )
                if (step + 1) % steps_per_epoch:
                    continue

                # End of an epoch; after every --eval_every epochs and the last: evaluate,
                # write the record (the means over the epochs since the previous one), checkpoint.
                progress.train_step(step + 1, _check_finite(parallel, previous, step + 1, ckpt))
                _close(batches)
                batches, previous = None, None
                if (epoch + 1) % config.eval_every and epoch + 1 < config.epochs:
                    continue
                evaluated = parallel.eval_params(state)
                record = _evaluation_record(
                    config, setup, evaluated, sums, history, epoch, period_start, progress
                )
                sums = None
                history.append(record)
                _write_evaluation(
                    writer,
                    step + 1,
                    record,
                    parallel.to_host(metrics["layers"]),
                    invariant,
                    config.learning_rate,
                    jacobian(parallel.to_host(evaluated)) if jacobian else {},
                )
                _save(ckpt, parallel, state, evaluated, history, step + 1, setup.method, start_time)
        finally:
            _close(batches)
            progress.close()
            ckpt.close()
            writer.close()

        final = parallel.to_host(parallel.eval_params(state))  # every process: a collective
        summary = _summary(config, setup, final, history, total_steps, start_time)
        if is_main:
            _write_final(out, final, summary)
    return summary


def _write_step(writer, step: int, host: dict[str, Any], epoch: int) -> None:
    """The training scalars of one step (every --log_every_steps)."""
    writer.write_scalars(
        step,
        {
            "train/loss": host["loss"],
            "train/top1": 100.0 * host["accuracy"],
            "train/rop": host["rop"],
            "train/epoch": epoch + 1,
        },
    )


def _evaluation_record(
    config, setup, evaluated, sums, history, epoch: int, period_start: float, progress
) -> dict[str, Any]:
    """The history record of an evaluation after `epoch`: the test metrics of `evaluated`, and
    the training means over the steps since the previous record (`sums`)."""
    epochs = epoch + 1 - (history[-1]["epoch"] if history else 0)
    period_steps = epochs * setup.steps_per_epoch
    test = _evaluate(config, setup, evaluated, progress)
    host_sums = setup.parallel.to_host(sums)
    return dict(
        epoch=epoch + 1,
        train_loss=float(host_sums["loss"]) / period_steps,
        train_top1=100.0 * float(host_sums["accuracy"]) / period_steps,
        test_top1=test["top1"],
        test_loss=test["loss"],
        rop=float(host_sums["rop"]) / period_steps if setup.method.has_rop else None,
        epoch_time_s=(time.time() - period_start) / epochs,
    )


def _write_evaluation(
    writer, step: int, record, layers, invariant: set[str], eta: float, jacobian
) -> None:
    """Writes an evaluation's record with the last step's per-layer statistics
    (`lo.layer_statistics`), the effective learning rates and the Jacobian estimate, if any."""
    per_layer = {
        f"layers/{path}/{stat}": float(v)
        for path, stats in layers.items()
        for stat, v in stats.items()
    }
    writer.write_scalars(
        step, {**record, **per_layer, **_effective_lrs(layers, invariant, eta), **jacobian}
    )
    writer.flush()


def _save(ckpt, parallel, state, evaluated, history, step: int, method, start_time) -> None:
    """Checkpoints the state after `step` with its history and the wall time so far; a
    pre-decayed method also exports the evaluated (pre-decayed) weights beside it."""
    saved = parallel.checkpointable(state)
    meta = dict(
        epoch=history[-1]["epoch"],
        step=step,
        history=history,
        fingerprint=train_lib.fingerprint(saved.params),
        wall_time_s=time.time() - start_time,
    )
    exported = None
    if method.predecayed:
        exported = train_lib.nested_dict(parallel.checkpointable(evaluated))
    ckpt.save(step, train_lib.nested_dict(saved), meta, exported)


def _write_final(out: str, final, summary: dict[str, Any]) -> None:
    """The finished run's files: the evaluated weights and summary.json (the mark of a finished
    run), then the summary line."""
    np.savez(
        os.path.join(out, "final_params.npz"),
        **{k: np.asarray(v) for k, v in train_lib.flat_dict(final).items()},
    )
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(summary["summary_line"], flush=True)


def _initial_state(config: Config, setup: Setup, ckpt: train_lib.Checkpointer):
    """(step, host state, metric history, wall time so far in seconds): restored with
    --resume, else fresh."""
    host_state = train_lib.create_train_state(setup.model.params, setup.method)
    restored = _restore(ckpt, setup.parallel, host_state) if config.resume else None
    if restored is None and ckpt.all_steps():
        raise ConfigError(
            f"{config.output_dir} already holds checkpoints {ckpt.all_steps()}: pass --resume "
            "to continue, or choose another --output_dir"
        )
    return restored or (0, host_state, [], 0.0)


def _writer(config: Config, start_step: int, progress: writers.Progress) -> writers.MultiWriter:
    """Every line of output: metrics.jsonl, TensorBoard and the console. On resume both files
    drop what came after the restored step (a fallback to an older checkpoint rewrites it)."""
    out = config.output_dir
    return writers.MultiWriter(
        [
            writers.JsonlWriter(os.path.join(out, "metrics.jsonl"), keep_up_to_step=start_step),
            writers.TensorBoardWriter(os.path.join(out, "tensorboard"), purge_step=start_step + 1),
            writers.ConsoleWriter(config.epochs, progress.print, step_lines=progress.bar.disable),
        ]
    )


def _train_batches(config: Config, train_ds: data.ArrayDataset, epoch: int):
    return data.batches(
        train_ds,
        config.batch_size,
        seed=config.seed,
        epoch=epoch,
        train=True,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def _evaluate(config: Config, setup: Setup, params: Any, progress: writers.Progress):
    batches = data.batches(
        setup.test_ds,
        setup.eval_batch_size,
        seed=config.seed,
        epoch=0,
        train=False,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        drop_remainder=False,
    )
    total = -(-len(setup.test_ds.labels) // setup.eval_batch_size)
    if config.eval_steps:
        batches = (b for _, b in zip(range(config.eval_steps), batches))
        total = min(total, config.eval_steps)
    local_batch = setup.eval_batch_size // jax.process_count()
    return train_lib.evaluate(
        setup.parallel, params, progress.evaluation(batches, total), local_batch
    )


def _describe(config: Config, setup: Setup, start_step: int, print_fn) -> None:
    """Two lines on the terminal; the method's full description (LPWD's depth table) goes to
    the run's directory and the debug log."""
    description = setup.method.description
    print_fn(f"method: {description.splitlines()[0]}")
    if "\n" in description:
        path = os.path.join(config.output_dir, "method.txt")
        with open(path, "w") as f:
            f.write(description + "\n")
        logging.debug("%s", description)
        print_fn(f"  (per-layer rates: {path})")
    path = os.path.join(config.output_dir, "layers.txt")
    with open(path, "w") as f:
        f.write(_scale_invariance_table(setup))
    print_fn(
        f"scale-invariant layers: {len(scale_invariant_modules(setup))} of "
        f"{len(setup.scale_sensitivity)} with a kernel; their effective learning rates are "
        f"logged (table: {path})"
    )
    print_fn(
        f"model {config.model} ({_count(setup.model.params):,} params), {config.dataset} "
        f"({len(setup.train_ds.labels)} train / {len(setup.test_ds.labels)} test), "
        f"{len(setup.devices)} devices x {jax.process_count()} processes, "
        f"{setup.steps_per_epoch} steps/epoch, {config.parallel}"
        + (f", resumed at step {start_step}" if start_step else "")
    )
    with open(os.path.join(config.output_dir, "config.json"), "w") as f:
        json.dump(_run_config(config, setup), f, indent=2)


def _run_config(config: Config, setup: Setup) -> dict[str, Any]:
    """The flags' values, plus what the method derived from the params (`method_details`:
    e.g. wd_matched's rate, lpwd_shuffled's permutation, the kernels WRS rescales)."""
    return {**to_dict(config), "method_details": setup.method.details}


def _scale_invariance_table(setup: Setup) -> str:
    width = max(len(m) for m in setup.scale_sensitivity) + 2
    lines = [
        "A layer is scale-invariant when scaling its kernel and bias leaves the logits unchanged:",
        f"lo.scale_sensitivity below {SCALE_INVARIANCE_TOL:g}, measured on the first "
        f"{SCALE_PROBE_EXAMPLES} training images with the initial weights. The effective",
        "learning rate eta / ||theta||^2 of these layers is logged as layers/<layer>/effective_lr.",
        "A stacked (scanned) kernel shows its largest sensitivity over the slices.",
        "",
        f"{'layer':<{width}}sensitivity  scale-invariant",
    ]
    for module, s in setup.scale_sensitivity.items():
        invariant = "yes" if _invariant(s) else "no"
        lines.append(f"{module:<{width}}{float(np.max(s)):11.2e}  {invariant}")
    lines += [
        "",
        "Every param leaf as lo.layer_structure reads it from one trace of the forward pass",
        "(LPWD's depths and the default decay mask come from it):",
        "",
        setup.layers.table(),
    ]
    return "\n".join(lines) + "\n"


def _effective_lrs(layers: dict[str, Any], invariant: set[str], eta: float) -> dict[str, float]:
    """Zhang et al.'s `eta / ||theta||^2` of the scale-invariant layers, from the weight norms
    `lo.layer_statistics` reported (0 for an all-zero layer, as the library's `effective_lr`)."""
    out = {}
    for path in sorted(invariant):
        w2 = float(layers[path]["weight_norm"]) ** 2
        out[f"layers/{path}/effective_lr"] = eta / w2 if w2 > 0 else 0.0
    return out


def _jacobian_norm(config: Config, setup: Setup):
    """`host params -> {"jacobian/norm_sq", "jacobian/norm_sq_stderr"}`: `lo.jacobian_norm` of
    the logits w.r.t. the images, on the first --jacobian_examples test images and with the
    same probes every epoch, so that its changes from epoch to epoch are not probe noise."""
    images = jnp.asarray(first_images(setup.test_ds, config.jacobian_examples))
    key = jax.random.key(config.seed)
    estimate = jax.jit(
        lambda params, images: lo.jacobian_norm(
            setup.model.apply, params, images, key, num_probes=config.jacobian_probes
        )
    )

    def measure(params: Any) -> dict[str, float]:
        est = estimate(params, images)
        return {"jacobian/norm_sq": float(est.mean), "jacobian/norm_sq_stderr": float(est.stderr)}

    return measure


def _summary(config, setup, final, history, total_steps, start_time) -> dict[str, Any]:
    """The run's summary; `final` are the evaluated weights on the host."""
    top1 = [r["test_top1"] for r in history]
    mean, std = best_k_summary(top1)
    rops = [r["rop"] for r in history if r.get("rop") is not None]
    return dict(
        summary_line=SUMMARY_FORMAT.format(mean=mean, std=std),
        best10_mean=mean,
        best10_std=std,
        best_top1=max(top1),
        final_top1=top1[-1],
        final_train_loss=history[-1]["train_loss"],
        mean_rop=float(np.mean(rops)) if rops else None,
        params_fingerprint=train_lib.fingerprint(final),
        epochs=history[-1]["epoch"],
        evaluations=len(history),
        steps=total_steps,
        method_description=setup.method.description.splitlines()[0],
        num_params=_count(setup.model.params),
        devices=len(setup.devices),
        machine=machine(setup.devices),
        processes=jax.process_count(),
        wall_time_s=time.time() - start_time,
        config=to_dict(config),
        method_details=setup.method.details,
        history=history,
    )


def machine(devices: Sequence[jax.Device]) -> str:
    """Where a run trained, e.g. "Intel(R) Xeon(R) Processor, 2 cores" or "NVIDIA H100 80GB
    HBM3 (gpu)": a run repeats bit for bit only on the same kind of chip, whose XLA code differs
    from another's."""
    first = devices[0]
    if first.platform != "cpu":
        return f"{first.device_kind} ({first.platform})"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def _restore(
    ckpt: train_lib.Checkpointer, parallel: train_lib.Parallel, host_state: Any
) -> tuple[int, Any, list[dict[str, Any]], float] | None:
    """(step, state, metric history, wall time so far) from the newest good checkpoint, or
    None. A checkpoint written before the wall time was saved counts as 0 s."""

    def verify(state_dict, meta):
        got, want = train_lib.fingerprint(state_dict["params"]), meta.get("fingerprint")
        if want is not None and not math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-6):
            return f"params fingerprint {got!r} != saved {want!r}"
        return None

    abstract = train_lib.nested_dict(parallel.abstract_state(host_state))
    restored = ckpt.restore_latest(abstract, verify)
    if restored is None:
        print(f"no checkpoint in {ckpt.directory}: starting from scratch", flush=True)
        return None
    step, state_dict, meta = restored
    state = train_lib.from_nested_dict(host_state, state_dict)
    return step, state, meta["history"], float(meta.get("wall_time_s", 0.0))


def _count(params: Any) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))


def _close(iterator: Any) -> None:
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


def _check_finite(parallel, metrics, step: int, ckpt: train_lib.Checkpointer) -> float:
    """The step's loss; NonFiniteError when its loss or gradients are not finite."""
    host = parallel.to_host({k: metrics[k] for k in ("finite", "loss")})
    loss = float(host["loss"])
    if bool(host["finite"]):
        return loss
    ckpt.wait()
    steps = ckpt.all_steps()
    last = (
        f"the last good checkpoint is step {max(steps)} in {ckpt.directory}"
        if steps
        else ("no checkpoint was saved yet")
    )
    raise NonFiniteError(
        f"non-finite loss or gradients at step {step} (loss={loss}); stopping the run. {last} "
        "(lower --lr or --weight_decay and continue with --resume)."
    )


def enable_compilation_cache(directory: str) -> None:
    """Caches every compiled XLA program on disk, so a repeated run starts in seconds."""
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = parse_config(argv, description=__doc__)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if config.compilation_cache_dir:
        enable_compilation_cache(config.compilation_cache_dir)
    if config.coordinator_address or config.num_processes:
        jax.distributed.initialize(
            coordinator_address=config.coordinator_address,
            num_processes=config.num_processes,
            process_id=config.process_id,
        )
    try:
        train_and_evaluate(config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except NonFiniteError as e:
        print(f"ERROR: {e}", file=sys.stderr, flush=True)
        return 1
    except Preempted as e:
        print(f"{e}; continue with --resume", file=sys.stderr, flush=True)
        return 3
    return 0
