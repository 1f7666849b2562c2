"""DeepSpeed setup for the learner: environment, process group, the DeepSpeed config built from ours,
model loading (ZeRO-3 partitioned as it loads), and the gather/convert helpers of weight export.

Kept apart from learner/trainer.py so the trainer reads as the algorithm: everything here is the
plumbing DeepSpeed and transformers need, with the reasons for each workaround next to it.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import OptimConfig, TrainerConfig
from common.log import get_logger

log = get_logger()

DEFAULT_EXTENSIONS_DIR = "~/.cache/or1/torch_extensions"  # DeepSpeed's CPU ops, built once (~1 min)
EXPORT_GATHER_NUMEL = 1 << 28  # ZeRO-3 export/load gathers at most this many elements at once (peak memory)
WEIGHT_DTYPES = ("float32", "bfloat16", "float16")


def prepare_environment() -> None:
    """Before DeepSpeed is imported: a persistent folder for its JIT-built ops, and its CPU
    accelerator named explicitly where there is no GPU (it would guess so, with a warning)."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser(DEFAULT_EXTENSIONS_DIR))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pick_gloo_interface() -> None:
    """Across hosts, gloo binds the address its hostname resolves to, and on Debian/Ubuntu that is
    a loopback address (/etc/hosts: 127.0.1.1 HOST): peers are then told to connect to 127.0.x and
    the group never forms. Unless the user chose (GLOO_SOCKET_IFNAME), bind the interface that
    routes to MASTER_ADDR, when the master is on another host and the hostname is loopback-only."""
    from bus.address import interface_towards, is_loopback

    master = os.environ.get("MASTER_ADDR", "")
    if os.environ.get("GLOO_SOCKET_IFNAME") or not master or is_loopback(master):
        return
    import socket

    if not is_loopback(socket.gethostname()):
        return
    name = interface_towards(master)
    if name:
        os.environ["GLOO_SOCKET_IFNAME"] = name
        log.info("gloo.interface", interface=name, master=master)


def init_distributed() -> tuple[int, int]:
    """Join (or start) the process group: env:// from torchrun/deepspeed, or a one-process group
    on an in-memory store when no launcher set RANK/WORLD_SIZE/MASTER_ADDR (no port to pick: a free port found
    by binding and releasing it can be taken by another process before the store listens on it,
    which was seen when an actor started beside the learner). gloo on CPU, nccl on GPU."""
    prepare_environment()
    import torch.distributed as dist

    if not dist.is_initialized():
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        acc = get_accelerator()
        # A launcher (torchrun, deepspeed, Slurm scripts) sets all three. RANK and WORLD_SIZE alone
        # are ours from an earlier one-process group in this process, which someone tore down
        # (vLLM's engine shutdown destroys the default group of the process it runs in).
        alone = not all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))
        if alone:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("LOCAL_RANK", "0")
        if not alone:
            pick_gloo_interface()
        if acc.device_name() != "cpu":
            acc.set_device(int(os.environ["LOCAL_RANK"]))
        _forget_dead_groups()
        if alone:  # DeepSpeed adopts a process group that is already up
            dist.init_process_group(acc.communication_backend_name(), store=dist.HashStore(), rank=0, world_size=1)
        deepspeed.init_distributed(dist_backend=acc.communication_backend_name(), auto_mpi_discovery=False)
    return dist.get_rank(), dist.get_world_size()


def _forget_dead_groups() -> None:
    """DeepSpeed caches groups cloned from the world group (`deepspeed.utils.groups`); after that
    group was destroyed (by vLLM's shutdown in the same process, say) the cache points at a dead
    group and the next engine fails ("Group ... is not registered"). Drop the cache before a new
    group is made. A private DeepSpeed helper: absent in another version, there is nothing to do."""
    import sys

    groups = sys.modules.get("deepspeed.utils.groups")
    release = getattr(groups, "_release_process_group_references", None)
    if release is not None:
        release()


def resolve_precision(precision: str, on_gpu: bool) -> str:
    return ("bf16" if on_gpu else "fp32") if precision == "auto" else precision


def build_deepspeed_config(
    trainer: TrainerConfig, optim: OptimConfig, *, on_gpu: bool, world_size: int
) -> dict[str, Any]:
    """Our DeepSpeed config, with `trainer.deepspeed_json` merged over it. Batch sizes are pinned
    (micro-batch 1, GAS 1): or1 accumulates itself (module docstring), so a user JSON that sets
    them otherwise is refused rather than silently breaking the token-level mean."""
    zero: dict[str, Any] = {"stage": trainer.zero_stage}
    if trainer.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # we export weights ourselves
        # zero.Init would otherwise replace torch.nn.functional.linear for the whole process, for good
        zero["memory_efficient_linear"] = False
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "gradient_clipping": optim.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps,
                       "weight_decay": optim.weight_decay, "torch_adam": optim.impl == "torch"},
        },
        "zero_optimization": zero,
        "bf16": {"enabled": resolve_precision(trainer.precision, on_gpu) == "bf16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if trainer.deepspeed_json:
        try:
            user = json.loads(Path(trainer.deepspeed_json).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"trainer.deepspeed_json {trainer.deepspeed_json}: {e}") from None
        cfg = _merge(cfg, user)
    pinned = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "train_batch_size": world_size}
    for key, want in pinned.items():
        if cfg.get(key) != want:
            raise ValueError(f"deepspeed_json sets {key}={cfg.get(key)!r}; or1 accumulates micro-batches "
                             f"itself and needs {want} (see learner/trainer.py)")
    return cfg


