"""learner/loss.py against hand-worked numbers (the arithmetic is in the comments)."""

import math

import pytest
import torch

from common.config import LossConfig
from learner import loss as L
from learner.loss import LossInputs, policy_loss, token_logprobs_and_entropy

torch.set_num_threads(1)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


def one_token(logp, A, *, prox=None, mu=None, H=0.0):
    """A single live token; `logp` becomes a leaf that requires grad."""
    lp = torch.tensor([logp], dtype=torch.float32, requires_grad=True)
    mu_t = t(mu if mu is not None else (prox if prox is not None else logp))
    return lp, LossInputs(
        logprobs=lp, entropy=t(H), behaviour_logprobs=mu_t, advantages=t(A), mask=t(1.0),
        prox_logprobs=None if prox is None else t(prox),
    )


# --- clipping -----------------------------------------------------------------------------

# prox = log 0.4, current = log 0.6 -> rho = 1.5; prox = log 0.4, current = log 0.2 -> rho = 0.5.
# behaviour = prox, so u = 1 and w = 1 in every mode. total_tokens = 1.
CASES = [
    # (current p, A, loss, d loss / d logp, clipped branch, low, high)
    # rho 1.5, A +1: min(1.5, clip(1.5)=1.2) = 1.2 -> clipped, loss -1.2, no gradient
    (0.6, +1.0, -1.2, 0.0, 1.0, 0.0, 1.0),
    # rho 1.5, A -1: min(-1.5, -1.2) = -1.5 -> unclipped, loss 1.5, grad -A·rho = 1.5
    (0.6, -1.0, 1.5, 1.5, 0.0, 0.0, 0.0),
    # rho 0.5, A +1: min(0.5, clip(0.5)=0.8) = 0.5 -> unclipped, loss -0.5, grad -A·rho = -0.5
    (0.2, +1.0, -0.5, -0.5, 0.0, 0.0, 0.0),
    # rho 0.5, A -1: min(-0.5, -0.8) = -0.8 -> clipped, loss 0.8, no gradient
    (0.2, -1.0, 0.8, 0.0, 1.0, 1.0, 0.0),
]


@pytest.mark.parametrize("p, A, want, grad, clip, low, high", CASES)
def test_clipping_both_sides(p, A, want, grad, clip, low, high):
    lp, inp = one_token(math.log(p), A, prox=math.log(0.4))
    out = policy_loss(inp, LossConfig(), entropy_coef=0.0, total_tokens=1)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(want, abs=1e-6)
    assert lp.grad.item() == pytest.approx(grad, abs=1e-6)
    m = out.metrics
    fracs = [m[k].item() for k in ("loss/clip_frac", "loss/clip_frac_low", "loss/clip_frac_high")]
    assert fracs == [clip, low, high]
    assert m["loss/policy"].item() == pytest.approx(want, abs=1e-6)


def test_clip_higher_uses_eps_high():
    # rho 1.25, A +1: eps_high 0.28 -> 1.25 < 1.28, unclipped: loss -1.25, grad -1.25.
    # With eps_high 0.2 the same token is clipped at 1.2: loss -1.2, grad 0.
    for eps_high, want, grad in ((0.28, -1.25, -1.25), (0.2, -1.2, 0.0)):
        lp, inp = one_token(math.log(0.5), 1.0, prox=math.log(0.4))
        out = policy_loss(inp, LossConfig(eps_high=eps_high), 0.0, 1)
        out.loss.backward()
        assert out.loss.item() == pytest.approx(want, abs=1e-6)
        assert lp.grad.item() == pytest.approx(grad, abs=1e-6)


