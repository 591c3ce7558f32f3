"""The studies' protocols, one module each: what runs, in which order, and how it is judged.

Each module holds the data of one study (its setting, plan, cells, comparisons, verdict rules
and figures) and a `PROTOCOLS` dict of `engine.Protocol`s by `--protocol` name: `cpu` (the LPWD
paper's claims at CPU scale, and `tiny` for tests), `controls` (what in LPWD helps; and
`controls_tiny`), `regimes` (does LPWD help where weight decay helps).
"""

from __future__ import annotations

import importlib

MODULES = ("cpu", "controls", "regimes")


def protocols() -> dict:
    """Every protocol by name."""
    out = {}
    for module in MODULES:
        out.update(importlib.import_module(f"{__name__}.{module}").PROTOCOLS)
    return out
