"""What reading the layer structure costs, and what its per-slice rates cost a train step.

A transformer of `--blocks` pre-norm blocks (width `--width`, 4 heads, MLP 4x) on token inputs,
once with its blocks stacked by linen's `nn.scan` and once unrolled. Measured:

- `lo.layer_structure` on the model's abstract params (`jax.eval_shape`, nothing is
  initialized), in its two parts: the trace of the model (`jax.make_jaxpr`, the model's own
  Python) and the walk over the trace (views, roles, depths), each the median over
  `--repeats` calls, for the stacked and the unrolled model;
- one jitted train step of the stacked model with LPWD's per-slice rates and the structure's
  decay mask, against the same step with PWD (the same rule and mask, one rate for every
  leaf): the paired ratio of their times, and XLA's flop and byte counts of both compiled
  steps (noise-free: equal counts mean the per-slice rates cost nothing inside the step).

    python -m lpwd_optax.experiments.benchmarks.bench_structure --out structure.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import lpwd_optax as lo
from lpwd_optax import structure
from lpwd_optax._common import leaves_with_paths
from lpwd_optax.experiments.benchmarks import bench_common

LR = 1e-3


class Block(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x, _):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=4)(h, h)
        h = nn.Dense(4 * self.width)(nn.LayerNorm()(x))
        return x + nn.Dense(self.width)(nn.gelu(h)), None


class Transformer(nn.Module):
    blocks: int
    width: int
    vocab: int = 512
    stacked: bool = True

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.width)(tokens)
        if self.stacked:
            stack = nn.scan(
                nn.remat(Block),
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=self.blocks,
            )
            x, _ = stack(self.width, name="blocks")(x, None)
        else:
            for i in range(self.blocks):
                x, _ = Block(self.width, name=f"block_{i}")(x, None)
        return nn.Dense(self.vocab)(nn.LayerNorm()(x))


def time_structure(model: nn.Module, tokens: jax.Array, repeats: int) -> dict[str, Any]:
    """Seconds per trace and per walk (lists over `repeats`), the equations the trace has (a
    scan's body counted once), and the structure."""
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens)["params"])
    flat = leaves_with_paths(abstract)
    trace_s, walk_s = [], []
    for _ in range(repeats):
        # A new function each time: jax caches the trace of one it has seen.
        apply_fn = lambda p, x: model.apply({"params": p}, x)
        start = time.perf_counter()
        closed = structure.trace.trace_forward(abstract, apply_fn, (tokens,), {}, "bench")
        trace_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        layouts = structure.analyse_jaxpr(closed, flat, caller="bench")
        walk_s.append(time.perf_counter() - start)
    layers = structure.LayerStructure(tuple(layouts), jax.tree.structure(abstract))
    return {"trace_s": trace_s, "walk_s": walk_s, "eqns": len(closed.jaxpr.eqns), "layers": layers}


def _compiled_costs(compiled: Any) -> dict[str, float]:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0]
    return {k: float(analysis.get(k, 0.0)) for k in ("flops", "bytes accessed")}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=24)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)

    model = Transformer(args.blocks, args.width)
    tokens = jnp.zeros((args.batch, args.tokens), jnp.int32)
    apply_fn = lambda p, x: model.apply({"params": p}, x)
    forms = {
        name: time_structure(
            Transformer(args.blocks, args.width, stacked=stacked), tokens, args.repeats
        )
        for name, stacked in (("stacked", True), ("unrolled", False))
    }
    layers = forms["stacked"]["layers"]
    print(layers)

    params = model.init(jax.random.key(0), tokens)["params"]
    rates = lo.layerwise_schedule(layers.depths, 0.05)
    mask = layers.decay_mask
    optimizers = {
        "pwd": optax.chain(optax.adam(LR), lo.pre_weight_decay(0.05, learning_rate=LR, mask=mask)),
        "lpwd": optax.chain(
            optax.adam(LR), lo.pre_weight_decay(rates, learning_rate=LR, mask=mask)
        ),
    }
    labels = jax.random.randint(jax.random.key(1), tokens.shape, 0, model.vocab)

    def make_step(tx):
        def step(params, state):
            def loss_fn(p):
                logits = apply_fn(p, tokens)
                return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

            grads = jax.grad(loss_fn)(params)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        return jax.jit(step)

    states, steps, costs = {}, {}, {}
    for name, tx in optimizers.items():
        states[name] = (params, tx.init(params))
        steps[name] = make_step(tx)
        costs[name] = _compiled_costs(steps[name].lower(*states[name]).compile())

    def run(name):
        def go():
            out = steps[name](*states[name])
            jax.block_until_ready(out)

        return go

    times = bench_common.time_interleaved({n: run(n) for n in optimizers}, args.repeats)
    pwd, lpwd = times["pwd"]["wall_s"], times["lpwd"]["wall_s"]
    paired = statistics.median(b / a for a, b in zip(pwd, lpwd))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    median = statistics.median
    rows = []
    for name, form in forms.items():
        trace, walk = median(form["trace_s"]), median(form["walk_s"])
        rows += [
            [f"{name}: trace, {form['eqns']} top-level eqns (s)", trace, None],
            [f"{name}: walk (s); walk / trace", walk, walk / trace],
        ]
    rows += [
        ["step, PWD one rate (s)", statistics.median(pwd), None],
        ["step, LPWD per slice (s)", statistics.median(lpwd), paired],
        ["XLA flops LPWD / PWD", costs["lpwd"]["flops"] / costs["pwd"]["flops"], None],
        [
            "XLA bytes accessed LPWD / PWD",
            costs["lpwd"]["bytes accessed"] / costs["pwd"]["bytes accessed"],
            None,
        ],
    ]
    print(
        f"\n{args.blocks} scanned blocks, width {args.width}, {n_params / 1e6:.1f}M params, "
        f"{layers.num_layers} layers, batch {args.batch} x {args.tokens} tokens"
    )
    print(bench_common.format_table(["measure", "median", "ratio"], rows))
    report = {
        "machine": bench_common.machine_info(),
        "config": vars(args),
        "params": n_params,
        "layers": layers.num_layers,
        "structure": {
            name: {
                "eqns": form["eqns"],
                "trace_s": bench_common.summarize(form["trace_s"]),
                "walk_s": bench_common.summarize(form["walk_s"]),
                "walk_over_trace": median(form["walk_s"]) / median(form["trace_s"]),
            }
            for name, form in forms.items()
        },
        "step_s": {n: bench_common.summarize(t["wall_s"]) for n, t in times.items()},
        "lpwd_over_pwd_paired": paired,
        "xla_costs": costs,
    }
    if args.out:
        bench_common.write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
