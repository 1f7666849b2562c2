"""VLLMEngine.abort from another thread, as the actor calls it: the generating thread leaves at its
next engine step (the wrapped `llm_engine.step`), the engine refuses later generations and still
closes. Its own module and engine: an aborted engine stays aborted."""

from __future__ import annotations

import threading

import pytest

from actors.engine import GenerationAborted, vllm_available
from bus.messages import SamplingSpec

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not vllm_available(), reason="vllm is not installed")]


def test_abort_from_another_thread_stops_at_the_next_step(tiny_model, actor_cfg, prompts):
    from actors.vllm_engine import VLLMEngine

    eng = VLLMEngine(str(tiny_model), actor_cfg)
    try:
        llm_engine = eng.llm.llm_engine
        wrapped, steps, third = llm_engine.step, [], threading.Event()

        def counted():
            steps.append(1)
            if len(steps) == 3:
                third.set()
            return wrapped()

        llm_engine.step = counted  # counts the steps that reach the abort check
        outcome: list[BaseException | object] = []

        def generate():
            try:
                outcome.append(eng.generate(prompts, SamplingSpec(n=4, temperature=1.0, max_tokens=200, seed=0)))
            except BaseException as e:  # noqa: BLE001 — checked below
                outcome.append(e)

        t = threading.Thread(target=generate, daemon=True)
        t.start()
        assert third.wait(60), "the generation never reached its third engine step"
        eng.abort()
        at_abort = len(steps)
        t.join(30)
        assert not t.is_alive() and isinstance(outcome[0], GenerationAborted)
        assert len(steps) <= at_abort + 2  # left at the next step boundary (one may have been under way)
        with pytest.raises(GenerationAborted):
            eng.generate(prompts[:1], SamplingSpec(n=1, temperature=1.0, max_tokens=4, seed=0))
    finally:
        eng.close()
