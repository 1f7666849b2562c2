"""learner/trainer.py and learner/checkpoint.py on DeepSpeed's CPU accelerator (one gloo rank).

The tiny model is the embedded one (common/tinymodel.py). ZeRO 0, 2 and 3 each run the same
lifecycle (load, learn, export, save -> load -> step); tests/integration/test_trainer_multirank.py
covers several ranks.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from samples import train_samples

from common.config import LearnerConfig, OptimConfig, TrainerConfig
from learner import checkpoint as ckpt
from learner.buffer import TrainSample, build_micro_batch, build_shared_micro_batch, make_micro_batches
from learner.ds_setup import build_deepspeed_config
from learner.trainer import Trainer

torch.set_num_threads(1)
VOCAB = 2000  # token ids drawn below the tiny model's vocabulary


def samples(seed: int, n: int, advantage: float | None = None, mu: float = -7.6) -> list[TrainSample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, r = int(rng.integers(2, 6)), int(rng.integers(2, 9))
        out.append(TrainSample(prompt_ids=rng.integers(0, VOCAB, p).astype(np.int32),
                               response_ids=rng.integers(0, VOCAB, r).astype(np.int32),
                               behaviour_logprobs=np.full(r, mu, np.float32),  # -7.6 ~ log(1/2048)
                               advantage=float(rng.normal()) if advantage is None else advantage,
                               reward=0.0, truncated=False, weight_version=0, prompt_id=str(i)))
    return out


def config(stage: int = 0, lr: float = 1e-3) -> LearnerConfig:
    cfg = LearnerConfig()
    cfg.trainer.zero_stage = stage
    cfg.optim.lr = lr
    return cfg


def tokens(mbs) -> int:
    return sum(mb.n_tokens for mb in mbs)


def params(trainer: Trainer) -> dict[str, np.ndarray]:
    """The module's parameters as numpy (ZeRO-3: gathered)."""
    import deepspeed

    named = list(trainer.engine.module.named_parameters())
    gather = [p for _, p in named if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(gather, modifier_rank=None, enabled=bool(gather)):
        return {n: p.detach().clone().numpy() for n, p in named}


def set_behaviour_to_own_logprobs(mbs, model_path, offset: float) -> None:
    """mu := log pi_0 + offset at every loss position (pi_0: the model folder's policy, T = 1)."""
    from transformers import AutoModelForCausalLM

    from learner.loss import token_logprobs_and_entropy

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    with torch.no_grad():
        for mb in mbs:
            ids = torch.from_numpy(mb.input_ids)
            logits = model(input_ids=ids, attention_mask=torch.from_numpy(mb.attention_mask)).logits[:, :-1]
            logp, _ = token_logprobs_and_entropy(logits, ids[:, 1:], 1.0)
            mb.behaviour_logprobs[:, 1:] = np.where(mb.loss_mask[:, 1:] > 0, logp.numpy() + offset, 0.0)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from common.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def trainer(tiny_model):
    return Trainer(tiny_model, config(0), temperature=1.0)


# ---- DeepSpeed config ---------------------------------------------------------------------


def test_deepspeed_config_from_ours():
    optim = OptimConfig(lr=2e-5, betas=(0.9, 0.95), weight_decay=0.1, grad_clip=0.5)
    ds = build_deepspeed_config(TrainerConfig(zero_stage=3), optim, on_gpu=False, world_size=4)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["memory_efficient_linear"] is False
    pinned = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"])
    assert pinned == (1, 1, 4)
    opt = ds["optimizer"]
    assert opt["type"] == "AdamW" and opt["params"]["lr"] == 2e-5 and opt["params"]["betas"] == [0.9, 0.95]
    assert opt["params"]["weight_decay"] == 0.1 and opt["params"]["torch_adam"] is False  # FusedAdam
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is False  # auto precision on CPU = fp32
    gpu = build_deepspeed_config(TrainerConfig(), OptimConfig(impl="torch"), on_gpu=True, world_size=1)
    assert gpu["bf16"]["enabled"] is True and gpu["optimizer"]["params"]["torch_adam"] is True


def test_deepspeed_json_merges_over_ours_but_not_over_accumulation(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}, "gradient_clipping": 2.0}))
    ds = build_deepspeed_config(TrainerConfig(zero_stage=2, deepspeed_json=str(user)), OptimConfig(),
                                on_gpu=False, world_size=2)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True} and ds["gradient_clipping"] == 2.0
    user.write_text(json.dumps({"gradient_accumulation_steps": 8}))
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        build_deepspeed_config(TrainerConfig(deepspeed_json=str(user)), OptimConfig(), on_gpu=False, world_size=1)
    user.write_text("{not json")
    with pytest.raises(ValueError, match="deepspeed_json"):
        build_deepspeed_config(TrainerConfig(deepspeed_json=str(user)), OptimConfig(), on_gpu=False, world_size=1)


