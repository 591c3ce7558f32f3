"""`_ordering.after`: the value is unchanged bit for bit, and XLA computes it after the token."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpwd_optax import _ordering


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("token", [0.0, -0.0, 1.5, np.nan, np.inf, -np.inf, 1e-45])
def test_value_is_unchanged_bit_for_bit(dtype, token):
    x = jnp.asarray([0.0, -0.0, 1.0, -3.5, np.inf, -np.inf, np.nan, 1e-3], dtype)
    got = jax.jit(_ordering.after)(x, jnp.float32(token))
    assert got.dtype == x.dtype
    bits = lambda a: np.asarray(a).view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)
    np.testing.assert_array_equal(bits(got), bits(x))
    assert _ordering.after(x, None) is x


def test_the_dependency_survives_compilation():
    """Two leaves' passes, each writing a temporary for a reduction: without the token XLA:CPU
    computes both first passes before either reduction (two temporaries alive), with it one
    leaf after the other (one temporary reused)."""
    if jax.default_backend() != "cpu":
        return
    shape = (512, 512)

    def two_leaves(ordered):
        def f(a, b, c, d):
            # exp: XLA never recomputes it in two consumers, so each w is written to memory.
            wa = jnp.exp(a) + c
            sa = jnp.sum(wa * wa, axis=0)
            first = wa * sa - c
            b = _ordering.after(b, _ordering.first_entry(sa)) if ordered else b
            wb = jnp.exp(b) + d
            sb = jnp.sum(wb * wb, axis=0)
            return first, wb * sb - d

        spec = jax.ShapeDtypeStruct(shape, jnp.float32)
        compiled = jax.jit(f, donate_argnums=(2, 3)).lower(spec, spec, spec, spec).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    size = 512 * 512 * 4
    assert two_leaves(ordered=True) < 2 * size <= two_leaves(ordered=False) + 2**16
