"""learner/service.py over the bus (tests/serving.py: the real Server, LearnerService, Scheduler
and WeightServer; a bus Client plays the actor): a lease request the staleness bound turns away is
held, and answered the moment a step frees a slot, when the run ends, or after
learner.admission_retry_s with Wait(admission, retry 0)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from bus.client import Client
from bus.messages import (
    FINISH_STOP, ROLE_ACTOR, WAIT_ADMISSION, WAIT_DONE, WAIT_WEIGHTS, Group, Hello, Lease, LeaseRequest, Message,
    Sample, Submit, SubmitAck, Wait,
)
from tests.serving import Learner, Scorer, until


class Asking:
    """A LeaseRequest sent on a thread of its own: its reply and when it came."""

    def __init__(self, client: Client, held: int):
        self.reply: Message | None = None
        self.at = 0.0
        self.sent = time.monotonic()
        self._thread = threading.Thread(target=self._ask, args=(client, held), daemon=True)
        self._thread.start()

    def _ask(self, client: Client, held: int) -> None:
        try:
            self.reply = client.request(LeaseRequest(max_groups=2, weight_version=held), timeout=60)
        except TimeoutError:  # the client closed under it
            pass
        self.at = time.monotonic()

    def answered(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()


def actor(ln: Learner) -> Client:
    client = Client(ln.server.endpoint, lambda: Hello(role=ROLE_ACTOR, worker_id="a0", weight_version=0),
                    heartbeat_s=0.2)
    client.connect(timeout=10)
    return client


def take_and_submit(ln: Learner, client: Client) -> Lease:
    """One lease of B = 2 groups at version 0, submitted (the Scorer makes them useful)."""
    lease = client.request(LeaseRequest(max_groups=2, weight_version=0), timeout=10)
    assert isinstance(lease, Lease) and len(lease.prompts) == 2
    samples = [Sample(np.array([5, 6, 7], np.int32), np.full(3, -0.5, np.float32), FINISH_STOP, "x") for _ in range(2)]
    groups = [Group(p.prompt_id, 0, samples) for p in lease.prompts]
    ack = client.request(Submit(lease_id=lease.lease_id, epoch=lease.epoch, groups=groups), timeout=10)
    assert isinstance(ack, SubmitAck) and ack.accepted == 2
    return lease


@pytest.fixture
def served() -> Iterator[tuple[Learner, Client]]:
    made: list = []

    def make(retry_s: float) -> tuple[Learner, Client]:
        ln = Learner(extra=(f"learner.admission_retry_s={retry_s}",))  # eta 0, B = 2, leases of 2
        made.append(ln)
        client = actor(ln)
        made.append(client)
        return ln, client

    yield make
    for x in reversed(made):
        x.close()


def test_a_turned_away_request_is_answered_when_the_step_ends(served):
    ln, client = served(retry_s=30.0)  # polling, the actor would sleep 30 s
    scorer = Scorer(ln.server.endpoint)
    try:
        take_and_submit(ln, client)  # the one batch η = 0 admits
        asking = Asking(client, held=0)
        assert not asking.answered(0.5), "answered before any slot freed"
        stepped = time.monotonic()
        assert ln.step() == 1  # waits for the scores, publishes 1, frees a batch of slots
        assert asking.answered(5.0)
        assert asking.reply == Wait(WAIT_WEIGHTS, 0.0, 1)  # the slot is there; it wants version 1
        assert asking.at - stepped < 3.0
        lease = client.request(LeaseRequest(max_groups=2, weight_version=1), timeout=10)
        assert isinstance(lease, Lease) and lease.min_version == 1
    finally:
        scorer.close()


def test_a_held_request_is_answered_after_admission_retry_s(served):
    ln, client = served(retry_s=0.3)
    take_and_submit(ln, client)  # no reward worker: the groups stay in flight, the bound stays shut
    asking = Asking(client, held=0)
    assert asking.answered(5.0)
    assert isinstance(asking.reply, Wait) and asking.reply.reason == WAIT_ADMISSION
    assert asking.reply.retry_after_s == 0.0  # ask again at once: it is held again
    assert 0.25 <= asking.at - asking.sent < 3.0


def test_the_run_ending_answers_held_requests_and_a_gone_actor_leaves_none(served):
    ln, client = served(retry_s=30.0)
    take_and_submit(ln, client)
    asking = Asking(client, held=0)
    until(lambda: ln.service._parked, what="the request held")
    ln.service.finish()
    assert asking.answered(5.0) and isinstance(asking.reply, Wait) and asking.reply.reason == WAIT_DONE

    other = Client(ln.server.endpoint, lambda: Hello(role=ROLE_ACTOR, worker_id="a1", weight_version=0),
                   heartbeat_s=0.2)
    other.connect(timeout=10)
    ln.service.finished = False  # back to serving, for the second actor
    parked = Asking(other, held=0)
    until(lambda: "a1" in ln.service._parked, what="the second actor's request held")
    other.close()  # Bye: the peer is gone, and so is its held request
    until(lambda: "a1" not in ln.service._parked, what="the gone actor's request dropped")
    assert parked.answered(5.0) and parked.reply is None
