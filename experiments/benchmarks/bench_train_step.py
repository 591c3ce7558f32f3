"""Training-step throughput of the Flax ports against timm in PyTorch, on the same device.

A training step is forward + backward + AdamW update, float32, on random 32x32 images at the
CIFAR setting of each model (the `<model>_cifar` presets: ConvNeXt with a 2x2 stem; Swin with
img_size 32, patch 2, window 4; timm gets the same arguments). Per model:

- Flax, one configuration per depthwise implementation of ConvNeXt ("auto": the library's
  default, which on CPU picks per-channel Toeplitz matmuls for maps up to 16x16 and the shifted
  multiply-add above; "shift": always the shifted multiply-add; "conv": XLA's grouped
  convolution, the GPU/TPU path), jitted with params and optimizer
  state donated: images/s, the time to trace and compile the step, peak host memory;
- timm in PyTorch (when torch and timm are installed) with `torch.set_num_threads` set to the
  number of CPUs this process may use, which is also the size of XLA's CPU thread pool.

`--device cuda` runs both frameworks on the first GPU instead (JAX needs its CUDA plugin, e.g.
`pip install 'jax[cuda13]'`). There "auto" is XLA's grouped convolution, and both sides use
TF32 for float32 matrix products and convolutions: JAX's default precision on GPU, and torch
is set to match (`torch.set_float32_matmul_precision("high")`). Each result records the device
its framework ran on.

Each model runs in its own subprocess (so one model's memory and compile caches do not touch
the next), and inside it its configurations are timed round-robin: the images/s ratios are
measured side by side. Peak host memory is the subprocess's running `ru_maxrss` after each
configuration's compile and warm-up step (the first configuration's own peak; later figures
include what the earlier configurations still hold); `--isolate-memory` runs each configuration
alone in a subprocess for its own peak. `--with-input` also measures the images/s
`experiments.data.batches` delivers on the digits dataset, against the training step's.

On a machine shared with other processes, PyTorch's OpenMP threads spin at barriers and stall
when one of them is descheduled, far more than XLA's thread pool does: compare at
`--threads 1`, or pass `--omp-passive`, and keep the load average in the JSON in mind.

    python -m lpwd_optax.experiments.benchmarks.bench_train_step --out step.json  # atto, tiny, swin
    python -m lpwd_optax.experiments.benchmarks.bench_train_step --quick  # a few minutes
    python -m lpwd_optax.experiments.benchmarks.bench_train_step --models convnext_tiny \
        --with-input --isolate-memory
    python -m lpwd_optax.experiments.benchmarks.bench_train_step --threads 1 \
        --depthwise shift  # busy machine
    python -m lpwd_optax.experiments.benchmarks.bench_train_step --device cuda \
        --depthwise auto --batch-size 256 --steps 10 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lpwd_optax.experiments.benchmarks import bench_common

DEFAULT_MODELS = ("convnext_atto", "convnext_tiny", "swin_tiny")
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.05
IMAGE_SIZE = 32
THROUGHPUT_TARGET = 1.0  # Flax images/s over timm's
COMPILE_TARGET_S = 30.0  # convnext_tiny, CPU
INPUT_TARGET = 5.0  # input pipeline images/s over the training step's
DEVICES = ("cpu", "cuda")
JAX_BACKEND = {"cpu": "cpu", "cuda": "gpu"}  # --device -> jax.default_backend()
# glibc malloc settings for --retain-freed-memory: one arena for all threads, no mmap for large
# blocks, never trim. XLA:CPU allocates a step's temporaries (1.7 GB for swin_tiny) as one block
# per execution; by default glibc maps it fresh and unmaps it after, so every step page-faults
# all of it in again (about 1.3 s of kernel CPU time per Swin step). torch's CPU tensors go the
# same way (0.4 s). With these, a freed block stays in the heap for the next step.
RETAIN_FREED_MEMORY_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(2**62),
}


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return True  # JAX alone may still have a GPU: its own check names the backend
    return torch.cuda.is_available()


def _torch_available() -> bool:
    try:
        import timm  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def configurations(model: str, depthwise: Sequence[str], with_torch: bool) -> list[str]:
    """Config ids: 'flax:<model>[:<depthwise impl>]' and 'torch:<model>'."""
    if model.startswith("convnext"):
        configs = [f"flax:{model}:{impl}" for impl in depthwise]
    else:
        configs = [f"flax:{model}"]
    if with_torch:
        configs.append(f"torch:{model}")
    return configs


def cifar_arguments(model: str) -> tuple[str, str, dict[str, Any]]:
    """(Flax preset name, timm name, timm constructor arguments) of `model` at 32x32."""
    from lpwd_optax import models

    preset = f"{model}_cifar"
    if preset not in models.list_models():
        raise ValueError(f"no CIFAR preset {preset!r}; have {models.list_models('*_cifar')}")
    if model.startswith("convnext"):
        return preset, model, dict(models.CONVNEXT_CIFAR)
    timm_name = models.list_models(f"{model}_patch*")[0]  # swin_tiny -> swin_tiny_patch4_...
    return preset, timm_name, dict(models.SWIN_CIFAR)


# ----------------------------------------------------------------------------------------------
# One configuration: build, compile, run


class FlaxStep:
    """A jitted Flax train step with donated params/state, driven on one fixed batch."""

    def __init__(
        self,
        model: str,
        impl: str | None,
        batch_size: int,
        num_classes: int,
        overrides: dict[str, Any] | None = None,
        compiler_options: dict[str, Any] | None = None,
    ):
        import jax
        import optax
        from flax import nnx

        from lpwd_optax import models

        preset, _, _ = cifar_arguments(model)
        overrides = dict(overrides or {})
        if impl is not None:
            overrides["depthwise_impl"] = impl
        # Shapes only, then random values: initializing for real would compile an init per
        # param shape (most of the set-up time) and changes nothing in the step's cost.
        abstract_model = nnx.eval_shape(
            lambda: models.create_model(preset, num_classes=num_classes, **overrides)
        )
        fm = models.functional_model(abstract_model)
        tx = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)

        def step(params, opt_state, images, labels, rng):
            def loss_fn(p):
                # `rng` drives drop path where the model has it (Swin's default rate is timm's).
                logits = fm.apply(p, images, train=True, rng=rng)
                return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        key_images, key_labels, self.rng = jax.random.split(jax.random.key(0), 3)
        self.images = jax.random.normal(key_images, (batch_size, IMAGE_SIZE, IMAGE_SIZE, 3))
        self.labels = jax.random.randint(key_labels, (batch_size,), 0, num_classes)
        self.params = bench_common.random_like(fm.params, seed=0)
        self.opt_state = tx.init(self.params)
        self.num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))
        (device,) = self.images.devices()
        self.device_name = f"{device.platform}: {device.device_kind}"
        self._jax = jax
        start = time.perf_counter()
        lowered = jax.jit(step, donate_argnums=(0, 1)).lower(
            self.params, self.opt_state, self.images, self.labels, self.rng
        )
        self.trace_s = time.perf_counter() - start
        start = time.perf_counter()
        self.step = lowered.compile(compiler_options)
        self.compile_s = time.perf_counter() - start
        self.loss = None

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.params, self.opt_state, self.loss = self.step(
                self.params, self.opt_state, self.images, self.labels, self.rng
            )
        self._jax.block_until_ready((self.params, self.opt_state, self.loss))


class TorchStep:
    """timm's model with torch.optim.AdamW on one fixed batch (NCHW, float32, denormals flushed)."""

    def __init__(
        self, model: str, batch_size: int, num_classes: int, threads: int, device: str = "cpu"
    ):
        import timm
        import torch

        torch.set_num_threads(threads)
        # XLA's CPU code flushes denormals to zero; do the same here so that neither side pays
        # for denormal arithmetic (timm's layer scale starts at 1e-6).
        torch.set_flush_denormal(True)
        if device == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32, as XLA's default on GPU
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
        torch.manual_seed(0)
        _, timm_name, kwargs = cifar_arguments(model)
        self.net = timm.create_model(timm_name, num_classes=num_classes, **kwargs).train()
        self.net.to(device)
        self.opt = torch.optim.AdamW(
            self.net.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY
        )
        self.images = torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
        self.labels = torch.randint(0, num_classes, (batch_size,), device=device)
        self.num_params = sum(p.numel() for p in self.net.parameters())
        self.threads = torch.get_num_threads()
        self.device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        # CUDA kernels run asynchronously: a timed call ends when the GPU is done.
        self._sync = torch.cuda.synchronize if device == "cuda" else lambda: None
        self._f = torch.nn.functional
        self.trace_s = self.compile_s = 0.0  # eager

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.opt.zero_grad(set_to_none=True)
            loss = self._f.cross_entropy(self.net(self.images), self.labels)
            loss.backward()
            self.opt.step()
        self._sync()


