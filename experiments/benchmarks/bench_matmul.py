"""The matmuls of a Flax training step, each timed alone in XLA and in PyTorch on the same CPU.

`bench_train_step` compares whole steps. This benchmark splits out the part that the model code
cannot change: the matrix products. It compiles the Flax training step of `--model` (the same
step as `bench_train_step`: forward, backward, AdamW, batch 128, 32x32), reads every `dot` in
XLA's optimized HLO (forward products, and the backward's products for the input and the weight
gradients), and times each distinct product alone, round-robin:

- in XLA: `lax.dot_general` with the same shapes and dimension numbers, jitted, once with
  each of XLA:CPU's matmul libraries (YNNPACK, the default, and Eigen);
- in PyTorch: `torch.einsum` of the same product (it runs on torch's BLAS, `mm`/`bmm`), with
  `torch.set_num_threads` equal to XLA's thread pool and `OMP_WAIT_POLICY=PASSIVE` (unless set
  otherwise), so that torch's idle threads do not spin while XLA's product runs.

It also times both whole steps (the Flax step and timm's, as `bench_train_step` builds them).
The report sums each side's matmul time over one step's products and sets it against the whole
steps. When XLA's matmuls alone take longer than timm's whole step, no change to the rest of the
Flax step can bring its throughput up to timm's: the bound is printed as
`timm step / (XLA matmuls of one step)`, each product counted at its faster XLA library.

A product timed alone is not the same as inside the step (there it may be fused with
element-wise work, and its operands may be in cache), so the per-step sums are estimates; the
XLA/torch ratios on the same product are the figures to trust. Dots inside a while loop are
counted once. timm's whole step runs with the passive OpenMP policy too, which costs it 3-5% on
a quiet machine (see README.md in this folder); set `OMP_WAIT_POLICY=ACTIVE` to time it the
other way.

    python -m lpwd_optax.experiments.benchmarks.bench_matmul --out bench_matmul.json  # swin_tiny
    python -m lpwd_optax.experiments.benchmarks.bench_matmul --model convnext_tiny --no-steps
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import re
import string
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from lpwd_optax.experiments.benchmarks import bench_common, bench_train_step

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?[\w.\-]+\s*\(.*\)\s*->.*\{\s*$")
_DOT_OPERANDS = re.compile(r"\bdot\(([^)]*)\)")
# One operand: `%name`, or `f32[2,3]{1,0} %name` where the printer puts shapes inline.
_OPERAND = re.compile(r"(?:(\w+)\[([\d,]*)\](?:\{[^}]*\})?\s+)?%([\w.\-]+)")


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _attribute(line: str, name: str) -> tuple[int, ...]:
    match = re.search(rf"\b{name}=\{{([\d,]*)\}}", line)
    return _dims(match.group(1)) if match else ()


@dataclasses.dataclass(frozen=True)
class Dot:
    """One `dot` of an HLO module: operand shapes and XLA's dimension numbers."""

    dtype: str
    lhs: tuple[int, ...]
    rhs: tuple[int, ...]
    lhs_batch: tuple[int, ...]
    rhs_batch: tuple[int, ...]
    lhs_contracting: tuple[int, ...]
    rhs_contracting: tuple[int, ...]

    def __post_init__(self):
        if [self.lhs[d] for d in self.lhs_batch] != [self.rhs[d] for d in self.rhs_batch]:
            raise ValueError(f"batch dimensions differ: {self}")
        if [self.lhs[d] for d in self.lhs_contracting] != [
            self.rhs[d] for d in self.rhs_contracting
        ]:
            raise ValueError(f"contracting dimensions differ: {self}")

    @property
    def dimension_numbers(self):
        return (self.lhs_contracting, self.rhs_contracting), (self.lhs_batch, self.rhs_batch)

    @property
    def out(self) -> tuple[int, ...]:
        """XLA's output order: batch dims, then lhs free dims, then rhs free dims."""
        free = lambda shape, used: [n for i, n in enumerate(shape) if i not in used]
        return (
            *(self.lhs[d] for d in self.lhs_batch),
            *free(self.lhs, self.lhs_batch + self.lhs_contracting),
            *free(self.rhs, self.rhs_batch + self.rhs_contracting),
        )

    @property
    def flops(self) -> int:
        return 2 * math.prod(self.out) * math.prod(self.lhs[d] for d in self.lhs_contracting)

    def einsum(self) -> str:
        """The same product as an einsum equation (output in XLA's order)."""
        letters = iter(string.ascii_letters)
        lhs = [next(letters) for _ in self.lhs]
        rhs = [None] * len(self.rhs)
        for lhs_dims, rhs_dims in (
            (self.lhs_batch, self.rhs_batch),
            (self.lhs_contracting, self.rhs_contracting),
        ):
            for i, j in zip(lhs_dims, rhs_dims):
                rhs[j] = lhs[i]
        rhs = [x or next(letters) for x in rhs]
        out = [lhs[d] for d in self.lhs_batch]
        out += [x for i, x in enumerate(lhs) if i not in self.lhs_batch + self.lhs_contracting]
        out += [x for i, x in enumerate(rhs) if i not in self.rhs_batch + self.rhs_contracting]
        return f"{''.join(lhs)},{''.join(rhs)}->{''.join(out)}"

    def label(self) -> str:
        shape = lambda s: "x".join(map(str, s))
        batch = f" batch {self.lhs_batch}" if self.lhs_batch else ""
        return (
            f"[{shape(self.lhs)}] . [{shape(self.rhs)}] over lhs {self.lhs_contracting} "
            f"rhs {self.rhs_contracting}{batch}"
        )


