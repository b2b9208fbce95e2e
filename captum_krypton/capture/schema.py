"""What an ATen op does to its first argument, read off the op's schema."""

from __future__ import annotations

import functools
from typing import Any

from torch import fx


def _first_alias(node: fx.Node):
    return _alias_of(node.target)


@functools.lru_cache(maxsize=4096)
def _alias_of(target: Any):
    """The first argument's alias info in the op's schema, read once per op: the
    clean run asks it of every node, every call."""
    schema = getattr(target, "_schema", None)
    return schema.arguments[0].alias_info if schema is not None and schema.arguments else None


def mutates_first_argument(node: fx.Node) -> bool:
    """Whether running the node writes into its first argument (an in-place op)."""
    alias = _first_alias(node)
    return bool(alias is not None and alias.is_write)


def is_view(node: fx.Node) -> bool:
    """An op whose output aliases its first argument (view, permute, select, ...)."""
    alias = _first_alias(node)
    return alias is not None and not alias.is_write
