"""Loop counters: values that depend on nothing but the steps of the loops around them.

A `fori_loop`'s counter, a scan over `jnp.arange(L)`, a `while_loop` that counts `i < L`, and
the index arithmetic on them (`2 * j + i`, `L - 1 - i`) are known at every step. The walker
evaluates them step by step, so that `w[i]` is a view whose offset moves with the steps (the
`b` of the view rule). Constants the model closes over are evaluated the same way, when small.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core as jex_core
import numpy as np

# Constants of at most this many entries are evaluated, and loops of at most this many steps
# (nested loops' steps counted together) are followed step by step.
MAX_STEPS = 1024
UNKNOWN = "a constant not evaluated"
LOOP = "a value that moves with loop steps the trace does not count"


@dataclasses.dataclass(frozen=True, eq=False)
class Steps:
    """A value that moves with the steps of the nested loops `levels` (outermost first):
    `values[s1, ..., sm]` is its value at their steps."""

    levels: tuple[int, ...]
    values: np.ndarray

    def at(self, step: dict[int, int]) -> Any:
        return self.values[tuple(step[level] for level in self.levels)]


def on_grid(values: Sequence[Any]) -> tuple[tuple[int, ...], list[np.ndarray]]:
    """Values, some of them `Steps`, broadcast on the grid of all their loops' steps."""
    sizes: dict[int, int] = {}
    for v in values:
        if isinstance(v, Steps):
            sizes.update(zip(v.levels, v.values.shape))
    levels = tuple(sorted(sizes))
    grid = tuple(sizes[level] for level in levels)
    out = []
    for v in values:
        if isinstance(v, Steps):
            rest = v.values.shape[len(v.levels) :]
            shape = [sizes[level] if level in v.levels else 1 for level in levels]
            out.append(np.broadcast_to(v.values.reshape(*shape, *rest), grid + rest))
        else:
            out.append(np.broadcast_to(np.asarray(v), grid + np.shape(v)))
    return levels, out


def steps_of(levels: tuple[int, ...], values: Any) -> Any:
    """`values` over the steps of `levels`: a `Steps`, or a plain value where there are none."""
    return Steps(levels, np.asarray(values)) if levels else values


def is_known(x: Any) -> bool:
    """An evaluated constant (the walker keeps them as numpy values)."""
    return isinstance(x, (np.ndarray, np.generic))


def moves(x: Any) -> bool:
    return x is LOOP or isinstance(x, Steps)


def _is_index(dtype: Any) -> bool:
    return np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.bool_)


def evaluate(eqn: Any, values: Sequence[Any]) -> list[Any] | None:
    """The outputs of an equation of index arithmetic whose inputs are all constants, step by
    step where some move with loops; None where they are not evaluated."""
    if any(v is UNKNOWN or v is LOOP for v in values):
        return None
    if not all(_is_index(v.aval.dtype) for v in eqn.outvars):
        return None  # only indices are ever read off a constant
    levels, columns = on_grid([v for v in values if isinstance(v, Steps)])
    if levels:
        grid = columns[0].shape[: len(levels)]
        if math.prod(grid) > MAX_STEPS:
            return None
        points = []
        for point in np.ndindex(grid):
            at = dict(zip(levels, point))
            outs = evaluate(eqn, [v.at(at) if isinstance(v, Steps) else v for v in values])
            if outs is None:
                return None
            points.append(outs)
        return [Steps(levels, np.stack(o).reshape(grid + np.shape(o[0]))) for o in zip(*points)]
    if any(math.prod(v.aval.shape) > MAX_STEPS for v in [*eqn.invars, *eqn.outvars]):
        return None
    try:
        with jax.ensure_compile_time_eval():
            inner = eqn.params.get("jaxpr")
            if isinstance(inner, jex_core.ClosedJaxpr) and eqn.primitive.name in ("jit", "pjit"):
                outs = jax.core.eval_jaxpr(inner.jaxpr, inner.consts, *values)
            elif sub_jaxprs(eqn):
                return None
            else:
                outs = eqn.primitive.bind(*values, **eqn.params)
                outs = outs if eqn.primitive.multiple_results else [outs]
            return [np.asarray(o) for o in outs]
    except Exception:  # anything not evaluable here stays an unknown constant
        return None


_CALLS: dict[str, bool] = {}  # primitive -> whether it calls jaxprs


def sub_jaxprs(eqn: Any) -> list[jex_core.Jaxpr]:
    """The jaxprs an equation calls (a jit's, a remat's, cond's branches, a scan's body)."""
    if _CALLS.get(eqn.primitive.name) is False:
        return []
    found = []
    for value in eqn.params.values():
        for x in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(x, jex_core.ClosedJaxpr):
                found.append(x.jaxpr)
            elif isinstance(x, jex_core.Jaxpr):
                found.append(x)
    _CALLS[eqn.primitive.name] = _CALLS.get(eqn.primitive.name) or bool(found)
    return found


def function_of(jaxpr: Any, out: int, var: Any, known: dict) -> Callable[[Any], Any] | None:
    """Output `out` of `jaxpr` as a function of its input `var` alone (the inputs in `known`
    held at their values): a counter's update, or a `while_loop`'s test of it. None if it
    needs any other input; the function returns None where a step is not evaluated."""
    is_literal = lambda v: isinstance(v, jex_core.Literal)
    target = jaxpr.outvars[out]
    needed, wanted = [], set() if is_literal(target) else {target}
    for eqn in reversed(jaxpr.eqns):
        if any(o in wanted for o in eqn.outvars):
            needed.append(eqn)
            wanted.update(v for v in eqn.invars if not is_literal(v))
    produced = {o for eqn in needed for o in eqn.outvars}
    if any(v not in produced and v is not var and v not in known for v in wanted):
        return None

    def f(x: Any) -> Any:
        env = {**known, var: x}
        for eqn in reversed(needed):
            outs = evaluate(eqn, [v.val if is_literal(v) else env[v] for v in eqn.invars])
            if outs is None:
                return None
            env.update(zip(eqn.outvars, outs))
        return np.asarray(target.val if is_literal(target) else env[target])

    return f


def is_counter(var: Any, init: Any) -> bool:
    return is_known(init) and var.aval.shape == () and np.issubdtype(var.aval.dtype, np.integer)


def counter_values(
    update: Callable[[Any], Any] | None,
    init: Any,
    length: int | None = None,
    test: Callable[[Any], Any] | None = None,
) -> np.ndarray | None:
    """A counter's values step by step from `init`: `length` steps, or while `test` holds
    (a `while_loop`), at most `MAX_STEPS`; None where they are not known."""
    if update is None or (length or 0) > MAX_STEPS:
        return None
    values, x = [], np.asarray(init)
    while len(values) < (MAX_STEPS + 1 if length is None else length):
        if test is not None:
            going = test(x)
            if going is None:
                return None
            if not bool(going):
                break
        values.append(x)
        x = update(x)
        if x is None and (length is None or len(values) < length):
            return None
    if not values or len(values) > MAX_STEPS:
        return None
    return np.stack(values)