def load_model(path: str, ds_config: dict[str, Any], precision: str) -> torch.nn.Module:
    """from_pretrained; under ZeRO-3 the model is built inside deepspeed.zero.Init (partitioned as
    each layer is created, never whole on one rank) and its safetensors are copied in by rank 0
    under GatheredParameters. (transformers' own route, HfDeepSpeedConfig, would pull in
    `accelerate` only for a version check; this keeps the dependency list as it is.)"""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if ds_config["zero_optimization"]["stage"] != 3:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    import deepspeed

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    config = AutoConfig.from_pretrained(path)
    # Random init would index into empty partitions (and be overwritten anyway); no_init_weights
    # also skips tying, so tie explicitly: a tied lm_head is then the embedding's partitioned param.
    # No dtype= here: DeepSpeed 0.19 then takes bf16 on CPU whatever is asked (an operator-precedence
    # slip in Init._set_dtype); without it the dtype follows ds_config (bf16 enabled or fp32).
    with deepspeed.zero.Init(config_dict_or_path=ds_config), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    _load_safetensors_zero3(model, Path(path))
    return model


def _load_safetensors_zero3(model: torch.nn.Module, folder: Path) -> None:
    """Copy a safetensors checkpoint (single file or sharded with an index) into a ZeRO-3
    partitioned model. Every rank walks the same parameter groups (the gather is collective);
    rank 0 reads the files. Names must match the module's (true for Qwen2/Llama-style folders)."""
    import deepspeed
    import torch.distributed as dist
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        where = {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    elif (folder / "model.safetensors").is_file():
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            where = {k: folder / "model.safetensors" for k in f.keys()}
    else:
        raise FileNotFoundError(f"{folder}: ZeRO-3 loading needs model.safetensors (or a sharded index)")
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = sorted(set(where) - set(params))
    lacking = {id(p): n for n, p in params.items() if n not in where and not _has_alias(p, params, where)}
    missing = sorted(lacking.values())
    if unknown or missing:
        raise ValueError(f"{folder}: checkpoint/model names differ: unexpected {unknown[:5]}, "
                         f"missing {missing[:5]}")
    rank = dist.get_rank()
    names = [n for n in params if n in where]
    for group in gather_groups([params[n] for n in names], 3):
        ids = {id(p) for p in group}
        todo = [n for n in names if id(params[n]) in ids]
        with deepspeed.zero.GatheredParameters(group, modifier_rank=0):
            if rank == 0:
                for file in sorted({where[n] for n in todo}):
                    with safe_open(str(file), framework="pt") as f, torch.no_grad():
                        for n in todo:
                            if where[n] == file:
                                params[n].data.copy_(f.get_tensor(n))


def _has_alias(p: torch.Tensor, params: dict[str, torch.Tensor], where: dict[str, Path]) -> bool:
    return any(q is p and n in where for n, q in params.items())


def folder_dtype(config: Any) -> str:
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    name = str(d).removeprefix("torch.")
    return name if name in WEIGHT_DTYPES else "float32"


def grad_norm(module: torch.nn.Module) -> float | None:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return None
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def gather_groups(params: list[torch.Tensor], stage: int) -> list[list[torch.Tensor]]:
    if stage != 3:
        return [params]
    groups, size = [[]], 0
    for p in params:
        numel = int(getattr(p, "ds_numel", p.numel()))
        if groups[-1] and size + numel > EXPORT_GATHER_NUMEL:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += numel
    return groups


def gathered(params: list[torch.Tensor], stage: int):
    if stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([p for p in params if hasattr(p, "ds_id")], modifier_rank=None)


UNKNOWN_LAYOUT: Any = object()  # own_partition: a partition laid out otherwise than ZeRO-3's plain split


def own_partition(p: torch.Tensor, rank: int, world_size: int) -> Any:
    """ZeRO-3's piece of `p` on this rank, as (elements, index of the first in the flattened `p`):
    rank r holds elements [r·s, (r+1)·s) of the flattened tensor padded to world_size·s, s =
    ds_tensor.ds_numel (deepspeed/runtime/zero/partition_parameters.py `_partition_param`), the
    last partition's padding cut off here. None for a tensor ZeRO does not partition (a buffer);
    UNKNOWN_LAYOUT where the partition is not that split (e.g. hierarchical partitioning)."""
    part = getattr(p, "ds_tensor", None)
    if not hasattr(p, "ds_id") or part is None:
        return None
    size, numel = int(part.ds_numel), int(p.ds_numel)
    if size * world_size != int(getattr(p, "ds_numel_aligned", -1)) or part.numel() < size:
        return UNKNOWN_LAYOUT
    start = rank * size
    return part.detach().reshape(-1).narrow(0, 0, max(0, min(size, numel - start))), start


def to_numpy(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    host = t.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()  # copy: never alias live params
    return _as_numpy(host)


def host_bytes(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """`t` as `dtype` in host memory, for a caller that copies it out at once (write(2)): the
    tensor's own memory when it already is a contiguous host tensor of that dtype (a bf16 ZeRO-3
    partition exported as bf16: half of a publish's time was this copy), else a converted copy."""
    host = t.detach().to(device="cpu", dtype=dtype).contiguous()
    return _as_numpy(host)


def _as_numpy(host: torch.Tensor) -> np.ndarray:
    return host.view(torch.uint16).numpy() if host.dtype == torch.bfloat16 else host.numpy()


def rng_states() -> dict[str, bytes]:
    states = {"torch": torch.get_rng_state().numpy().tobytes()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state().numpy().tobytes()
    return states


def set_rng_states(states: dict[str, bytes]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(states["torch"]), dtype=torch.uint8))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(states["cuda"]), dtype=torch.uint8))


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