def dots_in_hlo(text: str) -> collections.Counter[Dot]:
    """Every `dot` instruction of an HLO module's text, with how many times it appears.

    Operand shapes come from the operands' defining instructions in the same computation (or
    from shapes printed inline with the operands, where the HLO printer adds them).
    """
    found: collections.Counter[Dot] = collections.Counter()
    shapes: dict[str, tuple[str, tuple[int, ...]]] = {}
    for line in text.splitlines():
        if _COMPUTATION.match(line):
            shapes = {}
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        shapes[match.group(1)] = (match.group(2), _dims(match.group(3)))
        operands = _DOT_OPERANDS.search(line)
        if not operands:
            continue
        operand_shapes = []
        for dtype, dims, name in _OPERAND.findall(operands.group(1)):
            if dtype:
                operand_shapes.append((dtype, _dims(dims)))
            elif name in shapes:
                operand_shapes.append(shapes[name])
            else:
                raise ValueError(f"dot operand {name!r} has no shape in: {line.strip()}")
        (dtype, lhs), (_, rhs) = operand_shapes
        found[
            Dot(
                dtype,
                lhs,
                rhs,
                _attribute(line, "lhs_batch_dims"),
                _attribute(line, "rhs_batch_dims"),
                _attribute(line, "lhs_contracting_dims"),
                _attribute(line, "rhs_contracting_dims"),
            )
        ] += 1
    return found


# ----------------------------------------------------------------------------------------------
# Timing


# XLA:CPU's two matmul libraries: YNNPACK (the default) and, with YNNPACK's fusions turned off,
# Eigen. The option applies to a whole compilation, so a step gets one or the other.
XLA_LIBRARIES = {"xla": None, "xla_eigen": {"xla_cpu_experimental_ynn_fusion_type": ""}}


def _xla_dot(dot: Dot, options: dict[str, Any] | None):
    import jax

    rng = np.random.default_rng(0)
    lhs = jax.device_put(rng.standard_normal(dot.lhs, np.float32))
    rhs = jax.device_put(rng.standard_normal(dot.rhs, np.float32))
    fn = jax.jit(lambda a, b: jax.lax.dot_general(a, b, dot.dimension_numbers))
    compiled = fn.lower(lhs, rhs).compile(options)
    return lambda: compiled(lhs, rhs).block_until_ready()


def _torch_dot(dot: Dot):
    import torch

    gen = torch.Generator().manual_seed(0)
    lhs = torch.randn(dot.lhs, generator=gen)
    rhs = torch.randn(dot.rhs, generator=gen)
    equation = dot.einsum()
    return lambda: torch.einsum(equation, lhs, rhs)


