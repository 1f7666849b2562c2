"""`or1 learner`: the learner process.

    rank 0                                            ranks > 0
    ──────                                            ─────────
    tokenise the data, build the Trainer              build the Trainer
    --resume: load the latest checkpoint (new epoch)   worker_loop(): follow rank 0's commands
    publish weights v, serve the bus
    loop until the last stage's last step:
        wait for B useful groups (service.next_batch)
        micro-batches by token budget → every rank's train_step (one optimizer step)
        entropy controller ← the step's entropy
        export weights → publish v + 1 → scheduler.on_step()
        metrics → metrics.jsonl + TensorBoard;  checkpoint every K steps
    final checkpoint, tell actors the run is done (Wait(done)), stop
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from pathlib import Path

from common.config import Config, save_config
from common.data import DataError
from common.log import get_logger, setup_logging

log = get_logger()
DONE_GRACE_S = 30.0  # after the last step, keep answering until the fleet has left (at most this long)


def run(cfg: Config, log_format: str = "auto") -> int:
    rank = int(os.environ.get("RANK", "0"))
    setup_logging("learner", f"rank{rank}", log_format)
    if cfg.bus.keep_frame_memory:
        from bus.memory import keep_frame_memory

        keep_frame_memory()
    lc = cfg.learner
    model_path = resolve_model(cfg)
    schedule_steps(cfg)

    from learner.dist import RankGroup, worker_loop
    from learner.trainer import Trainer

    trainer = Trainer(model_path, lc, temperature=lc.sampling.temperature)
    if trainer.rank != 0:
        worker_loop(trainer)
        return 0
    group = RankGroup(trainer)
    try:
        return _serve_and_train(cfg, model_path, group)
    except DataError as e:  # unusable data: say what to change, no traceback
        log.error("data.unusable", error=str(e))
        return 2
    finally:
        group.stop()


def resolve_model(cfg: Config) -> str:
    """"tiny" → the embedded model (built once into the cache); anything else is used as given
    (a local folder, or a hub name that transformers resolves)."""
    if cfg.learner.model != "tiny":
        return cfg.learner.model
    from common.tinymodel import ensure_tiny_model

    return str(ensure_tiny_model(Path(cfg.run.cache_dir).expanduser(), warm=cfg.run.warm_start))


def schedule_steps(cfg: Config) -> None:
    """`run.steps` overrides the total: later stages are cut, the last kept stage is stretched."""
    total = cfg.run.steps
    if total is None:
        return
    stages, left = [], total
    for st in cfg.learner.stages:
        if left <= 0:
            break
        stages.append(st.model_copy(update={"steps": min(st.steps, left)}))
        left -= stages[-1].steps
    if left > 0:
        stages[-1] = stages[-1].model_copy(update={"steps": stages[-1].steps + left})
    cfg.learner.stages = stages


def _serve_and_train(cfg: Config, model_path: str, group) -> int:
    from transformers import AutoTokenizer

    from bus.address import learner_advertise_host, reachable_host
    from bus.auth import server_curve
    from bus.server import Server
    from bus.weights.server import WeightServer
    from actors.engine import model_context_len
    from common.data import run_context, training_data
    from common.metrics import JsonlSink, MultiSink, TensorBoardSink
    from learner import checkpoint as ckpt
    from learner.entropy import EntropyController
    from learner.scheduler import Prompt, Scheduler
    from learner.service import Ledger, LearnerService

    lc = cfg.learner
    run_dir = Path(lc.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "learner_config.json")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # every reference parsed, every prompt tokenized (or1 check-data); prompts too long: counted, announced
    data = training_data(cfg, tokenizer, model_len=model_context_len(model_path))
    prompts = [Prompt(p.id, ids, p.kind, p.reference, p.source) for p, ids in data.pairs]
    context = run_context(cfg, data.pairs)
    log.info("data.loaded", problems=len(prompts), sources=sorted({p.source for p in prompts}),
             max_prompt_tokens=data.limit.tokens, max_model_len=context)
    evaluator = None
    if lc.eval.every or lc.eval.at_start:
        from learner.evaluation import Evaluator

        evaluator = Evaluator(cfg, model_path, tokenizer)

    controller = EntropyController(lc.entropy)
    latest = ckpt.latest_checkpoint(run_dir) if lc.resume else None
    state = group.load_checkpoint(latest) if latest else {}
    epoch = int(state.get("epoch", -1)) + 1
    ledger = Ledger(run_dir / "ledger.jsonl")
    scheduler = Scheduler.from_config(prompts, lc, epoch, on_event=ledger.write, vocab_size=group.trainer.vocab_size)
    if state:
        scheduler.load_state_dict(state["scheduler"])
        controller.load_state_dict(state["entropy"])
        log.info("resumed", checkpoint=str(latest), version=scheduler.version, epoch=epoch)

    host = learner_advertise_host(lc.advertise_host, lc.bind_host)
    curve = server_curve(cfg.bus.curve_dir, cfg.bus.allow_readable_keys)
    if curve is None:
        warn_plaintext(lc.bind_host)
    weights = WeightServer(f"tcp://{lc.bind_host}:{lc.weights_port}", max_message_bytes=cfg.bus.max_message_bytes,
                           curve=curve)
    weights_ep = f"tcp://{host}:{weights.endpoint.rsplit(':', 1)[1]}"
    publish(group, weights, scheduler.version, cfg)
    run_id = state.get("run_id") or uuid.uuid4().hex[:12]
    service = LearnerService(cfg, scheduler, run_id=run_id, model=model_path, weights_endpoint=weights_ep,
                             max_model_len=context)
    server = Server(f"tcp://{lc.bind_host}:{lc.control_port}", heartbeat_s=cfg.bus.heartbeat_s,
                    liveness=cfg.bus.liveness, max_message_bytes=cfg.bus.max_message_bytes, curve=curve)
    service.attach(server)
    server.start()
    log.info("learner.serving", control=server.endpoint, weights=weights_ep, version=scheduler.version, epoch=epoch)
    tmp = run_dir / "endpoint.tmp"  # renamed into place: a reader never sees half of it
    tmp.write_text(f"tcp://{reachable_host(lc.advertise_host, lc.bind_host)}:{server.endpoint.rsplit(':', 1)[1]}\n")
    tmp.replace(run_dir / "endpoint")

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    sink = MultiSink(JsonlSink(run_dir / "metrics.jsonl"), TensorBoardSink(run_dir / "tb"))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    recent: list[float] = []
    export = (model_path, cfg) if lc.export_checkpoints else ()
    try:
        if evaluator is not None and lc.eval.at_start:
            sink.write(scheduler.version, evaluator.run(group, scheduler.version))
        first = data.metrics()  # data/* counts, with the first step's record
        while not stop.is_set() and not scheduler.done:
            reward = train_one(cfg, group, service, controller, weights, sink, stop, pad_id, first)
            first = {}
            if reward is None:
                break
            recent = (recent + [reward])[-lc.stop_window:]
            if reached(lc.stop_at_reward, recent, lc.stop_window):
                log.info("learner.target_reached", reward=round(sum(recent) / len(recent), 3), version=scheduler.version)
                break
            v = service.published_version
            if lc.checkpoint_every and v % lc.checkpoint_every == 0:
                save(group, run_dir, service, controller, run_id, lc.keep_checkpoints, *export)
            if evaluator is not None and evaluator.due(v):
                sink.write(v, evaluator.run(group, v))
        if scheduler.version > 0 and not (lc.checkpoint_every and scheduler.version % lc.checkpoint_every == 0):
            save(group, run_dir, service, controller, run_id, lc.keep_checkpoints, *export)
        if evaluator is not None and scheduler.version > 0 and not evaluator.due(scheduler.version):
            sink.write(scheduler.version, evaluator.run(group, scheduler.version))  # the final weights
        if scheduler.version > 0:
            save_model_folder(group, model_path, run_dir / "model", cfg)
        service.finish()
        service.wait_fleet_gone(stop, DONE_GRACE_S)
        service.close_run()
    finally:
        server.stop()
        weights.stop()
        sink.close()
        ledger.close()
        if evaluator is not None:
            evaluator.close()
    log.info("learner.done", version=scheduler.version)
    return 0


def warn_plaintext(bind_host: str) -> None:
    """The bus is open: say so, and how to close it, where the operator looks first."""
    log.warning("bus.plaintext", bind=bind_host,
                risk="any host that can reach the learner's ports can join as any role (actor, reward worker, admin), "
                     "submit trajectories and scores, and change settings",
                fix="or1 keys keys/ && start every role with --set bus.curve_dir=keys/ (see docs/security.md)")


def reached(target: float | None, recent: list[float], window: int) -> bool:
    return target is not None and len(recent) >= window and sum(recent) / len(recent) >= target


def train_one(cfg: Config, group, service, controller, weights, sink, stop: threading.Event, pad_id: int,
              extra: dict[str, float] | None = None) -> float | None:
    """One optimizer step: batch → micro-batches → train → publish → metrics (+ `extra`). Returns the
    step's mean reward (all groups scored since the last step), None if stopped."""
    from learner.buffer import make_micro_batches, to_train_samples

    lc = cfg.learner
    t_wait = time.perf_counter()
    batch = service.next_batch(stop)
    if batch is None:
        return None
    wait_s = time.perf_counter() - t_wait
    t0 = time.perf_counter()
    samples = to_train_samples(batch.groups)
    per_rank, mb_metrics = make_micro_batches(samples, lc.trainer.micro_batch_tokens, group.world_size,
                                              pad_id=pad_id, mask_truncated=lc.loss.mask_truncated)
    alpha = controller.alpha()
    metrics = group.step(per_rank, int(mb_metrics["learner/loss_tokens"]), alpha)
    metrics.update(controller.update(metrics["entropy/mean"]))
    version = batch.version + 1
    t_pub = time.perf_counter()
    publish(group, weights, version, cfg)
    metrics["learner/publish_s"] = time.perf_counter() - t_pub
    metrics.update(service.step_done(version))
    metrics.update({k: v for k, v in batch.metrics.items()})
    metrics.update(mb_metrics)
    metrics.update(service.fleet_metrics())
    metrics.update(weights.metrics)  # the weights port's own counters (weights/bad_messages, ...)
    metrics.update({"learner/wait_s": wait_s, "learner/step_s": time.perf_counter() - t0, "entropy/alpha_applied": alpha})
    metrics.update(extra or {})
    sink.write(version, metrics)
    log.info("step", version=version, reward=round(metrics.get("reward/mean", 0.0), 3),
             entropy=round(metrics.get("entropy/mean", 0.0), 4), staleness_max=metrics.get("staleness/max"),
             wait_s=round(wait_s, 2), step_s=round(metrics["learner/step_s"], 2))
    return float(metrics.get("reward/mean", 0.0))


