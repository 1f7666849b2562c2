"""`AsyncVLLMEngine`: the Engine contract on vLLM's `AsyncLLM`, with weights loaded in flight.

Used when `actor.update_mode = "in_flight"` (docs/weights.md#in-flight-updates). With long
responses a lease holds an actor for a long time; loading weights only between leases lets
staleness grow with response length. Here `load_weights` may be called from any thread while
`generate` runs:

    pause_generation(mode="keep")     requests stay queued; the engine core finishes its step
    or1_reload_from_file (workers)    the version's /dev/shm file, mapped; vLLM's layerwise reload
    update_weight_version(str(v))     vLLM labels every later token with v
    resume_generation()

Which weights sampled which token comes from vLLM itself: the engine core tags each step's
outputs with its weight version, which changes only while paused, and a finished completion
carries `weight_versions` spans (`WeightVersionSpan(version, start, end)` over output tokens).
They become each sample's `versions`; the actor tags the group with the oldest. The log-probs
stay the ones actually sampled, so the loss's importance weights correct the mix.

KV cache at a switch (`actor.in_flight_kv`):
- "recompute" (default): the pause clears the caches with the running requests preempted
  (`clear_cache=True`: vLLM's `_reset_caches(reset_running_requests=True)`), so on resume each
  sequence is prefilled again — prompt and tokens so far — with the new weights: every later token
  is sampled from exactly the new policy, as a fresh engine holding it would (tested greedily).
- "keep": the old weights' KV stays (`clear_cache=False`; PipelineRL's choice): no prefill, but
  later tokens attend to keys and values the old weights computed. Prefix caching is off in this
  mode, so no later request reuses a cached prompt block of old weights.

Process layout: `AsyncLLM` runs its engine core in a child process (the caller needs a `__main__`
guard, as `or1 actor` has). Its worker loads through our worker extension
(`actors.vllm_worker.WeightFileLoader`), vLLM's supported way for a caller to run code in its
workers, from the version's shared-memory file (or a copy written for the load): tensors passed
through `collective_rpc` to another process do not arrive on this vLLM (measured: "'list' object has
no attribute 'dtype'"). The event loop runs on a daemon thread of this object; `generate`, `load_weights`,
`abort` and `close` hand coroutines to it and wait, so callers stay synchronous.

Abort: the generation's task is cancelled on the loop; vLLM aborts a request whose output stream
is cancelled. `generate` then raises GenerationAborted, as does every later call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from actors.engine import (
    GenerationAborted,
    GenSample,
    check_request,
    decode_texts,
    end_token_ids,
    make_sample,
    prompt_seed,
)
from actors.vllm_engine import (
    checked_items,
    completion_arrays,
    engine_args,
    reload_file_args,
    replicate_greedy,
    sampling_params,
)
from actors.weights_io import expected_shapes
from bus.messages import SamplingSpec
from common.log import get_logger

if TYPE_CHECKING:
    import torch

    from common.config import ActorConfig

log = get_logger(component="actors.vllm_async")
BUILD_TIMEOUT_S = 600.0


class AsyncVLLMEngine:
    """See the module doc. `extra` goes to vLLM's engine arguments as is (tests, benchmarks)."""

    updates_in_flight = True

    def __init__(self, model: str, cfg: "ActorConfig", *, ignore_eos: bool = False, **extra: Any):
        """`ignore_eos`: generate to max_tokens past end tokens (tests and benchmarks of long runs)."""
        from transformers import AutoTokenizer

        t0 = time.perf_counter()
        self.model_dir = model
        self.version = -1
        self.tensor_parallel_size = cfg.tensor_parallel_size
        self.recompute = cfg.in_flight_kv == "recompute"
        self.ignore_eos = ignore_eos
        self.tokens_generated = 0  # output tokens streamed so far, over every call (tests watch it)
        self._shapes, self._tied = expected_shapes(model)
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self._end_ids = end_token_ids(model, self.tokenizer)
        self._aborted = threading.Event()
        self._running: asyncio.Task | None = None  # the generation under way (on the loop)
        self._ids = itertools.count()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-async", daemon=True)
        self._thread.start()
        if not self.recompute:
            extra = {"enable_prefix_caching": False, **extra}
        args = engine_args(model, cfg, extra, workers_apart=True)
        self.llm = self._call(self._build(args), timeout=BUILD_TIMEOUT_S)
        model_config = self.llm.model_config
        self.max_model_len = int(model_config.max_model_len)
        self.vocab_size = int(model_config.get_vocab_size())
        self.startup_s = time.perf_counter() - t0
        log.info("vllm_async.ready", model=model, startup_s=round(self.startup_s, 2), kv=cfg.in_flight_kv,
                 max_model_len=self.max_model_len, tensor_parallel_size=self.tensor_parallel_size)

    # --- the loop -------------------------------------------------------------------------------

    def _call(self, coro: Any, timeout: float | None = None) -> Any:
        """Run `coro` on the engine's loop and wait for its result (from any thread but the loop's)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _build(self, args: dict[str, Any]) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        await llm.update_weight_version(str(self.version))
        return llm

    # --- generation -----------------------------------------------------------------------------

    def sampling_params(self, sampling: SamplingSpec, prompt_len: int, seed: int | None) -> Any:
        from vllm.sampling_params import RequestOutputKind

        return sampling_params(sampling, prompt_len, seed, self.max_model_len,
                               output_kind=RequestOutputKind.DELTA, ignore_eos=self.ignore_eos)

    def generate(self, prompts: list[np.ndarray], sampling: SamplingSpec) -> list[list[GenSample]]:
        if self._aborted.is_set():
            raise GenerationAborted("the engine was aborted")
        if not prompts:
            return []
        ids = check_request(prompts, sampling, self.vocab_size, self.max_model_len)
        params = [self.sampling_params(sampling, len(p), prompt_seed(sampling, i)) for i, p in enumerate(ids)]
        try:
            raw = self._call(self._generate(ids, params))
        except (asyncio.CancelledError, concurrent.futures.CancelledError) as e:
            raise GenerationAborted("the engine was aborted") from e
        texts = iter(decode_texts(self.tokenizer, [c[0] for g in raw for c in g]))
        groups = []
        for g in raw:
            samples = []
            for ids_, lps, spans in g:
                s = make_sample(ids_, lps, next(texts), self._end_ids)
                s.versions = spans
                samples.append(s)
            groups.append(samples)
        return replicate_greedy(groups, sampling.n) if sampling.temperature == 0 else groups

    async def _generate(self, prompts: list[list[int]], params: list[Any]) -> list[list[tuple]]:
        self._running = asyncio.current_task()
        try:
            call = next(self._ids)
            return await asyncio.gather(*(self._one(f"{call}-{i}", p, sp)
                                          for i, (p, sp) in enumerate(zip(prompts, params))))
        finally:
            self._running = None

    async def _one(self, request_id: str, prompt: list[int], params: Any) -> list[tuple]:
        """One prompt's n completions: (ids, log-probs, version spans) by completion index, from the
        streamed deltas."""
        ids: dict[int, list[int]] = {}
        lp_ids: dict[int, list[int]] = {}  # the tokens the streamed log-probs are of (checked against ids)
        lps: dict[int, list[float]] = {}
        done: dict[int, Any] = {}
        async for out in self.llm.generate({"prompt_token_ids": prompt}, params, request_id=request_id):
            for c in out.outputs:
                ids.setdefault(c.index, []).extend(c.token_ids)
                if c.logprobs is not None:
                    lp_ids.setdefault(c.index, []).extend(c.logprobs.token_ids)
                    lps.setdefault(c.index, []).extend(c.logprobs.logprobs)
                self.tokens_generated += len(c.token_ids)
                if c.finish_reason is not None:
                    done[c.index] = c
        completions = []
        for k in sorted(done):
            a, lp = completion_arrays(ids.get(k, []), lp_ids.get(k, []), lps.get(k, []), done[k].finish_reason)
            completions.append((a, lp, spans_of(done[k].weight_versions, len(a))))
        return completions

    # --- weights --------------------------------------------------------------------------------

    def load_weights(self, named: Iterable[tuple[str, "torch.Tensor"]], version: int) -> dict[str, float]:
        """Pause, load in place, label, resume (module doc); from any thread, a generation running or
        not. The names and shapes are checked before the pause: a bad store changes nothing."""
        t0 = time.perf_counter()
        items, head = checked_items(named, self._shapes, self._tied)
        with reload_file_args(named, items, head is not None) as args:
            pause_s = self._call(self._swap(args, version))
        self.version = version
        return {"weights/load_s": time.perf_counter() - t0, "weights/pause_s": pause_s}

    async def _swap(self, args: tuple[str, str, list], version: int) -> float:
        """The swap on the loop; returns how long generation stood still."""
        t0 = time.perf_counter()
        await self.llm.pause_generation(mode="keep", clear_cache=self.recompute)
        t1 = time.perf_counter()
        try:
            await self.llm.collective_rpc("or1_reload_from_file", args=args)
            t2 = time.perf_counter()
            await self.llm.update_weight_version(str(version))
        finally:
            await self.llm.resume_generation()
        t3 = time.perf_counter()
        log.debug("vllm_async.swap", version=version, pause_s=round(t1 - t0, 4), reload_s=round(t2 - t1, 4),
                  resume_s=round(t3 - t2, 4))
        return t3 - t0

    # --- ending ---------------------------------------------------------------------------------

    def abort(self) -> None:
        """From any thread: cancel the generation under way (its requests are aborted in vLLM)."""
        self._aborted.set()
        self._loop.call_soon_threadsafe(self._cancel_running)

    def _cancel_running(self) -> None:
        if self._running is not None:
            self._running.cancel()

    def close(self) -> None:
        """Shut the engine core down (on the loop, whose tasks it ends), then stop the loop."""
        llm, self.llm = getattr(self, "llm", None), None
        loop = getattr(self, "_loop", None)
        if loop is None or not loop.is_running():
            return
        if llm is not None:
            self._call(_shutdown(llm), timeout=60.0)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout=5.0)


async def _shutdown(llm: Any) -> None:
    llm.shutdown()
    await asyncio.sleep(0)  # let the cancelled output tasks finish on this loop


def spans_of(spans: Any, n_tokens: int) -> list[tuple[int, int]]:
    """vLLM's WeightVersionSpan list as (version, first token) pairs; [] when vLLM labelled nothing
    (no tokens) — the group's version then stands for the sample."""
    if not spans or not n_tokens:
        return []
    return [(int(s.version), int(s.start)) for s in spans]