# --- behaviour correction -----------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, u, w, cut",
    [
        ("tis", 3.0, 2.0, 1.0),  # truncated at C = 2
        ("tis", 1.5, 1.5, 0.0),  # below C: the plain ratio
        ("tis", 0.3, 0.3, 0.0),  # tis never raises small weights
        ("mask", 3.0, 0.0, 1.0),  # above C: masked
        ("mask", 0.4, 0.0, 1.0),  # below 1/C = 0.5: masked
        ("mask", 0.6, 1.0, 0.0),  # inside [0.5, 2]: kept with weight 1
        ("none", 3.0, 1.0, 0.0),
    ],
)
def test_behaviour_weight_modes(mode, u, w, cut):
    # one-step shortcut: rho = 1, so PPO = -A; A = 2 -> loss = -2·w; grad = -A·w = -2w
    logp = math.log(0.3)
    lp, inp = one_token(logp, 2.0, mu=logp - math.log(u))
    out = policy_loss(inp, LossConfig(tis_mode=mode, tis_cap=2.0), 0.0, 1)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(-2.0 * w, abs=1e-5)
    assert lp.grad.item() == pytest.approx(-2.0 * w, abs=1e-5)
    assert out.metrics["loss/is_weight_mean"].item() == pytest.approx(w, abs=1e-5)
    assert out.metrics["loss/is_clip_frac"].item() == cut
    # mismatch/kl = k3 of KL(mu || pi_prox) = u - 1 - log u, e.g. u = 3: 2 - 1.0986 = 0.9014
    assert out.metrics["mismatch/kl"].item() == pytest.approx(u - 1 - math.log(u), abs=1e-5)


# --- entropy bonus, KL --------------------------------------------------------------------


def test_entropy_bonus_sign_and_scale():
    H = torch.tensor([0.7, 1.3, 9.0], requires_grad=True)
    lp = torch.zeros(3, requires_grad=True)
    inp = LossInputs(lp, H, torch.zeros(3), t(0.0, 0.0, 0.0), t(1.0, 1.0, 0.0))
    out = policy_loss(inp, LossConfig(), entropy_coef=0.01, total_tokens=4)
    out.loss.backward()
    # A = 0 -> PPO 0; loss = -0.01·(0.7 + 1.3)/4 = -0.005 (the masked 9.0 is ignored)
    assert out.loss.item() == pytest.approx(-0.005, abs=1e-7)
    # more entropy lowers the loss: dL/dH = -alpha/total = -0.0025 on live tokens, 0 on the masked one
    assert torch.allclose(H.grad, t(-0.0025, -0.0025, 0.0))
    assert out.metrics["entropy/mean"].item() == pytest.approx(2.0 / 4)


def test_k3_kl_penalty_only_when_beta_positive():
    # logp = log 0.5, mu = log 0.25: d = mu - logp = -log 2; KL = e^d - d - 1 = 0.5 + 0.693147 - 1 = 0.193147
    lp, inp = one_token(math.log(0.5), 0.0, mu=math.log(0.25))
    out = policy_loss(inp, LossConfig(kl_beta=0.1, tis_mode="none"), 0.0, 1)
    out.loss.backward()
    assert out.metrics["loss/kl"].item() == pytest.approx(0.193147, abs=1e-6)
    assert out.loss.item() == pytest.approx(0.1 * 0.193147, abs=1e-6)  # A = 0: only the KL term
    # dKL/dlogp = -e^d + 1 = 0.5 -> beta·0.5 = 0.05
    assert lp.grad.item() == pytest.approx(0.05, abs=1e-6)
    assert "loss/kl" not in policy_loss(one_token(0.0, 0.0)[1], LossConfig(), 0.0, 1).metrics


# --- token-level mean ---------------------------------------------------------------------


def _batch():
    # two sequences: 3 live tokens with A = +1, 1 live token (and 2 padding) with A = -1
    logp = torch.log(torch.tensor([[0.5, 0.4, 0.3], [0.2, 0.9, 0.9]]))
    mask = t(1, 1, 1, 1, 0, 0).reshape(2, 3)
    adv = torch.tensor([[1.0], [-1.0]])
    return logp, mask, adv