def build(config: str, args: argparse.Namespace):
    framework, model, *impl = config.split(":")
    if framework == "flax":
        overrides = json.loads(args.model_overrides)
        impl = impl[0] if impl else None
        xla_options = json.loads(args.xla_options) or None
        return FlaxStep(model, impl, args.batch_size, args.num_classes, overrides, xla_options)
    return TorchStep(
        model, args.batch_size, args.num_classes, bench_common.usable_cpus(), args.device
    )


def check_jax_backend(device: str) -> None:
    """Stops with one clear line if JAX's default backend is not the `--device` asked for."""
    import jax

    try:
        backend = jax.default_backend()
    except RuntimeError as e:  # JAX_PLATFORMS names a backend JAX cannot start
        backend = f"no backend ({e})"
    if backend != JAX_BACKEND[device]:
        raise SystemExit(
            f"--device {device}: JAX runs on {backend!r}; set JAX_PLATFORMS={device} before "
            f"JAX starts (the subprocesses do; --in-process cannot), and for cuda install "
            f"JAX's CUDA plugin: pip install 'jax[cuda13]'"
        )


def run_configs(configs: Sequence[str], args: argparse.Namespace) -> dict[str, Any]:
    """Build every config (compile + one warm-up step), then time them round-robin."""
    if any(c.startswith("flax:") for c in configs):
        check_jax_backend(args.device)
    steps, results = {}, {}
    for config in configs:
        rss_before = bench_common.peak_rss_mib()
        start = time.perf_counter()
        step = build(config, args)
        step.run(1)  # warm-up: first execution, allocations
        results[config] = {
            "framework": config.split(":")[0],
            "model": config.split(":")[1],
            "depthwise_impl": config.split(":")[2] if config.count(":") == 2 else None,
            "device": step.device_name,
            "num_params": step.num_params,
            "trace_s": step.trace_s,
            "compile_s": step.compile_s,
            "trace_and_compile_s": step.trace_s + step.compile_s,
            "setup_and_first_step_s": time.perf_counter() - start,
            "peak_rss_mib_after_setup": bench_common.peak_rss_mib(),
            "peak_rss_growth_mib": bench_common.peak_rss_mib() - rss_before,
        }
        if isinstance(step, TorchStep):
            results[config]["torch_threads"] = step.threads
        steps[config] = step
        print(f"  built {config} in {results[config]['setup_and_first_step_s']:.1f} s", flush=True)
    if args.repeats > 0:
        times = bench_common.time_interleaved(
            {c: (lambda s=s: s.run(args.steps)) for c, s in steps.items()},
            repeats=args.repeats,
            warmup=0,  # the warm-up step ran above
        )
        for config, t in times.items():
            rates = [args.steps * args.batch_size / w for w in t["wall_s"]]
            cpu_rates = [args.steps * args.batch_size / c for c in t["cpu_s"]]
            results[config]["images_per_s"] = bench_common.summarize(rates)
            results[config]["images_per_cpu_s"] = bench_common.summarize(cpu_rates)
            results[config]["step_s_median"] = float(np.median(t["wall_s"])) / args.steps
    return {
        "results": results,
        "process_peak_rss_mib": bench_common.peak_rss_mib(),
        "load_average_at_end": bench_common.load_average(),
    }


