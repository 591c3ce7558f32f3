"""Regularizer overhead: a jitted optimizer update with each regularizer, against optax.adamw.

One update step `params, state = step(params, state, grads)` (no forward/backward pass), jitted
with the params and optimizer state donated as in a real training step, on the param tree of a
real model (default ConvNeXt-T, 28.6M params, shapes from `nnx.eval_shape`, so the model is
never initialized). For each regularizer T the optimizer is `chain(optax.adam(lr), T)` (AdaDecay,
a gradient-side penalty, goes first: `chain(T, optax.adam(lr))`) and the figure is its median
time per step divided by `optax.adamw`'s with the same mask (timm's no-decay rule), timed
round-robin in one process. The decoupled decays should fuse into Adam's elementwise update
(target ratio <= 1.03). Also reported, all noise-free unlike the timings: optimizer-state
bytes against Adam's; XLA's estimate of the bytes the compiled step reads and writes (it counts
both branches of a conditional); the number of top-level kernels; the size of the compiled
step's temporary buffers (`temp_mib`, from XLA's buffer assignment); and the MiB of fresh
temporary buffers per step as page faults show them, i.e. the intermediates XLA writes to
memory and reads back (XLA's CPU runtime allocates them on every run, so each costs a write,
page faults and a read).

The transforms that reduce a param-sized tree before their elementwise pass have targets of
their own (`TARGETS`, paired time ratio against adamw): AdaDecay <= 1.3, `weight_rescaling(1)`
<= 1.45, a skipped step of `weight_rescaling(k)` <= 1.05 and CPR <= 1.5.

`weight_rescaling` appears three times: a large `every` (every timed step skips the rescale:
the cost of the `lax.cond`), `every=1` (branch-free, rescales every step) and `every=2`. WRS's
second form applies adam's update first and then `rescale_params` to the new params, under a
conditional, in the same step (rows "adam, then rescale_params"); a third times
`rescale_params` alone in its own jitted call, which a user would pay once per k steps.

The weight-decay variants: cautious and corrected (AdamC) decay share the decoupled target.
AdamS (the mean of Adam's second moment) and CPR (each kernel's norm after the update) reduce
a param-sized tree before their elementwise step, so they may read one more such tree than
adamw: their limit is `extra_read_limit` = 1 + param bytes / adamw's bytes accessed, the
memory-bound time ratio of exactly one extra read; `extra_trees_vs_adamw` is XLA's count of
the extra param-sized trees read and written.

    python -m lpwd_optax.experiments.benchmarks.bench_regularizers --out bench_regularizers.json
    python -m lpwd_optax.experiments.benchmarks.bench_regularizers \
        --model convnext_atto --steps 2 --repeats 1  # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lpwd_optax as lo
from lpwd_optax import models
from lpwd_optax.experiments.benchmarks import bench_common

LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.05
DECOUPLED_TARGET = 1.03
# A `weight_rescaling` period no benchmark reaches: every timed step is a skipped step.
NEVER = 2**30
# Paired time ratio against adamw for the transforms that reduce before their elementwise pass.
TARGETS = {
    "adaptive_weight_decay (first)": 1.3,
    "weight_rescaling(1), every step": 1.45,
    "weight_rescaling(k), skipped step": 1.05,
    "constrained_parameter_regularization (CPR)": 1.5,
}


def abstract_params(model_name: str, **overrides: Any) -> tuple[Any, Callable[..., Any]]:
    """The model's params as `jax.ShapeDtypeStruct`s (nothing allocated) and its apply fn."""
    abstract_model = nnx.eval_shape(lambda: models.create_model(model_name, **overrides))
    graphdef, params = nnx.split(abstract_model, nnx.Param)
    apply_fn = lambda p, x: nnx.merge(graphdef, p)(x)
    return params, apply_fn


