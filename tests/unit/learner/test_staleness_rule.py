"""learner/staleness.py: the rule's functions at and around the bound. The scheduler's use of them
is driven through every path by test_admission_machine.py."""

import numpy as np
import pytest

from learner.staleness import admissible, check_eta, fresh_enough, last_trainable, min_weights, staleness


@pytest.mark.parametrize("eta", [0, 1, 3])
def test_bound_is_inclusive_and_the_helpers_agree(eta):
    for v in range(0, 8):
        for w in range(0, v + 1):
            assert staleness(v, w) == v - w
            assert admissible(v, w, eta) == (v - w <= eta)
            # the oldest admissible weights, and the newest version a group from w may train at
            assert admissible(v, w, eta) == (w >= min_weights(v, eta)) == (v <= last_trainable(w, eta))
            assert fresh_enough(w, min_weights(v, eta)) == admissible(v, w, eta)


def test_min_weights_never_below_zero():
    assert min_weights(0, 4) == 0 and min_weights(2, 4) == 0 and min_weights(6, 4) == 2


def test_eta_must_be_a_nonnegative_integer():
    assert check_eta(0) == 0 and check_eta(np.int64(3)) == 3 and type(check_eta(np.int64(3))) is int
    for bad in (-1, 1.5, True, "2", None):
        with pytest.raises(ValueError, match="max_staleness must be an integer >= 0"):
            check_eta(bad)


@pytest.mark.parametrize("spans, ok", [
    ([], True),  # one version: the group's
    ([(3, 0)], True),
    ([(3, 0), (4, 5)], True),
    ([(3, 0), (5, 2), (6, 9)], True),
    ([(3, 1)], False),  # the first span must start at the first token
    ([(3, 0), (4, 10)], False),  # a span past the sample's end
    ([(3, 0), (4, 5), (5, 5)], False),  # starts not strictly increasing
    ([(4, 0), (3, 5)], False),  # versions going back
    ([(2, 0), (4, 5)], False),  # a token older than the group says: staleness would be undercounted
    ([(3, 0), (7, 5)], False),  # a version the learner never published
])
def test_spans_ok(spans, ok):
    from learner.staleness import spans_ok

    assert spans_ok(spans, n_tokens=10, weight_version=3, newest=6) is ok
