"""What an ATen op does to its first argument, read off the op's schema."""

from __future__ import annotations

import functools
from typing import Any

from torch import fx


def _first_alias(node: fx.Node):
    target = node.target
    try:
        return _alias_of(target)
    except TypeError:  # an unhashable target
        return _read_alias(target)


@functools.lru_cache(maxsize=4096)
def _alias_of(target: Any):
    """`_read_alias`, once per op: the clean run asks it of every node, every call."""
    return _read_alias(target)


def _read_alias(target: Any):
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
