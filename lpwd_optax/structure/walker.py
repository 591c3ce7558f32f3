"""The walker: one pass over the forward pass's jaxpr, in execution order.

It follows each param leaf through its views (`views`) into calls, conds and loops, records
every use of a view by a primitive that is not a view (`roles.use_of` says what it makes the
leaf), and writes how data flows between those uses as the program `depth` runs. A value is
`Pieces` (views of params), `Data` (computed from the inputs: a slot of the depth program),
or a constant (`counters`: a numpy value, `Steps` that move with loops, or unknown).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.extend.core as jex_core
import numpy as np

from lpwd_optax.structure import counters, views
from lpwd_optax.structure.counters import LOOP, UNKNOWN, Steps
from lpwd_optax.structure.depth import Flow, Loop, Reads
from lpwd_optax.structure.roles import Use, use_of
from lpwd_optax.structure.views import Pieces, View

# Primitives whose output is their operand, entry for entry.
IDENTITY = frozenset(
    "bitcast_convert_type convert_element_type copy copy_p device_put mesh_cast "
    "optimization_barrier pvary reduce_precision reshard sharding_constraint".split()
)
# With constants as the other operands these keep a param's index map (`1 + scale` is still
# the scale, `w * mask` the kernel): the use is where the result meets the data.
ELEMENTWISE = frozenset(
    "abs add cos div erf exp exp2 expm1 integer_pow log log1p logistic max min mul neg pow "
    "rsqrt sign sin sqrt square sub tanh".split()
)
SHAPE_VIEWS = frozenset({"broadcast_in_dim", "reshape", "rev", "slice", "squeeze", "transpose"})
EXIT = "no affine map: the leaves are read whole"


@dataclasses.dataclass(frozen=True)
class Data:
    """A value computed from the model's inputs: slot `slot` of the depth program."""

    slot: int


def _is_constant(value: Any) -> bool:
    return not isinstance(value, (Pieces, Data))


def _clamped(start: Any, n: int, size: int) -> Any:
    """A start clamped into range, as `dynamic_slice` and `gather` clamp it; an int where
    every step starts at the same entry."""
    if not isinstance(start, Steps):
        return min(max(int(start), 0), n - size)
    values = np.clip(start.values, 0, n - size)
    return int(values.flat[0]) if np.all(values == values.flat[0]) else Steps(start.levels, values)


def _gather_starts(dn: Any, indices: Any, shape: Sequence[int], sizes: Sequence[int]):
    """The starts of a gather that takes one slice at constant (or moving) indices."""
    if isinstance(indices, Steps):
        columns = indices.values.reshape(*indices.values.shape[: len(indices.levels)], -1)
        column = lambda i: Steps(indices.levels, columns[..., i])
    elif counters.is_known(indices):
        columns = np.ravel(indices)
        column = lambda i: columns[i]
    else:
        return None
    if columns.shape[-1] != len(dn.start_index_map) or dn.operand_batching_dims:
        return None
    starts: list[Any] = [0] * len(shape)
    for i, a in enumerate(dn.start_index_map):
        starts[a] = _clamped(column(i), shape[a], sizes[a])
    return starts