def time_dots(
    dots: collections.Counter[Dot], repeats: int, with_torch: bool
) -> list[dict[str, Any]]:
    """Median seconds per call of each distinct dot, XLA and torch timed round-robin."""
    rows = []
    for i, (dot, count) in enumerate(sorted(dots.items(), key=lambda kv: -kv[0].flops * kv[1])):
        runs = {name: _xla_dot(dot, options) for name, options in XLA_LIBRARIES.items()}
        if with_torch:
            runs["torch"] = _torch_dot(dot)
        times = bench_common.time_interleaved(runs, repeats=repeats, warmup=2)
        row = {
            "dot": dot.label(),
            "einsum": dot.einsum(),
            "count_per_step": count,
            "gflop": dot.flops / 1e9,
            **{f"{k}_s": float(np.median(t["wall_s"])) for k, t in times.items()},
        }
        row["xla_best_s"] = min(row[f"{name}_s"] for name in XLA_LIBRARIES)
        if with_torch:
            row["xla_vs_torch_time"] = row["xla_s"] / row["torch_s"]
            row["xla_best_vs_torch_time"] = row["xla_best_s"] / row["torch_s"]
        rows.append(row)
        print(f"  {i + 1}/{len(dots)} {row['dot']}", flush=True)
    return rows


def time_steps(
    flax_step: bench_train_step.FlaxStep, args: argparse.Namespace, with_torch: bool
) -> dict[str, Any]:
    """Whole training steps, Flax and timm, as `bench_train_step` builds them."""
    steps: dict[str, Any] = {"flax": flax_step}
    if with_torch:
        steps["timm"] = bench_train_step.TorchStep(
            args.model, args.batch_size, args.num_classes, bench_common.usable_cpus()
        )
    for step in steps.values():
        step.run(1)
    times = bench_common.time_interleaved(
        {k: (lambda s=s: s.run(1)) for k, s in steps.items()}, repeats=args.step_repeats
    )
    return {f"{k}_step_s": float(np.median(t["wall_s"])) for k, t in times.items()}


# ----------------------------------------------------------------------------------------------
# Report


def summarize(report: dict[str, Any]) -> None:
    """Per-step sums of the matmul times and the bound they put on the step ratio, in place."""
    rows = report["dots"]
    totals = report["totals"] = {
        "dots_per_step": sum(r["count_per_step"] for r in rows),
        "gflop_per_step": sum(r["gflop"] * r["count_per_step"] for r in rows),
        **{
            f"{name}_matmul_s_per_step": sum(r[f"{name}_s"] * r["count_per_step"] for r in rows)
            for name in (*XLA_LIBRARIES, "xla_best")
        },
    }
    if report["torch_available"]:
        totals["torch_matmul_s_per_step"] = sum(r["torch_s"] * r["count_per_step"] for r in rows)
        for name in (*XLA_LIBRARIES, "xla_best"):
            totals[f"{name}_vs_torch_matmul_time"] = (
                totals[f"{name}_matmul_s_per_step"] / totals["torch_matmul_s_per_step"]
            )
    steps = report.get("steps", {})
    if "timm_step_s" in steps:
        # Flax images/s over timm's if everything but XLA's matmuls took no time at all, and each
        # product ran on the faster of XLA's two libraries (a step cannot mix them).
        totals["throughput_ratio_bound"] = (
            steps["timm_step_s"] / totals["xla_best_matmul_s_per_step"]
        )
        totals["throughput_ratio_measured"] = steps["timm_step_s"] / steps["flax_step_s"]