# ----------------------------------------------------------------------------------------------
# Orchestration: one subprocess per model (or per config with --isolate-memory)


def _child_argv(args: argparse.Namespace, configs: Sequence[str], out: str, **overrides):
    settings = {
        "--batch-size": args.batch_size,
        "--steps": args.steps,
        "--repeats": args.repeats,
        "--num-classes": args.num_classes,
        "--model-overrides": args.model_overrides,
        "--xla-options": args.xla_options,
        "--threads": args.threads,
        "--device": args.device,
        **overrides,
    }
    argv = [
        sys.executable,
        "-m",
        "lpwd_optax.experiments.benchmarks.bench_train_step",
        "--child",
        ",".join(configs),
    ]
    for flag, value in settings.items():
        argv += [flag, str(value)]
    return [*argv, "--out", out]


def run_in_subprocess(args: argparse.Namespace, configs: Sequence[str], **overrides) -> dict:
    env = dict(os.environ, JAX_PLATFORMS=args.device)  # JAX's backend, before it starts
    if args.omp_passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    if args.retain_freed_memory:
        env.update(RETAIN_FREED_MEMORY_ENV)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "child.json")
        argv = _child_argv(args, configs, out, **overrides)
        if subprocess.run(argv, env=env).returncode:  # report the others anyway
            print(f"FAILED: {' '.join(argv)}", flush=True)
            return {"results": {}, "error": f"subprocess for {configs} failed"}
        return json.loads(Path(out).read_text())