def test_token_mean_exact_across_micro_batches_and_not_per_sequence():
    logp, mask, adv = _batch()
    full_lp = logp.clone().requires_grad_(True)
    full = policy_loss(LossInputs(full_lp, torch.zeros(2, 3), logp, adv, mask), LossConfig(), 0.0, 4)
    full.loss.backward()
    # rho = 1, w = 1 (mu = current): per token PPO = -A -> (-1 -1 -1 +1)/4 = -0.5
    assert full.loss.item() == pytest.approx(-0.5)
    # the per-sequence mean would be (mean(-1,-1,-1) + mean(+1))/2 = 0: a different objective
    assert full.loss.item() != pytest.approx(0.0)
    parts, grads, metric_sum = 0.0, [], 0.0
    for i in range(2):
        lp = logp[i : i + 1].clone().requires_grad_(True)
        out = policy_loss(LossInputs(lp, torch.zeros(1, 3), logp[i : i + 1], adv[i : i + 1], mask[i : i + 1]),
                          LossConfig(), 0.0, total_tokens=4)
        out.loss.backward()
        parts += out.loss.item()
        metric_sum += out.metrics["loss/policy"].item()
        grads.append(lp.grad)
    assert parts == pytest.approx(full.loss.item(), abs=1e-7)  # -0.75 + 0.25
    assert metric_sum == pytest.approx(-0.5, abs=1e-7)
    assert torch.allclose(torch.cat(grads), full_lp.grad)
    # d/dlogp = -A·w/4 on live tokens: -0.25 ×3, +0.25, then 0 on padding
    assert torch.allclose(full_lp.grad, t(-0.25, -0.25, -0.25, 0.25, 0.0, 0.0).reshape(2, 3))


def test_one_step_shortcut_gradient_is_advantage_times_weight():
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(4, 7, generator=g), -1).requires_grad_(True)
    mu = logp.detach() + 0.5 * torch.randn(4, 7, generator=g)
    adv = torch.randn(4, 1, generator=g)
    mask = (torch.rand(4, 7, generator=g) > 0.3).float()
    out = policy_loss(LossInputs(logp, torch.zeros(4, 7), mu, adv, mask), LossConfig(tis_cap=2.0), 0.0, 20.0)
    out.loss.backward()
    w = torch.exp(logp.detach() - mu).clamp(max=2.0)
    # rho = 1 inside [0.8, 1.2]: never clipped, d(-rho·A·w)/dlogp = -A·w (rho = 1), times mask / total
    assert torch.allclose(logp.grad, -adv * w * mask / 20.0, atol=1e-7)
    assert out.metrics["loss/clip_frac"].item() == 0.0


def test_recompute_path_uses_given_prox():
    g = torch.Generator().manual_seed(1)
    logp = torch.log_softmax(torch.randn(3, 5, generator=g), -1).requires_grad_(True)
    prox = logp.detach() + 0.3 * torch.randn(3, 5, generator=g)
    mu = prox + 0.2 * torch.randn(3, 5, generator=g)
    adv = torch.randn(3, 1, generator=g).expand(3, 5)
    mask = torch.ones(3, 5)
    inp = LossInputs(logp, torch.zeros(3, 5), mu, adv, mask, prox_logprobs=prox)
    out = policy_loss(inp, LossConfig(), 0.0, 15.0)
    out.loss.backward()
    rho = torch.exp(logp.detach() - prox)
    w = torch.exp(prox - mu).clamp(max=2.0)
    unclipped, clipped = rho * adv, rho.clamp(0.8, 1.2) * adv
    want = (-torch.minimum(unclipped, clipped) * w).sum() / 15.0
    assert out.loss.item() == pytest.approx(want.item(), abs=1e-6)
    active = unclipped <= clipped  # gradient flows only where the unclipped branch is the min
    assert torch.allclose(logp.grad, torch.where(active, -adv * rho * w / 15.0, 0.0), atol=1e-7)
    assert 0 < out.metrics["loss/clip_frac"].item() < 1  # this draw has both kinds of token


