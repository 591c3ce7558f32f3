"""Building blocks of the training program: train state, the step, evaluation, parallelism.

The step applies a method's two optax stages one after the other (see `methods.py`), so that
besides the new state it can report R_op of the decay in use (the penalty is `P = u - u'`
between the base optimizer's update `u` and the regularized update `u'`), per-layer weight and
update norms, and whether the loss and gradients are finite.

Two ways to run the same step on many devices, behind one small interface (`Parallel`):
- `JitParallel` (default): one `jax.jit` over a `Mesh` with a `data` axis; the batch is sharded
  over it and the state is replicated and donated. Each process feeds its own slice of the
  global batch (`jax.make_array_from_process_local_data`), so this also runs multi-host.
- `PmapParallel`: `jax.pmap` over the local devices with `lax.pmean` of the gradients.
Both compute the mean loss over the same global batch and so give the same numbers.

Drop path draws its masks from `fold_in(key(seed), step)`, so a resumed run continues the same
PRNG stream. (Under pmap each device also folds in its index; with drop_path_rate > 0 the two
modes thus draw different, equally valid masks. The paper's default, and ours, is 0.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lpwd_optax as lo
from lpwd_optax.experiments.methods import Method

Params = Any
Batch = Mapping[str, Any]
DATA_AXIS = "data"


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # int32 scalar: the number of updates applied so far
    params: Params  # the stored params (pre-decayed phi_t for PWD/LPWD)
    opt_state: tuple[Any, Any]  # the states of the method's two stages, in chain order


def create_train_state(params: Params, method: Method) -> TrainState:
    params = method.init_params(params)
    first, second = method.stages
    return TrainState(
        step=jnp.zeros([], jnp.int32),
        params=params,
        opt_state=(first.init(params), second.init(params)),
    )


# ----------------------------------------------------------------------------------------------
# The step


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


def make_train_step(
    apply_fn: Callable[..., jax.Array],
    method: Method,
    seed: int,
    *,
    axis_name: str | None = None,
    layer_stats: bool = True,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, Any]]]:
    """The per-step function `(state, batch) -> (state, metrics)`, not yet compiled.

    Args:
      apply_fn: `apply_fn(params, images, train=..., rng=...) -> logits`.
      method: the regularization method (its two stages).
      seed: base seed of the drop-path keys.
      axis_name: under pmap, the device axis over which gradients and metrics are averaged.
      layer_stats: also return `lo.layer_statistics` of the params and the final update.

    Returns:
      The step function. Metrics: loss, accuracy (train batch), grad_norm, rop (NaN when the
      method has no separate decoupled penalty), finite (loss and grads), layers (when asked).
    """
    first, second = method.stages
    base_key = jax.random.key(seed)

    def step_fn(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Any]]:
        rng = jax.random.fold_in(base_key, state.step)
        if axis_name is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))

        def loss_fn(params):
            logits = apply_fn(params, batch["image"], train=True, rng=rng)
            return cross_entropy_loss(logits, batch["label"]).mean(), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        if axis_name is not None:
            grads, loss, accuracy = jax.lax.pmean((grads, loss, accuracy), axis_name)

        first_state, second_state = state.opt_state
        u, first_state = first.update(grads, first_state, state.params)
        u_reg, second_state = second.update(u, second_state, state.params)
        new_state = TrainState(
            step=state.step + 1,
            params=optax.apply_updates(state.params, u_reg),
            opt_state=(first_state, second_state),
        )
        if method.has_rop:
            rop = lo.opposing_penalty_rate(state.params, u, lo.penalties(u, u_reg))
        else:
            rop = jnp.array(jnp.nan, jnp.float32)
        metrics = dict(
            loss=loss,
            accuracy=accuracy,
            grad_norm=optax.tree.norm(grads),
            rop=rop,
            finite=jnp.isfinite(loss) & all_finite(grads),
        )
        if layer_stats:
            metrics["layers"] = lo.layer_statistics(state.params, u_reg)
        return new_state, metrics

    return step_fn


def make_eval_step(
    apply_fn: Callable[..., jax.Array], *, axis_name: str | None = None
) -> Callable[[Params, Batch], dict[str, jax.Array]]:
    """`(params, batch) -> sums of correct, loss and count` over the examples with mask 1."""

    def eval_fn(params: Params, batch: Batch) -> dict[str, jax.Array]:
        logits = apply_fn(params, batch["image"], train=False, rng=None)
        mask = batch["mask"].astype(jnp.float32)
        sums = dict(
            correct=jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
            loss=jnp.sum(cross_entropy_loss(logits, batch["label"]) * mask),
            count=jnp.sum(mask),
        )
        if axis_name is not None:
            sums = jax.lax.psum(sums, axis_name)
        return sums

    return eval_fn


def pad_batch(batch: Batch, size: int) -> dict[str, np.ndarray]:
    """Pads a (local) batch with zeros to `size` examples and adds `mask` (1 real, 0 padding)."""
    n = len(batch["label"])
    if n > size:
        raise ValueError(f"batch of {n} examples does not fit the padded size {size}")
    out = {
        k: np.concatenate([v, np.zeros((size - n, *v.shape[1:]), v.dtype)])
        for k, v in batch.items()
    }
    out["mask"] = np.concatenate([np.ones(n, np.float32), np.zeros(size - n, np.float32)])
    return out


def evaluate(
    parallel: Parallel, params: Any, batches: Iterator[Batch], local_batch_size: int
) -> dict[str, float]:
    """Top-1 accuracy (%) and mean loss of `params` (device layout of `parallel`)."""
    totals = None
    for batch in batches:
        sums = parallel.eval_step(params, parallel.put_batch(pad_batch(batch, local_batch_size)))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
        raise ValueError("the evaluation set yielded no batches")
    totals = parallel.to_host(totals)
    count = max(float(totals["count"]), 1.0)
    return dict(
        top1=100.0 * float(totals["correct"]) / count,
        loss=float(totals["loss"]) / count,
        count=int(totals["count"]),
    )


# ----------------------------------------------------------------------------------------------
# Parallelism


def replica_to_host(x: Any) -> np.ndarray:
    """A host numpy copy of a replicated array (also of one spanning several processes)."""
    if isinstance(x, jax.Array):
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


class Parallel:
    """How the state and batches live on devices and how the step runs there."""

    local_device_count: int

    def put_state(self, state: TrainState) -> Any: ...
    def checkpointable(self, state: Any) -> TrainState: ...
    def abstract_state(self, state: TrainState) -> Any: ...
    def put_batch(self, batch: Batch) -> Any: ...
    def train_step(self, state: Any, batch: Any) -> tuple[Any, dict[str, Any]]: ...
    def eval_step(self, params: Any, batch: Any) -> dict[str, Any]: ...
    def eval_params(self, state: Any) -> Any: ...
    def to_host(self, tree: Any) -> Any: ...


class JitParallel(Parallel):
    """One `jax.jit` over a data-parallel mesh: batch sharded, state replicated and donated."""

    def __init__(self, step_fn, eval_fn, method: Method, devices: list[jax.Device] | None = None):
        devices = jax.devices() if devices is None else devices
        self.mesh = Mesh(np.asarray(devices), (DATA_AXIS,))
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P(DATA_AXIS))
        self.local_device_count = sum(d.process_index == jax.process_index() for d in devices)
        self.train_step = jax.jit(
            step_fn,
            in_shardings=(self.replicated, self.batch_sharding),
            out_shardings=(self.replicated, self.replicated),
            donate_argnums=0,
        )
        self.eval_step = jax.jit(
            eval_fn,
            in_shardings=(self.replicated, self.batch_sharding),
            out_shardings=self.replicated,
        )
        self._eval_params = jax.jit(
            method.eval_params, in_shardings=self.replicated, out_shardings=self.replicated
        )

    def put_state(self, state: TrainState) -> TrainState:
        # Every process holds the same host values (same seed); build global replicated arrays.
        def put(x):
            x = np.asarray(x) if not isinstance(x, jax.Array) else x
            if isinstance(x, jax.Array) and x.sharding == self.replicated:
                return x
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, self.replicated, lambda idx: x[idx])

        return jax.tree.map(put, state)

    def checkpointable(self, state: TrainState) -> TrainState:
        return state  # global replicated arrays; orbax writes them from one process

    def abstract_state(self, state: TrainState) -> Any:
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=self.replicated), state
        )

    def put_batch(self, batch: Batch) -> dict[str, jax.Array]:
        return {
            k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in batch.items()
        }

    def eval_params(self, state: TrainState) -> Params:
        return self._eval_params(state.params, state.step)

    def to_host(self, tree: Any) -> Any:
        return jax.tree.map(replica_to_host, tree)


class PmapParallel(Parallel):
    """`jax.pmap` over the local devices; gradients averaged with `lax.pmean` (all devices)."""

    def __init__(self, step_fn_for_axis, eval_fn, method: Method, devices=None):
        # `devices`: all devices to map over (of every process); None means all of them.
        local = jax.local_devices() if devices is None else devices
        self.local_device_count = sum(d.process_index == jax.process_index() for d in local)
        pmap = functools.partial(jax.pmap, axis_name=DATA_AXIS, devices=devices)
        self.train_step = pmap(step_fn_for_axis, donate_argnums=0)
        self.eval_step = pmap(eval_fn)
        self._eval_params = pmap(method.eval_params)

    def put_state(self, state: TrainState) -> TrainState:
        # A leading device axis (a broadcast view, no copy); pmap places one slice per device.
        n = self.local_device_count
        return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n, *np.shape(x))), state)

    def checkpointable(self, state: TrainState) -> TrainState:
        return jax.tree.map(lambda x: np.asarray(x[0]), state)

    def abstract_state(self, state: TrainState) -> Any:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), state)

    def put_batch(self, batch: Batch) -> dict[str, np.ndarray]:
        n = self.local_device_count

        def split(x):
            x = np.asarray(x)
            if x.shape[0] % n:
                raise ValueError(f"local batch {x.shape[0]} is not divisible by {n} devices")
            return x.reshape(n, x.shape[0] // n, *x.shape[1:])

        return {k: split(v) for k, v in batch.items()}

    def eval_params(self, state: TrainState) -> Params:
        return self._eval_params(state.params, state.step)

    def to_host(self, tree: Any) -> Any:
        return jax.tree.map(lambda x: np.asarray(x[0]), tree)


def make_parallel(
    kind: str,
    apply_fn: Callable[..., jax.Array],
    method: Method,
    seed: int,
    *,
    devices: list[jax.Device] | None = None,
    layer_stats: bool = True,
) -> Parallel:
    """`kind` is 'jit' (sharded jit over `devices`, default all) or 'pmap' (local devices)."""
    if kind == "jit":
        step_fn = make_train_step(apply_fn, method, seed, layer_stats=layer_stats)
        return JitParallel(step_fn, make_eval_step(apply_fn), method, devices)
    if kind == "pmap":
        step_fn = make_train_step(
            apply_fn, method, seed, axis_name=DATA_AXIS, layer_stats=layer_stats
        )
        eval_fn = make_eval_step(apply_fn, axis_name=DATA_AXIS)
        return PmapParallel(step_fn, eval_fn, method, devices)
    raise ValueError(f"parallel must be 'jit' or 'pmap', got {kind!r}")


# ----------------------------------------------------------------------------------------------
# Pytrees <-> plain dicts (checkpoints and exported weights)


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path_names(path: tuple[Any, ...]) -> list[str]:
    names = [_key_name(k) for k in path]
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
        names = names[:-1]  # an NNX Variable's value
    return names


def flat_dict(tree: Any) -> dict[str, Any]:
    """`{"stem/conv/kernel": leaf, ...}` with '/'-joined readable paths."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    out = {"/".join(_path_names(p)): leaf for p, leaf in flat}
    if len(out) != len(flat):
        raise ValueError("two leaves share a path name")
    return out