def input_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    from lpwd_optax.experiments import data
    from lpwd_optax.experiments.benchmarks import bench_input

    ds = data.load_dataset("digits", split="train")
    out = {"dataset": "digits", "num_images": len(ds), "batch_size": args.batch_size}
    for prefetch in (0, 2):
        rate, cpu_rate = bench_input.images_per_second(
            ds,
            args.batch_size,
            prefetch,
            repeats=max(args.repeats, 1),
            min_images=args.input_images,
        )
        out[f"images_per_s_prefetch{prefetch}"] = rate
        out[f"images_per_cpu_s_prefetch{prefetch}"] = cpu_rate
    return out


def summarize_models(report: dict[str, Any]) -> None:
    """Adds Flax/timm ratios, the compile target and the input-pipeline ratios in place."""
    results = report["results"]
    for r in results.values():
        if r["framework"] != "flax" or "images_per_s" not in r:
            continue
        torch_result = results.get(f"torch:{r['model']}")
        if torch_result and "images_per_s" in torch_result:
            r["vs_timm"] = r["images_per_s"]["median"] / torch_result["images_per_s"]["median"]
            # Best sample against best sample: the least disturbed by other processes.
            r["vs_timm_best"] = r["images_per_s"]["max"] / torch_result["images_per_s"]["max"]
            r["vs_timm_cpu"] = (
                r["images_per_cpu_s"]["median"] / torch_result["images_per_cpu_s"]["median"]
            )
            r["meets_throughput_target"] = r["vs_timm"] >= THROUGHPUT_TARGET
        if r["model"] == "convnext_tiny":
            r["meets_compile_target"] = r["trace_and_compile_s"] < COMPILE_TARGET_S
        conv = results.get(f"flax:{r['model']}:conv")
        if r["depthwise_impl"] not in (None, "conv") and conv and "images_per_s" in conv:
            r["vs_native_conv"] = r["images_per_s"]["median"] / conv["images_per_s"]["median"]
    pipeline = report.get("input_pipeline")
    if pipeline:
        ratios = {}
        for config, r in results.items():
            if r["framework"] == "flax" and "images_per_s" in r:
                train_rate = r["images_per_s"]["median"]
                ratios[config] = {
                    f"prefetch{p}": pipeline[f"images_per_s_prefetch{p}"] / train_rate
                    for p in (0, 2)
                }
        pipeline["ratio_to_train_step"] = ratios
        pipeline["meets_target"] = all(min(v.values()) >= INPUT_TARGET for v in ratios.values())