# ---- checkpoint layout (pure file logic) --------------------------------------------------


def test_checkpoint_layout_marker_and_pruning(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path) is None
    for step in (1, 2, 3):
        path = ckpt.begin_save(ckpt.checkpoint_dir(tmp_path, step))
        ckpt.write_state(path, step, 1, {"epoch": step})
        ckpt.mark_complete(path)
    killed = ckpt.begin_save(ckpt.checkpoint_dir(tmp_path, 4))  # a save killed before its marker
    (killed / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    assert ckpt.checkpoint_dir(tmp_path, 3).name == "step_000003"
    assert ckpt.latest_checkpoint(tmp_path) == ckpt.checkpoint_dir(tmp_path, 3)
    assert ckpt.read_state(ckpt.latest_checkpoint(tmp_path))["client_state"] == {"epoch": 3}
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.read_state(killed)
    stale = ckpt.begin_save(ckpt.checkpoint_dir(tmp_path, 0))  # incomplete and older than the newest
    removed = ckpt.prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["step_000000", "step_000001"] and not stale.exists()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_000002", "step_000003"]
    assert killed.exists()  # newer than the newest complete one: a later save of step 4 replaces it
    again = ckpt.begin_save(killed)
    assert list(again.iterdir()) == []


def test_client_state_must_be_json():
    with pytest.raises(ValueError, match="JSON"):
        ckpt.check_client_state({"rng": object()})
    with pytest.raises(ValueError, match="dict"):
        ckpt.check_client_state([1, 2])


# ---- one gloo rank, ZeRO 0 ----------------------------------------------------------------


class GradProbe(Trainer):
    """Records the accumulated gradient instead of stepping (parameters stay put)."""

    def _optimizer_step(self) -> float:
        from deepspeed.utils import safe_get_full_grad

        self.grads = {n: safe_get_full_grad(p).detach().clone().reshape(getattr(p, "ds_shape", p.shape))
                      for n, p in self.engine.module.named_parameters()}  # ZeRO-3: gathered
        self.engine.optimizer.zero_grad()
        return 0.0


def test_accumulation_is_exact_with_fillers(tiny_model):
    """One micro-batch == three (one an empty filler) == the same in another order == with gradient
    checkpointing: the token-level mean is exact despite DeepSpeed's accumulation."""
    probe = GradProbe(tiny_model, config(0), temperature=0.8)
    batch = samples(3, 6)
    whole = [build_micro_batch(batch)]
    split = [build_micro_batch(batch[:2]), build_micro_batch([]), build_micro_batch(batch[2:])]
    runs = []
    for mbs in (whole, split, split[::-1]):
        metrics = probe.train_step(mbs, tokens(mbs), entropy_coef=0.004)
        runs.append((metrics, probe.grads))
    checkpointed = config(0)
    checkpointed.trainer.gradient_checkpointing = True
    probe = GradProbe(tiny_model, checkpointed, temperature=0.8)
    assert probe.engine.module.is_gradient_checkpointing and probe.engine.module.training
    runs.append((probe.train_step(split, tokens(split), entropy_coef=0.004), probe.grads))
    (m0, g0), *rest = runs
    scale = max(g.abs().max().item() for g in g0.values())
    assert scale > 1e-3
    for m, g in rest:
        assert max((g[n] - g0[n]).abs().max().item() for n in g0) <= 1e-6 * scale
        assert m["loss/total"] == pytest.approx(m0["loss/total"], rel=1e-6, abs=1e-9)
        assert m["entropy/mean"] == pytest.approx(m0["entropy/mean"], rel=1e-6)
    assert m0["learner/tokens"] == tokens(whole) == sum(len(s.response_ids) for s in batch)
    assert 0.1 < m0["entropy/mean"] < np.log(2048) + 1e-3


@pytest.mark.parametrize("stage", [0, 3])
def test_shared_prompts_give_the_flat_gradient(stage, tiny_model):
    """Each group's prompt run once, its responses on the prompt's keys and values (the shared-prompt
    form), gives the flat form's loss, metrics and gradient: micro-batches holding two groups, a
    group cut into pieces, prompts of different lengths (left-padded) and a filler included."""
    batch = train_samples(11, 12, prompt=(2, 7), response=(1, 9), group_size=4)  # 3 groups of 4
    per_rank, m = make_micro_batches(batch, token_budget=25, n_ranks=1, share_prompts=True)
    shared = per_rank[0] + [build_shared_micro_batch([])]
    assert max(mb.prompt_ids.shape[0] for mb in shared) >= 2  # two groups in one micro-batch
    assert sum(mb.prompt_ids.shape[0] for mb in shared[:-1]) > 3  # a group cut into pieces
    assert len({len(s.prompt_ids) for s in batch}) > 1 and sum(mb.size for mb in shared) == 12
    assert m["learner/positions"] < sum(s.length for s in batch)  # fewer positions than flat
    flat = [build_micro_batch(batch[:7]), build_micro_batch([]), build_micro_batch(batch[7:])]
    runs = []
    for mbs in (flat, shared):
        probe = GradProbe(tiny_model, config(stage), temperature=0.8)
        runs.append((probe.train_step(mbs, tokens(mbs), entropy_coef=0.004), probe.grads))
    (m0, g0), (m1, g1) = runs
    scale = max(g.abs().max().item() for g in g0.values())
    assert scale > 1e-3
    assert max((g1[n] - g0[n]).abs().max().item() for n in g0) <= 1e-5 * scale
    for key in ("loss/total", "entropy/mean", "loss/policy"):
        assert m1[key] == pytest.approx(m0[key], rel=1e-5, abs=1e-6)  # the losses cancel to ~1e-2
    assert m1["learner/tokens"] == m0["learner/tokens"] == sum(len(s.response_ids) for s in batch)


def test_shared_prompt_batches_are_checked(trainer):
    def bad(**change):
        mb = build_shared_micro_batch([train_samples(4, 3, group_size=3)])
        for name, value in change.items():
            getattr(mb, name)[...] = value
        return mb

    for mb, why in ((bad(row_prompt=1), "row_prompt"), (bad(prompt_ids=10**6), "prompt token ids"),
                    (bad(prompt_mask=0), "left-padded")):
        with pytest.raises(ValueError, match=why):
            trainer.train_step([mb], tokens([mb]), 0.0)
    mixed = [build_shared_micro_batch([train_samples(4, 3, group_size=3)]), build_micro_batch(samples(4, 3))]
    with pytest.raises(ValueError, match="both forms"):
        trainer.train_step(mixed, tokens(mixed), 0.0)


def test_bad_batches_raise_and_the_trainer_survives(trainer):
    good = [build_micro_batch(samples(4, 3))]
    with pytest.raises(ValueError, match="total_tokens"):
        trainer.train_step(good, tokens(good) + 1, 0.0)
    bad = build_micro_batch(samples(4, 3))
    bad.input_ids[0, 1] = 10**6
    with pytest.raises(ValueError, match="token ids"):
        trainer.train_step([bad], tokens([bad]), 0.0)
    bad = build_micro_batch(samples(4, 3))
    bad.advantages[bad.loss_mask > 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        trainer.train_step([bad], tokens([bad]), 0.0)
    with pytest.raises(ValueError, match="no loss tokens"):
        trainer.train_step([build_micro_batch([])], 0, 0.0)
    version = trainer.version
    metrics = trainer.train_step(good, tokens(good), 0.0)
    assert trainer.version == version + 1 and np.isfinite(metrics["loss/total"])


def test_sgd_steps_take_several_steps_per_batch(trainer, monkeypatch):
    mbs = [build_micro_batch(s) for s in (samples(5, 2), samples(6, 3), samples(7, 2))]
    calls = []
    forward = trainer._score
    monkeypatch.setattr(trainer, "_score", lambda b: calls.append(torch.is_grad_enabled()) or forward(b))
    monkeypatch.setattr(trainer.cfg.loss, "sgd_steps", 2)
    version = trainer.version
    metrics = trainer.train_step(mbs, tokens(mbs), 0.0)
    assert trainer.version == version + 2
    assert calls == [False] * 3 + [True] * 3  # pi_prox first (no grad), then the two mini-batches
    assert metrics["learner/tokens"] == tokens(mbs) and np.isfinite(metrics["learner/grad_norm"])
    # the step's time split: forward/backward and optimizer, both inside the step's own time
    fwd_bwd, optim = metrics["learner/fwd_bwd_s"], metrics["learner/optim_s"]
    assert fwd_bwd > 0 and optim > 0 and fwd_bwd + optim <= metrics["learner/train_s"]


def test_rank_group_on_one_rank(trainer, tmp_path):
    from learner.dist import RankGroup

    ranks = RankGroup(trainer)
    mbs = [build_micro_batch(samples(9, 3))]
    with pytest.raises(ValueError, match="ranks"):
        ranks.step([mbs, mbs], 2 * tokens(mbs), 0.0)
    version = trainer.version
    assert ranks.step([mbs], tokens(mbs), 0.0)["learner/tokens"] == tokens(mbs)
    assert trainer.version == version + 1
    assert [n for n, _, _ in ranks.export_weights()][0] == "model.embed_tokens.weight"
    with pytest.raises(ValueError, match="JSON"):
        ranks.save_checkpoint(tmp_path / "step_000001", {"x": {1, 2}})
    path = ranks.save_checkpoint(ckpt.checkpoint_dir(tmp_path, trainer.version), {"epoch": 1})
    assert ranks.load_checkpoint(path) == {"epoch": 1} and trainer.version == version + 1
    ranks.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        ranks.step([mbs], tokens(mbs), 0.0)


def test_export_dtypes(trainer):
    own = params(trainer)
    f32 = trainer.export_weights("float32")
    assert [n for n, _, _ in f32][-1] == "lm_head.weight" and len({n for n, _, _ in f32}) == len(f32)
    weights = {n: a for n, a, _ in f32}
    for name, value in own.items():
        assert np.array_equal(weights[name], value)
    assert np.array_equal(weights["lm_head.weight"], own["model.embed_tokens.weight"])  # tied alias
    bf16 = {n: (a, d) for n, a, d in trainer.export_weights("bfloat16")}
    bits, dtype = bf16["model.norm.weight"]
    assert dtype == "bfloat16" and bits.dtype == np.uint16
    want = torch.from_numpy(own["model.norm.weight"]).to(torch.bfloat16).view(torch.uint16).numpy()
    assert np.array_equal(bits, want)
    assert trainer.weights_dtype_name("auto") == "float32"  # the tiny model's folder dtype
    with pytest.raises(ValueError, match="weights dtype"):
        trainer.export_weights("int8")


@pytest.mark.parametrize("stage", [0, 3])
def test_auto_weights_dtype_is_the_folders_not_the_training_precision(stage, tiny_model, tmp_path):
    """A bfloat16 folder trained in fp32 (CPU) sends bfloat16 weights under "auto": the loaded model's
    config says float32 (from_pretrained/from_config record the dtype they loaded in)."""
    import shutil

    from transformers import AutoModelForCausalLM

    folder = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).save_pretrained(folder)
    for f in tiny_model.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "generation")):
            shutil.copy(f, folder / f.name)
    trainer = Trainer(folder, config(stage), temperature=1.0)
    assert trainer.precision == "fp32" and trainer.weights_dtype_name("auto") == "bfloat16"
    exported = trainer.export_weights()
    assert {d for _, _, d in exported} == {"bfloat16"} and exported[0][1].dtype == np.uint16


