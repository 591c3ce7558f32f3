"""The one trace: `apply_fn(params, *example_args, **example_kwargs)` as a jaxpr."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def is_traceable(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def check_params(flat: list[tuple[str, Any]], apply_fn: Any, caller: str) -> None:
    if not flat:
        raise ValueError(f"{caller}: params has no leaves.")
    if not callable(apply_fn):
        raise TypeError(f"{caller}: apply_fn must be callable, got {type(apply_fn).__name__}.")
    for path, leaf in flat:
        if not (is_traceable(leaf) or isinstance(leaf, (numbers.Number, jax.core.Tracer))):
            raise TypeError(
                f"{caller}: the param leaf '{path}' is a {type(leaf).__name__}, not an array; "
                "pass only the arrays (for Equinox, eqx.filter(model, eqx.is_array))."
            )


def trace_forward(
    params: Any, apply_fn: Callable, example_args: tuple, example_kwargs: dict, caller: str
) -> Any:
    """The forward pass as a `ClosedJaxpr` whose inputs are the param leaves, then the example
    arrays. Other example values (`train=False`, None, an rng object) are closed over as
    they are, so Python branching on them keeps working."""
    leaves, treedef = jax.tree_util.tree_flatten((example_args, example_kwargs))
    dynamic = [i for i, x in enumerate(leaves) if is_traceable(x)]

    def forward(params, dynamic_leaves):
        full = list(leaves)
        for i, x in zip(dynamic, dynamic_leaves):
            full[i] = x
        args, kwargs = jax.tree_util.tree_unflatten(treedef, full)
        return apply_fn(params, *args, **kwargs)

    try:
        return jax.make_jaxpr(forward)(params, [leaves[i] for i in dynamic])
    except Exception as e:
        name = getattr(apply_fn, "__name__", type(apply_fn).__name__)
        raise ValueError(
            f"{caller} could not trace apply_fn {name}(params, *example_args, "
            f"**example_kwargs): {type(e).__name__}: {e}. Check that the example inputs have "
            "the shapes and dtypes the model expects."
        ) from e