def print_report(report: dict[str, Any]) -> None:
    headers = [
        "config",
        "device",
        "params",
        "images/s",
        "vs timm",
        "best/best",
        "(cpu-time)",
        "vs conv",
        "compile s",
        "peak RSS MiB",
    ]
    rows = []
    for config, r in report["results"].items():
        rate = r.get("images_per_s", {}).get("median")
        rows.append(
            [
                config,
                r.get("device"),
                f"{r['num_params'] / 1e6:.2f}M",
                rate,
                r.get("vs_timm"),
                r.get("vs_timm_best"),
                r.get("vs_timm_cpu"),
                r.get("vs_native_conv"),
                r["trace_and_compile_s"] if r["framework"] == "flax" else None,
                r.get("isolated_peak_rss_mib", r["peak_rss_mib_after_setup"]),
            ]
        )
    m = report["machine"]
    print(
        f"\n{report['device']}: batch {report['batch_size']}, "
        f"{report['steps']} steps x {report['repeats']} repeats "
        f"(median); {m['cpus_usable']} CPUs ({m['cpu']}), XLA and torch threads "
        f"{report['threads']} (OMP_WAIT_POLICY {report['torch_omp_wait_policy']}); "
        f"load at start {m['load_average_1_5_15min']}"
    )
    if report.get("malloc_env"):
        print(f"malloc settings (both frameworks): {report['malloc_env']}")
    if report.get("xla_options"):
        print(f"XLA compiler options for the Flax steps: {report['xla_options']}")
    print(bench_common.format_table(headers, rows))
    if not report["torch_available"]:
        print("torch/timm not installed: Flax figures only.")
    pipeline = report.get("input_pipeline")
    if pipeline:
        print(
            f"input pipeline (digits, batch {pipeline['batch_size']}): "
            f"{pipeline['images_per_s_prefetch0']:,.0f} images/s on demand, "
            f"{pipeline['images_per_s_prefetch2']:,.0f} with prefetch"
        )
        for config, ratio in pipeline["ratio_to_train_step"].items():
            print(
                f"  vs {config}: {ratio['prefetch0']:.1f}x on demand, "
                f"{ratio['prefetch2']:.1f}x prefetched (target >= {INPUT_TARGET:g}x)"
            )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument(
        "--device",
        default="cpu",
        choices=DEVICES,
        help="where both frameworks run: cpu, or cuda (the first GPU; JAX needs jax[cuda13])",
    )
    parser.add_argument(
        "--depthwise",
        nargs="+",
        default=["auto", "shift", "conv"],
        choices=["shift", "conv", "auto"],
        help="ConvNeXt depthwise impls",
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="train steps per timed sample")
    parser.add_argument("--repeats", type=int, default=3, help="timed samples (median)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument(
        "--model-overrides",
        default="{}",
        help="JSON constructor arguments for the Flax models only (needs --no-torch), "
        'e.g. \'{"dims": [8], "depths": [1]}\' for a smoke test',
    )
    parser.add_argument(
        "--xla-options",
        default="{}",
        help="JSON XLA compiler options for the Flax steps (`Lowered.compile`), e.g. "
        '\'{"xla_cpu_experimental_ynn_fusion_type": ""}\' for XLA\'s Eigen matmuls',
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPUs for both frameworks (0: all usable). Each model's subprocess is restricted "
        "to the first N usable CPUs before XLA starts, so XLA's thread pool and "
        "torch.set_num_threads both get N",
    )
    parser.add_argument(
        "--omp-passive",
        action="store_true",
        help="OMP_WAIT_POLICY=PASSIVE for PyTorch's OpenMP threads (a fairer timm figure on a "
        "machine shared with other processes, where spinning threads stall each other)",
    )
    parser.add_argument(
        "--retain-freed-memory",
        action="store_true",
        help="glibc malloc keeps freed memory for reuse (both frameworks, in the subprocesses): "
        "no page faults on each step's temporaries; see RETAIN_FREED_MEMORY_ENV",
    )
    parser.add_argument("--no-torch", action="store_true", help="skip timm even if installed")
    parser.add_argument(
        "--with-input",
        action="store_true",
        help="also measure the digits input pipeline and its ratio",
    )
    parser.add_argument(
        "--input-images", type=int, default=20_000, help="images per timed input-pipeline pass"
    )
    parser.add_argument(
        "--isolate-memory",
        action="store_true",
        help="exact peak RSS: each config alone in a subprocess (1 step)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run every model in this process (no subprocesses)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="convnext_atto only, batch 32, 2 steps x 2 repeats"
    )
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: configs for a subprocess
    args = parser.parse_args(argv)
    if args.device == "cuda" and not args.child and not _cuda_available():
        parser.error("--device cuda: torch sees no CUDA device (torch.cuda.is_available())")
    if args.retain_freed_memory and args.in_process:
        parser.error("--retain-freed-memory sets the subprocesses' environment: drop --in-process")
    if json.loads(args.model_overrides) and not args.no_torch and not args.child:
        parser.error("--model-overrides changes the Flax models only: add --no-torch")
    if args.quick:
        args.models, args.batch_size, args.steps, args.repeats = ["convnext_atto"], 32, 2, 2
        args.input_images = min(args.input_images, 5_000)
    return args


