"""Checking and coercing what callers hand the store, and turning database errors into StoreError.

The store's internal helpers, shared by ``store.writes``, ``store.runs`` and ``store.reads`` (not part
of the API; callers use ``store.queries``). Each check names the offending field in its one-line
``StoreError``, so bad input is refused before a transaction starts. ``_db_errors`` wraps a
transaction so a driver or SQLAlchemy error comes out as one line saying what the store was doing.
"""

from __future__ import annotations

import json
import operator
from collections import defaultdict, deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from treeplay.store.database import StoreError, first_line
from treeplay.store.records import NodeRecord, TreeRecord

INT_MIN, INT_MAX = -(2**31), 2**31 - 1
JUDGMENT_TARGETS = ("trajectory", "node", "step", "candidate")
DONE = "done"
RUNNING = "running"


# ----------------------------------------------------------------------------------------------
# Checking and coercing input: each helper names the offending field in its error.


def _int(value: Any, where: str, *, optional: bool = False, bounded: bool = True) -> int | None:
    if type(value) is int and INT_MIN <= value <= INT_MAX:
        return value
    if value is None and optional:
        return None
    if isinstance(value, bool):
        raise StoreError(f"{where} must be an integer, got a bool")
    try:
        number = operator.index(value)
    except TypeError:
        raise StoreError(f"{where} must be an integer, got {type(value).__name__} {value!r:.60}") from None
    if bounded and not INT_MIN <= number <= INT_MAX:
        raise StoreError(f"{where} is {number}, outside the 32-bit integer range of the store's columns")
    return number


def _float(value: Any, where: str, *, optional: bool = False, nan_ok: bool = False) -> float | None:
    if type(value) is float and (value == value or nan_ok):
        return value
    if value is None and optional:
        return None
    if isinstance(value, (bool, str, bytes)) or value is None:
        raise StoreError(f"{where} must be a number, got {type(value).__name__} {value!r:.60}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise StoreError(f"{where} must be a number, got {type(value).__name__} {value!r:.60}") from None
    if number != number and not nan_ok:
        raise StoreError(f"{where} is NaN")
    return number


def _bool(value: Any, where: str, *, optional: bool = False) -> bool | None:
    if value is None and optional:
        return None
    if value is True or value is False:
        return value
    if type(value).__name__ == "bool_":  # numpy's bool
        return bool(value)
    raise StoreError(f"{where} must be a bool, got {type(value).__name__} {value!r:.60}")


def _str(value: Any, where: str, *, optional: bool = False) -> str | None:
    if type(value) is str and "\x00" not in value:
        return value
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise StoreError(f"{where} must be a string, got {type(value).__name__} {value!r:.60}")
    if "\x00" in value:
        raise StoreError(f"{where} contains a NUL character, which PostgreSQL cannot store")
    return value


def _json(value: Any, where: str) -> Any:
    if value is None:
        return None
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise StoreError(f"{where} is not JSON-serialisable without NaN: {e}") from None
    return value


def _json_text(value: Any, where: str) -> str | None:
    """``value`` serialised for a JSON column written with raw ``executemany`` (None stays NULL)."""
    if value is None:
        return None
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise StoreError(f"{where} is not JSON-serialisable without NaN: {e}") from None


def _clean_floats(values: Mapping[str, Any] | None, where: str) -> dict[str, Any] | None:
    """A dict of named numbers for a JSON column: NaN becomes None (JSON has no NaN)."""
    if values is None:
        return None
    if not isinstance(values, Mapping):
        raise StoreError(f"{where} must be a dict, got {type(values).__name__}")
    out: dict[str, Any] = {}
    for key, v in values.items():
        if isinstance(v, float) and v != v:
            v = None
        elif type(v).__module__ == "numpy":
            v = v.item()
            v = None if isinstance(v, float) and v != v else v
        out[str(key)] = v
    return _json(out, where)


def _of_type(value: Any, kind: type, where: str) -> None:
    if not isinstance(value, kind):
        raise StoreError(f"{where} must be a {kind.__name__}, got {type(value).__name__}")


def _order_tree(tree: TreeRecord, where: str) -> list[NodeRecord]:
    """The tree's nodes with parents before children (breadth first), after checking its shape.

    Raises:
        StoreError: Not exactly one root, a duplicate key, a parent key that is not in the tree,
            or a cycle (nodes that cannot be reached from the root).
    """
    if not isinstance(tree.nodes, list) or not tree.nodes:
        raise StoreError(f"{where} has no nodes (a tree needs exactly one root)")
    children: dict[int, list[NodeRecord]] = defaultdict(list)
    keys: set[int] = set()
    roots: list[NodeRecord] = []
    for i, node in enumerate(tree.nodes):
        if not isinstance(node, NodeRecord):
            raise StoreError(f"{where}.nodes[{i}] must be a NodeRecord, got {type(node).__name__}")
        key = _int(node.key, f"{where}.nodes[{i}].key", bounded=False)
        if key in keys:
            raise StoreError(f"{where} has two nodes with key {key}")
        keys.add(key)
        parent = _int(node.parent_key, f"{where}.nodes[{i}].parent_key", optional=True, bounded=False)
        if parent is None:
            roots.append(node)
        else:
            children[parent].append(node)
    if len(roots) != 1:
        raise StoreError(f"{where} has {len(roots)} roots (nodes with parent_key None); it needs exactly one")
    for parent in children:
        if parent not in keys:
            child = children[parent][0].key
            raise StoreError(f"{where}: node {child} has parent_key {parent}, which is not in the tree")
    ordered: list[NodeRecord] = []
    queue = deque(roots)
    while queue:
        node = queue.popleft()
        ordered.append(node)
        queue.extend(children.get(node.key, ()))
    if len(ordered) != len(tree.nodes):
        stuck = sorted(keys - {n.key for n in ordered})[:5]
        raise StoreError(f"{where} has a cycle: nodes {stuck} cannot be reached from the root")
    return ordered


# ----------------------------------------------------------------------------------------------
# Database errors


@contextmanager
def _db_errors(what: str) -> Iterator[None]:
    """Turn driver/SQLAlchemy errors into a one-line StoreError saying what we were doing."""
    try:
        yield
    except StoreError:
        raise
    except SQLAlchemyError as e:
        raise StoreError(f"{what}: {first_line(e)}") from None
