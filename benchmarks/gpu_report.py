"""The figures of `benchmarks/gpu_smoke.sh`, from a finished `or1 run` directory and its model.

    python benchmarks/gpu_report.py --run RUN_DIR --model MODEL_DIR [--skip-offline]

- **generation**: each actor's engine throughput in the run (sum of its leases' tokens over the sum
  of their generation seconds, the `actor.generated` log events; the first lease, which includes
  warm-up, left out), the mean over actors; against vLLM's own offline `LLM.generate` on the same
  model, a lease's worth of the run's prompts (B prompts × n samples, same temperature and token
  budget), best of 3 rounds after a warm-up. `gen_vs_vllm` = or1 / offline.
- **learner MFU**: 6 · N · tokens per step / (`learner/fwd_bwd_s` + `learner/optim_s`) / (peak ×
  ranks), N the model's parameters; peak from the device name (H100/H200 989, A100 312 bf16 dense
  TFLOP/s) or `OR1_PEAK_TFLOPS`; "n/a" on CPU.
- **weight sync, ZMQ**: seconds per GB of the version (N × bytes per weight of `weights_dtype`):
  the actors' `weights.pulled` transfer_s + `weights.loaded` load_s, median over versions ≥ 1.
- **weight sync, NCCL**: a raw `torch.distributed` NCCL broadcast of the same bytes between two GPUs
  (two processes), median of 5 — the floor an NCCL path would reach; "n/a" with fewer than 2 GPUs
  (NCCL needs a device per rank).

Ends with `RESULT gen_tok_s=… vllm_tok_s=… gen_vs_vllm=… mfu=… zmq_s_per_gb=… nccl_s_per_gb=…`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
GB = 1e9


def events(logs: Path, pattern: str, name: str) -> dict[str, list[dict]]:
    """JSON log events `name` per log file matching `pattern` (non-JSON lines skipped)."""
    out: dict[str, list[dict]] = {}
    for path in sorted(logs.glob(pattern)):
        rows = []
        for line in path.read_text(errors="replace").splitlines():
            if f'"{name}"' not in line or not line.startswith("{"):
                continue
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("event") == name:
                rows.append(e)
        out[path.stem] = rows
    return out


def actor_tok_s(logs: Path) -> float:
    rates = []
    for rows in events(logs, "actor*.log", "actor.generated").values():
        rows = rows[1:]  # the first lease includes the engine's warm-up
        gen = sum(float(r["gen_s"]) for r in rows)
        if gen > 0:
            rates.append(sum(int(r["tokens"]) for r in rows) / gen)
    return statistics.mean(rates) if rates else 0.0


def parameters(model: str) -> int:
    from transformers import AutoConfig

    from common.model_shapes import plan

    total = 0
    for _, shape in plan(AutoConfig.from_pretrained(model)):
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def offline_tok_s(model: str, cfg, prompts: list[list[int]]) -> float:
    """vLLM's own LLM.generate on `prompts` (a lease's worth), best of 3 after a warm-up."""
    from vllm import LLM, SamplingParams

    from actors.vllm_engine import engine_args

    st = cfg.learner.stages[0]
    args = engine_args(model, cfg.actor.model_copy(update={"max_model_len": cfg.actor.max_model_len or 2048}),
                       {}, workers_apart=False)
    args.pop("worker_extension_cls", None)
    llm = LLM(**args)
    sp = SamplingParams(n=st.group_size, temperature=cfg.learner.sampling.temperature, max_tokens=st.max_response_tokens)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(inputs, sp, use_tqdm=False)
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        outs = llm.generate(inputs, sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        best = max(best, sum(len(c.token_ids) for o in outs for c in o.outputs) / dt)
    return best


def run_prompts(cfg, n: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from common.data import training_prompts

    tok = AutoTokenizer.from_pretrained(cfg.learner.model)
    return [list(map(int, ids)) for _, ids in training_prompts(cfg, tok)[:n]]


def mfu(rows: list[dict], params: int, ranks: int) -> str:
    import torch

    if not torch.cuda.is_available():
        return "n/a"
    name = torch.cuda.get_device_name(0)
    peak = float(os.environ.get("OR1_PEAK_TFLOPS", 0)) or next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)
    if not peak:
        return "n/a"
    vals = [6 * params * float(r["learner/tokens"]) / (float(r["learner/fwd_bwd_s"]) + float(r["learner/optim_s"]))
            for r in rows if r.get("learner/fwd_bwd_s")]
    return f"{statistics.median(vals) / (peak * 1e12 * ranks):.4f}" if vals else "n/a"


def zmq_s_per_gb(logs: Path, nbytes: int) -> float:
    pulled = events(logs, "actor*.log", "weights.pulled")
    loaded = events(logs, "actor*.log", "weights.loaded")
    per = []
    for actor in pulled:
        loads = {int(e["version"]): float(e["load_s"]) for e in loaded.get(actor, [])}
        for e in pulled[actor]:
            v = int(e["version"])
            if v >= 1 and v in loads:
                per.append(float(e["transfer_s"]) + loads[v])
    return statistics.median(per) / (nbytes / GB) if per else float("nan")


def _nccl_rank(rank: int, nbytes: int, port: int, out) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=rank, world_size=2)
    torch.cuda.set_device(rank)
    buf = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(6):
        torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        dist.broadcast(buf, src=0)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if rank == 1:
        out.put(statistics.median(times[1:]))
    dist.destroy_process_group()


def nccl_s_per_gb(nbytes: int) -> str:
    import multiprocessing as mp

    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return "n/a"
    import socket

    with socket.socket() as s:  # a free port for the two ranks' rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_nccl_rank, args=(r, nbytes, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    return f"{q.get(timeout=5) / (nbytes / GB):.4f}" if not q.empty() else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--skip-offline", action="store_true")
    a = ap.parse_args()
    from common.config import load_config
    from common.metrics import read_jsonl

    run = Path(a.run)
    cfg = load_config(run / "config.json")
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "learner/tokens" in r][1:]
    params = parameters(a.model)
    wbytes = {"bfloat16": 2, "float16": 2, "float32": 4}
    from actors.weights_io import folder_dtype

    dtype = cfg.learner.trainer.weights_dtype
    nbytes = params * wbytes.get(folder_dtype(a.model, dtype) if dtype == "auto" else dtype, 2)
    gen = actor_tok_s(run / "logs")
    st = cfg.learner.stages[0]
    off = 0.0 if a.skip_offline else offline_tok_s(a.model, cfg, run_prompts(cfg, st.prompts_per_batch))
    zmq = zmq_s_per_gb(run / "logs", nbytes)
    print(f"model {a.model}: {params / 1e6:.0f}M parameters, {nbytes / GB:.3f} GB per version")
    print(f"generation: or1 {gen:.0f} tok/s per actor, vLLM offline {off:.0f} tok/s on the same prompts")
    print(f"weight sync over ZMQ: {zmq:.3f} s/GB (transfer + load, median over versions)")
    print(f"RESULT gen_tok_s={gen:.1f} vllm_tok_s={off:.1f} gen_vs_vllm={(gen / off if off else float('nan')):.3f} "
          f"mfu={mfu(rows, params, cfg.run.learner_ranks)} zmq_s_per_gb={zmq:.4f} nccl_s_per_gb={nccl_s_per_gb(nbytes)}")


if __name__ == "__main__":
    main()
