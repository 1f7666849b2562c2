"""The scorer's side of the result channel: ``parse_channel(bytes) -> Report`` (the wire format is
in ``rewards/harness.py``'s docstring).

Everything here assumes the bytes were written by the program under test: they are parsed with
``json.loads`` only (never unpickled, never evaluated), every JSON object must be one of the known
tags, nesting is capped, and the decoded values are plain Python data (plus the frozen
``ListValue``/``TreeValue``), so comparing them runs no code the program chose. A line that does
not parse is skipped: a case without a value fails anyway, so skipping can never make one pass.
A case reported twice makes the report ``malformed``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

MAX_DEPTH = 120  # a little above the harness's own cap, for the tags


@dataclass(frozen=True)
class ListValue:
    """A linked list (ListNode) as its values."""

    values: tuple


@dataclass(frozen=True)
class TreeValue:
    """A binary tree (TreeNode) in LeetCode's level order, None for missing children."""

    values: tuple


@dataclass(frozen=True)
class Opaque:
    """A result with no encoding: only its type name and truth value came back."""

    type_name: str
    truth: bool


@dataclass
class Report:
    values: dict[int, Any] = field(default_factory=dict)  # case -> decoded value or Opaque
    errors: dict[int, str] = field(default_factory=dict)  # case -> why it raised
    done: bool = False
    error: str = ""  # why the run ended early, outside any case
    malformed: str = ""  # a case reported twice
    skipped: int = 0  # lines that did not parse


def decode(j: Any, depth: int = 0) -> Any:
    """A tagged JSON value as Python data; ValueError when it is not one."""
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    if j is None or isinstance(j, (bool, int, float, str)):
        return j
    d = depth + 1
    if isinstance(j, list):
        return [decode(x, d) for x in j]
    if not isinstance(j, dict) or len(j) != 1:
        raise ValueError("not a tagged value")
    (tag, body), = j.items()
    if tag == "b" and isinstance(body, str):
        return body.encode("latin-1")
    if not isinstance(body, list):
        raise ValueError(f"tag {tag!r} needs a list")
    items = [decode(x, d) for x in body]
    if tag == "t":
        return tuple(items)
    if tag == "s":
        return frozenset(_hashable(items))
    if tag == "d":
        if not all(isinstance(p, list) and len(p) == 2 for p in items):
            raise ValueError("dict entries must be pairs")
        return dict(zip(_hashable([p[0] for p in items]), (p[1] for p in items)))
    if tag == "c" and len(items) == 2 and all(isinstance(x, (int, float)) for x in items):
        return complex(items[0], items[1])
    if tag == "L":
        return ListValue(tuple(items))
    if tag == "T":
        return TreeValue(tuple(items))
    raise ValueError(f"unknown tag {tag!r}")


def _hashable(items: list) -> list:
    for x in items:
        try:
            hash(x)
        except TypeError:
            raise ValueError("unhashable set element or dict key") from None
    return items


def parse_channel(data: bytes) -> Report:
    """The report in the channel's bytes (see the module doc for what is trusted)."""
    rep = Report()
    for line in data.split(b"\n"):
        add_line(line, rep)
    return rep


def add_line(line: bytes, rep: Report) -> None:
    """Add one channel line (without its newline) to `rep`; a line that does not parse is skipped."""
    if not line.strip():
        return
    try:
        _take(json.loads(line), rep)
    except (ValueError, RecursionError, TypeError, UnicodeDecodeError):
        rep.skipped += 1


def _take(rec: Any, rep: Report) -> None:
    if not isinstance(rec, dict):
        raise ValueError("record is not an object")
    if "done" in rec:
        rep.done = rec["done"] is True
        if not rep.done:
            rep.error = str(rec.get("e", ""))[:300]
        return
    i = rec.get("i")
    if not isinstance(i, int) or isinstance(i, bool) or i < 0:
        raise ValueError("bad case index")
    if "v" in rec:
        value = decode(rec["v"])
    elif "u" in rec:
        value = Opaque(str(rec["u"])[:100], rec.get("t") is True)
    elif "e" in rec:
        if i in rep.errors or i in rep.values:
            rep.malformed = f"case {i} reported twice"
        rep.errors[i] = str(rec["e"])[:300]
        return
    else:
        raise ValueError("record has no value")
    if i in rep.values or i in rep.errors:
        rep.malformed = f"case {i} reported twice"
    rep.values[i] = value
