"""Every public docstring example in the library runs and prints what it says."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["decay", "adaptive", "rescaling", "diagnostics", "layerwise", "projection", "_common"]
# The weight-decay variants of 2023-2025.
MODULES += ["cautious", "corrected", "timescale", "stable", "constrained"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"lpwd_optax.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


def test_public_api_is_documented():
    import lpwd_optax

    for name in lpwd_optax.__all__:
        doc = getattr(lpwd_optax, name).__doc__ or ""
        assert doc.strip(), f"{name} has no docstring"
        if callable(getattr(lpwd_optax, name)) and name not in (
            "decay_coefficients",
            "default_decay_mask",
            "penalties",
        ):
            for section in ("Args:", "Returns:"):
                assert section in doc, f"{name}'s docstring lacks {section}"
