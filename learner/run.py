"""`or1 learner`: the learner process.

    rank 0                                                  ranks > 0
    ──────                                                  ─────────
    build the Trainer, wrap it in RankGroup (`ranks`)       build the Trainer
    build_learner(cfg, ranks) (learner/learner.py):          worker_loop(): follow rank 0's commands
        tokenise the data, --resume: load the latest
        checkpoint (new epoch), publish weights v, serve
    Learner.run(): steps until the last stage's last step,
        checkpoints, final save, Wait(done) to the fleet
    Learner.close()

The module also holds the helpers the Learner and the benchmarks share: `publish` (export → one
weights version on the weights port), `save_model_folder`.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.config import Config
from common.data import DataError
from common.log import get_logger, setup_logging

if TYPE_CHECKING:
    from learner.dist import RankGroup

log = get_logger()


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
        # rank 0 ends the group (STOP after its final checkpoint, which needs every rank): a
        # launcher or `or1 run` that signals the whole process group must not kill us first
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        worker_loop(trainer)
        return 0
    ranks = RankGroup(trainer)
    try:
        return _run_rank0(cfg, ranks)
    except DataError as e:  # unusable data: say what to change, no traceback
        log.error("data.unusable", error=str(e))
        return 2
    finally:
        ranks.stop()  # idempotent: Learner.close() has done it unless building failed


def _run_rank0(cfg: Config, ranks: RankGroup) -> int:
    """Build the learner, let SIGTERM/SIGINT end its run gracefully (final checkpoint, Wait(done)),
    run it, close it."""
    from learner.learner import build_learner

    stop = stop_on_signals()  # before building: the bus is served before build_learner returns
    learner = build_learner(cfg, ranks, stop)
    try:
        return learner.run()
    finally:
        learner.close()


def stop_on_signals() -> threading.Event:
    """An event SIGTERM or SIGINT sets: the run ends gracefully at the next step boundary (final
    checkpoint, Wait(done)). A second SIGINT raises KeyboardInterrupt, for an operator at a terminal
    who will not wait; SIGTERM never forces, because a launcher (torchrun, Slurm) may forward one
    after the process group got its own."""
    stop = threading.Event()

    def handle(signum: int, _frame: Any) -> None:
        if stop.is_set():
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        log.info("learner.stopping", signal=signal.Signals(signum).name, force="Ctrl-C again")
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handle)
    return stop


def resolve_model(cfg: Config) -> str:
    """"tiny" → the embedded model (built once into the cache); anything else is used as given
    (a local folder, or a hub name that transformers resolves)."""
    if cfg.learner.model != "tiny":
        return cfg.learner.model
    from common.tinymodel import tiny_model_for

    return str(tiny_model_for(cfg))


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


def warn_plaintext(bind_host: str) -> None:
    """The bus is open: say so, and how to close it, where the operator looks first."""
    log.warning("bus.plaintext", bind=bind_host,
                risk="any host that can reach the learner's ports can join as any role (actor, reward worker, admin), "
                     "submit trajectories and scores, and change settings",
                fix="or1 keys keys/ && start every role with --set bus.curve_dir=keys/ (see docs/security.md)")


def publish(ranks: RankGroup, weights, version: int, cfg: Config) -> bool:
    """Export the full state dict into a new store and serve it as `version`. A tied alias
    (lm_head.weight of tied embeddings: the very tensor of the embedding) is sent once, under the
    embedding's name (`Trainer.weights_layout`): both engines take a tied model's store without the
    head and re-tie it (actors/weights_io.check_named), and at Qwen2.5-0.5B's shape the alias is
    22 % of the bytes (272 MB of 1.26 GB in bf16) that every version would copy, checksum, send and
    hold twice.

    Under ZeRO-3 with several ranks on this host, each rank writes its own partitions straight into
    the version's /dev/shm file (`publish_sharded`): nothing is gathered. Otherwise (ZeRO 0-2, ranks
    on several hosts, no room in /dev/shm) rank 0 gathers tensor by tensor and writes each into the
    buffer as it comes, never holding a second whole copy of the model (measured at the 0.5B shape:
    1 GB less at its peak). Returns whether the version was written sharded."""
    from bus.weights.store import WeightStore

    dtype = cfg.learner.trainer.weights_dtype
    store = publish_sharded(ranks, version, cfg) if ranks.exports_shards else None
    sharded = store is not None
    if store is None:
        store = WeightStore.build(version, ranks.weights_layout(dtype), lambda write: ranks.export_into(dtype, write),
                                  chunk_bytes=cfg.bus.chunk_bytes, shared=cfg.bus.shared_memory)
    weights.publish(store)
    return sharded


def publish_sharded(ranks: RankGroup, version: int, cfg: Config):
    """The version's store filled by all ranks at once (`RankGroup.export_shards`), or None when
    that cannot be done here (the caller gathers instead). Measured at the Qwen2.5-0.5B shape, 2 CPU
    ranks: see docs/weights.md. The file is in /dev/shm whatever `bus.shared_memory` says: that
    key decides whether actors of this host map the learner's copy, and a file is the only buffer
    the ranks can all write; its bytes are the ones a private buffer would hold."""
    from bus.weights.store import WeightStore

    dtype = cfg.learner.trainer.weights_dtype
    t0 = time.perf_counter()
    filled: list[float] = []

    def fill(file, metas) -> bool:
        filled.append(time.perf_counter())
        done = ranks.export_shards(dtype, str(file.path), file.file_id, {m.name: m.offset for m in metas})
        filled.append(time.perf_counter())
        return done

    try:
        store = WeightStore.build_shared(version, ranks.weights_layout(dtype), fill, chunk_bytes=cfg.bus.chunk_bytes)
        t1 = time.perf_counter()
        if store is not None:  # where a version's time goes: the file, the ranks' writes, the checksums
            log.debug("publish.sharded", version=version, take_s=round(filled[0] - t0, 3),
                      write_s=round(filled[1] - filled[0], 3), checksum_s=round(t1 - filled[1], 3))
    except OSError as e:  # no /dev/shm, or not room for a version in it
        log.warning("publish.no_shared_file", error=str(e)[:200], fallback="rank 0 gathers from now on")
        ranks.gather_from_now_on()
        return None
    if store is None:
        log.warning("publish.shards_refused", fallback="rank 0 gathers from now on",
                    why="a rank could not write into rank 0's /dev/shm file (ranks on several hosts?)")
    return store


def save_model_folder(ranks: RankGroup, model_path: str, out: Path, cfg: Config) -> None:
    """The trained policy as an ordinary HF folder (config and tokenizer files copied from the
    model folder, weights from the learner): `or1 eval RUN_DIR/model`, vLLM and transformers load it."""
    from learner.export import arrays_to_tensors, write_hf_folder

    exported = ranks.export_weights(cfg.learner.trainer.weights_dtype)
    write_hf_folder(arrays_to_tensors(exported), model_path, out)
    log.info("model.saved", path=str(out))
