"""One leaf after another: a data dependency that orders XLA's work on a transform's leaves.

A transform that reduces `theta + u` before its elementwise pass (WRS's channel norms, CPR's
`R(theta + u)`) needs the optimizer's update `u` twice: once in the reduction and once in the
pass that writes the new weights. XLA never recomputes the optimizer's divide and square root
in two consumers, so it writes `u` (or `theta + u`) to a temporary buffer. Left alone, XLA:CPU
schedules every leaf's first pass before any leaf's last one, so the temporaries of all leaves
are alive together: a buffer the size of the model, which the CPU runtime allocates afresh and
page-faults in on every step (more time than the extra bytes it moves). Making each leaf's first
pass depend on the previous leaf's reduction makes XLA finish the leaves one after another, and
their temporaries share a buffer the size of a few leaves.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp
from jax import lax


def after(x: chex.Array, token: chex.Array | None) -> chex.Array:
    """`x`, bit for bit, as a value that XLA computes only once the scalar `token` exists.

    `x * 1`, with the 1 built from `token`'s bits by two shifts that always give 0, which XLA
    does not fold away (a plain `0 * token` could be NaN, and `lax.optimization_barrier` is
    removed before XLA:CPU schedules). One multiply per entry, inside the pass that reads `x`.
    """
    if token is None:
        return x
    bits = lax.bitcast_convert_type(jnp.asarray(token).astype(jnp.float32), jnp.uint32)
    zero = lax.shift_right_logical(lax.shift_right_logical(bits, jnp.uint32(16)), jnp.uint32(16))
    one = lax.bitcast_convert_type(jnp.uint32(0x3F800000) | zero, jnp.float32)
    return x * one.astype(x.dtype)


def first_entry(x: chex.Array) -> chex.Array:
    """A scalar of `x` to pass on as the next leaf's token."""
    return x.reshape(-1)[0]