def restrict_cpus(threads: int) -> None:
    """Use only the first `threads` usable CPUs (before XLA starts: it sizes its pool from them)."""
    if threads and hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, cpus[:threads])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    machine = bench_common.machine_info()  # before any restriction: the whole machine
    restrict_cpus(args.threads)
    if args.child:  # a subprocess started below: run its configs, write raw results
        report = run_configs(args.child.split(","), args)
        bench_common.write_json(args.out, report)
        return report

    start = time.perf_counter()
    with_torch = not args.no_torch and _torch_available()
    report: dict[str, Any] = {
        "benchmark": "train_step_throughput",
        "batch_size": args.batch_size,
        "image_size": IMAGE_SIZE,
        "steps": args.steps,
        "repeats": args.repeats,
        "dtype": "float32",
        "optimizer": f"AdamW(lr={LEARNING_RATE}, weight_decay={WEIGHT_DECAY})",
        "model_overrides": json.loads(args.model_overrides),
        "xla_options": json.loads(args.xla_options),
        "device": args.device,
        "threads": bench_common.usable_cpus(),
        "torch_omp_wait_policy": "PASSIVE"
        if args.omp_passive
        else os.environ.get("OMP_WAIT_POLICY", "default"),
        "malloc_env": RETAIN_FREED_MEMORY_ENV if args.retain_freed_memory else {},
        "torch_available": with_torch,
        "machine": machine,
        "results": {},
        "processes": {},
    }
    for model in args.models:
        configs = configurations(model, args.depthwise, with_torch)
        print(f"{model}: {', '.join(configs)}", flush=True)
        if args.in_process:
            out = run_configs(configs, args)
        else:
            out = run_in_subprocess(args, configs)
        report["results"].update(out["results"])
        report["processes"][model] = {k: v for k, v in out.items() if k != "results"}
        if args.isolate_memory:
            for config in configs:
                alone = run_in_subprocess(args, [config], **{"--repeats": 0})
                if config not in alone["results"] or config not in report["results"]:
                    continue
                report["results"][config]["isolated_peak_rss_mib"] = alone["process_peak_rss_mib"]
                report["results"][config]["isolated_trace_and_compile_s"] = alone["results"][
                    config
                ]["trace_and_compile_s"]
        if args.out:  # after each model: a run stopped by a time limit keeps what it measured
            summarize_models(report)
            bench_common.write_json(args.out, report)
    if args.with_input:
        report["input_pipeline"] = input_pipeline(args)
    summarize_models(report)
    report["load_average_at_end"] = bench_common.load_average()
    report["total_wall_s"] = time.perf_counter() - start
    print_report(report)
    if args.out:
        bench_common.write_json(args.out, report)
    return report


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