def from_flat_dict(template: Any, flat: Mapping[str, Any]) -> Any:
    """Inverse of `flat_dict`, with the structure of `template`; names must match exactly."""
    names = flat_dict(template)
    missing = sorted(set(names) - set(flat))
    extra = sorted(set(flat) - set(names))
    if missing or extra:
        raise ValueError(f"params do not match the model: missing {missing[:5]}, extra {extra[:5]}")
    _, treedef = jax.tree_util.tree_flatten(template)
    return jax.tree_util.tree_unflatten(treedef, [flat[name] for name in names])


def nested_dict(tree: Any) -> dict[str, Any]:
    """Any pytree as nested dicts with string keys (what orbax stores without custom types)."""
    out: dict[str, Any] = {}
    for name, leaf in flat_dict(tree).items():
        node = out
        *parents, last = name.split("/") if name else ["_"]
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = leaf
    return out


def from_nested_dict(template: Any, nested: Mapping[str, Any]) -> Any:
    """Inverse of `nested_dict`, with the structure of `template`."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = []
    for path, _ in flat:
        node = nested
        for part in _path_names(path) or ["_"]:
            node = node[part]
        leaves.append(node)
    return jax.tree_util.tree_unflatten(treedef, leaves)


@jax.jit
def _fingerprint(params: Params) -> jax.Array:
    total = jnp.zeros([], jnp.float32)
    for x in jax.tree.leaves(params):
        total += jnp.mean(jnp.abs(x.astype(jnp.float32)))
    return total


def fingerprint(params: Params) -> float:
    """A cheap fingerprint of params, sum over leaves of mean |x| (to detect corrupted files)."""
    return float(replica_to_host(_fingerprint(params)))
