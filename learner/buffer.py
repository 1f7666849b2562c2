"""Scored groups -> batches -> token-budget micro-batches. Pure Python/numpy (no torch).

Group path (driven by `learner/scheduler.py`, which owns the admission accounting):

1. A scored group is classified by its rewards (`learner/advantage.py` `classify`): all equal ->
   zero advantage, dropped before batching (`filter/zero_adv_all_correct` when every sample has
   reward >= SOLVED_REWARD, else `filter/zero_adv_all_wrong`); otherwise it is buffered. With
   `loss.keep_zero_advantage` (systems benchmarks of untrained models only) a zero-advantage group
   is counted the same way, plus `filter/zero_adv_kept`, and buffered too: it trains with
   advantage 0 (only the entropy term acts).
2. `GroupBuffer.purge_stale(v, eta)` removes every buffered group no longer admissible at v
   (`learner/staleness.py`: staleness v - w > eta; never trained, the scheduler requeues the
   prompt), then `take(B)` hands out B groups, the oldest weights first, so the groups closest to
   the staleness bound are trained before they cross it.

   That is Skywork-OR1's rejection sampling (`learner.fill_batch`, the default): a step waits for B
   useful groups, so late in training, when most groups are solved by every sample, the actors
   generate several groups per useful one. With `fill_batch = false` a step comes every B *scored*
   groups instead (as TRL's GRPOTrainer steps on every generation batch): `take(B)` consumes the
   next B groups in scoring order (the buffer keeps that order as slots: a useful group, or None
   for one dropped at scoring) and trains the useful ones among them, fewer than B when some were
   dropped; B slots with no useful group give no step and are discarded. The scheduler's
   admission counts slots (`pending`), so each step still consumes exactly B of what it admitted.
3. `to_train_samples` turns groups into per-sample records with group-normalised advantages
   (`learner/advantage.py` `group_advantages`), and `make_micro_batches` packs them for the ranks.

Micro-batch packing: samples (prompt + response tokens) are sorted by length, longest first, and
dealt to ranks longest-processing-time first (each goes to the rank with the fewest tokens so far),
which balances tokens and gives each rank a similar length profile. Each rank's list, still sorted,
is packed greedily: a micro-batch is padded to its first (longest) sample's length L and takes
samples while b * L <= token_budget; a sample longer than the budget gets a micro-batch of its own.
Ranks with fewer micro-batches get empty ones (b = 0) so every rank runs the same number of
forward/backward passes: DeepSpeed's collectives hang otherwise.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from bus.messages import FINISH_LENGTH, Sample
from learner.advantage import USEFUL, classify, group_advantages
from learner.staleness import admissible, staleness

KEPT_ZERO_ADV = "zero_adv_kept"  # GroupBuffer.add: a zero-advantage group buffered (keep_zero_advantage)


@dataclass
class ScoredGroup:
    """One prompt's group with its rewards, from acceptance to training."""

    group_id: int
    lease_id: int
    prompt_id: str
    prompt_ids: np.ndarray  # int32 prompt token ids
    weight_version: int
    samples: list[Sample]
    rewards: np.ndarray  # float32 [n]


def staleness_metrics(groups: list[ScoredGroup], version: int, eta: int) -> dict[str, float | list[int]]:
    """staleness/mean, /max and /hist (counts for staleness 0..eta) of a batch trained at `version`,
    each group counted from its oldest weights; staleness/mixed_frac: the share of its samples whose
    tokens came from more than one version (in-flight updates), and staleness/token_mean: the mean
    staleness of the tokens themselves (below staleness/mean when newer weights took over mid-sample)."""
    s = np.array([staleness(version, g.weight_version) for g in groups], dtype=np.int64)
    hist = np.bincount(s, minlength=eta + 1) if s.size else np.zeros(eta + 1, dtype=np.int64)
    samples = [(g.weight_version, x) for g in groups for x in g.samples]
    mixed = sum(len(x.versions) > 1 for _, x in samples)
    tokens = sum(len(x.token_ids) for _, x in samples)
    return {
        "staleness/mean": float(s.mean()) if s.size else 0.0,
        "staleness/max": float(s.max()) if s.size else 0.0,
        "staleness/hist": [int(c) for c in hist],
        "staleness/mixed_frac": mixed / len(samples) if samples else 0.0,
        "staleness/token_mean": (sum(token_staleness(version, w, x) for w, x in samples) / tokens) if tokens else 0.0,
    }


def token_staleness(version: int, weight_version: int, sample: Sample) -> int:
    """The summed staleness of a sample's tokens trained at `version` (its spans, else all from
    `weight_version`)."""
    n = len(sample.token_ids)
    if not sample.versions:
        return n * staleness(version, weight_version)
    ends = [v.start for v in sample.versions[1:]] + [n]
    return sum((e - v.start) * staleness(version, v.version) for v, e in zip(sample.versions, ends))