@pytest.mark.parametrize("stage", [0, 3])
def test_export_into_a_sink_matches_the_export(stage, tiny_model):
    """publish's path: the layout names each distinct tensor once (the tied head under the
    embedding's name), and the sink receives exactly the exported arrays, in that order."""
    trainer = Trainer(tiny_model, config(stage), temperature=1.0)
    layout = trainer.weights_layout("bfloat16")
    got: list[tuple[str, np.ndarray]] = []
    assert trainer.export_weights("bfloat16", sink=lambda n, a: got.append((n, a))) is None
    full = {n: a for n, a, _ in trainer.export_weights("bfloat16")}
    assert [n for n, _ in got] == [n for n, _, _ in layout] and "lm_head.weight" not in dict(got)
    for (name, dtype, shape), (n, a) in zip(layout, got):
        assert dtype == "bfloat16" and list(a.shape) == shape and np.array_equal(a, full[n])


def test_auto_weights_dtype_is_bf16_when_training_in_bf16(tiny_model):
    """bf16 throughout on GPU: an fp32 folder trained in bf16 sends bfloat16 weights under "auto"."""
    cfg = config(0)
    cfg.trainer.precision = "bf16"
    trainer = Trainer(tiny_model, cfg, temperature=1.0)
    assert trainer.model_dtype == "float32" and trainer.weights_dtype_name("auto") == "bfloat16"


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_zero_stage_lifecycle(stage, tiny_model, tmp_path):
    """Load exactly, learn a fixed positive-advantage batch, export, save -> load -> step == step."""
    from safetensors.torch import load_file

    a = Trainer(tiny_model, config(stage, lr=1e-4), temperature=1.0)
    assert a.zero_stage == stage and torch.nn.functional.linear is torch._C._nn.linear
    exported = {n: arr for n, arr, _ in a.export_weights()}
    for name, value in load_file(str(tiny_model / "model.safetensors")).items():
        assert np.array_equal(exported[name], value.numpy()), name

    # With A = 1 the loss is -mean(w), w = min(pi/mu, 2): mu = e^3 * pi_0 starts w at e^-3, far
    # enough below the cap that it keeps rising (the loss keeps falling) as pi of the batch's tokens
    # grows by Adam's ~lr-sized steps (lr 1e-4 here: one step of 1e-3 moves this model ~1.6 nats)
    batch = [build_micro_batch(samples(1, 4, 1.0)), build_micro_batch(samples(2, 3, 1.0))]
    set_behaviour_to_own_logprobs(batch, tiny_model, offset=3.0)
    losses = [a.train_step(batch, tokens(batch), 0.0)["loss/total"] for _ in range(6)]
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[-1] < 2 * losses[0]  # not a rounding drift: -mean(w) at least doubled
    assert a.version == 6
    exported = {n: arr for n, arr, _ in a.export_weights()}
    for name, value in params(a).items():
        assert np.array_equal(exported[name], value), name

    state = {"epoch": 2, "scheduler": {"cursor": 17, "pass_rates": {"p1": 0.5}}, "entropy": {"coef": 1e-4}}
    path = a.save_checkpoint(ckpt.checkpoint_dir(tmp_path, a.version), state)
    assert ckpt.latest_checkpoint(tmp_path) == path and ckpt.is_complete(path)
    nxt = [build_micro_batch(samples(8, 5))]
    a.train_step(nxt, tokens(nxt), 0.002)
    want = params(a)

    b = Trainer(tiny_model, config(stage, lr=1e-4), temperature=1.0)
    assert b.load_checkpoint(path) == state and b.version == 6
    b.train_step(nxt, tokens(nxt), 0.002)
    got = params(b)
    assert b.version == 7 and max(float(np.abs(got[n] - want[n]).max()) for n in want) <= 1e-6


def test_a_new_trainer_after_the_process_group_was_torn_down(tiny_model):
    """vLLM's engine shutdown destroys the default process group of the process it runs in (an
    in-process eval, a test). The next Trainer makes a new one-process group, and DeepSpeed's cached
    groups of the dead one are dropped ("Group ... is not registered" otherwise)."""
    import torch.distributed as dist

    Trainer(tiny_model, config(), temperature=1.0)
    dist.destroy_process_group()
    t = Trainer(tiny_model, config(), temperature=1.0)
    mbs = [build_micro_batch(samples(4, 3))]
    assert np.isfinite(t.train_step(mbs, tokens(mbs), 0.0)["loss/total"]) and t.version == 1
