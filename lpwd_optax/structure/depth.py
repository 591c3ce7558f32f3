"""Depth: the number of layers on the longest path from the input, read off the dataflow.

The walker writes the forward pass as a small program over depths: `Flow` (a value's depth
is the largest of its inputs'), `Reads` (an equation that reads params: each layer it reads
takes, at its first read, one more than the deepest input) and `Loop` (a body run once per
step, so that slice `i` of a stacked leaf is read at step `i`). Running it assigns every
layer its depth, so parallel layers (q, k and v) share one, whether fused or not, and two
kernels used one after the other are two layers even inside one module.

Each leaf (one slice of a stacked leaf) is a layer, except a bias or a scale that reads the
output of the layer its own module read last, and nothing deeper: it belongs to that layer (a
Dense's bias to its kernel, a norm's bias to its scale). With `rules`, each rule's group of
leaves is one layer instead.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lpwd_optax.structure.counters import Steps
from lpwd_optax.structure.paths import module_path, natural_path_key


@dataclasses.dataclass(frozen=True)
class Flow:
    out: int
    ins: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Reads:
    out: int
    ins: tuple[int, ...]
    uses: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Loop:
    """`steps` runs of `body` (None: until its depths settle), the carry going from
    `carry_out` back to `carry_in`, from `init` to `final`; `ys` the largest over steps.
    `varying`: whether a read in the body moves with the steps (a stacked leaf's slices)."""

    level: int
    steps: int | None
    body: list
    carry_in: tuple[int | None, ...]
    init: tuple[int | None, ...]
    carry_out: tuple[int | None, ...]
    final: tuple[int | None, ...]
    ys_in: tuple[int | None, ...]
    ys_out: tuple[int | None, ...]
    varying: bool


class _Run:
    """Runs a depth program; `depth[node]` for every layer read."""

    def __init__(self, uses: Sequence[Any], layouts: Sequence[Any], group_of: Callable | None):
        self.uses, self.layouts, self.group_of = uses, layouts, group_of
        self.depth: dict[Any, int] = {}
        self.node_of: dict[tuple[int, tuple[int, ...]], Any] = {}
        self.last_layer: dict[str, Any] = {}  # module -> the layer it read last

    def node(self, u: int, step: dict[int, int], before: int) -> Any:
        """The layer use `u` reads at `step` (its input `before` deep), or None where it
        reads none."""
        view = self.uses[u].view
        offset = view.offset.at(step) if isinstance(view.offset, Steps) else view.offset
        if offset < 0:
            return None
        layout = self.layouts[view.leaf]
        key = ()
        if layout.stacked_axes:
            index = np.unravel_index(int(offset), view.leaf_shape)
            key = tuple(int(index[a]) for a in layout.stacked_axes)
        module = module_path(layout.path)
        found = self.node_of.get((view.leaf, key))
        if found is None:
            last = self.last_layer.get(module)
            if self.group_of is not None:
                found = ("rule", self.group_of(layout.path), key)
            elif layout.role not in ("kernel", "embedding") and last and self.depth[last] >= before:
                found = last  # a bias or scale on its module's last layer's output
            else:
                found = ("leaf", view.leaf, key)
            self.node_of[(view.leaf, key)] = found
        self.last_layer[module] = found
        return found

    def run(self, program: list, env: dict[int, int], step: dict[int, int]) -> None:
        for op in program:
            if isinstance(op, Loop):
                self.loop(op, env, step)
                continue
            ins = [env[i] for i in op.ins if i in env]
            if isinstance(op, Flow):
                if ins:
                    env[op.out] = max(ins)
                continue
            before = max(ins, default=0)
            depths = ins
            for u in op.uses:
                node = self.node(u, step, before)
                if node is not None:
                    depths.append(self.depth.setdefault(node, before + 1))
            if depths:
                env[op.out] = max(depths)

    def loop(self, op: Loop, env: dict[int, int], step: dict[int, int]) -> None:
        carry = [env.get(s) for s in op.init]
        ys: dict[int, int] = {}
        seen = set()
        for s in itertools.count() if op.steps is None else range(op.steps):
            if not op.varying:  # each step the same reads: it settles once the carry repeats
                if tuple(carry) in seen:
                    break
                seen.add(tuple(carry))
            step[op.level] = s
            for slot, d in zip(op.carry_in, carry):
                if slot is not None:
                    env.pop(slot, None) if d is None else env.__setitem__(slot, d)
            self.run(op.body, env, step)
            carry = [env.get(s) for s in op.carry_out]
            for y_in, y_out in zip(op.ys_in, op.ys_out):
                if y_in in env and y_out is not None:
                    ys[y_out] = max(ys.get(y_out, 0), env[y_in])
        step.pop(op.level, None)
        env.update(ys)
        env.update((f, d) for f, d in zip(op.final, carry) if f is not None and d is not None)


def depths(
    program: list,
    inputs: Sequence[int],
    uses: Sequence[Any],
    layouts: Sequence[Any],
    group_of: Callable[[str], Any] | None,
    caller: str,
) -> list[Any]:
    """Every leaf's depth: an int, or an int array over its stacked axes. Slices and leaves
    the forward pass never reads get the depth after the last, with a warning."""
    runner = _Run(uses, layouts, group_of)
    runner.run(program, dict.fromkeys(inputs, 0), {})
    if not runner.depth:
        raise ValueError(
            f"{caller}: apply_fn used none of the params in its forward pass; check that it "
            "reads them from its first argument."
        )
    last = max(runner.depth.values()) + 1
    out, unused = [], []
    for i, layout in enumerate(layouts):
        sizes = [layout.shape[a] for a in layout.stacked_axes]
        found = np.full(sizes, last, np.int64)
        for key in itertools.product(*map(range, sizes)):
            node = runner.node_of.get((i, key))
            if node is None:
                index = f"[{','.join(map(str, key))}]" if key else ""
                unused.append(layout.path + index)
            else:
                found[key] = runner.depth[node]
        if layout.stacked_axes:
            shape = [n if a in layout.stacked_axes else 1 for a, n in enumerate(layout.shape)]
            out.append(found.reshape(shape))
        else:
            out.append(int(found))
    if unused:
        names = sorted(unused, key=natural_path_key)
        warnings.warn(
            f"{caller}: apply_fn never used {len(names)} params (e.g. "
            f"{', '.join(names[:3])}); they get the last label {last}.",
            stacklevel=5,
        )
    return out
