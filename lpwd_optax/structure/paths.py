"""Paths: the module a leaf belongs to, their natural order, and the layers paths alone give.

A leaf's path is its "/"-joined key path (`path_str`). Its module is the path without the
leaf's own name: `stages/0/conv/kernel` and `stages/0/conv/bias` belong to `stages/0/conv`,
and the leaves at the root of the tree to the root module `""`. Paths sort naturally, name by
name with digit runs compared as numbers, so `blocks_9` comes before `blocks_10` and a
module's children stay together.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Sequence
from typing import Any


def module_path(path: str) -> str:
    """The module a leaf belongs to: its path without the leaf name (`a/b/kernel` -> `a/b`,
    `kernel` -> `""`, the root)."""
    return path.rpartition("/")[0]


def _natural_key(name: str) -> tuple[Any, ...]:
    # "blocks_10" -> ("blocks_", 10, ""): digit runs compare as numbers, so 9 < 10.
    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))


def natural_path_key(path: str) -> tuple[Any, ...]:
    """Sort key of a "/"-joined path: name by name, digit runs compared as numbers
    (`blocks_9` < `blocks_10`, `stages/1` < `stages/10`), a module's children together
    (`a/x` < `a_b/y`). The root `""` has no names and comes first."""
    return tuple(_natural_key(name) for name in path.split("/")) if path else ()


def path_depths(
    paths: Sequence[str], group_of: Callable[[str], Hashable] | None = None
) -> list[int]:
    """Depths `1..n` from paths alone: every module is a layer, and the layers are numbered in
    the natural order of their module paths; with `group_of(path)`, every group is a layer,
    numbered in the order of the group values."""
    if group_of is None:
        group_of = lambda path: natural_path_key(module_path(path))
    keys = [group_of(path) for path in paths]
    rank = {key: i + 1 for i, key in enumerate(sorted(set(keys)))}
    return [rank[key] for key in keys]
