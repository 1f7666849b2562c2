"""The learner on rank 0 as one object: what it owns, one optimizer step, the run loop.

`build_learner(cfg, ranks)` wires a `Learner` around the rank group (learner/dist.py `RankGroup`):
the training data and tokenizer, the resumed checkpoint, the scheduler and its ledger, the weight
server (serving version v at once), the bus server with `LearnerService`'s handlers, the endpoint
file, the metrics sink and the optional evaluator. `or1 learner` (learner/run.py `run`) and the
in-process test (tests/unit/learner/test_learner.py) build it the same way, so the test exercises
the process's own wiring.

    learner.run():
        [eval at start]
        until the last stage's last step, the target reward, or `stop`:
            learner.step():  wait for B useful groups (service.next_batch)
                             micro-batches by token budget → every rank's train_step (one optimizer step)
                             entropy controller ← the step's entropy
                             publish v + 1 → service.step_done (scheduler.on_step) → one metrics record
            checkpoint every K versions, eval every E versions
        final checkpoint and eval (unless just done), model/ folder; Wait(done) to the fleet, serve
        until it has left, end the grants still open in the ledger
    learner.close(): stop both servers and the ranks, close the sink, the ledger and the evaluator

Timings, one writer each: `learner/wait_s` waiting for the batch, `learner/train_s` the ranks'
`train_step` (learner/trainer.py), `learner/publish_s` export and publish, `learner/step_s` the
whole step from batch in hand to its metrics record (all of these plus micro-batching and
bookkeeping).
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from common.config import Config, LearnerConfig, save_config
from common.log import get_logger
from learner.run import publish, save_model_folder, warn_plaintext

if TYPE_CHECKING:
    from bus.server import Server
    from bus.weights.server import WeightServer
    from common.metrics import MetricsSink
    from learner.dist import RankGroup
    from learner.entropy import EntropyController
    from learner.evaluation import Evaluator
    from learner.scheduler import Batch, Prompt, Scheduler
    from learner.service import Ledger, LearnerService

log = get_logger()
T = TypeVar("T")
DONE_GRACE_S = 30.0  # after the last step, keep answering until the fleet has left (at most this long)


@dataclass(eq=False)
class Learner:
    """Rank 0's side of the run. It owns the ranks, the service with its scheduler, the entropy
    controller, the weights and control servers, the metrics sink, the ledger and the evaluator;
    `close()` releases them all. The bus handlers run on the control server's thread and touch the
    scheduler only under `service.lock`; the methods here run on the main thread."""

    cfg: Config
    ranks: RankGroup
    service: LearnerService
    controller: EntropyController
    weights: WeightServer
    server: Server
    sink: MetricsSink
    ledger: Ledger
    evaluator: Evaluator | None
    run_id: str
    pad_id: int
    pending: dict[str, float] = field(default_factory=dict)  # joins the next step's record (data/* counts)
    stop: threading.Event = field(default_factory=threading.Event)  # set it (SIGTERM) to end the run early
    _saved: int = field(default=-1, init=False)  # the version this process checkpointed last
    _evaluated: int = field(default=-1, init=False)  # the version this process evaluated last
    _closed: bool = field(default=False, init=False)

    @property
    def scheduler(self) -> Scheduler:
        return self.service.scheduler

    @property
    def version(self) -> int:
        """The newest published weights version (= optimizer steps taken)."""
        return self.service.published_version

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.learner.run_dir)

    @property
    def model_path(self) -> str:
        return self.ranks.trainer.model_path

    def step(self) -> float | None:
        """One optimizer step: batch → micro-batches → train → publish → metrics. Returns the step's
        mean reward (all groups scored since the last step), None if `stop` came before a batch."""
        t_wait = time.perf_counter()
        batch = self.service.next_batch(self.stop)
        if batch is None:
            return None
        wait_s = time.perf_counter() - t_wait
        t0 = time.perf_counter()
        metrics = self._train(batch)
        version = batch.version + 1
        t_pub = time.perf_counter()
        sharded = self.publish(version)  # before step_done: a version is served before any reply announces it
        metrics["learner/publish_s"] = time.perf_counter() - t_pub
        metrics["learner/publish_sharded"] = float(sharded)
        metrics.update(self.service.step_done(version))
        metrics.update(batch.metrics)
        metrics.update(self.service.fleet_metrics())
        metrics.update(self.weights.metrics)  # the weights port's own counters (weights/bad_messages, ...)
        metrics.update({"learner/wait_s": wait_s, "learner/step_s": time.perf_counter() - t0})
        metrics.update(self.pending)
        self.pending = {}
        self.sink.write(version, metrics)
        log.info("step", version=version, reward=round(metrics.get("reward/mean", 0.0), 3),
                 entropy=round(metrics.get("entropy/mean", 0.0), 4),
                 staleness_max=metrics.get("staleness/max"), wait_s=round(wait_s, 2),
                 step_s=round(metrics["learner/step_s"], 2))
        return float(metrics.get("reward/mean", 0.0))

    def _train(self, batch: Batch) -> dict[str, float]:
        """The batch's samples as micro-batches dealt to the ranks, one optimizer step on all of them
        at the controller's α, then the controller's update from the step's entropy."""
        from learner.buffer import make_micro_batches, to_train_samples

        lc = self.cfg.learner
        samples = to_train_samples(batch.groups)
        per_rank, mb_metrics = make_micro_batches(samples, lc.trainer.micro_batch_tokens,
                                                  self.ranks.world_size, pad_id=self.pad_id,
                                                  mask_truncated=lc.loss.mask_truncated,
                                                  share_prompts=lc.trainer.prompts_shared)
        alpha = self.controller.alpha()
        metrics = self.ranks.step(per_rank, int(mb_metrics["learner/loss_tokens"]), alpha)
        metrics.update(self.controller.update(metrics["entropy/mean"]))
        metrics.update(mb_metrics)
        metrics["entropy/alpha_applied"] = alpha
        return metrics

    def publish(self, version: int) -> bool:
        """Every rank's weights, exported and served as `version` on the weights port; True if the
        ranks wrote their own partitions (learner/run.py `publish`), False if rank 0 gathered."""
        return publish(self.ranks, self.weights, version, self.cfg)

    def save(self) -> Path:
        """A checkpoint of the published version (with learner.export_checkpoints, also its weights
        as an HF folder in checkpoints/step_N/hf), then prune old ones. Returns its folder."""
        from learner import checkpoint as ckpt
        from learner.export import HF_DIR

        lc = self.cfg.learner
        with self.service.lock:
            version = self.service.published_version
            state = {"epoch": self.scheduler.epoch, "run_id": self.run_id,
                     "scheduler": self.scheduler.state_dict(), "entropy": self.controller.state_dict()}
        path = self.ranks.save_checkpoint(ckpt.checkpoint_dir(self.run_dir, version), state)
        if lc.export_checkpoints:
            save_model_folder(self.ranks, self.model_path, path / HF_DIR, self.cfg)
        ckpt.prune_checkpoints(self.run_dir, lc.keep_checkpoints)
        self._saved = version
        log.info("checkpoint.saved", path=str(path))
        return path

    def evaluate(self) -> None:
        """The evaluator's eval/* metrics for the current weights, as their own record."""
        assert self.evaluator is not None
        self.sink.write(self.version, self.evaluator.run(self.ranks, self.version))
        self._evaluated = self.version

    def run(self) -> int:
        """Steps until the schedule ends, the target reward is reached or `stop`; then `_wrap_up`."""
        lc = self.cfg.learner
        if self.evaluator is not None and lc.eval.at_start:
            self.evaluate()
        recent: list[float] = []
        while not self.stop.is_set() and not self.scheduler.done:
            reward = self.step()
            if reward is None:
                break
            recent = (recent + [reward])[-lc.stop_window:]
            if reached(lc.stop_at_reward, recent, lc.stop_window):
                log.info("learner.target_reached", reward=round(sum(recent) / len(recent), 3),
                         version=self.version)
                break
            if lc.checkpoint_every and self.version % lc.checkpoint_every == 0:
                self.save()
            if self.evaluator is not None and self.evaluator.due(self.version):
                self.evaluate()
        self._wrap_up()
        log.info("learner.done", version=self.version)
        return 0

    def _wrap_up(self) -> None:
        """The final checkpoint, eval and model/ folder (once weights were trained), then tell the
        fleet the run is done, serve until it has left, and end the grants still open."""
        if self.version > 0:
            if self.version != self._saved:
                self.save()
            if self.evaluator is not None and self.version != self._evaluated:
                self.evaluate()
            save_model_folder(self.ranks, self.model_path, self.run_dir / "model", self.cfg)
        self.service.finish()
        self.service.wait_fleet_gone(DONE_GRACE_S)
        self.service.close_run()

    def close(self) -> None:
        """Stop serving (control, then weights), release the ranks, close the sink, the ledger and
        the evaluator. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.server.stop()
            self.weights.stop()
            self.ranks.stop()
        finally:
            self.sink.close()
            self.ledger.close()
            if self.evaluator is not None:
                self.evaluator.close()


def reached(target: float | None, recent: list[float], window: int) -> bool:
    return target is not None and len(recent) >= window and sum(recent) / len(recent) >= target


def build_learner(cfg: Config, ranks: RankGroup, stop: threading.Event | None = None) -> Learner:
    """Everything rank 0 holds before its first step: data checked and tokenized, the latest
    checkpoint loaded with --resume (a new epoch), version v published, the bus served, the endpoint
    file written. Raises common.data.DataError for data the run cannot use."""
    from transformers import AutoTokenizer

    from common.metrics import JsonlSink, MultiSink, TensorBoardSink
    from learner.entropy import EntropyController
    from learner.service import Ledger

    lc, model_path = cfg.learner, ranks.trainer.model_path
    run_dir = Path(lc.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "learner_config.json")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts, context, data_metrics = _training_data(cfg, tokenizer, model_path)
    evaluator = _evaluator(cfg, model_path, tokenizer)
    controller = EntropyController(lc.entropy)
    resumed = _resume(lc, ranks, run_dir)
    ledger = Ledger(run_dir / "ledger.jsonl")
    scheduler = _scheduler(prompts, lc, resumed, controller, ledger, ranks.trainer.vocab_size)
    run_id = resumed[0].get("run_id") or uuid.uuid4().hex[:12]
    sink = MultiSink(JsonlSink(run_dir / "metrics.jsonl"), TensorBoardSink(run_dir / "tb"))
    weights, service, server = _serve(cfg, ranks, scheduler, run_id, context)  # last: peers come at once
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Learner(cfg=cfg, ranks=ranks, service=service, controller=controller, weights=weights,
                   server=server, sink=sink, ledger=ledger, evaluator=evaluator, run_id=run_id, pad_id=pad_id,
                   pending=data_metrics, stop=stop or threading.Event())


def _training_data(cfg: Config, tokenizer: Any,
                   model_path: str) -> tuple[list[Prompt], int, dict[str, float]]:
    """The scheduler's prompts, the run's context length and the data/* counts. Every reference is
    parsed and every prompt tokenized here (as `or1 check-data` does); prompts too long are counted."""
    from actors.engine import model_context_len
    from common.data import run_context, training_data
    from learner.scheduler import Prompt

    data = training_data(cfg, tokenizer, model_len=model_context_len(model_path))
    prompts = [Prompt(p.id, ids, p.kind, p.reference, p.source) for p, ids in data.pairs]
    context = run_context(cfg, data.pairs)
    log.info("data.loaded", problems=len(prompts), sources=sorted({p.source for p in prompts}),
             max_prompt_tokens=data.limit.tokens, max_model_len=context)
    return prompts, context, data.metrics()


def _evaluator(cfg: Config, model_path: str, tokenizer: Any) -> Evaluator | None:
    if not (cfg.learner.eval.every or cfg.learner.eval.at_start):
        return None
    from learner.evaluation import Evaluator

    return Evaluator(cfg, model_path, tokenizer)


def _resume(lc: LearnerConfig, ranks: RankGroup, run_dir: Path) -> tuple[dict[str, Any], Path | None]:
    """With learner.resume, every rank loads the latest complete checkpoint: its client state
    (epoch, run id, scheduler, entropy controller) and folder, or ({}, None) for a fresh run."""
    from learner import checkpoint as ckpt

    latest = ckpt.latest_checkpoint(run_dir) if lc.resume else None
    return (ranks.load_checkpoint(latest), latest) if latest is not None else ({}, None)


def _scheduler(prompts: list[Prompt], lc: LearnerConfig, resumed: tuple[dict[str, Any], Path | None],
               controller: EntropyController, ledger: Ledger, vocab_size: int) -> Scheduler:
    """The scheduler of a new epoch (the checkpoint's + 1), restored with the controller from the
    resumed checkpoint's state."""
    from learner.scheduler import Scheduler

    state, path = resumed
    epoch = int(state.get("epoch", -1)) + 1
    scheduler = Scheduler.from_config(prompts, lc, epoch, on_event=ledger.write, vocab_size=vocab_size)
    if state:
        scheduler.load_state_dict(state["scheduler"])
        controller.load_state_dict(state["entropy"])
        log.info("resumed", checkpoint=str(path), version=scheduler.version, epoch=epoch)
    return scheduler


def _serve(cfg: Config, ranks: RankGroup, scheduler: Scheduler, run_id: str,
           context: int) -> tuple[WeightServer, LearnerService, Server]:
    """The weights port serving version v, then the control port with the service's handlers, then
    the endpoint file (or1 run waits for it)."""
    from bus.address import learner_advertise_host
    from bus.auth import server_curve
    from bus.server import Server
    from bus.weights.server import WeightServer
    from learner.service import LearnerService

    lc, bus = cfg.learner, cfg.bus
    curve = server_curve(bus.curve_dir, bus.allow_readable_keys)
    if curve is None:
        warn_plaintext(lc.bind_host)
    weights = bind_or_any(lambda ep: WeightServer(ep, max_message_bytes=bus.max_message_bytes, curve=curve),
                          lc.bind_host, lc.weights_port, lc.any_free_port)
    host = learner_advertise_host(lc.advertise_host, lc.bind_host)
    weights_ep = f"tcp://{host}:{weights.endpoint.rsplit(':', 1)[1]}"
    publish(ranks, weights, scheduler.version, cfg)
    service = LearnerService(cfg, scheduler, run_id=run_id, model=ranks.trainer.model_path,
                             weights_endpoint=weights_ep, max_model_len=context)
    server = bind_or_any(lambda ep: Server(ep, heartbeat_s=bus.heartbeat_s, liveness=bus.liveness,
                                           max_message_bytes=bus.max_message_bytes, curve=curve),
                         lc.bind_host, lc.control_port, lc.any_free_port)
    service.attach(server)
    server.start()
    log.info("learner.serving", control=server.endpoint, weights=weights_ep, version=scheduler.version,
             epoch=scheduler.epoch)
    _write_endpoint(lc, server.endpoint)
    return weights, service, server


def bind_or_any(make: Callable[[str], T], host: str, port: int, any_free: bool) -> T:
    """`make(endpoint)` on host:port; if that port is taken and `any_free`, on a free port instead
    (said in the log: the endpoint file and `learner.serving` name the one bound)."""
    import zmq

    try:
        return make(f"tcp://{host}:{port}")
    except zmq.ZMQError as e:
        if not (any_free and port and e.errno == zmq.EADDRINUSE):
            raise
    log.warning("learner.port_taken", port=port, fix="bound a free port instead (learner.any_free_port)")
    return make(f"tcp://{host}:0")


def _write_endpoint(lc: LearnerConfig, bound: str) -> None:
    """RUN_DIR/endpoint: the control endpoint a local peer dials, renamed into place so that a
    reader never sees half of it."""
    from bus.address import reachable_host

    run_dir = Path(lc.run_dir)
    tmp = run_dir / "endpoint.tmp"
    tmp.write_text(f"tcp://{reachable_host(lc.advertise_host, lc.bind_host)}:{bound.rsplit(':', 1)[1]}\n")
    tmp.replace(run_dir / "endpoint")
