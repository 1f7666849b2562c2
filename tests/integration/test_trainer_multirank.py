"""Gradient exactness through DeepSpeed across real ranks, and the rank-0 command protocol.

The test starts `torchrun --nproc_per_node 2` on THIS file (its `__main__` is the rank program):
rank 0 drives the step through `RankGroup` (scatter of micro-batches, learner/dist.py), rank 1
sits in `worker_loop`. Each rank gets 3 micro-batches (rank 1's last one an empty filler; in the
shared-prompt case, under ZeRO-3, the same groups in that form, where every micro-batch, fillers
included, runs the backbone twice, so the ranks' parameter gathers must still pair up), DeepSpeed
accumulates with its own scaling compensated (learner/trainer.py), and the gradient is read just
before `engine.step()` (a Trainer subclass wraps `_optimizer_step`; `safe_get_full_grad` assembles
ZeRO-2/3 partitions, collectively on every rank), i.e. after the data-parallel reduction and before
clipping and AdamW. The reference is the same batch as ONE micro-batch on one process in plain torch
(no DeepSpeed at all): logits -> token_logprobs_and_entropy -> policy_loss(total_tokens) -> backward.
They must agree to 1e-5 of the largest gradient entry. The run then sends a step with a wrong token
count (refused with the same ValueError on both ranks; the worker keeps serving), exports weights,
publishes versions (learner/run.py `publish`: under ZeRO-3 every rank writes its own partitions into
rank 0's /dev/shm file, which must hold exactly the gathered export's bytes, fp32 and bf16; a rank
that cannot open the file makes the group gather from then on), saves a checkpoint and loads it
through the protocol, and stops the worker.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from samples import train_samples

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]
TEMPERATURE = 0.9


def make_samples(seed: int = 0, n: int = 10):
    """Deterministic samples of mixed lengths with mixed-sign advantages, in groups of 2 (one prompt each)."""
    return train_samples(seed, n, prompt=(2, 6), response=(2, 9), group_size=2)


def split_for_ranks(samples, shared: bool = False):
    """Rank 0: 3 micro-batches; rank 1: 2 and an empty filler (b = 0). Shared prompts: rank 0 holds
    groups 0 and 1 in one micro-batch, group 2, and a filler; rank 1 groups 3 and 4, then a filler."""
    from learner.buffer import build_micro_batch, build_shared_micro_batch

    cuts = [samples[0:2], samples[2:4], samples[4:6], samples[6:8], samples[8:10], []]
    if shared:
        return [[build_shared_micro_batch(c) for c in ([cuts[0], cuts[1]], [cuts[2]], [])],
                [build_shared_micro_batch(c) for c in ([cuts[3]], [cuts[4]], [])]]
    mbs = [build_micro_batch(c) for c in cuts]
    return [mbs[0:3], mbs[3:6]]


# ---- the rank program (run by torchrun) ---------------------------------------------------------


def rank_main(args: argparse.Namespace) -> None:
    import torch
    from deepspeed.utils import safe_get_full_grad

    from common.config import LearnerConfig
    from learner.dist import RankGroup, worker_loop
    from learner.trainer import Trainer

    torch.set_num_threads(1)

    class GradProbe(Trainer):
        grads: dict[str, np.ndarray] = {}

        def _optimizer_step(self) -> float:
            for name, p in self.engine.module.named_parameters():
                g = safe_get_full_grad(p)  # collective under ZeRO-2/3: every rank calls
                shape = p.ds_shape if hasattr(p, "ds_shape") else p.shape
                self.grads[name] = g.detach().float().cpu().numpy().copy().reshape(shape)  # copy: clip is in place
            return super()._optimizer_step()

    cfg = LearnerConfig()
    cfg.trainer.zero_stage = args.stage
    cfg.optim.lr = 1e-3
    trainer = GradProbe(args.model, cfg, temperature=TEMPERATURE)
    if trainer.rank != 0:
        served = worker_loop(trainer)
        # STEP, the refused STEP, EXPORT; per dtype: EXPORT, publish's SHARDS (ZeRO-3) or EXPORT;
        # the refused SHARDS, publish's EXPORT; SAVE, LOAD
        assert served == 11, served
        return
    out = Path(args.out)
    ranks = RankGroup(trainer)
    per_rank = split_for_ranks(make_samples(), args.shared)
    total = sum(mb.n_tokens for mbs in per_rank for mb in mbs)
    metrics = ranks.step(per_rank, total, entropy_coef=0.003)
    np.savez(out / "grads.npz", **trainer.grads)
    with pytest.raises(ValueError, match="total_tokens"):  # refused on both ranks; the worker carries on
        ranks.step(per_rank, total + 1, entropy_coef=0.0)
    weights = ranks.export_weights()
    published = publish_both_ways(ranks, args.stage)
    path = ranks.save_checkpoint(out / "checkpoints" / "step_000001", {"epoch": 3, "note": "x"})
    files = sorted(p.name for p in path.iterdir())
    trainer.version = 99
    client = ranks.load_checkpoint(path)
    ranks.stop()
    (out / "result.json").write_text(json.dumps({
        "metrics": metrics, "version": trainer.version, "loaded_client": client,
        "world_size": trainer.world_size, "files": files,
        "export_names": [n for n, _, _ in weights], "export_dtype": weights[0][2], "published": published,
    }))


def publish_both_ways(ranks, stage: int) -> dict:
    """Publish version 1 in fp32 and bf16 and compare each store with the gathered export; then a
    file no rank can open (as on another host): refused on every rank, and the next publish gathers."""
    from common.config import load_config
    from learner.run import publish

    class Server:
        def publish(self, store):
            self.store = store

    out = {"sharded": ranks.exports_shards}
    for dtype in ("float32", "bfloat16"):
        gathered = {n: a for n, a, _ in ranks.export_weights(dtype)}
        server = Server()
        publish(ranks, server, 1, load_config(overrides=[f"learner.trainer.weights_dtype={dtype}",
                                                           "bus.shared_memory=false", "bus.chunk_bytes=4096"]))
        store = server.store
        assert store.verify() and (store.shared is not None) == (stage == 3), (dtype, store.shared)
        got = dict(store.arrays())
        assert set(got) <= set(gathered) and len(got) >= len(gathered) - 1  # the tied alias once
        out[dtype] = all(np.array_equal(got[n], gathered[n]) for n in got)
    out["bogus_file"] = ranks.export_shards("float32", "/dev/shm/or1-w-1-1-0ff", "0:0", {})
    out["sharded_after"] = ranks.exports_shards
    server = Server()
    publish(ranks, server, 2, load_config(overrides=["bus.shared_memory=false"]))
    out["after_fallback"] = server.store.verify() and server.store.shared is None
    return out


# ---- the reference and the test ---------------------------------------------------------------


def reference_gradients(model_path: Path) -> tuple[dict[str, np.ndarray], float]:
    """The whole batch as one micro-batch, plain torch, one process."""
    import torch
    from transformers import AutoModelForCausalLM

    from common.config import LossConfig
    from learner.buffer import build_micro_batch
    from learner.loss import LossInputs, policy_loss, token_logprobs_and_entropy

    torch.set_num_threads(1)
    mb = build_micro_batch(make_samples())
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    ids = torch.from_numpy(mb.input_ids)
    logits = model(input_ids=ids, attention_mask=torch.from_numpy(mb.attention_mask), use_cache=False).logits[:, :-1]
    logp, ent = token_logprobs_and_entropy(logits, ids[:, 1:], TEMPERATURE)
    cut = lambda a: torch.from_numpy(a[:, 1:])  # noqa: E731
    out = policy_loss(LossInputs(logp, ent, cut(mb.behaviour_logprobs), cut(mb.advantages), cut(mb.loss_mask)),
                      LossConfig(), 0.003, float(mb.n_tokens))
    out.loss.backward()
    return {n: p.grad.numpy().copy() for n, p in model.named_parameters()}, float(out.loss.detach())


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from common.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("stage,shared", [(0, False), (2, False), (3, False), (3, True)])
def test_two_ranks_three_micro_batches_match_one_batch(stage, shared, tiny_model, tmp_path):
    from procs import free_port  # here: this file also runs as the ranks' script, without tests/ on the path

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(HERE), "--stage", str(stage), "--model", str(tiny_model), "--out", str(tmp_path),
           *(["--shared"] if shared else [])]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads((tmp_path / "result.json").read_text())
    got = dict(np.load(tmp_path / "grads.npz"))
    want, ref_loss = reference_gradients(tiny_model)

    assert set(got) == set(want)
    scale = max(float(np.abs(g).max()) for g in want.values())
    worst = max(float(np.abs(got[n] - want[n]).max()) for n in want)
    assert scale > 1e-3  # a real gradient, not zeros
    assert worst <= 1e-5 * scale, (worst, scale)
    ref_norm = float(np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in want.values())))
    m = result["metrics"]
    assert m["loss/total"] == pytest.approx(ref_loss, rel=1e-5, abs=1e-7)
    assert m["learner/grad_norm"] == pytest.approx(ref_norm, rel=1e-4)
    assert m["learner/tokens"] == sum(len(s.response_ids) for s in make_samples())
    assert result["version"] == 1 and result["world_size"] == 2
    assert "lm_head.weight" in result["export_names"] and result["export_dtype"] == "float32"
    assert result["published"] == {"sharded": stage == 3, "float32": True, "bfloat16": True,
                                   "bogus_file": False, "sharded_after": False, "after_fallback": True}
    assert {"COMPLETE", "or1_state.json", "rng_rank_00000.json", "rng_rank_00001.json"} <= set(result["files"])
    state = json.loads((tmp_path / "checkpoints" / "step_000001" / "or1_state.json").read_text())
    assert state["client_state"] == {"epoch": 3, "note": "x"} and state["version"] == 1
    assert result["loaded_client"] == {"epoch": 3, "note": "x"}  # and version back to 1 (checked above)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--shared", action="store_true", help="the shared-prompt form (learner/buffer.py)")
    rank_main(parser.parse_args())