class GroupBuffer:
    """Scored groups: zero-advantage ones counted and dropped (kept when `keep_zero_advantage`),
    useful ones held in arrival order until a batch takes them. Counters and rewards accumulate
    between batches and are reported (then reset) with the next batch's metrics."""

    def __init__(self, keep_zero_advantage: bool = False, fill: bool = True) -> None:
        self.keep_zero_advantage = keep_zero_advantage
        self.fill = fill  # False: a batch is the next B scored groups' useful ones (module doc, 2.)
        self._groups: list[ScoredGroup] = []
        self._slots: deque[ScoredGroup | None] = deque()  # scoring order, when not `fill`
        self._counts: Counter[str] = Counter()
        self._rewards: list[float] = []

    def __len__(self) -> int:
        return len(self._groups)

    @property
    def pending(self) -> int:
        """Scored groups the coming batches will consume: the useful ones held (fill), or every
        scored one not consumed yet, useful or dropped (not fill)."""
        return len(self._groups) if self.fill else len(self._slots)

    def add(self, group: ScoredGroup) -> str:
        """Classify and keep if useful; returns "useful", "all_correct" or "all_wrong" (dropped), or
        KEPT_ZERO_ADV (a zero-advantage group held because of keep_zero_advantage)."""
        kind = classify(group.rewards)
        self._rewards.extend(float(r) for r in group.rewards)
        if kind == USEFUL:
            self._counts["filter/useful_groups"] += 1
            self._hold(group)
            return kind
        self._counts["filter/zero_adv_groups"] += 1
        self._counts[f"filter/zero_adv_{kind}"] += 1
        if self.keep_zero_advantage:
            self._counts["filter/zero_adv_kept"] += 1
            self._hold(group)
            return KEPT_ZERO_ADV
        if not self.fill:
            self._slots.append(None)
        return kind

    def _hold(self, group: ScoredGroup) -> None:
        self._groups.append(group)
        if not self.fill:
            self._slots.append(group)

    def drain(self) -> list[ScoredGroup]:
        """Remove and return every held group (the run ended)."""
        out, self._groups = self._groups, []
        self._slots.clear()
        return out

    def purge_stale(self, version: int, eta: int) -> list[ScoredGroup]:
        """Remove and return the groups with staleness version - weight_version > eta."""
        stale = [g for g in self._groups if not admissible(version, g.weight_version, eta)]
        if stale:
            self._groups = [g for g in self._groups if admissible(version, g.weight_version, eta)]
            gone = {id(g) for g in stale}  # their slots go too: requeued, they leave the admission load
            self._slots = deque(x for x in self._slots if x is None or id(x) not in gone)
            self._counts["staleness/dropped"] += len(stale)
        return stale

    def take(self, k: int, version: int, eta: int) -> tuple[list[ScoredGroup], dict[str, Any]]:
        """The next batch and its metrics, or ([], {}) if there is none yet. Call purge_stale first.
        fill: k groups, oldest weights first (ties: arrival order), once k are held. Not fill: the
        useful ones among the next k scored groups (1 to k of them), once k were scored."""
        if k <= 0:
            return [], {}
        batch = self._take_filled(k) if self.fill else self._take_scored(k)
        return (batch, self._metrics(batch, version, eta)) if batch else ([], {})

    def _take_filled(self, k: int) -> list[ScoredGroup]:
        if len(self._groups) < k:
            return []
        order = sorted(range(len(self._groups)), key=lambda i: (self._groups[i].weight_version, i))
        chosen = set(order[:k])
        batch = [self._groups[i] for i in order[:k]]
        self._groups = [g for i, g in enumerate(self._groups) if i not in chosen]
        return batch

    def _take_scored(self, k: int) -> list[ScoredGroup]:
        while len(self._slots) >= k:
            batch = [g for g in (self._slots.popleft() for _ in range(k)) if g is not None]
            if batch:  # else k slots with nothing to learn from: discarded, no step
                taken = {id(g) for g in batch}
                self._groups = [g for g in self._groups if id(g) not in taken]
                return batch
            self._counts["filter/empty_batches"] += 1
        return []

    def _metrics(self, batch: list[ScoredGroup], version: int, eta: int) -> dict[str, Any]:
        keys = ("filter/useful_groups", "filter/zero_adv_groups", "filter/zero_adv_all_correct",
                "filter/zero_adv_all_wrong", "staleness/dropped", "filter/empty_batches")
        m: dict[str, Any] = {k: float(self._counts[k]) for k in keys}
        if self.keep_zero_advantage:
            m["filter/zero_adv_kept"] = float(self._counts["filter/zero_adv_kept"])
        scored = m["filter/useful_groups"] + m["filter/zero_adv_groups"]
        kept = m["filter/useful_groups"] + m.get("filter/zero_adv_kept", 0.0)
        m["filter/kept_frac"] = kept / scored if scored else 0.0
        m["reward/mean"] = float(np.mean(self._rewards)) if self._rewards else 0.0
        m.update(staleness_metrics(batch, version, eta))
        self._counts.clear()
        self._rewards = []
        return m


# --- samples and micro-batches --------------------------------------------------------------


