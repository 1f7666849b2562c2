"""Math reward: Skywork-OR1's rule on top of math-verify, bounded in time.

Algorithm (``score_math``), for a response and a gold answer:

1. The answer is the text after the *last* ``</think>`` if the response has one, else the whole
   response. (Skywork's code takes the text between the first and second ``</think>``; with one
   ``</think>``, the usual case, both agree.) A response whose answer sits only inside the think
   block therefore scores 0.
2. ``pred = math_verify.parse(answer)`` with math-verify's default extraction (LaTeX, then plain
   expressions; ``\\boxed{}`` and "final answer is" anchors first, the rightmost match wins).
   Several ``\\boxed{}`` joined by "," / "and" / "or" become one set; unconnected boxes: the last
   one counts. ``pred`` is ``[sympy_value, extracted_string]`` on success; nothing extracted → 0.
3. Exact match: 1 if the extracted string equals a gold string (Skywork's fast path), or the
   whole answer stripped equals it.
4. Otherwise 1 if ``verify(parse("\\boxed{" + gold + "}"), pred)`` for some gold, else 0.
   Boxing the gold makes math-verify read it as a final answer (Skywork-OR1 §7.1).

The gold ``reference`` is one answer string; a JSON list of strings (the Skywork-OR1-RL-Data
``ground_truth`` form, e.g. ``["3"]``) means "any of these".

Time: math-verify can hang (sympy simplification, pathological regexes). Its own timeouts use
``signal.alarm`` per call and cancel any enclosing alarm, so they are turned off here and the
whole scoring runs under one ``ITIMER_REAL`` that raises ``MathTimeout`` (a BaseException, so
math-verify's ``except Exception`` blocks cannot swallow it). That only works in a main thread;
elsewhere there is no in-process limit. The pool (``rewards/pool.py``) adds a hard deadline a little
later and kills the worker process, which also covers C code that never returns to the interpreter.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

from bus.messages import ScoreOut

THINK_END = "</think>"
DETAIL_CHARS = 200  # ScoreOut.detail keeps this much of the extracted answer


class MathTimeout(BaseException):
    """Raised by the interval timer when one scoring exceeds its time limit."""


def extract_answer(response: str) -> str:
    """The text after the last `</think>`, or the whole response when there is none."""
    head, sep, tail = response.rpartition(THINK_END)
    return tail if sep else response


def parse_golds(reference: str) -> list[str]:
    """Gold answers from a reference: a JSON list of strings means several, else the text itself.
    A JSON list of numbers ("[1, 2]") is an answer (a list/interval), not several golds."""
    text = reference.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return [v.strip() for v in value]
    return [text]


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise MathTimeout in this (main) thread after `seconds`; a no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread() or seconds <= 0:
        yield
        return

    def _expire(signum: int, frame: object) -> None:
        raise MathTimeout()

    old = signal.signal(signal.SIGALRM, _expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _quiet_math_verify() -> None:
    # math-verify warns once that its own timeouts are off; that is deliberate here (see above).
    logging.getLogger("math_verify").setLevel(logging.ERROR)


def verify_answer(answer: str, golds: list[str]) -> tuple[bool, str]:
    """(correct, extracted string) by Skywork's rule; no time limit of its own."""
    from math_verify import parse, verify

    _quiet_math_verify()
    pred = parse(answer, parsing_timeout=None)
    extracted = next((p for p in pred if isinstance(p, str)), "")
    if not pred:
        return False, ""
    if extracted.strip() in golds or answer.strip() in golds:
        return True, extracted
    for gold in golds:
        if verify(parse("\\boxed{" + gold + "}", parsing_timeout=None), pred, timeout_seconds=None):
            return True, extracted
    return False, extracted


def score_math(response: str, reference: str, timeout_s: float) -> ScoreOut:
    """1.0 or 0.0 by the rule in the module docstring. Never raises for bad text; a run over
    `timeout_s` gives ScoreOut(0, error="timeout")."""
    golds = [g for g in parse_golds(reference) if g]
    if not golds:
        return ScoreOut(0.0, error="empty reference")
    answer = extract_answer(response)
    if not answer.strip():
        return ScoreOut(0.0, detail="no answer after </think>" if THINK_END in response else "empty response")
    try:
        with time_limit(timeout_s):
            ok, extracted = verify_answer(answer, golds)
    except MathTimeout:
        return ScoreOut(0.0, error="timeout")
    detail = extracted[:DETAIL_CHARS] if extracted else "nothing extracted"
    return ScoreOut(1.0 if ok else 0.0, detail=detail)