def optimizers(params: Any, apply_fn: Callable[..., Any], image_size: int):
    """name -> (optimizer, group[, step]). Groups: reference, decoupled (target), coupled,
    rescaling. A third item replaces the update step `make_step` would build."""
    lr, wd = LEARNING_RATE, WEIGHT_DECAY
    mask = lo.default_decay_mask(params)
    example = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    labels = lo.depth_labels(params, apply_fn, example)
    layerwise_rates = lo.layerwise_schedule(labels, wd)
    adam = optax.adam(lr)
    return {
        "optax.adamw": (optax.adamw(lr, weight_decay=wd, mask=mask), "baseline"),
        "optax.adam (no decay)": (adam, "reference"),
        "weight_decay": (optax.chain(adam, lo.weight_decay(wd, learning_rate=lr)), "decoupled"),
        "real_time_weight_decay": (
            optax.chain(adam, lo.real_time_weight_decay(wd, learning_rate=lr)),
            "decoupled",
        ),
        "pre_weight_decay": (
            optax.chain(adam, lo.pre_weight_decay(wd, learning_rate=lr)),
            "decoupled",
        ),
        "LPWD (layer-wise pre_weight_decay)": (
            optax.chain(adam, lo.pre_weight_decay(layerwise_rates, learning_rate=lr)),
            "decoupled",
        ),
        "weight_rescaling(k), skipped step": (
            optax.chain(adam, lo.weight_rescaling(NEVER)),
            "decoupled",
        ),
        "weight_rescaling(1), every step": (
            optax.chain(adam, lo.weight_rescaling(1)),
            "rescaling",
        ),
        "weight_rescaling(2), mean step": (
            optax.chain(adam, lo.weight_rescaling(2)),
            "rescaling",
        ),
        "adaptive_weight_decay (first)": (
            optax.chain(lo.adaptive_weight_decay(wd), adam),
            "coupled",
        ),
        # WRS without the transform, in the training step: adam's update applied, then
        # `rescale_params` on the new params under a conditional.
        "adam, then rescale_params (every step)": (adam, "rescaling", rescale_after(adam, 1)),
        "adam, then rescale_params (skipped step)": (
            adam,
            "rescaling",
            rescale_after(adam, NEVER),
        ),
        # ... or in its own jitted call: the cost of one such call, to spread over k steps.
        "rescale_params (its own call)": (
            optax.identity(),
            "rescaling",
            lambda params, state, grads: (lo.rescale_params(params), state),
        ),
        **variant_optimizers(adam, lr, wd),
    }


# The weight-decay variants of 2023-2025. Cautious and corrected decay are elementwise, like
# weight_decay ("decoupled", same target). AdamS reduces Adam's second moment to one number
# and CPR each kernel's squared norm after the update before the elementwise step, so both
# may read one more param-sized tree than adamw ("extra read"; limit: `extra_read_limit`).
EXTRA_READ = "extra read"


def variant_optimizers(adam: optax.GradientTransformation, lr: float, wd: float):
    schedule = optax.cosine_decay_schedule(lr, 10_000)
    return {
        "cautious_weight_decay": (
            optax.chain(adam, lo.cautious_weight_decay(wd, learning_rate=lr)),
            "decoupled",
        ),
        "corrected_weight_decay (AdamC, scheduled lr)": (
            optax.chain(
                adam,
                lo.corrected_weight_decay(wd, learning_rate=schedule, max_learning_rate=lr),
            ),
            "decoupled",
        ),
        "stable_weight_decay (AdamS)": (lo.adams(lr, weight_decay=wd), EXTRA_READ),
        "constrained_parameter_regularization (CPR)": (
            optax.chain(adam, lo.constrained_parameter_regularization("warm_start", 1)),
            EXTRA_READ,
        ),
    }


def rescale_after(adam: optax.GradientTransformation, every: int) -> Callable[..., Any]:
    """A train step's update: adam's, applied, then the params rescaled after every k-th one."""

    def step(params, state, grads):
        updates, state = adam.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        due = state[0].count % every == 0  # scale_by_adam's count, already incremented
        return jax.lax.cond(due, lo.rescale_params, lambda p: p, params), state

    return step


def tree_bytes(tree: Any) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def make_step(opt: optax.GradientTransformation, step: Callable[..., Any] | None = None):
    def optimizer_step(params, opt_state, grads):
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(step or optimizer_step, donate_argnums=(0, 1))


