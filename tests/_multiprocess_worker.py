"""One process of a multi-process run of experiments.cifar on localhost (tests/test_cifar.py).

    python tests/_multiprocess_worker.py NUM_LOCAL_DEVICES -- <experiments.cifar flags>

Runs the program with `--coordinator_address/--num_processes/--process_id` among the flags,
then prints `RESULT {json}` with this process's view of the final weights.
"""

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax

jax.config.update("jax_num_cpu_devices", int(sys.argv[1]))

from lpwd_optax.experiments import cifar  # noqa: E402
from lpwd_optax.experiments.config import parse_config  # noqa: E402


def main() -> None:
    config = parse_config(sys.argv[sys.argv.index("--") + 1 :])
    cifar.enable_compilation_cache(config.compilation_cache_dir)
    jax.distributed.initialize(
        coordinator_address=config.coordinator_address,
        num_processes=config.num_processes,
        process_id=config.process_id,
        initialization_timeout=120,
    )
    summary = cifar.train_and_evaluate(config)
    result = dict(
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        devices=jax.device_count(),
        fingerprint=summary["params_fingerprint"],
        top1=[r["test_top1"] for r in summary["history"]],
        train_loss=[r["train_loss"] for r in summary["history"]],
    )
    print("RESULT " + json.dumps(result), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
