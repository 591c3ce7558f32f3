"""Epoch checkpoints with orbax: async saves, the last few kept, corrupted ones skipped.

Each checkpoint holds three items: `state` (the full `TrainState`, enough to continue exactly),
`meta` (JSON: epoch, metric history, a fingerprint of the params) and, for PWD/LPWD,
`evaluated` (the paper's weights `theta_t`, not the stored pre-decayed `phi_t`).

Restoring walks from the newest checkpoint back: one that fails to load or whose params do not
match the fingerprint saved with it is reported, moved to `<directory>.corrupted/`, and the
previous one is tried.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lpwd_optax.experiments.config import ConfigError

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