def print_report(report: dict[str, Any]) -> None:
    torch_ok = report["torch_available"]
    headers = ["product", "per step", "GFLOP", "XLA ms", "XLA Eigen ms", "torch ms"]
    headers += ["XLA/torch", "best XLA/torch", "XLA GFLOP/s"]
    rows = [
        [
            r["dot"],
            r["count_per_step"],
            r["gflop"],
            1e3 * r["xla_s"],
            1e3 * r["xla_eigen_s"],
            1e3 * r["torch_s"] if torch_ok else None,
            r.get("xla_vs_torch_time"),
            r.get("xla_best_vs_torch_time"),
            r["gflop"] / r["xla_s"],
        ]
        for r in report["dots"]
    ]
    m = report["machine"]
    print(
        f"\n{report['model']}, batch {report['batch_size']}: the {len(rows)} distinct products of "
        f"one training step; median of {report['repeats']} calls each; {m['cpus_usable']} CPUs "
        f"({m['cpu']}), threads {report['threads']}; load at start {m['load_average_1_5_15min']}"
    )
    print(bench_common.format_table(headers, rows))
    t = report["totals"]
    print(f"one step's {t['dots_per_step']} products ({t['gflop_per_step']:.1f} GFLOP):")
    for name, what in (
        ("xla", "XLA (YNNPACK, the default)"),
        ("xla_eigen", "XLA (Eigen)"),
        ("xla_best", "XLA, the faster library per product"),
    ):
        ratio = f" ({t[f'{name}_vs_torch_matmul_time']:.2f}x torch)" if torch_ok else ""
        print(f"  {what}: {t[f'{name}_matmul_s_per_step']:.3f} s{ratio}")
    if torch_ok:
        print(f"  torch: {t['torch_matmul_s_per_step']:.3f} s")
    steps = report.get("steps", {})
    if steps:
        line = f"whole steps: Flax {steps['flax_step_s']:.3f} s"
        if "timm_step_s" in steps:
            line += (
                f", timm {steps['timm_step_s']:.3f} s: Flax/timm throughput "
                f"{t['throughput_ratio_measured']:.2f}; at most "
                f"{t['throughput_ratio_bound']:.2f} if all but XLA's matmuls took no time "
                "(each on its faster library)"
            )
        print(line)
    if not torch_ok:
        print("torch not installed: XLA figures only.")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="swin_tiny", choices=bench_train_step.DEFAULT_MODELS)
    parser.add_argument(
        "--depthwise", default="auto", help="ConvNeXt's depthwise impl (its dots differ)"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per product")
    parser.add_argument("--step-repeats", type=int, default=3, help="timed whole steps")
    parser.add_argument("--no-steps", action="store_true", help="skip the whole-step timing")
    parser.add_argument("--no-torch", action="store_true", help="skip torch even if installed")
    parser.add_argument(
        "--model-overrides",
        default="{}",
        help="JSON constructor arguments for the Flax model (timm's step then differs: needs "
        "--no-steps or --no-torch)",
    )
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.model_overrides != "{}" and not (args.no_torch or args.no_steps):
        parser.error("--model-overrides changes the Flax model only: add --no-steps")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    # Before torch starts its OpenMP threads: idle ones sleep instead of spinning, so they do not
    # take the CPUs from the XLA call timed next (bench_train_step's --omp-passive).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with_torch = not args.no_torch and bench_train_step._torch_available()
    machine = bench_common.machine_info()
    start = time.perf_counter()
    impl = args.depthwise if args.model.startswith("convnext") else None
    if with_torch:
        import torch

        # XLA's pool is sized the same. (Random normal operands have no denormals, so unlike
        # TorchStep this does not flush them: that would change the process's FPU state.)
        torch.set_num_threads(bench_common.usable_cpus())
    flax_step = bench_train_step.FlaxStep(
        args.model, impl, args.batch_size, args.num_classes, json.loads(args.model_overrides)
    )
    dots = dots_in_hlo(flax_step.step.as_text())
    if not dots:
        raise RuntimeError(f"no dot instructions in the compiled {args.model} step")
    report: dict[str, Any] = {
        "benchmark": "train_step_matmuls",
        "model": args.model,
        "depthwise_impl": impl,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "threads": bench_common.usable_cpus(),
        "torch_omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "torch_available": with_torch,
        "machine": machine,
    }
    if not args.no_steps:
        report["steps"] = time_steps(flax_step, args, with_torch)
    print(f"{args.model}: timing {len(dots)} distinct products", flush=True)
    report["dots"] = time_dots(dots, args.repeats, with_torch)
    summarize(report)
    report["wall_s"] = time.perf_counter() - start
    report["load_average_at_end"] = bench_common.load_average()
    print_report(report)
    if args.out:
        bench_common.write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