@dataclass
class TrainSample:
    prompt_ids: np.ndarray  # int32 [P]
    response_ids: np.ndarray  # int32 [R]
    behaviour_logprobs: np.ndarray  # float32 [R], mu of each response token
    advantage: float
    reward: float
    truncated: bool
    weight_version: int
    prompt_id: str

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def to_train_samples(groups: list[ScoredGroup]) -> list[TrainSample]:
    """One TrainSample per response, with its group's normalised advantage."""
    out = []
    for g in groups:
        adv = group_advantages(g.rewards)
        for s, a, r in zip(g.samples, adv, g.rewards):
            out.append(
                TrainSample(
                    prompt_ids=np.asarray(g.prompt_ids, dtype=np.int32),
                    response_ids=np.asarray(s.token_ids, dtype=np.int32),
                    behaviour_logprobs=np.asarray(s.logprobs, dtype=np.float32),
                    advantage=float(a),
                    reward=float(r),
                    truncated=s.finish_reason == FINISH_LENGTH,
                    weight_version=g.weight_version,
                    prompt_id=g.prompt_id,
                )
            )
    return out


@dataclass
class MicroBatch:
    """Right-padded [b, L] arrays aligned with token positions. The trainer scores
    logits[:, :-1] against input_ids[:, 1:] and uses the [:, 1:] slices of the per-token arrays:
    loss_mask[i, t] = 1 means "token t of row i is a response token that counts", and
    behaviour_logprobs[i, t] is mu of that token. Position 0 is never in the loss (nothing predicts it)."""

    input_ids: np.ndarray  # int64 [b, L] prompt + response
    attention_mask: np.ndarray  # int64 [b, L]
    loss_mask: np.ndarray  # float32 [b, L]
    behaviour_logprobs: np.ndarray  # float32 [b, L]
    advantages: np.ndarray  # float32 [b, L]
    n_tokens: int  # loss_mask.sum()

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])


def build_micro_batch(samples: list[TrainSample], pad_id: int = 0, mask_truncated: bool = False
                      ) -> MicroBatch:
    """Right-pad `samples` to their longest length (an empty list gives b = 0, L = 0)."""
    width = max((s.length for s in samples), default=0)
    shape = (len(samples), width)
    ids = np.full(shape, pad_id, dtype=np.int64)
    attn = np.zeros(shape, dtype=np.int64)
    mask = np.zeros(shape, dtype=np.float32)
    mu = np.zeros(shape, dtype=np.float32)
    adv = np.zeros(shape, dtype=np.float32)
    for i, s in enumerate(samples):
        p, n = len(s.prompt_ids), s.length
        ids[i, :p] = s.prompt_ids
        ids[i, p:n] = s.response_ids
        attn[i, :n] = 1
        mu[i, p:n] = s.behaviour_logprobs
        adv[i, p:n] = s.advantage
        if not (mask_truncated and s.truncated):
            mask[i, p:n] = 1.0
    mask[:, :1] = 0.0  # an empty prompt would put a response token at 0, which nothing predicts
    return MicroBatch(ids, attn, mask, mu, adv, int(mask.sum()))


def make_micro_batches(
    samples: list[TrainSample], token_budget: int, n_ranks: int, pad_id: int = 0, mask_truncated: bool = False
) -> tuple[list[list[MicroBatch]], dict[str, float]]:
    """Per rank, the same number of micro-batches of at most `token_budget` padded tokens (see the
    module docstring). Metrics: learner/padding_frac (padded positions / all positions),
    learner/micro_batches (per rank), learner/rank_token_imbalance (max rank tokens / mean),
    learner/loss_tokens (the batch's total_tokens for the loss)."""
    if token_budget < 1 or n_ranks < 1:
        raise ValueError(f"token_budget and n_ranks must be >= 1, got {token_budget}, {n_ranks}")
    ordered = sorted(samples, key=lambda s: s.length, reverse=True)
    per_rank: list[list[TrainSample]] = [[] for _ in range(n_ranks)]
    load = [0] * n_ranks
    for s in ordered:
        r = min(range(n_ranks), key=lambda i: (load[i], i))
        per_rank[r].append(s)
        load[r] += s.length
    packed = [[build_micro_batch(mb, pad_id, mask_truncated) for mb in _pack(lst, token_budget)]
              for lst in per_rank]
    count = max(len(p) for p in packed)
    for p in packed:
        p.extend(build_micro_batch([], pad_id) for _ in range(count - len(p)))
    real = sum(load)
    padded = sum(mb.input_ids.size for p in packed for mb in p)
    metrics = {
        "learner/padding_frac": 1.0 - real / padded if padded else 0.0,
        "learner/micro_batches": float(count),
        "learner/rank_token_imbalance": max(load) / (real / n_ranks) if real else 1.0,
        "learner/loss_tokens": float(sum(mb.n_tokens for p in packed for mb in p)),
    }
    return packed, metrics


def _pack(ordered: list[TrainSample], token_budget: int) -> list[list[TrainSample]]:
    """Greedy packing of length-descending samples: b * L_first <= budget, oversize alone."""
    groups: list[list[TrainSample]] = []
    for s in ordered:
        if groups and (len(groups[-1]) + 1) * groups[-1][0].length <= token_budget:
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups
