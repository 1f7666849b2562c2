"""The learner's log-probs without full logits: loss.head_logprobs_and_entropy and the trainer's
scoring forward (learner/trainer.py) give what the full [b, L, V] logits give, and never build them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from common.config import LearnerConfig, LossConfig
from learner import loss as L
from learner.buffer import TrainSample, build_micro_batch
from learner.loss import LossInputs, head_logprobs_and_entropy, policy_loss, token_logprobs_and_entropy
from learner.trainer import Trainer, check_scorable, scoring_forward
from samples import train_samples

torch.set_num_threads(1)
TEMPERATURE = 0.8


def samples(seed: int, n: int) -> list[TrainSample]:
    return train_samples(seed, n)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from common.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=2)


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


class ShapeProbe(TorchDispatchMode):
    """Every aten op's output shapes, forward and backward (the mode is thread-local state that the
    autograd engine carries into backward)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out

    def vocab_rows(self, vocab: int, hidden: int) -> int:
        """The most positions any [..., V] tensor held (the head weight's transpose [H, V] aside)."""
        sizes = [int(np.prod(s[:-1])) for _, s in self.shapes
                 if s and s[-1] == vocab and s != (hidden, vocab)]
        return max(sizes, default=0)


# ---- the pure function --------------------------------------------------------------------


@pytest.mark.parametrize("chunk_bytes", [4 * 50 * 3, 4 * 50 * 13 * 3])
def test_head_logprobs_equal_full_logits_float64(monkeypatch, chunk_bytes):
    """3 rows per chunk: 13 rows -> 5 checkpointed chunks; then a budget that holds all 13 rows'
    kept tensors: one plain pass."""
    monkeypatch.setattr(L, "CHUNK_BYTES", chunk_bytes)
    chunked = []
    real = L._over_chunks
    monkeypatch.setattr(L, "_over_chunks", lambda *a, **k: chunked.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(13, 8, generator=g, requires_grad=True)
    weight = torch.randn(50, 8, generator=g, requires_grad=True)
    bias = torch.randn(50, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (13,), generator=g)
    lp, H = head_logprobs_and_entropy(hidden, targets, weight, bias, TEMPERATURE)
    refs = [t.detach().double().requires_grad_(True) for t in (hidden, weight, bias)]
    logits = torch.nn.functional.linear(refs[0], refs[1], refs[2])
    ref_logp = torch.log_softmax(logits / TEMPERATURE, -1)
    ref_lp = ref_logp.gather(-1, targets[:, None])[:, 0]
    ref_H = -(ref_logp.exp() * ref_logp).sum(-1)
    assert lp.dtype == torch.float32 and lp.shape == H.shape == (13,)
    assert torch.allclose(lp.double(), ref_lp, atol=1e-5) and torch.allclose(H.double(), ref_H, atol=1e-5)
    (lp.sum() + 0.3 * H.sum()).backward()
    (ref_lp.sum() + 0.3 * ref_H.sum()).backward()
    for got, ref in zip((hidden, weight, bias), refs):
        assert torch.allclose(got.grad.double(), ref.grad, atol=1e-5)
    assert len(chunked) == (1 if chunk_bytes < 4 * 50 * 13 * L.KEPT_SLABS else 0)
    empty = head_logprobs_and_entropy(hidden[:0], targets[:0], weight, None, 1.0)
    assert [t.shape for t in empty] == [(0,), (0,)]
    with pytest.raises(ValueError):
        head_logprobs_and_entropy(hidden, targets[:3], weight, bias, 1.0)
    with pytest.raises(ValueError):
        head_logprobs_and_entropy(hidden, targets, weight, bias, 0.0)


# ---- the model path -----------------------------------------------------------------------


def test_scoring_forward_equals_full_logits_with_gradients(tiny_model, monkeypatch):
    """Log-probs, entropy and every parameter's gradient of the chunked path equal those of the
    full-logits path (HF forward -> logits[:, :-1] -> token_logprobs_and_entropy) to 1e-5."""
    monkeypatch.setattr(L, "CHUNK_BYTES", 4 * 2048 * 5)  # 5 rows per chunk
    mb = build_micro_batch(samples(0, 5))
    ids, attn = torch.from_numpy(mb.input_ids), torch.from_numpy(mb.attention_mask)
    live = torch.from_numpy(mb.loss_mask[:, 1:]) > 0
    weights = torch.linspace(-1.0, 1.0, int(live.sum()))  # a loss that weighs each token differently

    full = hf_model(tiny_model)
    logits = full(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1]
    ref_lp, ref_H = token_logprobs_and_entropy(logits, ids[:, 1:], TEMPERATURE)
    ((ref_lp[live] * weights).sum() + 0.5 * ref_H[live].sum()).backward()

    chunked = hf_model(tiny_model)
    check_scorable(chunked)
    with scoring_forward(chunked, TEMPERATURE):
        lp, H = chunked(ids, attn, live)
    assert "forward" not in chunked.__dict__ and "forward" not in chunked.lm_head.__dict__  # restored
    assert lp.shape == H.shape == live.shape and torch.all(lp[~live] == 0) and torch.all(H[~live] == 0)
    assert torch.allclose(lp[live], ref_lp[live], atol=1e-5)
    assert torch.allclose(H[live], ref_H[live], atol=1e-5)
    ((lp[live] * weights).sum() + 0.5 * H[live].sum()).backward()
    want = dict(full.named_parameters())
    scale = max(p.grad.abs().max().item() for p in want.values())
    assert scale > 1e-3
    for name, p in chunked.named_parameters():
        assert (p.grad - want[name].grad).abs().max().item() <= 1e-5 * scale, name


class GradProbe(Trainer):
    """Records the accumulated gradient instead of stepping."""

    def _optimizer_step(self) -> float:
        self.grads = {n: p.grad.detach().clone() for n, p in self.engine.module.named_parameters()}
        self.engine.optimizer.zero_grad()
        return 0.0


def test_train_step_gradients_equal_full_logits_reference(tiny_model, monkeypatch):
    """Trainer.train_step (DeepSpeed, ZeRO 0, three micro-batches one a filler, 4-row chunks) against
    the whole batch through the full logits in plain torch: same loss, same gradients."""
    monkeypatch.setattr(L, "CHUNK_BYTES", 4 * 2048 * 4)
    batch = samples(1, 6)
    mbs = [build_micro_batch(batch[:2]), build_micro_batch([]), build_micro_batch(batch[2:])]
    total = sum(mb.n_tokens for mb in mbs)
    probe = GradProbe(tiny_model, LearnerConfig(), temperature=TEMPERATURE)
    metrics = probe.train_step(mbs, total, entropy_coef=0.003)

    model = hf_model(tiny_model)
    mb = build_micro_batch(batch)
    ids = torch.from_numpy(mb.input_ids)
    logits = model(input_ids=ids, attention_mask=torch.from_numpy(mb.attention_mask), use_cache=False).logits
    logp, ent = token_logprobs_and_entropy(logits[:, :-1], ids[:, 1:], TEMPERATURE)
    cut = lambda a: torch.from_numpy(a[:, 1:])  # noqa: E731
    inputs = LossInputs(logp, ent, cut(mb.behaviour_logprobs), cut(mb.advantages), cut(mb.loss_mask))
    out = policy_loss(inputs, LossConfig(), 0.003, float(total))
    out.loss.backward()
    assert metrics["loss/total"] == pytest.approx(out.loss.item(), rel=1e-5, abs=1e-7)
    scale = max(p.grad.abs().max().item() for p in model.parameters())
    assert scale > 1e-3
    for name, p in model.named_parameters():
        assert (probe.grads[name] - p.grad).abs().max().item() <= 1e-5 * scale, name


def test_full_logits_are_never_built(tiny_model, monkeypatch):
    """A train step with pi_prox recomputed (sgd_steps=2: no-grad and grad forwards, backward): no
    tensor of the step ever holds more than one chunk (4 rows) of vocabulary-sized values, and the
    head sees exactly the loss positions, with their next tokens as targets. The same probe on the
    full-logits forward sees [b, L, V], so this test fails if the trainer builds full logits."""
    rows = 4
    monkeypatch.setattr(L, "CHUNK_BYTES", 4 * 2048 * rows)
    trainer = Trainer(tiny_model, LearnerConfig(), temperature=TEMPERATURE)
    monkeypatch.setattr(trainer.cfg.loss, "sgd_steps", 2)
    vocab, hidden = trainer.vocab_size, trainer.engine.module.config.hidden_size
    mbs = [build_micro_batch(samples(2, 3)), build_micro_batch(samples(3, 2))]
    seen = []
    real = L.head_logprobs_and_entropy
    monkeypatch.setattr(L, "head_logprobs_and_entropy",
                        lambda h, y, *a: seen.append((h.shape, y.clone())) or real(h, y, *a))
    probe = ShapeProbe()
    with probe:
        trainer.train_step(mbs, sum(mb.n_tokens for mb in mbs), entropy_coef=0.003)
    assert any("_log_softmax_backward_data" in op for op, _ in probe.shapes)  # backward was probed too
    assert probe.vocab_rows(vocab, hidden) == rows
    assert len(seen) == 2 * len(mbs)  # one head call per forward: pi_prox, then the training pass
    for (shape, targets), mb in zip(seen, mbs + mbs):
        want = mb.input_ids[:, 1:][mb.loss_mask[:, 1:] > 0]
        assert shape == (mb.n_tokens, hidden) and np.array_equal(targets.numpy(), want)
    assert max(mb.n_tokens for mb in mbs) > rows  # several chunks per call

    old = ShapeProbe()  # the probe catches full logits: the plain forward builds [b, L, V]
    with old, torch.no_grad():
        trainer.engine.module(input_ids=torch.from_numpy(mbs[0].input_ids), use_cache=False)
    assert old.vocab_rows(vocab, hidden) == mbs[0].input_ids.size


def test_models_whose_logits_are_not_the_head_are_refused(tiny_model):
    model = hf_model(tiny_model)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        check_scorable(model)
    model.config.final_logit_softcapping = None
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(ValueError, match="not a Linear"):
        check_scorable(model)
