"""The actor as an object (actors/actor.py `Actor`), in one process, against a real learner side
(tests/serving.py: the bus `Server` with `LearnerService` and `Scheduler`, and a `WeightServer`
publishing versions). The engine is a fake; the test
plays the learner's training loop (score, take a batch, publish, advance) and reads the ledger
events the scheduler emits."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from actors.actor import Actor
from actors.engine import GenerationAborted, GenSample
from actors.weights_io import StreamBroken, StreamedTensors
from bus.messages import (
    FINISH_STOP,
    LeaseRequest,
    SamplingSpec,
    Submit,
)
from bus.weights.store import PartialStore, WeightStore
from tests.serving import MODEL, RUN_LEN, Learner, Scorer, until


class FakeEngine:
    """The Engine contract without a model: every sample is the tokens 5 6 7 ending "stop". With
    `block`, generate waits until aborted (or, with `ignore_abort`, until `unblock` is set)."""

    def __init__(self, block: bool = False, ignore_abort: bool = False):
        self.version = -1
        self.max_model_len = RUN_LEN
        self.block, self.ignore_abort = block, ignore_abort
        self.loads: list[int] = []
        self.generated: list[int] = []  # the version held at each generate call
        self.generating = threading.Event()
        self.aborted = threading.Event()
        self.unblock = threading.Event()
        self.closed = False

    def generate(self, prompts: list[np.ndarray], sampling: SamplingSpec) -> list[list[GenSample]]:
        self.generated.append(self.version)
        self.generating.set()
        if self.block:
            (self.unblock if self.ignore_abort else self.aborted).wait(30)
        if self.aborted.is_set() and not self.ignore_abort:
            raise GenerationAborted("aborted")
        return [[GenSample(np.array([5, 6, 7], np.int32), np.full(3, -0.5, np.float32), FINISH_STOP, "x")
                 for _ in range(sampling.n)] for _ in prompts]

    def load_weights(self, named, version: int) -> dict[str, float]:
        assert named.store.manifest.version == version  # the store the sync pulled, as zero-copy views
        self.loads.append(version)
        self.version = version
        return {"weights/load_s": 0.0}

    def abort(self) -> None:
        self.aborted.set()

    def close(self) -> None:
        self.closed = True


class InFlightEngine(FakeEngine):
    """An engine that loads weights mid-generation (the AsyncLLM engine's contract): generate waits
    until a newer version is loaded from another thread, then says tokens 2 on came from it."""

    updates_in_flight = True

    def generate(self, prompts: list[np.ndarray], sampling: SamplingSpec) -> list[list[GenSample]]:
        start = self.version
        self.generated.append(start)
        self.generating.set()
        deadline = time.monotonic() + (15 if len(self.generated) > 1 else 0)  # the first lease runs through
        while self.version == start and time.monotonic() < deadline and not self.aborted.is_set():
            time.sleep(0.01)
        if self.aborted.is_set():
            raise GenerationAborted("aborted")
        spans = [(start, 0)] if self.version == start else [(start, 0), (self.version, 2)]
        return [[GenSample(np.array([5, 6, 7], np.int32), np.full(3, -0.5, np.float32), FINISH_STOP, "x", spans)
                 for _ in range(sampling.n)] for _ in prompts]


class Running:
    """An Actor with a fake engine, running on a thread of its own (as `or1 actor` runs it on the
    main thread); `made` records the arguments its engine was built with."""

    def __init__(self, learner: Learner, engine: FakeEngine, cfg=None):
        self.engine, self.made = engine, []
        self.actor = Actor(cfg or learner.cfg, make_engine=self._make)
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _make(self, model, a, max_model_len):
        self.made.append((model, max_model_len))
        return self.engine

    def _run(self) -> None:
        self.code = self.actor.run()

    def stop(self, timeout: float = 10.0) -> float:
        """Set the stop flag; seconds until run() returned."""
        t0 = time.monotonic()
        self.actor.stop.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the actor did not stop"
        return time.monotonic() - t0


@pytest.fixture
def learner():
    made: list[Learner] = []

    def make(**kw) -> Learner:
        made.append(Learner(**kw))
        return made[-1]

    yield make
    for x in made:
        x.close()


def test_leases_are_generated_and_submitted_with_the_held_version(learner):
    ln = learner()
    run = Running(ln, FakeEngine())
    try:
        accepts = until(lambda: len(ln.seen("accept")) >= 2 and ln.seen("accept"), what="two accepted groups")
        assert run.made == [(MODEL, RUN_LEN)]  # built after the Welcome, from what the learner announced
        assert run.engine.loads[0] == 0 and run.engine.generated[0] == 0
        assert all(e["weight_version"] == 0 for e in accepts)
        assert until(lambda: ln.seen("lease_end", reason="completed"), what="the lease completed")
        assert run.actor.stats.groups >= 2 and run.actor.stats.tokens >= 2 * 2 * 3
    finally:
        run.stop()
    assert run.code == 0 and run.engine.closed and not run.engine.aborted.is_set()
    assert until(lambda: not ln.actors(), what="the actor's Bye")


def test_a_new_version_is_loaded_before_the_next_lease(learner):
    """η = 0: after a step the learner answers Wait(weights, 1); the actor pulls and loads version 1,
    and every group after that is generated and tagged with it."""
    ln = learner()
    scorer = Scorer(ln.server.endpoint)
    run = Running(ln, FakeEngine())
    try:
        assert ln.step() == 1
        until(lambda: ln.seen("accept", weight_version=1), what="a group generated with version 1")
        assert run.engine.loads[:2] == [0, 1]
        assert 1 in run.engine.generated
        leases = {e["lease_id"]: e for e in ln.seen("lease")}
        for e in ln.seen("accept"):  # never older weights than the lease asked for
            assert e["weight_version"] >= leases[e["lease_id"]]["min_version"]
    finally:
        run.stop()
        scorer.close()


def lie_about_the_held_version(ln: Learner) -> None:
    """The learner believes the actor holds one version more than its LeaseRequest says, so it may
    grant a lease whose min_version is above what the actor holds (the path an actor must guard)."""
    def lease(peer, msg: LeaseRequest):
        with ln.service.lock:
            return ln.service.lease(peer, replace(msg, weight_version=msg.weight_version + 1))

    ln.server.on(LeaseRequest, lease)


def test_a_lease_above_the_held_version_waits_for_that_version(learner):
    ln = learner(publish_first=False)  # version 0 is announced, but its weights are held back
    lie_about_the_held_version(ln)
    run = Running(ln, FakeEngine())
    try:
        (lease,) = until(lambda: ln.seen("lease"), what="a lease")
        assert lease["min_version"] == 0
        time.sleep(1.0)
        assert run.engine.loads == [] and run.engine.generated == []  # no weights ≥ 0 yet: no generation
        ln.publish(0)
        until(lambda: ln.seen("accept", lease_id=lease["lease_id"]), what="the lease's groups")
        assert run.engine.loads[0] == 0 and run.engine.generated[0] == 0
        assert all(e["weight_version"] == 0 for e in ln.seen("accept", lease_id=lease["lease_id"]))
    finally:
        run.stop()


def test_a_lease_whose_weights_do_not_come_is_released(learner):
    ln = learner(publish_first=False, lease_timeout_s=1.0)
    lie_about_the_held_version(ln)
    run = Running(ln, FakeEngine())
    try:
        (lease,) = until(lambda: ln.seen("lease"), what="a lease")[:1]
        ends = until(lambda: ln.seen("end", lease_id=lease["lease_id"]), what="the lease's end")
        assert {e["outcome"] for e in ends} == {"released"}  # given back at its deadline, not expired later
        assert run.engine.generated == []
    finally:
        run.stop()


@pytest.mark.parametrize("ignore_abort", [False, True])
def test_stop_during_a_generation_releases_the_leases_at_once(learner, ignore_abort):
    """The stop flag (what SIGTERM sets) in the middle of a long generation: the engine is told to
    abort, the held lease goes back with Release and the actor says Bye at once, without waiting
    for the generation. An engine that honours abort is closed once it has stopped; one that does
    not is left to the process exit, never closed under a running generation."""
    ln = learner()
    run = Running(ln, FakeEngine(block=True, ignore_abort=ignore_abort))
    run.actor.abort_grace_s = 0.5
    try:
        assert run.engine.generating.wait(15)
        (lease,) = ln.seen("lease")
        took = run.stop()
        assert took < 3.0 and run.code == 0
        assert run.engine.aborted.is_set()
        ends = until(lambda: ln.seen("end", lease_id=lease["lease_id"]), timeout=2, what="the lease's end")
        assert {e["outcome"] for e in ends} == {"released"}
        until(lambda: not ln.actors(), timeout=1, what="the actor's Bye")  # liveness would take 10 s
        assert run.engine.closed is (not ignore_abort)
    finally:
        run.engine.unblock.set()


def test_wait_done_ends_the_actor(learner):
    ln = learner()
    ln.service.finish()
    run = Running(ln, FakeEngine())
    run.thread.join(15)
    assert not run.thread.is_alive() and run.code == 0
    assert run.engine.generated == [] and run.engine.closed
    assert until(lambda: not ln.actors(), what="the actor's Bye")


def test_a_context_shorter_than_the_run_is_refused_before_the_engine(learner):
    ln = learner()
    cfg = ln.cfg.model_copy(deep=True)
    cfg.actor.max_model_len = RUN_LEN // 2
    run = Running(ln, FakeEngine(), cfg=cfg)
    run.thread.join(15)
    assert run.code == 2 and run.made == []


def test_a_signal_only_sets_the_stop_flag(learner):
    ln = learner()
    actor = Actor(ln.cfg, make_engine=lambda *_: FakeEngine())
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        actor.install_signals()
        os.kill(os.getpid(), signal.SIGTERM)
        assert until(actor.stop.is_set, timeout=5, what="the stop flag")
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    assert actor.run() == 0  # stopped before the Welcome: leaves without building an engine
    assert actor.engine is None


def test_in_flight_weights_load_during_the_generation(learner):
    """actor.update_mode = in_flight, η = 1: the second lease generates while the learner trains the
    first and publishes version 1; the actor pulls it and loads it into the running engine from its
    main thread. The groups are tagged with the oldest version (0) and carry where version 1 took
    over, and the learner accepts them."""
    ln = learner(eta=1)
    scorer = Scorer(ln.server.endpoint)
    cfg = ln.cfg.model_copy(deep=True)
    cfg.actor.update_mode = "in_flight"
    submits: list[Submit] = []

    def submit(peer, msg: Submit):
        submits.append(msg)
        with ln.service.lock:
            return ln.service.submit(peer, msg)

    ln.server.on(Submit, submit)
    run = Running(ln, InFlightEngine(), cfg=cfg)
    try:
        until(lambda: len(run.engine.generated) >= 2, what="the second lease generating")
        assert run.engine.generated[:2] == [0, 0] and run.engine.loads == [0]
        assert ln.step() == 1  # trains the first lease's groups, publishes version 1
        second = until(lambda: [e for e in ln.seen("accept") if e["lease_id"] != ln.seen("accept")[0]["lease_id"]],
                       what="the second lease's groups")
        assert run.engine.loads[:2] == [0, 1] and run.actor.stats.in_flight_loads >= 1
        assert all(e["weight_version"] == 0 for e in second)  # the oldest of its tokens
        first, later = submits[0], submits[-1]
        assert all(s.versions == [] for g in first.groups for s in g.samples)  # one version: no spans sent
        assert all([(v.version, v.start) for v in s.versions] == [(0, 0), (1, 2)]
                   for g in later.groups for s in g.samples)
    finally:
        run.stop()
        scorer.close()


def test_between_leases_mode_never_loads_mid_generation(learner):
    """The default update_mode: even an engine that could load in flight is loaded only between leases."""
    ln = learner(eta=1)
    scorer = Scorer(ln.server.endpoint)
    run = Running(ln, InFlightEngine())
    try:
        until(lambda: len(run.engine.generated) >= 2, what="the second lease generating")
        assert ln.step() == 1
        time.sleep(1.0)
        assert run.engine.loads == [0]  # version 1 waits for the lease to end
    finally:
        run.stop()
        scorer.close()


class StreamingEngine(FakeEngine):
    """An engine that loads a version while it arrives (vLLM in-process: `streams_loads`): it reads
    every tensor of a StreamedTensors, and notes whether the first came before the pull completed."""

    streams_loads = True

    def __init__(self):
        import torch  # noqa: F401  the stream yields torch tensors: torch's first import (~2 s) would land
        # in the first yield and make it late whenever no earlier test in this process imported torch

        super().__init__()
        self.early: list[bool] = []  # per streamed load: the first tensor came before the last chunk
        self.broken = 0

    def load_weights(self, named, version: int) -> dict[str, float]:
        if not isinstance(named, StreamedTensors):
            return super().load_weights(named, version)
        try:
            for i, _ in enumerate(named):
                if i == 0:
                    self.early.append(not named.partial.complete)
        except StreamBroken:
            self.broken += 1
            self.version = -1
            raise
        self.loads.append(version)
        self.version = version
        return {"weights/load_s": 0.0}


def step_with_weights_arriving(ln: Learner, upto: int | None = None, delay_s: float = 0.1):
    """`Learner.step`, but the new version (8 tensors, a chunk each) is served while it is still
    being filled, a chunk every `delay_s` (the first `upto` only, if given): the actor pulls it slowly."""
    batch = ln.service.next_batch(threading.Event())
    assert batch is not None
    version = batch.version + 1
    store = WeightStore.from_arrays(version, [(f"w{i}", np.full(16, version, np.float32)) for i in range(8)],
                                    chunk_bytes=64)
    partial = PartialStore(store.manifest)
    ln.weights.publish_partial(partial)
    ln.service.step_done(version)

    def fill(first: int, last: int) -> None:
        for i in range(first, last):
            time.sleep(delay_s)
            partial.put(i, store.chunk(i))

    feeder = threading.Thread(target=fill, args=(0, store.n_chunks if upto is None else upto), daemon=True)
    feeder.start()
    return version, feeder, lambda: fill(upto or 0, store.n_chunks)


def test_a_version_waited_for_is_loaded_while_it_arrives(learner):
    """η = 0: the actor must wait for version 1; its engine loads lazily, so it loads the version's
    tensors as their chunks land rather than after the whole pull."""
    ln = learner()
    scorer = Scorer(ln.server.endpoint)
    run = Running(ln, StreamingEngine())
    try:
        until(lambda: ln.seen("accept", weight_version=0), what="a group with version 0")
        version, feeder, _ = step_with_weights_arriving(ln, delay_s=0.15)
        until(lambda: ln.seen("accept", weight_version=version), what="a group generated with version 1")
        feeder.join()
        assert run.engine.loads[:2] == [0, 1] and run.engine.early == [True] and run.engine.broken == 0
    finally:
        run.stop()
        scorer.close()


def test_a_stream_that_breaks_holds_no_version_until_the_whole_one_loads(learner):
    """The pull of version 1 gives up halfway (its chunks stop coming): the engine holds part of two
    versions, so the actor holds none and generates nothing until version 1 comes whole."""
    ln = learner(extra=("bus.chunk_timeout_s=0.3",))
    scorer = Scorer(ln.server.endpoint)
    run = Running(ln, StreamingEngine())
    try:
        until(lambda: ln.seen("accept", weight_version=0), what="a group with version 0")
        version, feeder, rest = step_with_weights_arriving(ln, upto=4, delay_s=0.02)
        until(lambda: run.engine.broken >= 1, timeout=30, what="the stream breaking")
        assert run.actor.held_version == -1
        generated = len(run.engine.generated)
        time.sleep(0.5)
        assert len(run.engine.generated) == generated  # nothing generated on the mixed weights
        rest()  # the learner finishes the version; the sync's next pull brings it whole
        until(lambda: ln.seen("accept", weight_version=version), timeout=30, what="groups with version 1")
        assert run.engine.loads[-1] == version and -1 not in run.engine.generated
    finally:
        run.stop()
        scorer.close()
