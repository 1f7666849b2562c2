"""`or1 score --kind math|code FILE.jsonl --workers N`: score a file through the service's code path.

Each non-blank line is a JSON object with `response` (string) and `reference` (the gold answer,
or the code test spec as a JSON string or object); an optional `id` is echoed back. Output: one
JSON line per record, in input order, as soon as it and every record before it are scored:
``{"line": n, ["id": ...,] "reward": r, ["error": "...",] ["detail": "..."]}`` (n: the record's
1-based line number; blank lines are skipped). Every non-blank line yields exactly one output line,
whatever it holds: a record that is not UTF-8, not JSON, not an object, lacks a field or has one of
the wrong type gets reward 0 and an `error` (``malformed record: ...``) without stopping the run.
Output lines are UTF-8 JSON; a line whose text cannot be UTF-8 (a lone surrogate such as
``"\\ud800"`` in an id, a response or an extracted answer) is written with ``\\u`` escapes instead.
At most `IN_FLIGHT_PER_WORKER` records per worker are held at once, so a file of any size streams
in bounded memory.
"""

from __future__ import annotations

import json
import os
import sys
from collections import deque
from concurrent.futures import Future
from typing import Any, BinaryIO, Iterator, TextIO

from bus.messages import ScoreItem, ScoreOut
from common.config import RewardConfig

IN_FLIGHT_PER_WORKER = 8
KINDS = ("math", "code")


def record_to_item(line: str, kind: str) -> tuple[Any, ScoreItem]:
    """(id or None, item) from one jsonl line; ValueError with a short reason when malformed."""
    try:
        rec = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(rec, dict):
        raise ValueError(f"record must be a JSON object, got {type(rec).__name__}")
    response, reference = rec.get("response"), rec.get("reference")
    if not isinstance(response, str):
        raise ValueError("missing or non-string 'response'")
    if reference is None:
        raise ValueError("missing 'reference'")
    if not isinstance(reference, str):
        # code specs may come as objects, math golds as numbers; the scorers take text
        structured = kind == "code" or isinstance(reference, (list, dict))
        try:
            reference = json.dumps(reference) if structured else str(reference)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"unusable 'reference': {e}") from None
    return rec.get("id"), ScoreItem(kind=kind, response=response, reference=reference)


def result_line(line_no: int, rec_id: Any, out: ScoreOut) -> str:
    """One output line; never raises (an id that cannot be written is replaced by an error)."""
    row: dict[str, Any] = {"line": line_no}
    if rec_id is not None:
        row["id"] = rec_id
    row["reward"] = out.reward
    if out.error:
        row["error"] = out.error
    if out.detail:
        row["detail"] = out.detail
    try:
        text = json.dumps(row, ensure_ascii=False)
    except (ValueError, TypeError, RecursionError) as e:  # e.g. an id nested past the recursion limit
        row.pop("id", None)
        row["reward"] = 0.0
        row["error"] = f"malformed record: id cannot be written: {type(e).__name__}"
        text = json.dumps(row, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: \u escapes keep the line valid JSON and UTF-8
        text = json.dumps(row, ensure_ascii=True)
    return text


def _lines(f: BinaryIO) -> Iterator[tuple[int, str | None]]:
    """(line number, text) of every non-blank line; text None when the line is not UTF-8."""
    for n, raw in enumerate(f, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield n, None
            continue
        if line.strip():
            yield n, line


def score_file(path: str, kind: str, workers: int, cfg: RewardConfig, out: TextIO = sys.stdout) -> int:
    """Score every record of `path` (jsonl) as `kind`; print one result line per record in order.
    Returns 0 (malformed records included, each with an error line), 2 if the file can't be read."""
    if kind not in KINDS:
        print(f"or1 score: --kind must be one of {', '.join(KINDS)}, got {kind!r}", file=sys.stderr)
        return 2
    try:
        f = open(path, "rb")
    except OSError as e:
        print(f"or1 score: cannot read {path}: {e.strerror or e}", file=sys.stderr)
        return 2
    try:
        return _score_stream(f, path, kind, workers, cfg, out)
    except BrokenPipeError:  # `or1 score ... | head`: the reader left; stop quietly
        if out is sys.stdout:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _score_stream(f: BinaryIO, path: str, kind: str, workers: int, cfg: RewardConfig, out: TextIO) -> int:
    from rewards.pool import ScorePool

    window: deque[tuple[int, Any, Future | ScoreOut]] = deque()
    with f, ScorePool(workers, cfg) as pool:
        for index, line in _lines(f):
            if line is None:
                window.append((index, None, ScoreOut(0.0, error="malformed record: not UTF-8 text")))
            else:
                try:
                    rec_id, item = record_to_item(line, kind)
                    window.append((index, rec_id, pool.submit(item)))
                except Exception as e:  # noqa: BLE001 - one bad record never costs the others
                    window.append((index, None, ScoreOut(0.0, error=f"malformed record: {e}"[:300])))
            while len(window) > workers * IN_FLIGHT_PER_WORKER:
                _emit(window.popleft(), out)
        while window:
            _emit(window.popleft(), out)
    return 0


def _emit(entry: tuple[int, Any, Future | ScoreOut], out: TextIO) -> None:
    index, rec_id, res = entry
    try:
        score = res.result() if isinstance(res, Future) else res
    except Exception as e:  # noqa: BLE001 - the pool promises never to fail a future; keep the line anyway
        score = ScoreOut(0.0, error=f"{type(e).__name__}: {e}"[:300])
    out.write(result_line(index, rec_id, score) + "\n")
    out.flush()