def hlo_summary(compiled: Any) -> dict[str, Any]:
    """XLA's cost estimate and the number of top-level kernels of a compiled step."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older jax: one dict per computation
        cost = cost[0] if cost else {}
    text = compiled.as_text()
    entry = text[text.find("ENTRY") :]
    kernels = sum(
        1
        for line in entry.splitlines()
        if " = " in line
        and not any(
            op in line.split(" = ", 1)[1].split("(", 1)[0]
            for op in ("parameter", "tuple", "get-tuple-element", "constant", "bitcast")
        )
    )
    memory = compiled.memory_analysis()
    return {
        "temp_mib": memory.temp_size_in_bytes / 2**20 if memory is not None else float("nan"),
        "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
        "flops": float(cost.get("flops", float("nan"))),
        "top_level_ops": kernels,
        "fusions": entry.count(" fusion("),
        "conditionals": entry.count(" conditional("),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    machine = bench_common.machine_info()
    abstract, apply_fn = abstract_params(args.model, **json.loads(args.model_overrides))
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))
    print(
        f"{args.model}: {len(jax.tree.leaves(abstract))} param leaves, {num_params:,} params; "
        f"{args.steps} steps per sample, {args.repeats} repeats; "
        f"load {machine['load_average_1_5_15min']}"
    )
    master = bench_common.random_like(abstract, seed=0)
    grads = bench_common.random_like(abstract, seed=1, scale=1e-3)
    opts = optimizers(abstract, apply_fn, args.image_size)
    if args.only:
        keep = {"optax.adamw", *args.only}
        opts = {k: v for k, v in opts.items() if k in keep}

    copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))
    steps, inits, results = {}, {}, {}
    adam_state_bytes = tree_bytes(jax.eval_shape(optax.adam(LEARNING_RATE).init, abstract))
    for name, (opt, group, *custom_step) in opts.items():
        state_shapes = jax.eval_shape(opt.init, abstract)
        step = make_step(opt, *custom_step)
        start = time.perf_counter()
        compiled = step.lower(abstract, state_shapes, abstract).compile()
        compile_s = time.perf_counter() - start
        print(f"  compiled {name} in {compile_s:.1f} s", flush=True)
        steps[name], inits[name] = compiled, jax.jit(opt.init)
        state_bytes = tree_bytes(state_shapes) or None  # None: no optimizer state at all
        results[name] = {
            "group": group,
            "compile_s": compile_s,
            "state_bytes": state_bytes,
            "state_bytes_vs_adam": state_bytes and state_bytes / adam_state_bytes,
            # A chain keeps one int32 step count per stage: 4 bytes per extra transform.
            "state_extra_bytes_vs_adam": state_bytes and state_bytes - adam_state_bytes,
            **hlo_summary(compiled),
        }

    live: dict[str, Any] = {}
    page_faults: dict[str, list[float]] = {name: [] for name in opts}

    def prepare(name):
        live.clear()  # free the previous configuration's buffers first
        params = copy(master)
        # One untimed step: the timed ones then run in a training loop's steady state.
        live[name] = steps[name](params, inits[name](params), grads)
        jax.block_until_ready(live[name])

    def timed(name):
        def fn():
            params, state = live.pop(name)
            faults = bench_common.minor_page_faults()
            for _ in range(args.steps):
                params, state = steps[name](params, state, grads)
            jax.block_until_ready((params, state))
            page_faults[name].append((bench_common.minor_page_faults() - faults) / args.steps)
            live[name] = (params, state)

        return fn

    times = bench_common.time_interleaved(
        {name: timed(name) for name in opts},
        repeats=args.repeats,
        warmup=args.warmup,
        prepare={name: lambda name=name: prepare(name) for name in opts},
    )
    live.clear()
    base = results["optax.adamw"]
    param_bytes = tree_bytes(abstract)
    for name, r in results.items():
        for clock in ("wall_s", "cpu_s"):
            per_step = [t / args.steps for t in times[name][clock]]
            r[f"step_{clock}"] = bench_common.summarize(per_step)
            # The ratio of medians, and the median of per-round ratios (robust to drifting load).
            base_steps = [t / args.steps for t in times["optax.adamw"][clock]]
            r[f"ratio_{clock}"] = float(np.median(per_step) / np.median(base_steps))
            r[f"ratio_{clock}_paired"] = float(
                np.median([a / b for a, b in zip(per_step, base_steps)])
            )
        r["bytes_accessed_vs_adamw"] = r["bytes_accessed"] / base["bytes_accessed"]
        # Fresh temporary buffers per step: intermediates XLA wrote to memory.
        r["page_faults_mib_per_step"] = (
            float(np.median(page_faults[name])) * resource.getpagesize() / 2**20
        )
        if r["group"] == "decoupled":
            r["meets_target"] = r["ratio_wall_s"] <= DECOUPLED_TARGET
        # How many param-sized trees more than adamw the step reads or writes (XLA's estimate),
        # and the memory-bound time ratio of reading exactly one more.
        r["extra_trees_vs_adamw"] = (r["bytes_accessed"] - base["bytes_accessed"]) / param_bytes
        if r["group"] == EXTRA_READ:
            r["extra_read_limit"] = 1 + param_bytes / base["bytes_accessed"]
            r["meets_target"] = r["ratio_wall_s"] <= r["extra_read_limit"] * DECOUPLED_TARGET
        if name in TARGETS:
            r["target"] = TARGETS[name]
            r["meets_target"] = r["ratio_wall_s_paired"] <= TARGETS[name]

    report = {
        "benchmark": "regularizer_overhead",
        "model": args.model,
        "model_overrides": json.loads(args.model_overrides),
        "num_params": num_params,
        "num_leaves": len(jax.tree.leaves(abstract)),
        "steps_per_sample": args.steps,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "learning_rate": LEARNING_RATE,
        "weight_decay": WEIGHT_DECAY,
        "target_decoupled_ratio": DECOUPLED_TARGET,
        "targets": TARGETS,
        "machine": machine,
        "load_average_at_end": bench_common.load_average(),
        "peak_rss_mib": bench_common.peak_rss_mib(),
        "results": results,
    }
    print_report(report)
    return report


def print_report(report: dict[str, Any]) -> None:
    headers = [
        "optimizer",
        "ms/step",
        "vs adamw",
        "paired",
        "cpu ratio",
        "state MiB",
        "+bytes vs adam",
        "XLA bytes vs adamw",
        "+trees",
        "temp MiB/step",
        "XLA temp MiB",
        "kernels",
        "compile s",
    ]
    rows = []
    for name, r in report["results"].items():
        rows.append(
            [
                name,
                1e3 * r["step_wall_s"]["median"],
                r["ratio_wall_s"],
                r["ratio_wall_s_paired"],
                r["ratio_cpu_s_paired"],
                r["state_bytes"] and r["state_bytes"] / 2**20,
                r["state_extra_bytes_vs_adam"],
                r["bytes_accessed_vs_adamw"],
                r["extra_trees_vs_adamw"],
                r["page_faults_mib_per_step"],
                r["temp_mib"],
                r["top_level_ops"],
                r["compile_s"],
            ]
        )
    print(bench_common.format_table(headers, rows))
    print(
        "ratios: median step time over optax.adamw's ('paired': median of per-round ratios); "
        f"target for the decoupled decays <= {report['target_decoupled_ratio']}; for AdamS, "
        "extra_read_limit (one more param-sized tree read) times that; paired ratio targets: "
        + ", ".join(f"{name} <= {target}" for name, target in report["targets"].items())
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="convnext_tiny", help="a models.list_models() name")
    parser.add_argument(
        "--model-overrides", default="{}", help="JSON constructor arguments for create_model"
    )
    parser.add_argument("--image-size", type=int, default=224, help="for LPWD's depth labels")
    parser.add_argument("--steps", type=int, default=10, help="update steps per timed sample")
    parser.add_argument("--repeats", type=int, default=7, help="timed samples (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--only", nargs="*", help="a subset of the optimizer names")
    parser.add_argument("--out", help="write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    report = run(args)
    if args.out:
        bench_common.write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