def publish(group, weights, version: int, cfg: Config) -> None:
    """Export the full state dict (gathered under ZeRO-3) and serve it as `version`. A tied alias
    (lm_head.weight of tied embeddings: the very array of the embedding) is sent once, under the
    embedding's name: both engines take a tied model's store without the head and re-tie it
    (actors/weights_io.check_named), and at Qwen2.5-0.5B's shape the alias is 22 % of the bytes
    (272 MB of 1.26 GB in bf16) that every version would copy, checksum, send and hold twice."""
    from bus.weights.store import WeightStore

    exported = unique_arrays(group.export_weights(cfg.learner.trainer.weights_dtype))
    store = WeightStore.from_arrays(version, [(n, a) for n, a, _ in exported], chunk_bytes=cfg.bus.chunk_bytes,
                                    dtype_names={n: d for n, _, d in exported}, shared=cfg.bus.shared_memory)
    weights.publish(store)


def unique_arrays(exported: list) -> list:
    """`export_weights` triples without the later names of an array already listed (tied aliases)."""
    seen: set[int] = set()
    out = []
    for name, array, dtype in exported:
        if id(array) not in seen:
            seen.add(id(array))
            out.append((name, array, dtype))
    return out


def save(group, run_dir: Path, service, controller, run_id: str, keep: int, export_from: str | None = None,
         cfg: Config | None = None) -> None:
    """A checkpoint (and with `export_from`, the base model folder, also its weights as an HF folder
    in checkpoints/step_N/hf: learner.export_checkpoints), then prune old ones."""
    from learner import checkpoint as ckpt
    from learner.export import HF_DIR

    with service.lock:
        state = {"epoch": service.scheduler.epoch, "run_id": run_id, "scheduler": service.scheduler.state_dict(),
                 "entropy": controller.state_dict()}
    path = group.save_checkpoint(ckpt.checkpoint_dir(run_dir, service.published_version), state)
    if export_from is not None and cfg is not None:
        save_model_folder(group, export_from, path / HF_DIR, cfg)
    ckpt.prune_checkpoints(run_dir, keep)
    log.info("checkpoint.saved", path=str(path))


def save_model_folder(group, model_path: str, out: Path, cfg: Config) -> None:
    """The trained policy as an ordinary HF folder (config and tokenizer files copied from the
    model folder, weights from the learner): `or1 eval RUN_DIR/model`, vLLM and transformers load it."""
    from learner.export import arrays_to_tensors, write_hf_folder

    write_hf_folder(arrays_to_tensors(group.export_weights(cfg.learner.trainer.weights_dtype)), model_path, out)
    log.info("model.saved", path=str(out))
