"""learner/learner.py: the Learner that `or1 learner` runs, built by the same `build_learner`, in
this process: the embedded tiny model on one DeepSpeed rank (CPU, gloo), real weights and control
servers on free ports. Scored groups go straight into its scheduler (lease → submit → scored under
the service lock, as the bus handlers and the score dispatcher do), so no actor or reward worker
runs; tests/integration/test_learner_process.py drives the learner process over the bus."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from bus.messages import Group, Lease, Sample
from bus.weights.pull import fetch_manifest
from common.config import Config, load_config
from common.metrics import read_jsonl
from learner import checkpoint as ckpt
from learner.learner import Learner, build_learner

torch.set_num_threads(1)
B, N = 2, 4  # prompts per batch, samples per prompt


def make_config(run_dir, model_dir, steps: int, resume: bool = False) -> Config:
    return load_config(overrides=[
        f"learner.model={model_dir}", f"learner.run_dir={run_dir}", "learner.bind_host=127.0.0.1",
        "learner.advertise_host=127.0.0.1", "learner.control_port=0", "learner.weights_port=0",
        "learner.max_staleness=0", f"learner.lease_groups={B}", "learner.optim.lr=1e-4",
        f"learner.stages=[{{steps={steps}, max_response_tokens=8, prompts_per_batch={B}, group_size={N}}}]",
        f"learner.resume={str(resume).lower()}",
    ])


def build(cfg: Config) -> Learner:
    from learner.dist import RankGroup
    from learner.trainer import Trainer

    trainer = Trainer(cfg.learner.model, cfg.learner, temperature=cfg.learner.sampling.temperature)
    return build_learner(cfg, RankGroup(trainer))


def feed(learner: Learner, rewards: list[float]) -> bool:
    """One lease of B groups at the published version, submitted and scored with `rewards` (each
    group's n rewards). False when the scheduler grants nothing now."""
    service, scheduler = learner.service, learner.scheduler
    with service.lock:
        now = service.clock()
        lease = scheduler.grant("test-actor", B, service.published_version, now)
        if not isinstance(lease, Lease):
            return False
        samples = [Sample(token_ids=np.array([5, 6, 7], np.int32), logprobs=np.full(3, -0.5, np.float32),
                          finish_reason="stop", text="") for _ in range(N)]
        groups = [Group(p.prompt_id, service.published_version, samples) for p in lease.prompts]
        result = scheduler.submit("test-actor", lease.lease_id, lease.epoch, groups, now)
        assert len(result.accepted) == len(groups), result.rejected
        for acc in result.accepted:
            assert scheduler.scored(acc.group_id, rewards) == "buffered"
        service.ready.notify_all()
    return True


def test_step_publishes_records_and_saves(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    learner = build(make_config(run_dir, tiny_model_dir, steps=3))
    try:
        assert learner.version == 0 and learner.weights.versions() == [0]
        port = learner.server.endpoint.rsplit(":", 1)[1]
        assert (run_dir / "endpoint").read_text().strip() == f"tcp://127.0.0.1:{port}"
        assert feed(learner, [1.0, 0.0, 1.0, 0.0])
        assert learner.step() == pytest.approx(0.5)
        assert learner.version == learner.scheduler.version == 1 and learner.ranks.trainer.version == 1
        assert learner.weights.versions() == [0, 1]
        manifest = fetch_manifest(learner.service.sources.learner_endpoint, 1, timeout=10)  # on the wire
        assert manifest.version == 1 and manifest.tensors

        path = learner.save()
        assert path == ckpt.checkpoint_dir(run_dir, 1) and ckpt.is_complete(path)
        assert ckpt.latest_checkpoint(run_dir) == path

        learner.stop.set()  # SIGTERM's effect: the next step returns without a batch
        assert learner.step() is None and learner.version == 1
    finally:
        learner.close()
    learner.close()  # idempotent
    [record] = read_jsonl(run_dir / "metrics.jsonl")
    assert record["step"] == 1 and np.isfinite(record["loss/policy"]) and record["reward/mean"] == 0.5
    assert any(k.startswith("data/") for k in record)  # the data counts join the first step's record
    train_s, publish_s, step_s = (record[f"learner/{k}_s"] for k in ("train", "publish", "step"))
    assert 0 < train_s and 0 < publish_s and train_s + publish_s <= step_s  # the step holds both
    ledger = [json.loads(x) for x in (run_dir / "ledger.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "end" and e["outcome"] == "trained" for e in ledger) == B


def test_resumed_run_to_the_end_of_the_schedule(tmp_path, tiny_model_dir):
    """A checkpoint at version 1, then a resumed Learner runs its loop to the last step (a thread
    feeds it), saves the final checkpoint and the model folder."""
    run_dir = tmp_path / "run"
    first = build(make_config(run_dir, tiny_model_dir, steps=3))
    try:
        feed(first, [1.0, 0.0, 0.0, 0.0])
        assert first.step() is not None
        first.save()
    finally:
        first.close()

    learner = build(make_config(run_dir, tiny_model_dir, steps=3, resume=True))
    done, errors = threading.Event(), []

    def feeder() -> None:
        try:
            while not done.is_set() and not learner.scheduler.done:
                if not feed(learner, [0.0, 1.0, 1.0, 1.0]):
                    done.wait(0.02)
        except Exception as e:  # noqa: BLE001 — end the run instead of leaving it waiting for groups
            errors.append(e)
            learner.stop.set()

    thread = threading.Thread(target=feeder, daemon=True)
    try:
        assert learner.version == 1 and learner.scheduler.epoch == 1 and learner.weights.versions() == [1]
        thread.start()
        assert learner.run() == 0
    finally:
        done.set()
        thread.join(10)
        learner.close()
    assert not errors and learner.version == 3 and learner.service.finished
    assert ckpt.latest_checkpoint(run_dir) == ckpt.checkpoint_dir(run_dir, 3)
    assert (run_dir / "model" / "config.json").exists()
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert steps == [1, 2, 3]
    assert {r["reward/mean"] for r in read_jsonl(run_dir / "metrics.jsonl")[1:]} == {0.75}


def test_a_run_stopped_by_sigterm_waits_for_its_fleet_to_hear_done(tmp_path, tiny_model_dir):
    """SIGTERM's stop flag ends the loop, but the wrap-up still waits (within DONE_GRACE_S) until the
    fleet has heard Wait(done) and left. It used to return at once, since the flag it was handed was
    set: the actors kept calling a learner that had exited."""
    import time

    from bus.client import Client
    from bus.messages import ROLE_ACTOR, WAIT_DONE, Hello, LeaseRequest, Wait

    learner = build(make_config(tmp_path / "run", tiny_model_dir, steps=3))
    port = learner.server.endpoint.rsplit(":", 1)[1]
    actor = Client(f"tcp://127.0.0.1:{port}", lambda: Hello(role=ROLE_ACTOR, worker_id="a1"), heartbeat_s=0.5)
    left: dict[str, float] = {}

    def fleet() -> None:  # an actor that leaves 0.5 s after it is told the run is done
        actor.connect(timeout=30)
        while True:
            reply = actor.request(LeaseRequest(max_groups=B, weight_version=0), timeout=30)
            if isinstance(reply, Wait) and reply.reason == WAIT_DONE:
                time.sleep(0.5)
                left["at"] = time.monotonic()
                actor.close()
                return
            time.sleep(0.05)

    t = threading.Thread(target=fleet, daemon=True)
    try:
        t.start()
        time.sleep(1.0)  # connected, asking
        learner.stop.set()  # what SIGTERM does
        assert learner.run() == 0
        ended = time.monotonic()
    finally:
        learner.close()
        actor.close()
    t.join(timeout=10)
    assert "at" in left and left["at"] <= ended, "the learner returned before its actor had left"
