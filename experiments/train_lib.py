"""Building blocks of the training program: train state, step, evaluation, devices, checkpoints.

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

Checkpoints (`Checkpointer`, orbax): one per evaluation, async, the last few kept. Each holds
`state` (the full `TrainState`, enough to continue exactly), `meta` (JSON: epoch, metric history,
a fingerprint of the params) and, for PWD/LPWD, `evaluated` (the paper's weights `theta_t`, not
the stored pre-decayed `phi_t`). Restoring walks from the newest checkpoint back: one that fails
to load or whose params do not match the fingerprint saved with it is reported, moved to
`<directory>.corrupted/`, and the previous one is tried. `OutputLock` keeps two runs from
writing one directory; `read_run_weights` reads another run's weights (`--init_from`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import socket
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lpwd_optax as lo
from lpwd_optax.experiments.config import ConfigError
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


# ----------------------------------------------------------------------------------------------
# Checkpoints

Verify = Callable[[Any, dict[str, Any]], str | None]  # (state, meta) -> error message or None


class Checkpointer:
    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
        )
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory, options=self._options, item_names=("state", "meta", "evaluated")
        )

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any], evaluated: Any = None) -> None:
        """Starts an (async) save of `state`, `meta` and optional `evaluated` weights."""
        items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        if evaluated is not None:
            items["evaluated"] = ocp.args.StandardSave(evaluated)
        self._manager.save(step, args=ocp.args.Composite(**items))

    def restore_latest(
        self, abstract_state: Any, verify: Verify | None = None
    ) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, state, meta) of the newest good checkpoint, or None when there is none.

        Args:
          abstract_state: the state's structure as `jax.ShapeDtypeStruct`s with shardings.
          verify: optional check of a restored (state, meta); returns an error message or None.
        """
        self._manager.wait_until_finished()
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
                error = verify(restored["state"], restored["meta"]) if verify else None
            except Exception as e:  # orbax raises many types for unreadable files
                error = f"{type(e).__name__}: {e}"
            if error is None:
                return step, restored["state"], restored["meta"]
            self._quarantine(step, error)
        return None

    def _quarantine(self, step: int, error: str) -> None:
        message = (
            f"checkpoint {step} in {self.directory} is corrupted ({error.splitlines()[0][:300]}); "
            f"moved to {self.directory}.corrupted/ and falling back to the previous one"
        )
        logging.warning(message)
        print(f"WARNING: {message}", flush=True)
        if jax.process_index() == 0:
            target = os.path.join(f"{self.directory}.corrupted", str(step))
            shutil.rmtree(target, ignore_errors=True)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"quarantine checkpoint {step}")
        self._manager.close()
        self._manager = self._open()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def read_run_weights(path: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The weights a run of the training program reached: (flat weights, its config.json,
    where they came from).

    `path` is a run's --output_dir (its newest checkpoint is read) or one of its
    `checkpoints/<step>` directories. The weights are the evaluated ones (PWD/LPWD's theta_t,
    not the stored phi_t), as flat `{"stem/conv/kernel": array}` names.

    Raises:
      ConfigError: `path` holds no checkpoint of the training program.
    """
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(os.path.join(path, "checkpoints")):
        run_dir, directory, step = path, os.path.join(path, "checkpoints"), None
    elif os.path.basename(path).isdigit() and os.path.basename(os.path.dirname(path)) == (
        "checkpoints"
    ):
        directory, step = os.path.dirname(path), int(os.path.basename(path))
        run_dir = os.path.dirname(directory)
    else:
        raise ConfigError(
            f"--init_from: {path} is neither a run directory of this program (with "
            "checkpoints/) nor one of its checkpoints/<step> directories"
        )
    config_path = os.path.join(run_dir, "config.json")
    if not os.path.exists(config_path):
        raise ConfigError(f"--init_from: {run_dir} has no config.json; not a run of this program")
    with open(config_path) as f:
        run_config = json.load(f)
    manager = ocp.CheckpointManager(directory, item_names=("state", "meta", "evaluated"))
    absl_logger = logging.getLogger("absl")  # orbax warns of each item it is not asked for
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        step = manager.latest_step() if step is None else step
        if step is None or step not in manager.all_steps():
            raise ConfigError(
                f"--init_from: no checkpoint {'' if step is None else step} in {directory}"
            )
        has_evaluated = manager.item_metadata(step).get("evaluated") is not None
        items = {"evaluated" if has_evaluated else "state": ocp.args.StandardRestore()}
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    finally:
        manager.close()
        absl_logger.setLevel(level)
    tree = restored["evaluated"] if has_evaluated else restored["state"]["params"]
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in key_path): np.asarray(leaf)
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
    return flat, run_config, f"{directory}/{step}"


class OutputLock:
    """Creates a run directory and holds `<directory>/lock` (host and pid of the owner) while
    a run writes it, so that two runs cannot write one directory at once. A lock left by a
    process that no longer runs on this host is taken over. A directory this lock created is
    removed again if the run fails before writing anything into it.
    """

    def __init__(self, directory: str, *, enabled: bool = True):
        self.directory, self.enabled = directory, enabled
        self.path = os.path.join(directory, "lock")
        self._created = False

    def __enter__(self) -> OutputLock:
        self._created = not os.path.exists(self.directory)
        os.makedirs(self.directory, exist_ok=True)
        if not self.enabled:
            return self
        owner = f"{socket.gethostname()} {os.getpid()}"
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self._holder()
                if holder is not None:
                    raise ConfigError(
                        f"another run ({holder}) is writing {self.directory}; wait for it or "
                        "choose another --output_dir"
                    ) from None
                os.remove(self.path)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(owner + "\n")
            return self

    def _holder(self) -> str | None:
        """'host pid' of a live owner, None when the lock is stale."""
        try:
            with open(self.path) as f:
                host, pid = f.read().split()
        except (OSError, ValueError):
            return None
        if host != socket.gethostname():
            return f"pid {pid} on {host}"  # cannot check another host: assume it runs
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return f"pid {pid}"

    def __exit__(self, kind, error, traceback) -> None:
        if self.enabled and os.path.exists(self.path):
            os.remove(self.path)
        if kind is not None and self._created and not os.listdir(self.directory):
            os.rmdir(self.directory)
