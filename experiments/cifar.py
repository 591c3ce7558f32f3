r"""Train a ConvNeXt or Swin on CIFAR with one of the LPWD paper's regularizers.

One run of the paper's CIFAR experiments (SPEC section 5): constant learning rate, Adam or
SGD-momentum, a regularizer from `lpwd_optax`, evaluation every epoch, and at the end the line
`mean +- std of the best 10 test top-1: XX.XX +- Y.YY` plus `summary.json`.

Offline quick start (scikit-learn's digits, a small ConvNeXt, a few minutes on a laptop CPU):

    python -m experiments.cifar --preset=quickstart

The paper's setting (ConvNeXt-T, CIFAR-10 from tensorflow-datasets, Adam, LPWD):

    python -m experiments.cifar --dataset=cifar10 --method=lpwd --output_dir=runs/c10_lpwd

Outputs in --output_dir: config.json, metrics.jsonl (one record per epoch: train loss, test
top-1, mean R_op, per-layer norms), tensorboard/, checkpoints/ (orbax, one per epoch),
final_params.npz (the evaluated weights; for PWD/LPWD theta_t, not the stored phi_t) and
summary.json. R_op is reported for the decoupled methods (wd, rwd, pwd, lpwd, wrs); for
baseline, l2 and adadecay it is undefined and written as null.

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
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from lpwd_optax import models
from lpwd_optax.experiments import checkpointing, data, methods, train_lib, writers
from lpwd_optax.experiments.config import Config, parse_config, to_dict

SUMMARY_FORMAT = "mean +- std of the best 10 test top-1: {mean:.2f} +- {std:.2f}"


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


def train_and_evaluate(config: Config) -> dict[str, Any]:
    """Runs (or resumes) one training run and returns its summary."""
    start_time = time.time()
    process_index, process_count = jax.process_index(), jax.process_count()
    is_main = process_index == 0
    out = config.output_dir
    os.makedirs(out, exist_ok=True)

    # Data and model.
    train_ds = data.load_dataset(config.dataset, data_dir=config.data_dir, split="train")
    test_ds = data.load_dataset(config.dataset, data_dir=config.data_dir, split="test")
    model = models.create_model(
        config.model,
        num_classes=train_ds.num_classes,
        seed=config.seed,
        drop_path_rate=config.drop_path_rate,
        **config.overrides,
    )
    fm = models.functional_model(model)
    example = jnp.zeros((2, *train_ds.images.shape[1:]), jnp.float32)
    method = methods.build_method(
        config.method,
        optimizer=config.optimizer,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        params=fm.params,
        apply_fn=fm.apply,
        example_batch=example,
        lpwd_max_scale=config.lpwd_max_scale,
        adadecay_alpha=config.adadecay_alpha,
        wrs_every=config.wrs_every,
        wrs_mode=config.wrs_mode,
    )

    # Devices and batch geometry.
    devices = select_devices(config.num_devices)
    parallel = train_lib.make_parallel(
        config.parallel,
        fm.apply,
        method,
        config.seed,
        devices=devices if config.num_devices else None,
    )
    local_devices = parallel.local_device_count
    eval_batch_size = config.eval_batch_size or config.batch_size
    for name, size in (("batch_size", config.batch_size), ("eval_batch_size", eval_batch_size)):
        if size % (process_count * local_devices):
            raise ValueError(
                f"{name}={size} must be divisible by processes x local devices = "
                f"{process_count} x {local_devices}"
            )
    local_eval_batch = eval_batch_size // process_count
    steps_per_epoch = data.num_batches(train_ds, config.batch_size)
    if steps_per_epoch == 0:
        raise ValueError(
            f"the training set ({len(train_ds.labels)} examples) is smaller than one batch "
            f"({config.batch_size}); lower --batch_size"
        )
    if config.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.steps_per_epoch)
    total_steps = steps_per_epoch * config.epochs

    # State, possibly restored.
    host_state = train_lib.create_train_state(fm.params, method)
    ckpt = checkpointing.Checkpointer(
        os.path.join(out, "checkpoints"), max_to_keep=config.keep_checkpoints
    )
    history: list[dict[str, Any]] = []
    restored_step = None
    if config.resume:
        restored = _restore(ckpt, parallel, host_state)
        if restored is not None:
            restored_step, host_state, history = restored
    elif ckpt.all_steps():
        raise ValueError(
            f"{out} already holds checkpoints {ckpt.all_steps()}: pass --resume to continue, "
            "or choose another --output_dir"
        )
    state = parallel.put_state(host_state)
    start_step = int(parallel.to_host(state.step)) if restored_step is not None else 0
    start_epoch = start_step // steps_per_epoch

    # Writers (process 0 only).
    if is_main:
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(to_dict(config), f, indent=2)
        jsonl = writers.JsonlWriter(
            os.path.join(out, "metrics.jsonl"), keep_up_to_step=restored_step
        )
        tensorboard = writers.TensorBoardWriter(os.path.join(out, "tensorboard"))
        epoch_writer = writers.MultiWriter([jsonl, tensorboard])
        step_writer = writers.MultiWriter([tensorboard])
        print(f"method: {method.description}", flush=True)
        print(
            f"model {config.model} ({_count(fm.params):,} params), {config.dataset} "
            f"({len(train_ds.labels)} train / {len(test_ds.labels)} test), {len(devices)} "
            f"devices x {process_count} processes, {steps_per_epoch} steps/epoch, "
            f"{config.parallel}" + (f", resumed at step {start_step}" if restored_step else ""),
            flush=True,
        )
    else:
        epoch_writer = step_writer = writers.MultiWriter([])

    progress = tqdm(
        total=total_steps,
        initial=start_step,
        unit="step",
        dynamic_ncols=True,
        disable=not (is_main and config.progress),
    )
    steps_this_run = 0
    step = start_step
    try:
        for epoch in range(start_epoch, config.epochs):
            epoch_start = time.time()
            batches = data.batches(
                train_ds,
                config.batch_size,
                seed=config.seed,
                epoch=epoch,
                train=True,
                process_index=process_index,
                process_count=process_count,
            )
            sums, previous, metrics = None, None, None
            for _, batch in zip(range(steps_per_epoch), batches):
                state, metrics = parallel.train_step(state, parallel.put_batch(batch))
                step += 1
                steps_this_run += 1
                running = {k: metrics[k] for k in ("loss", "accuracy", "rop")}
                sums = running if sums is None else jax.tree.map(jnp.add, sums, running)
                # Check the previous step while this one runs: one step stays in flight.
                if previous is not None:
                    _check_finite(parallel, previous, step - 1, ckpt)
                previous = metrics
                progress.update(1)
                if step % config.log_every_steps == 0:
                    host = parallel.to_host(running)
                    step_writer.write_scalars(step, {f"train/{k}": v for k, v in host.items()})
                    progress.set_postfix(epoch=epoch + 1, loss=f"{float(host['loss']):.4f}")
                if config.stop_after_steps and steps_this_run >= config.stop_after_steps:
                    raise Preempted(f"stopped after {steps_this_run} steps (--stop_after_steps)")
            _close(batches)
            if metrics is None:
                raise ValueError("the training data yielded no batches")
            _check_finite(parallel, previous, step, ckpt)

            evaluated = parallel.eval_params(state)
            eval_batches = data.batches(
                test_ds,
                eval_batch_size,
                seed=config.seed,
                epoch=0,
                train=False,
                process_index=process_index,
                process_count=process_count,
                drop_remainder=False,
            )
            if config.eval_steps:
                eval_batches = (b for _, b in zip(range(config.eval_steps), eval_batches))
            test = train_lib.evaluate(parallel, evaluated, eval_batches, local_eval_batch)

            host_sums = parallel.to_host(sums)
            record = dict(
                epoch=epoch + 1,
                train_loss=float(host_sums["loss"]) / steps_per_epoch,
                train_top1=100.0 * float(host_sums["accuracy"]) / steps_per_epoch,
                test_top1=test["top1"],
                test_loss=test["loss"],
                rop=float(host_sums["rop"]) / steps_per_epoch if method.has_rop else None,
                epoch_time_s=time.time() - epoch_start,
            )
            history.append(record)
            # Per-layer norms of the epoch's last step (lo.layer_statistics).
            layer_scalars = {
                f"layers/{path}/{stat}": float(v)
                for path, stats in parallel.to_host(metrics["layers"]).items()
                for stat, v in stats.items()
            }
            epoch_writer.write_scalars(step, {**record, **layer_scalars})
            epoch_writer.flush()
            rop_text = f", R_op {record['rop']:.4f}" if record["rop"] is not None else ""
            if is_main:
                tqdm.write(
                    f"epoch {epoch + 1}/{config.epochs}: train loss {record['train_loss']:.4f}, "
                    f"test top-1 {record['test_top1']:.2f}{rop_text} "
                    f"({record['epoch_time_s']:.1f} s)"
                )

            saved = parallel.checkpointable(state)
            meta = dict(
                epoch=epoch + 1,
                step=step,
                history=history,
                fingerprint=train_lib.fingerprint(saved.params),
            )
            exported = None
            if method.name in ("pwd", "lpwd"):
                exported = train_lib.nested_dict(_checkpointable_params(parallel, evaluated))
            ckpt.save(step, train_lib.nested_dict(saved), meta, exported)
    finally:
        progress.close()
        ckpt.close()
        epoch_writer.close()

    # Final export and summary.
    final = parallel.to_host(parallel.eval_params(state))
    top1 = [r["test_top1"] for r in history]
    mean, std = best_k_summary(top1)
    rops = [r["rop"] for r in history if r.get("rop") is not None]
    summary = dict(
        summary_line=SUMMARY_FORMAT.format(mean=mean, std=std),
        best10_mean=mean,
        best10_std=std,
        best_top1=max(top1),
        final_top1=top1[-1],
        final_train_loss=history[-1]["train_loss"],
        mean_rop=float(np.mean(rops)) if rops else None,
        params_fingerprint=train_lib.fingerprint(final),
        epochs=len(history),
        steps=step,
        method_description=method.description.splitlines()[0],
        num_params=_count(fm.params),
        devices=len(devices),
        processes=process_count,
        wall_time_s=time.time() - start_time,
        config=to_dict(config),
        history=history,
    )
    if is_main:
        np.savez(
            os.path.join(out, "final_params.npz"),
            **{k: np.asarray(v) for k, v in train_lib.flat_dict(final).items()},
        )
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(summary["summary_line"], flush=True)
    return summary


def _restore(
    ckpt: checkpointing.Checkpointer, parallel: train_lib.Parallel, host_state: Any
) -> tuple[int, Any, list[dict[str, Any]]] | None:
    """(step, state, metric history) from the newest good checkpoint, or None."""

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
    return step, train_lib.from_nested_dict(host_state, state_dict), meta["history"]


def _count(params: Any) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))


def _close(iterator: Any) -> None:
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


def _checkpointable_params(parallel: train_lib.Parallel, params: Any) -> Any:
    if isinstance(parallel, train_lib.PmapParallel):
        return parallel.to_host(params)
    return params


def _check_finite(parallel, metrics, step: int, ckpt: checkpointing.Checkpointer) -> None:
    if bool(parallel.to_host(metrics["finite"])):
        return
    loss = float(parallel.to_host(metrics["loss"]))
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
    config = parse_config(argv, description=__doc__)
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
    except NonFiniteError as e:
        print(f"ERROR: {e}", file=sys.stderr, flush=True)
        return 1
    except Preempted as e:
        print(f"{e}; continue with --resume", file=sys.stderr, flush=True)
        return 3
    return 0
