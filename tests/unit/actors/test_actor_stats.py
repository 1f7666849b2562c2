"""actor/tokens_per_s is the rate of the last interval, not a cumulative average (issue 13)."""

from actors.actor import RATE_WINDOW_S, ActorStats


def test_tokens_per_s_is_the_last_intervals_rate():
    s = ActorStats()
    assert s.interval_rate(100.0) == 0.0
    s.tokens, s.gen_s = 1000, 1.0
    assert s.interval_rate(100.0 + RATE_WINDOW_S) == 1000 / RATE_WINDOW_S
    assert s.interval_rate(101.0 + RATE_WINDOW_S) == 1000 / RATE_WINDOW_S  # held until the next window
    s.tokens = 1000  # nothing generated in the next window: the rate falls to 0, the cumulative does not
    assert s.interval_rate(100.0 + 2 * RATE_WINDOW_S) == 0.0
    s.tokens, s.gen_s = 31000, 2.0  # a burst: only this window's tokens count
    assert s.interval_rate(100.0 + 3 * RATE_WINDOW_S) == 30000 / RATE_WINDOW_S
