"""Test-wide JAX set-up: 8 simulated CPU devices so multi-device code is exercised on CPU, and a
compilation cache for the test session."""

import os

# Must happen before JAX initializes its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One thread for PyTorch's reference computations (and numpy's BLAS): on the tests' tiny models
# its OpenMP threads, spinning beside XLA's, made a conv step a hundred times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture(scope="session", autouse=True)
def _session_compilation_cache(tmp_path_factory):
    """A persistent compilation cache, new and empty for each test session (one per xdist
    worker): a program compiled again, by a fresh `jax.jit` of the same function or for the same
    model in another test, is read back instead of compiled. Returns its directory."""
    from tests import _cifar_helpers as helpers

    path = tmp_path_factory.getbasetemp() / "jax_compilation_cache"
    helpers.enable_compilation_cache(path)
    return path


@pytest.fixture(scope="session")
def cache_dir(_session_compilation_cache):
    """The session's compilation cache, for the training programs the tests start."""
    return str(_session_compilation_cache)


@pytest.fixture
def data_cache(tmp_path_factory, monkeypatch):
    """The datasets the training programs decode, cached once for the test session."""
    monkeypatch.setenv("LPWD_OPTAX_CACHE", str(tmp_path_factory.getbasetemp() / "data_cache"))
