"""An actor's context follows the run: the learner's Welcome carries the run's max_model_len, the
engine takes it unless actor.max_model_len is set, a set one below what the run needs is refused
naming the setting; and the CPU core binding of tensor-parallel shards."""

from __future__ import annotations

import numpy as np
import pytest

from actors.engine import context_error, make_engine, model_context_len
from actors.vllm_engine import cpu_binding
from bus.codec import decode, encode
from bus.messages import SamplingSpec, Welcome
from common.config import ActorConfig


def test_welcome_carries_the_runs_context():
    base = dict(run_id="r", epoch=0, version=0, heartbeat_s=1.0, liveness=3, max_staleness=0)
    out, _ = decode(encode(Welcome(**base, max_model_len=34816)), max_bytes=1 << 20)
    assert out.max_model_len == 34816
    assert Welcome(**base).max_model_len == 0


def test_context_error_names_the_setting():
    assert context_error(None, 300) == "" and context_error(300, 300) == "" and context_error(64, 0) == ""
    why = context_error(200, 300)
    assert "actor.max_model_len = 200" in why and "unset actor.max_model_len" in why and "at least 300" in why
    assert "actor.engine = vllm" in context_error(None, 300, tensor_parallel_size=2, kind="hf")


def test_engine_takes_the_announced_context_unless_set(tiny_model):
    assert model_context_len(str(tiny_model)) == 4096
    eng = make_engine("hf", str(tiny_model), ActorConfig(seed=0, threads=1))
    assert eng.max_model_len == 4096  # nothing announced: the model's own limit
    eng = make_engine("hf", str(tiny_model), ActorConfig(seed=0, threads=1), max_model_len=20)
    assert eng.max_model_len == 20
    out = eng.generate([np.arange(1, 15, dtype=np.int32)], SamplingSpec(n=1, temperature=0.0, max_tokens=12))
    assert len(out[0][0].token_ids) <= 6  # the context bounds the response: 20 - 14
    eng = make_engine("hf", str(tiny_model), ActorConfig(seed=0, threads=1, max_model_len=64),
                      max_model_len=20)
    assert eng.max_model_len == 64  # the user's setting wins (the actor refuses it first when too small)


def test_hf_engine_refuses_tensor_parallelism(tiny_model):
    with pytest.raises(ValueError, match="actor.tensor_parallel_size = 2 needs the vLLM engine"):
        make_engine("hf", str(tiny_model), ActorConfig(tensor_parallel_size=2))


@pytest.mark.parametrize("shards, threads, cores, want", [
    (2, 0, [0, 1], "0|1"),
    (2, 0, [0, 1, 2, 3, 4], "0,1|2,3"),
    (4, 0, list(range(8)), "0,1|2,3|4,5|6,7"),
    (2, 3, list(range(8)), "0,1,2|3,4,5"),
    (2, 8, list(range(8)), "0,1,2,3|4,5,6,7"),  # more threads than cores: an even split
    (2, 0, [3], "3|3"),  # fewer cores than shards: shared
    (2, 0, [6, 2], "2|6"),
])
def test_cpu_binding(shards, threads, cores, want):
    assert cpu_binding(shards, threads, cores) == want
