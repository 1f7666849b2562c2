"""rewards/memo.py: math verdicts reused, scorings in flight shared, code and failures never kept."""

from concurrent.futures import Future

from bus.messages import ScoreItem, ScoreOut
from rewards.memo import ScoreMemo, memo_key


class Pool:
    """A submit that records what it was given and resolves when told to."""

    def __init__(self):
        self.sent: list[tuple[ScoreItem, Future]] = []

    def submit(self, item: ScoreItem) -> Future:
        fut: Future = Future()
        self.sent.append((item, fut))
        return fut


def math(response: str, reference: str = "7") -> ScoreItem:
    return ScoreItem("math", response, reference)


def test_a_known_verdict_is_reused_and_a_pending_one_shared():
    memo, pool = ScoreMemo(10), Pool()
    first = memo.score(math(" \\boxed{7}"), pool.submit)
    second = memo.score(math(" \\boxed{7}"), pool.submit)  # the same pair while the first is scored
    assert second is first and len(pool.sent) == 1
    pool.sent[0][1].set_result(ScoreOut(1.0, detail="7"))
    third = memo.score(math(" \\boxed{7}"), pool.submit)
    assert third.done() and third.result() == ScoreOut(1.0, detail="7") and len(pool.sent) == 1
    other = memo.score(math(" \\boxed{7}", reference="8"), pool.submit)  # another reference: scored
    assert not other.done() and len(pool.sent) == 2
    assert memo.metrics() == {"reward/memo_hits": 1.0, "reward/memo_shared": 1.0, "reward/memo_misses": 2.0}


def test_code_and_failed_scorings_are_never_kept():
    memo, pool = ScoreMemo(10), Pool()
    code = ScoreItem("code", "print(1)", '{"inputs": [""], "outputs": ["1"]}')
    assert memo_key(code) is None
    memo.score(code, pool.submit).set_result(ScoreOut(1.0))
    memo.score(code, pool.submit)
    assert len(pool.sent) == 2  # a program's run depends on time and machine: always run again
    memo.score(math("x"), pool.submit)
    pool.sent[-1][1].set_result(ScoreOut(0.0, error="timeout"))
    memo.score(math("x"), pool.submit)
    assert len(pool.sent) == 4  # a timeout may pass next time
    pool.sent[-1][1].set_exception(RuntimeError("pool closed"))
    memo.score(math("x"), pool.submit)
    assert len(pool.sent) == 5


def test_least_recently_used_go_first_and_zero_turns_it_off():
    memo, pool = ScoreMemo(2), Pool()
    for r in ("a", "b"):
        memo.score(math(r), pool.submit)
        pool.sent[-1][1].set_result(ScoreOut(0.0))
    memo.score(math("a"), pool.submit)  # a is now the most recent
    memo.score(math("c"), pool.submit)
    pool.sent[-1][1].set_result(ScoreOut(0.0))  # c pushes b out
    assert memo.score(math("a"), pool.submit).done()
    assert not memo.score(math("b"), pool.submit).done()
    off, pool = ScoreMemo(0), Pool()
    off.score(math("a"), pool.submit).set_result(ScoreOut(1.0))
    assert not off.score(math("a"), pool.submit).done() and len(pool.sent) == 2


def test_keys_keep_the_fields_apart():
    assert memo_key(ScoreItem("math", "ab", "c")) != memo_key(ScoreItem("math", "a", "bc"))
    assert memo_key(ScoreItem("math", "1", "1")) == memo_key(ScoreItem("math", "1", "1"))
    assert len(memo_key(ScoreItem("math", "x" * 100_000, "1"))) == 16
