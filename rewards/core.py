"""`score_one`: one ScoreItem → one ScoreOut, dispatched on `kind`; never raises.

Every exception (a bug, a sandbox failure, a math-verify timeout) becomes reward 0 with a short
`error`, so one bad item never costs the others their scores. `error` and `detail` are always valid
UTF-8 (a lone surrogate, from a response or from what a program printed, becomes ``\\udXXX`` text),
so they can be packed for the bus. Imported by pool workers, which preload it (and math-verify)
once so that a replaced worker starts scoring at once.
"""

from __future__ import annotations

from bus.messages import ScoreItem, ScoreOut
from common.config import RewardConfig
from rewards.code import score_code
from rewards.math import MathTimeout, score_math

KINDS = ("math", "code")
ERROR_CHARS = 200


def score_one(item: ScoreItem, cfg: RewardConfig) -> ScoreOut:
    """Score one item by its kind; any failure is ScoreOut(0.0, error=...)."""
    out = _score(item, cfg)
    return ScoreOut(out.reward, _utf8(out.error), _utf8(out.detail))


def _utf8(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _score(item: ScoreItem, cfg: RewardConfig) -> ScoreOut:
    try:
        if item.kind == "math":
            return score_math(item.response, item.reference, cfg.math_timeout_s)
        if item.kind == "code":
            return score_code(item.response, item.reference, cfg)
        return ScoreOut(0.0, error=f"unknown kind {item.kind!r} (expected one of {', '.join(KINDS)})")
    except MathTimeout:
        return ScoreOut(0.0, error="timeout")
    except Exception as e:  # noqa: BLE001 - the contract is: never raise
        return ScoreOut(0.0, error=f"{type(e).__name__}: {e}"[:ERROR_CHARS])


def item_deadline_s(item: ScoreItem, cfg: RewardConfig) -> float:
    """Hard limit the pool allows one item before killing its worker: the item's own limit
    plus a grace, so the in-process limits normally answer first."""
    if item.kind == "math":
        return cfg.math_timeout_s + 2.0
    return cfg.code_item_timeout_s + cfg.code_timeout_s + 5.0


def warm_up() -> None:
    """Import what scoring needs (math-verify pulls in sympy: ~1 s), so the first item is not slow."""
    import math_verify  # noqa: F401
    import math_verify.grader  # noqa: F401
