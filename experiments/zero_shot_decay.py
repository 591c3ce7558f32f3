"""Zero-shot weight decay (LPWD paper, Fig. 3a): decay a trained model, no training, evaluate.

Takes the weights a run exported (`<run_dir>/final_params.npz`, the evaluated weights), applies
`steps` steps of pure weight decay with rate lambda_s and no gradient,

    theta_{t+1} = theta_t - d * theta_t,  d = lambda_s (or lambda_s * eta with --learning_rate)

through `lpwd_optax.weight_decay` on zero updates (so only the leaves of the default decay mask
shrink, as in training), and measures test top-1 for every lambda_s. The paper's observation:
accuracy falls as lambda_s grows, i.e. the decay by itself moves a trained model away from
the point the optimizer found.

    lpwd-zero-shot --run_dir=runs/quickstart
    lpwd-plots zero_shot runs/quickstart/zero_shot_decay.json  # writes fig3a_zero_shot.png there
"""

from __future__ import annotations

if __name__ == "__main__":  # started as a script or as experiments.zero_shot_decay: see _entry.py
    from lpwd_optax.experiments import _entry

    _entry.run(__file__)

import argparse
import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lpwd_optax as lo
from lpwd_optax import models
from lpwd_optax.experiments import cifar, data, train_lib

DEFAULT_LAMBDAS = "0,1e-4,2e-4,5e-4,1e-3,2e-3,5e-3,1e-2,2e-2,5e-2"


def load_run(run_dir: str) -> tuple[dict[str, Any], Any, Any, data.ArrayDataset]:
    """(config dict, apply_fn, evaluated params, test set) of a finished run."""
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    test_ds = data.load_dataset(config["dataset"], data_dir=config["data_dir"], split="test")
    overrides = json.loads(config["model_overrides"]) if config["model_overrides"] else {}
    model = models.create_model(
        config["model"], num_classes=test_ds.num_classes, seed=config["seed"], **overrides
    )
    fm = models.functional_model(model)
    with np.load(os.path.join(run_dir, "final_params.npz")) as f:
        params = train_lib.from_flat_dict(fm.params, {k: f[k] for k in f.files})
    return config, fm.apply, params, test_ds


@functools.partial(jax.jit, static_argnames=("steps",))
def decay_without_training(params: Any, rate: Any, steps: int, learning_rate: Any = None) -> Any:
    """`steps` updates of `lo.weight_decay(rate)` applied to zero base updates.

    `rate` (and `learning_rate`) are traced, so every lambda_s reuses one compiled program.
    """
    tx = lo.weight_decay(rate, learning_rate=learning_rate)

    def body(_, carry):
        params, state = carry
        zeros = jax.tree.map(jnp.zeros_like, params)
        updates, state = tx.update(zeros, state, params)
        return optax.apply_updates(params, updates), state

    return jax.lax.fori_loop(0, steps, body, (params, tx.init(params)))[0]


def accuracy(eval_step, params, test_ds: data.ArrayDataset, batch_size: int = 500) -> float:
    """Test top-1 (%) with a jitted `train_lib.make_eval_step` function."""
    correct = count = 0.0
    batches = data.batches(test_ds, batch_size, seed=0, epoch=0, train=False, drop_remainder=False)
    for batch in batches:
        sums = eval_step(params, train_lib.pad_batch(batch, batch_size))
        correct += float(sums["correct"])
        count += float(sums["count"])
    return 100.0 * correct / count


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run_dir", required=True, help="A finished experiments.cifar run.")
    parser.add_argument("--lambdas", default=DEFAULT_LAMBDAS, help="Comma-separated lambda_s.")
    parser.add_argument("--steps", type=int, default=100, help="Decay steps (paper: 100).")
    parser.add_argument(
        "--learning_rate",
        type=float,
        default=None,
        help="If given, the per-step decay is lambda_s * learning_rate (training convention).",
    )
    parser.add_argument("--batch_size", type=int, default=500, help="Evaluation batch size.")
    parser.add_argument(
        "--output_dir", default=None, help="Where zero_shot_decay.json goes; default run_dir."
    )
    parser.add_argument(
        "--compilation_cache_dir",
        default="~/.cache/lpwd_optax/jax",
        help="JAX persistent compilation cache ('none' disables it).",
    )
    args = parser.parse_args(argv)
    if args.compilation_cache_dir.lower() != "none":
        cifar.enable_compilation_cache(args.compilation_cache_dir)

    config, apply_fn, params, test_ds = load_run(args.run_dir)
    eval_step = jax.jit(train_lib.make_eval_step(apply_fn))
    results = []
    for rate in (float(x) for x in args.lambdas.split(",") if x):
        decayed = decay_without_training(params, jnp.float32(rate), args.steps, args.learning_rate)
        top1 = accuracy(eval_step, decayed, test_ds, args.batch_size)
        results.append(dict(lambda_s=rate, top1=top1))
        print(f"lambda_s={rate:g}: test top-1 {top1:.2f}", flush=True)
    output = os.path.join(args.output_dir or args.run_dir, "zero_shot_decay.json")
    with open(output, "w") as f:
        json.dump(
            dict(
                run_dir=args.run_dir,
                method=config["method"],
                steps=args.steps,
                learning_rate=args.learning_rate,
                results=results,
            ),
            f,
            indent=2,
        )
    print(f"wrote {output}")
    return 0
