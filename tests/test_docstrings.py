"""Every docstring example in the library and the models runs and prints what it says.

This is the one place the examples run as doctests (the documentation site renders them and
does not run them again). Every module of `lpwd_optax` and `lpwd_optax.models` is found here,
so a new module's examples run without being listed.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil

import pytest

import lpwd_optax

# The models need Flax (the [models] extra, part of [test]).
PACKAGES = ["lpwd_optax"] + (["lpwd_optax.models"] if importlib.util.find_spec("flax") else [])


def _modules() -> list[str]:
    names = []
    for package in PACKAGES:
        path = importlib.import_module(package).__path__
        names += [package] + [f"{package}.{m.name}" for m in pkgutil.iter_modules(path)]
    return names


def test_every_library_module_is_covered():
    names = _modules()
    for module in (
        "decay",
        "adaptive",
        "rescaling",
        "diagnostics",
        "layerwise",
        "projection",
        "structure",
    ):
        assert f"lpwd_optax.{module}" in names
    assert len(lpwd_optax.__all__) > 20


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


def test_public_api_is_documented():
    import lpwd_optax

    for name in lpwd_optax.__all__:
        doc = getattr(lpwd_optax, name).__doc__ or ""
        assert doc.strip(), f"{name} has no docstring"
        if isinstance(getattr(lpwd_optax, name), type):  # a data type: its fields
            assert "Attributes:" in doc, f"{name}'s docstring lacks Attributes:"
        elif callable(getattr(lpwd_optax, name)) and name not in (
            "decay_coefficients",
            "default_decay_mask",
            "penalties",
        ):
            for section in ("Args:", "Returns:"):
                assert section in doc, f"{name}'s docstring lacks {section}"
