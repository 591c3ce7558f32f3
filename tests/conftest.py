"""Test-wide JAX set-up: 8 simulated CPU devices so multi-device code is exercised on CPU."""

import os

# Must happen before JAX initializes its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_num_cpu_devices", 8)
