"""The multi-rank protocol: rank 0 runs the service and drives the other ranks' trainers.

Every rank builds a `Trainer` (which joins the process group). Rank 0 wraps its own in a
`RankGroup`; ranks > 0 call `worker_loop(trainer)`, which returns at STOP. Each RankGroup method
sends one command and then runs the same Trainer method locally, so all ranks enter DeepSpeed's
collectives together:

    STEP(total_tokens, entropy_coef) + scatter of each rank's micro-batches -> train_step
    EXPORT(dtype)                                                           -> export_weights
    SHARDS(dtype, path, file_id, offsets)                                   -> export_shards
    SAVE(directory, client_state)                                           -> save_checkpoint
    LOAD(directory)                                                         -> load_checkpoint
    STOP                                        -> barrier, destroy the process group, return

Commands travel on a separate gloo group (also on GPU clusters: the control objects are small
host-side Python values, and a CPU group keeps them off the NCCL stream) with a long timeout,
because ranks > 0 wait in a broadcast for as long as rank 0 spends collecting a batch. The objects
go through torch.distributed's object collectives (pickle between our own ranks, never on the
bus). Rank 0 checks a command's arguments before sending it, so bad input raises there without
stranding the other ranks; the Trainer's own checks end in a collective and raise the same
ValueError on every rank, which workers log and survive. Any other exception on a worker is fatal
(its peers would wait forever in a collective): it is logged and re-raised so the launcher
(torchrun / deepspeed) tears the job down.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from learner import checkpoint as ckpt

if TYPE_CHECKING:
    import numpy as np

    from learner.buffer import MicroBatch
    from learner.trainer import Trainer

STEP, EXPORT, SHARDS, SAVE, LOAD, STOP = "step", "export", "shards", "save", "load", "stop"
CONTROL_TIMEOUT = datetime.timedelta(days=7)  # ranks > 0 idle in a broadcast while rank 0 gathers data

_control_group: Any = None


def control_group() -> Any:
    """The gloo group commands travel on (created once, collectively, by every rank)."""
    global _control_group
    if _control_group is None:
        import torch.distributed as dist

        _control_group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return _control_group


def _broadcast(obj: Any) -> Any:
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0, group=control_group())
    return box[0]


def _scatter(per_rank: Sequence[Any] | None) -> Any:
    import torch.distributed as dist

    out: list[Any] = [None]
    inputs = list(per_rank) if per_rank is not None else None
    dist.scatter_object_list(out, inputs, src=0, group=control_group())
    return out[0]


def _shutdown() -> None:
    """All ranks at STOP: meet, then tear the process group down explicitly. A rank that simply
    exits while its gloo/DeepSpeed communicators are alive can abort in their destructors
    ("terminate called without an active exception"), which a launcher reports as a failed job."""
    import torch.distributed as dist

    global _control_group
    dist.barrier(group=control_group())
    _control_group = None
    dist.destroy_process_group()


class RankGroup:
    """Rank 0's handle on all ranks' trainers; with one rank it just calls the trainer."""

    def __init__(self, trainer: Trainer):
        if trainer.rank != 0:
            raise ValueError(f"RankGroup runs on rank 0; rank {trainer.rank} must call worker_loop(trainer)")
        self.trainer = trainer
        self.world_size = trainer.world_size
        if self.world_size > 1:
            control_group()
        self._stopped = False
        self._shards_work = True

    def _send(self, command: tuple[Any, ...]) -> None:
        if self._stopped:
            raise RuntimeError("RankGroup already stopped")
        if self.world_size > 1:
            _broadcast(command)

    def step(
        self, per_rank: Sequence[list[MicroBatch]], total_tokens: int, entropy_coef: float
    ) -> dict[str, float]:
        """per_rank[r] = rank r's micro-batches (the same count for every rank)."""
        if len(per_rank) != self.world_size:
            raise ValueError(f"got micro-batches for {len(per_rank)} ranks, the group has {self.world_size}")
        counts = {len(mbs) for mbs in per_rank}
        if len(counts) != 1:
            raise ValueError(f"every rank needs the same number of micro-batches, got {sorted(counts)}")
        self._send((STEP, int(total_tokens), float(entropy_coef)))
        mine = _scatter(per_rank) if self.world_size > 1 else per_rank[0]
        return self.trainer.train_step(mine, total_tokens, entropy_coef)

    def export_weights(self, dtype: str = "auto") -> list[tuple[str, np.ndarray, str]]:
        self.trainer.weights_dtype_name(dtype)  # validate here, before the workers are involved
        self._send((EXPORT, dtype))
        weights = self.trainer.export_weights(dtype)
        assert weights is not None  # rank 0 always receives them
        return weights

    def export_into(self, dtype: str, sink: Callable[[str, np.ndarray], None]) -> None:
        """The same export, each tensor handed to `sink` on rank 0 as it is gathered
        (`Trainer.export_weights(dtype, sink)`; `Trainer.weights_layout` says what comes)."""
        self.trainer.weights_dtype_name(dtype)
        self._send((EXPORT, dtype))
        self.trainer.export_weights(dtype, sink)

    def weights_layout(self, dtype: str = "auto") -> list[tuple[str, str, list[int]]]:
        return self.trainer.weights_layout(dtype)

    @property
    def exports_shards(self) -> bool:
        """Whether a version may be written by every rank at once (`export_shards`): ZeRO-3 with
        several ranks, until a try shows the ranks do not share this host's /dev/shm."""
        return self.world_size > 1 and self.trainer.zero_stage == 3 and self._shards_work

    def export_shards(self, dtype: str, path: str, file_id: str, offsets: dict[str, int]) -> bool:
        """Every rank writes its own ZeRO-3 partitions into rank 0's version file
        (`Trainer.export_shards`); False (and not tried again) if some rank could not."""
        self.trainer.weights_dtype_name(dtype)
        self._send((SHARDS, dtype, path, file_id, offsets))
        done = self.trainer.export_shards(dtype, path, file_id, offsets)
        if not done:
            self.gather_from_now_on()
        return done

    def gather_from_now_on(self) -> None:
        """Publish by gathering to rank 0 for the rest of the run (`exports_shards` is False)."""
        self._shards_work = False

    def save_checkpoint(self, directory: str | Path, client_state: dict[str, Any]) -> Path:
        ckpt.check_client_state(client_state)
        self._send((SAVE, str(directory), client_state))
        return self.trainer.save_checkpoint(directory, client_state)

    def load_checkpoint(self, directory: str | Path) -> dict[str, Any]:
        ckpt.read_state(directory)  # a missing or incomplete checkpoint fails here, alone
        self._send((LOAD, str(directory)))
        return self.trainer.load_checkpoint(directory)

    def stop(self) -> None:
        """Release the workers (their worker_loop returns) and, with several ranks, close the
        process group on every rank together; the trainers are unusable afterwards. Idempotent."""
        if not self._stopped:
            self._send((STOP,))
            self._stopped = True
            if self.world_size > 1:
                _shutdown()


def worker_loop(trainer: Trainer) -> int:
    """Ranks > 0: run rank 0's commands until STOP. Returns the number of commands served."""
    from common.log import get_logger

    if trainer.rank == 0:
        raise ValueError("worker_loop runs on ranks > 0; rank 0 uses RankGroup")
    log = get_logger(rank=trainer.rank)
    served = 0
    while True:
        command = _broadcast(None)
        kind = command[0]
        if kind == STOP:
            _shutdown()
            return served
        try:
            if kind == STEP:
                trainer.train_step(_scatter(None), command[1], command[2])
            elif kind == EXPORT:
                trainer.export_weights(command[1])
            elif kind == SHARDS:
                trainer.export_shards(*command[1:])
            elif kind == SAVE:
                trainer.save_checkpoint(command[1], command[2])
            elif kind == LOAD:
                trainer.load_checkpoint(command[1])
            else:
                raise RuntimeError(f"unknown command {kind!r} from rank 0")
        except ValueError as e:  # raised identically on every rank after a collective check
            log.warning("command_rejected", command=kind, error=str(e))
        except Exception:
            log.exception("command_failed", command=kind)
            raise
        served += 1