class Walker:
    def __init__(self) -> None:
        self.uses: list[Use] = []
        self.exits: dict[int, str] = {}  # leaf -> the primitive where no affine map was left
        self.levels = 0
        self.slots = 0

    def walk_forward(self, closed: Any, leaf_shapes: Sequence[tuple[int, ...]]) -> list:
        """Walks the traced forward pass (its first inputs the param leaves, the rest data)
        and returns the depth program; its input slots are `inputs`."""
        params = [Pieces.of(View.of_leaf(i, s)) for i, s in enumerate(leaf_shapes)]
        inputs = [self.data() for _ in closed.jaxpr.invars[len(params) :]]
        self.inputs = [d.slot for d in inputs]
        small = lambda c: np.size(c) <= counters.MAX_STEPS
        consts = [np.asarray(c) if small(c) else UNKNOWN for c in closed.consts]
        program: list = []
        self.walk(closed.jaxpr, [*params, *inputs], program, consts)
        return program

    def data(self) -> Data:
        self.slots += 1
        return Data(self.slots - 1)

    def walk(self, jaxpr: Any, ins: Sequence[Any], program: list, consts: Sequence = ()) -> list:
        env = dict(zip(jaxpr.invars, ins))
        env.update((v, UNKNOWN) for v in jaxpr.constvars)
        env.update(zip(jaxpr.constvars, consts))
        read = lambda v: np.asarray(v.val) if isinstance(v, jex_core.Literal) else env[v]
        for eqn in jaxpr.eqns:
            env.update(zip(eqn.outvars, self.equation(eqn, [read(v) for v in eqn.invars], program)))
        return [read(v) for v in jaxpr.outvars]

    def equation(self, eqn: Any, values: list[Any], program: list) -> list[Any]:
        name, n_out, kinds = eqn.primitive.name, len(eqn.outvars), set(map(type, values))
        if Pieces not in kinds:  # no param flows in, none can be read inside
            if Data in kinds:
                return self.flow(values, n_out, program)
            outs = counters.evaluate(eqn, values)
            moving = any(counters.moves(v) for v in values)
            return outs if outs is not None else [LOOP if moving else UNKNOWN] * n_out
        if name == "scan":
            return self.scan(eqn, values, program)
        if name == "while":
            return self.while_loop(eqn, values, program)
        if counters.sub_jaxprs(eqn):
            return self.call(eqn, values, program)
        out = self.view(eqn, values)
        if out is EXIT:
            return self.read(eqn, values, program, whole=True)
        if out is not None:
            return [out if out.views() else UNKNOWN]
        return self.read(eqn, values, program)

    # --- data and uses

    def flow(self, values: Sequence[Any], n_out: int, program: list) -> list[Any]:
        data = [v for v in values if type(v) is Data]
        ins = tuple({v.slot for v in data})
        if len(ins) == 1:
            return [data[0]] * n_out  # one input: its depth
        out = self.data()
        program.append(Flow(out.slot, ins))
        return [out] * n_out

    def read(self, eqn: Any, values: list[Any], program: list, whole: bool = False) -> list:
        """A use of each view among `values` (each leaf read whole where `whole`)."""
        name, is_data = eqn.primitive.name, [isinstance(v, Data) for v in values]
        used = [
            (k, view) for k, v in enumerate(values) if isinstance(v, Pieces) for view in v.views()
        ]
        if whole:
            used = list({view.leaf: (k, view) for k, view in used}.values())
        ids = []
        for k, view in used:
            if whole or self.moves_within(view):
                self.exits.setdefault(view.leaf, name)
                use = Use(View.of_leaf(view.leaf, view.leaf_shape), name, "other", whole=True)
            else:
                use = use_of(eqn, k, view, is_data)
            self.uses.append(use)
            ids.append(len(self.uses) - 1)
        out = self.data()
        program.append(
            Reads(out.slot, tuple(v.slot for v in values if isinstance(v, Data)), tuple(ids))
        )
        return [out] * len(eqn.outvars)

    @staticmethod
    def moves_within(view: View) -> bool:
        """A loop moves the view along an axis it spans: each step reads a group of slices."""
        if not isinstance(view.offset, Steps):
            return False
        entries = view.entries()
        return any(len(np.unique(entries[:, a])) > 1 for a in view.spanned())

    # --- views

    def view(self, eqn: Any, values: list[Any]) -> Any:
        """The output of a view primitive (`Pieces`, or EXIT where no affine map describes
        it); None where `eqn` uses the params instead."""
        name, params, shape = eqn.primitive.name, eqn.params, tuple(eqn.outvars[0].aval.shape)
        pieces = [v for v in values if isinstance(v, Pieces)]
        first, others = values[0], [v for v in values if v is not pieces[0]]
        if name in IDENTITY:
            return pieces[0]
        if name in ("concatenate", "stack"):
            if any(isinstance(v, Data) for v in values):
                return None
            stack = name == "stack"
            axis = params["axis" if stack else "dimension"] % len(shape)
            sizes = [1 if stack else v.aval.shape[axis] for v in eqn.invars]
            operands = [v if isinstance(v, Pieces) else None for v in values]
            return views.join(operands, sizes, axis, shape, stack) or EXIT
        if name == "select_n" and first is not pieces[0]:  # the param where chosen: a mask
            return pieces[0] if all(_is_constant(v) for v in others[1:]) else None
        if not all(_is_constant(v) for v in others):
            return None
        if name in ELEMENTWISE and len(pieces[0].shape) == len(shape):
            dims = {"broadcast_dimensions": tuple(range(len(shape)))}  # size-1 axes broadcast
            return views.through("broadcast_in_dim", dims, pieces[0], shape)
        if first is not pieces[0]:
            return None
        if name in SHAPE_VIEWS:
            return views.through(name, params, first, shape) or EXIT
        if name == "dynamic_slice":
            if any(s is UNKNOWN or s is LOOP for s in values[1:]):
                return EXIT
            sizes = params["slice_sizes"]
            starts = [_clamped(s, n, m) for s, n, m in zip(values[1:], first.shape, sizes)]
            return views.window_of(first, starts, sizes) or EXIT
        if name == "gather":
            return self.gathered(params, first, values[1], shape)
        return None

    def gathered(self, params: dict, operand: Pieces, indices: Any, shape: tuple) -> Any:
        """A gather at constant indices: one slice at known (or moving) starts is a window, its
        collapsed axes dropped; any other makes opaque axes."""
        dn, sizes = params["dimension_numbers"], params["slice_sizes"]
        starts = _gather_starts(dn, indices, operand.shape, sizes)
        if starts is not None:
            out = views.window_of(operand, starts, sizes)
            kept = tuple(n for a, n in enumerate(sizes) if a not in dn.collapsed_slice_dims)
            out = out and views.through(
                "squeeze", {"dimensions": dn.collapsed_slice_dims}, out, kept
            )
            return (out and views.through("reshape", {}, out, shape)) or EXIT
        if counters.moves(indices) or operand.axis is not None:
            return EXIT
        parts = tuple((0, 0, views.gathered(v, dn, shape)) for v in operand.views())
        return Pieces(None, shape, parts)

    # --- calls and loops

    def call(self, eqn: Any, values: list[Any], program: list) -> list[Any]:
        """jit, remat, custom derivatives, shard_map, cond's branches: walked inline, their
        operands the last ones of the equation (cond's first is the branch index)."""
        n_out = len(eqn.outvars)
        results = []
        for jaxpr in counters.sub_jaxprs(eqn):
            k = len(jaxpr.invars)
            inner = values[len(values) - k :] if k <= len(values) else [UNKNOWN] * k
            results.append(self.walk(jaxpr, inner, program))
        results = [r for r in results if len(r) == n_out]
        if len(results) == 1:
            return results[0]
        if not results:
            return self.flow(values, n_out, program)
        outs = []  # cond: each output is any branch's, chosen by the index
        for got in zip(*results):
            data = [g for g in [*got, values[0]] if isinstance(g, Data)]
            pieces = [g for g in got if isinstance(g, Pieces)]
            outs.append(
                self.flow(data, 1, program)[0] if data else pieces[0] if pieces else UNKNOWN
            )
        return outs

    def new_level(self) -> int:
        self.levels += 1
        return self.levels - 1

    def scan(self, eqn: Any, values: list[Any], program: list) -> list[Any]:
        """A scan's body walked once: each step reads entry `step` of the xs (so a stacked
        leaf's slices move with the steps), a counter carry takes its values step by step."""
        p = eqn.params
        n, nc, ncarry, body = p["length"], p["num_consts"], p["num_carry"], p["jaxpr"].jaxpr
        level = self.new_level()
        reads = Steps((level,), np.arange(n)[::-1] if p["reverse"] else np.arange(n))
        known = {v: f for v, f in zip(body.invars[:nc], values) if counters.is_known(f)}
        inner: list[Any] = list(values[:nc])
        for k in range(nc, nc + ncarry):
            var, f = body.invars[k], values[k]
            if counters.is_counter(var, f):
                update = counters.function_of(body, k - nc, var, known)
                steps = counters.counter_values(update, f, n)
                inner.append(LOOP if steps is None else Steps((level,), steps))
            else:
                inner.append(f if isinstance(f, Pieces) else self.data())
        for f in values[nc + ncarry :]:
            if isinstance(f, Pieces):
                step = views.take_of(f, 0, reads)
                inner.append(step or self.read(eqn, [f], program, whole=True)[0])
            elif counters.is_known(f) and n <= counters.MAX_STEPS:
                inner.append(Steps((level,), np.asarray(f)[reads.values]))
            else:
                inner.append(f if isinstance(f, Data) else LOOP)
        carry_in, init = inner[nc : nc + ncarry], values[nc : nc + ncarry]
        return self.loop(level, n, [(body, inner)], carry_in, init, program)

    def while_loop(self, eqn: Any, values: list[Any], program: list) -> list[Any]:
        """A `while_loop` whose test reads one counter of known start and update (`i < L`)
        runs a known number of steps, walked as a scan's; any other, until its depths settle."""
        p = eqn.params
        nc, nb = p["cond_nconsts"], p["body_nconsts"]
        cond, body, init = p["cond_jaxpr"].jaxpr, p["body_jaxpr"].jaxpr, values[nc + nb :]
        known_cond = {v: f for v, f in zip(cond.invars[:nc], values) if counters.is_known(f)}
        known_body = {v: f for v, f in zip(body.invars[:nb], values[nc:]) if counters.is_known(f)}
        for k, f in enumerate(init):  # a carry passed on unchanged (fori_loop's bound)
            if counters.is_known(f) and body.outvars[k] is body.invars[nb + k]:
                known_cond[cond.invars[nc + k]] = known_body[body.invars[nb + k]] = f
        update = lambda k: counters.function_of(body, k, body.invars[nb + k], known_body)
        is_counter = [counters.is_counter(body.invars[nb + k], f) for k, f in enumerate(init)]
        tests = [
            (k, counters.function_of(cond, 0, cond.invars[nc + k], known_cond))
            for k in range(len(init))
            if is_counter[k]
        ]
        tests = [(k, test) for k, test in tests if test is not None]
        length = None
        if len(tests) == 1:
            k, test = tests[0]
            found = counters.counter_values(update(k), init[k], test=test)
            length = None if found is None else len(found)
        level = self.new_level()
        carried: list[Any] = []
        for k, f in enumerate(init):
            steps = (
                counters.counter_values(update(k), f, length) if is_counter[k] and length else None
            )
            if steps is not None:
                carried.append(Steps((level,), steps))
            elif is_counter[k] and update(k) is not None:
                carried.append(LOOP)
            else:
                carried.append(f if isinstance(f, Pieces) else self.data())
        subs = [(cond, [*values[:nc], *carried]), (body, [*values[nc : nc + nb], *carried])]
        return self.loop(level, length, subs, carried, init, program)

    def loop(
        self,
        level: int,
        length: int | None,
        subs: list[tuple[Any, list[Any]]],
        carry_in: Sequence[Any],
        init: Sequence[Any],
        program: list,
    ) -> list[Any]:
        """Walks a loop's jaxprs once (`subs`: (jaxpr, inputs), the body last, its first
        outputs the carry that `carry_in` receives) into a `Loop` of the depth program."""
        first_use, body_program = len(self.uses), []
        outs = [self.walk(jaxpr, inner, body_program) for jaxpr, inner in subs][-1]
        n = len(carry_in)
        varying = any(
            isinstance(u.view.offset, Steps) and level in u.view.offset.levels
            for u in self.uses[first_use:]
        )
        final = [self.data() if isinstance(c, Data) else UNKNOWN for c in carry_in]
        ys = [self.data() if isinstance(y, Data) else UNKNOWN for y in outs[n:]]
        slots = lambda values: tuple(v.slot if isinstance(v, Data) else None for v in values)
        program.append(
            Loop(
                level,
                length,
                body_program,
                slots(carry_in),
                slots(init),
                slots(outs[:n]),
                slots(final),
                slots(outs[n:]),
                slots(ys),
                varying,
            )
        )
        # A param carried through unchanged is still that param after the loop.
        pieces = [
            c if isinstance(c, Pieces) and o is c else f for c, o, f in zip(carry_in, outs, final)
        ]
        return [*pieces, *ys]
