"""A clear error when an optional part of the package is imported without its extra."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence


def require(part: str, extra: str, modules: Sequence[tuple[str, str]]) -> None:
    """Raises one ImportError naming every missing distribution of `modules` (pairs of an
    importable top-level module and the distribution that provides it) and the extra that
    installs them."""
    missing = []
    for module, distribution in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(distribution)
    if missing:
        raise ImportError(
            f"{part} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
            f"not installed: pip install 'lpwd_optax[{extra}]'"
        )
