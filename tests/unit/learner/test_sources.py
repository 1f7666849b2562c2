from learner.sources import LEARNER_ID, RelayView, WeightSources


def relays(*ids, version=1):
    return [RelayView(i, f"tcp://{i}:1", have_version=-1, receiving_version=version) for i in ids]


def test_learner_first_then_relays_within_fanout():
    ws = WeightSources("tcp://learner:5556", fanout=2)
    rs = relays("a", "b", "c", "d")
    assert ws.choose(1, "a", rs)[1] == LEARNER_ID
    assert ws.choose(1, "b", rs)[1] == LEARNER_ID
    third = ws.choose(1, "c", rs)[1]
    assert third in ("a", "b")
    fourth = ws.choose(1, "d", rs)[1]
    assert fourth in ("a", "b", "c") and fourth != "d"
    for sid in (LEARNER_ID, "a", "b", "c"):
        assert len(ws.children(sid, 1)) <= 2


def test_no_cycle_and_no_self():
    ws = WeightSources("tcp://learner:5556", fanout=1)
    rs = relays("a", "b")
    assert ws.choose(1, "a", rs)[1] == LEARNER_ID
    assert ws.choose(1, "b", rs)[1] == "a"
    # a re-asks (e.g. its pull stalled): it must not be sent to its own child b
    assert ws.choose(1, "a", rs)[1] != "b"


def test_done_and_dead_free_slots():
    ws = WeightSources("tcp://learner:5556", fanout=1)
    rs = relays("a", "b")
    ws.choose(1, "a", rs)
    ws.done("a", 1)
    assert ws.children(LEARNER_ID, 1) == set()
    ws.choose(1, "b", rs)
    ws.dead("b")
    assert ws.children(LEARNER_ID, 1) == set()


def test_relay_must_hold_or_receive_the_version():
    ws = WeightSources("tcp://learner:5556", fanout=1)
    old = [RelayView("a", "tcp://a:1", have_version=0, receiving_version=-1)]
    ws.choose(1, "x", old)
    assert ws.choose(1, "y", old)[1] == LEARNER_ID  # a holds only version 0: overflow goes to the learner


def test_slots_expire_after_ttl():
    now = [0.0]
    ws = WeightSources("tcp://learner:5556", fanout=1, ttl_s=5.0, clock=lambda: now[0])
    rs = relays("a", "b")
    assert ws.choose(1, "a", rs)[1] == LEARNER_ID
    assert ws.choose(1, "b", rs)[1] == "a"  # the learner's one slot is taken
    now[0] = 6.0  # a finished long ago without a heartbeat yet: its slot is free again
    assert ws.choose(1, "b", rs)[1] == LEARNER_ID


def test_same_host_source_first_and_outside_the_fanout():
    """With shared memory, a requester on a source's host maps the version there: the learner for
    its own host, else a same-host relay (one holding the version before one still receiving), and
    such children do not take the slots that remote pullers need."""
    ws = WeightSources("tcp://learner:5556", fanout=1, learner_host="L", shared=True)
    rs = [RelayView("a", "tcp://a:1", -1, 1, host="n1"), RelayView("b", "tcp://b:1", 1, -1, host="n1"),
          RelayView("c", "tcp://c:1", -1, 1, host="n2")]
    assert ws.choose(1, "x", rs, host="L")[1] == LEARNER_ID
    assert ws.choose(1, "y", rs, host="L")[1] == LEARNER_ID  # beyond the fanout of 1: same host
    assert ws.choose(1, "z", rs, host="n3")[1] == LEARNER_ID  # the learner's one remote slot is still free
    assert ws.choose(1, "d", rs, host="n1")[1] == "b"  # holds version 1 (a is still receiving it)
    assert ws.choose(1, "e", rs, host="n1")[1] == "b"
    assert ws.choose(1, "a", rs, host="n1")[1] == "b"  # a relay too: b is not its descendant
    assert ws.choose(1, "b", rs, host="n1")[1] != "a"  # ... and b never pulls from its own child a
    # shared memory off: the plain tree
    plain = WeightSources("tcp://learner:5556", fanout=1, learner_host="L", shared=False)
    assert plain.choose(1, "x", rs, host="L")[1] == LEARNER_ID
    assert plain.choose(1, "y", rs, host="L")[1] != LEARNER_ID


def test_a_relay_sent_to_pull_a_version_serves_it_before_its_heartbeat_says_so():
    ws = WeightSources("tcp://learner:5556", fanout=1)
    silent = [RelayView(i, f"tcp://{i}:1", have_version=0, receiving_version=-1) for i in ("a", "b", "c")]
    assert ws.choose(1, "a", silent)[1] == LEARNER_ID
    assert ws.choose(1, "b", silent)[1] == "a"  # a is pulling 1: it was told to
    assert ws.choose(1, "c", silent)[1] == "b"
    assert ws.choose(2, "c", silent)[1] == LEARNER_ID  # nobody was sent to pull 2 yet
