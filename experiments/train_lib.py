"""Building blocks of the training program: train state, the step, evaluation, parallelism.

The step applies a method's two optax stages one after the other (see `methods.py`), so that
besides the new state it can report R_op of the decay in use (the penalty is `P = u - u'`
between the base optimizer's update `u` and the regularized update `u'`), per-layer weight and
update norms, and whether the loss and gradients are finite.

Two ways to build the same step for many devices, behind one interface (`Parallel`):
- 'jit' (default): one `jax.jit` over a `Mesh` with a `data` axis; the batch is sharded over it
  and the state is replicated and donated. Each process feeds its own slice of the global
  batch (`jax.make_array_from_process_local_data`), so this also runs multi-host.
- 'pmap': `jax.pmap` over the local devices with `lax.pmean` of the gradients.
Both compute the mean loss over the same global batch and so give the same numbers.

Drop path draws its masks from `fold_in(key(seed), step)`, so a resumed run continues the same
PRNG stream. (Under pmap each device also folds in its index; with drop_path_rate > 0 the two
modes thus draw different, equally valid masks. The paper's default, and ours, is 0.)
"""

from __future__ import annotations

import dataclasses
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
# Parallelism: one interface, two ways to build it


def replica_to_host(x: Any) -> np.ndarray:
    """A host numpy copy of a replicated array (also of one spanning several processes)."""
    if isinstance(x, jax.Array):
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


@dataclasses.dataclass(frozen=True)
class Parallel:
    """The compiled step and evaluation, and how state and batches are laid out on devices.

    Built by `make_parallel`; the training loop uses only these fields and never asks which
    way (sharded `jax.jit` or `jax.pmap`) they were built.
    """

    local_device_count: int
    train_step: Callable[[Any, Any], tuple[Any, dict[str, Any]]]  # (state, batch)
    eval_step: Callable[[Any, Any], dict[str, Any]]  # (params, batch) -> sums
    eval_params: Callable[[Any], Params]  # device state -> evaluated weights (device layout)
    put_state: Callable[[TrainState], Any]  # host state -> device layout
    put_batch: Callable[[Batch], Any]  # this process's slice of a global batch -> device layout
    to_host: Callable[[Any], Any]  # replicated device tree -> host numpy tree
    checkpointable: Callable[[Any], Any]  # device tree -> what orbax saves
    abstract_state: Callable[[TrainState], Any]  # host state -> orbax restore target


def _jit_parallel(step_fn, eval_fn, method: Method, devices: list[jax.Device]) -> Parallel:
    """One `jax.jit` over a data-parallel mesh: batch sharded, state replicated and donated."""
    mesh = Mesh(np.asarray(devices), (DATA_AXIS,))
    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))
    train_step = jax.jit(
        step_fn,
        in_shardings=(replicated, batch_sharding),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        eval_fn, in_shardings=(replicated, batch_sharding), out_shardings=replicated
    )
    eval_params = jax.jit(method.eval_params, in_shardings=replicated, out_shardings=replicated)

    def put(x):
        # Every process holds the same host values (same seed): build global replicated arrays.
        if isinstance(x, jax.Array) and x.sharding == replicated:
            return x
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, replicated, lambda idx: x[idx])

    return Parallel(
        local_device_count=sum(d.process_index == jax.process_index() for d in devices),
        train_step=train_step,
        eval_step=eval_step,
        eval_params=lambda state: eval_params(state.params, state.step),
        put_state=lambda state: jax.tree.map(put, state),
        put_batch=lambda batch: {
            k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
            for k, v in batch.items()
        },
        to_host=lambda tree: jax.tree.map(replica_to_host, tree),
        checkpointable=lambda tree: tree,  # global arrays; orbax writes them from one process
        abstract_state=lambda state: jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=replicated), state
        ),
    )


def _pmap_parallel(step_fn, eval_fn, method: Method, devices: list[jax.Device] | None) -> Parallel:
    """`jax.pmap` over the local devices; gradients averaged with `lax.pmean` (all devices)."""
    local = jax.local_devices() if devices is None else devices
    n = sum(d.process_index == jax.process_index() for d in local)
    pmap = functools.partial(jax.pmap, axis_name=DATA_AXIS, devices=devices)
    eval_params = pmap(method.eval_params)

    def split(x):
        x = np.asarray(x)
        if x.shape[0] % n:
            raise ValueError(f"local batch {x.shape[0]} is not divisible by {n} devices")
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])

    def first_replica(tree):
        return jax.tree.map(lambda x: np.asarray(x[0]), tree)

    return Parallel(
        local_device_count=n,
        train_step=pmap(step_fn, donate_argnums=0),
        eval_step=pmap(eval_fn),
        eval_params=lambda state: eval_params(state.params, state.step),
        # A leading device axis (a broadcast view, no copy); pmap places one slice per device.
        put_state=lambda state: jax.tree.map(
            lambda x: np.broadcast_to(np.asarray(x), (n, *np.shape(x))), state
        ),
        put_batch=lambda batch: {k: split(v) for k, v in batch.items()},
        to_host=first_replica,
        checkpointable=first_replica,
        abstract_state=lambda state: jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), state
        ),
    )


def make_parallel(
    kind: str,
    apply_fn: Callable[..., jax.Array],
    method: Method,
    seed: int,
    *,
    devices: list[jax.Device] | None = None,
    layer_stats: bool = True,
) -> Parallel:
    """The same step built for `kind`: 'jit' (sharded over `devices`, default all) or 'pmap'."""
    if kind == "jit":
        step_fn = make_train_step(apply_fn, method, seed, layer_stats=layer_stats)
        devices = jax.devices() if devices is None else devices
        return _jit_parallel(step_fn, make_eval_step(apply_fn), method, devices)
    if kind == "pmap":
        step_fn = make_train_step(
            apply_fn, method, seed, axis_name=DATA_AXIS, layer_stats=layer_stats
        )
        eval_fn = make_eval_step(apply_fn, axis_name=DATA_AXIS)
        return _pmap_parallel(step_fn, eval_fn, method, devices)
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