def test_non_finite_inputs_stay_finite():
    # padding with -inf log-probs and NaN entropy, and a live token whose behaviour log-prob is
    # absurd (u = e^1000): the clamp keeps w = C, masked positions contribute exactly 0
    logp = torch.tensor([[math.log(0.5), -math.inf]], requires_grad=True)
    H = torch.tensor([[0.3, math.nan]], requires_grad=True)
    mu = torch.tensor([[-1000.0, -math.inf]])
    inp = LossInputs(logp, H, mu, t(1.0).reshape(1, 1), t(1.0, 0.0).reshape(1, 2))
    out = policy_loss(inp, LossConfig(), 0.01, 1)
    out.loss.backward()
    assert math.isfinite(out.loss.item()) and out.loss.item() == pytest.approx(-2.0 - 0.01 * 0.3, abs=1e-6)
    assert torch.isfinite(logp.grad).all() and torch.isfinite(H.grad).all()
    assert all(math.isfinite(v.item()) for v in out.metrics.values())


def test_bad_inputs_raise():
    lp, inp = one_token(0.0, 1.0)
    with pytest.raises(ValueError, match="total_tokens"):
        policy_loss(inp, LossConfig(), 0.0, 0)
    inp.mask = torch.ones(2)
    with pytest.raises(ValueError, match="mask"):
        policy_loss(inp, LossConfig(), 0.0, 1)
    z = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="same rank"):  # [b] would broadcast along L here
        policy_loss(LossInputs(z.requires_grad_(), z, z, torch.ones(4), z), LossConfig(), 0.0, 1)


def test_empty_micro_batch_gives_zero_loss_with_grad():
    lp = torch.zeros(0, 5, requires_grad=True)
    z = torch.zeros(0, 5)
    out = policy_loss(LossInputs(lp, z, z, torch.zeros(0, 1), z), LossConfig(), 0.01, 10)
    out.loss.backward()
    assert out.loss.item() == 0.0 and lp.grad.shape == (0, 5)


# --- log-probs and entropy from logits ----------------------------------------------------


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_token_logprobs_and_entropy_match_float64(temperature, monkeypatch):
    monkeypatch.setattr(L, "CHUNK_BYTES", 2 * 4 * 50 * 3)  # 3 positions per chunk: exercises chunking
    g = torch.Generator().manual_seed(2)
    logits = (3 * torch.randn(2, 11, 50, generator=g)).requires_grad_(True)
    targets = torch.randint(0, 50, (2, 11), generator=g)
    lp, H = token_logprobs_and_entropy(logits, targets, temperature)
    ref_logits = logits.detach().double().requires_grad_(True)
    ref_logp = torch.log_softmax(ref_logits / temperature, -1)
    ref_lp = ref_logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ref_H = -(ref_logp.exp() * ref_logp).sum(-1)
    assert lp.dtype == torch.float32 and lp.shape == (2, 11)
    assert torch.allclose(lp.double(), ref_lp, atol=1e-5) and torch.allclose(H.double(), ref_H, atol=1e-5)
    # gradients through the checkpointed chunks match too
    (lp.sum() + 0.5 * H.sum()).backward()
    (ref_lp.sum() + 0.5 * ref_H.sum()).backward()
    assert torch.allclose(logits.grad.double(), ref_logits.grad, atol=1e-5)
    with torch.no_grad():
        lp2, H2 = token_logprobs_and_entropy(logits, targets, temperature)
    assert torch.equal(lp2, lp.detach()) and torch.equal(H2, H.detach())


def test_token_logprobs_bf16_and_bad_shapes():
    logits = torch.randn(1, 4, 16).bfloat16()
    lp, H = token_logprobs_and_entropy(logits, torch.zeros(1, 4, dtype=torch.long), 1.0)
    assert lp.dtype == torch.float32 and torch.all(H <= math.log(16) + 1e-4)
    with pytest.raises(ValueError):
        token_logprobs_and_entropy(logits, torch.zeros(1, 3, dtype=torch.long), 1.0)
    with pytest.raises(ValueError):
        token_logprobs_and_entropy(logits, torch.zeros(1, 4, dtype=torch.long), 0.0)
