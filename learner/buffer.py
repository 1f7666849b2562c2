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

Micro-batch packing works on units: with `share_prompts` (the trainer's default,
`trainer.share_prompts`) a unit is one group's samples, which share their prompt, so the prompt's
positions are computed once for the group (the trainer's forward runs the prompts, then every
response on top of its prompt's keys and values: `learner/trainer.py`); without it, or when a
group's responses do not fit one micro-batch with their prompt (then the group is cut into pieces
that do, each with its prompt), a unit is one sample (prompt + response). A unit costs the
positions it puts through the model: P + sum of its response lengths shared, P + R alone. Units
are sorted by cost, largest first, and dealt to ranks longest-processing-time first (each goes to
the rank with the fewest positions so far), which balances the work and gives each rank a similar
length profile. Each rank's list, still sorted, is packed greedily: a unit joins the open
micro-batch while its padded size stays within the token budget (b * L flat; g * P + b * R shared,
P and R the longest prompt and response in it); a unit over the budget gets a micro-batch of its
own. Ranks with fewer micro-batches get empty ones (b = 0) so every rank runs the same number of
forward/backward passes: DeepSpeed's collectives hang otherwise. With `share_prompts` both forms
are planned and the one that computes fewer positions is built: sharing drops the repeated
prompts but pads each response to the longest in its micro-batch, so short answers to long
prompts (the embedded tasks: 8 x 11 prompt positions saved per group of 7-token answers) share,
and long responses of spread lengths stay flat, where sorting by length packs them tighter.
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
        # when not `fill`: (weights, group or None for a dropped one), oldest weights first, then scoring order
        self._slots: deque[tuple[int, ScoredGroup | None]] = deque()
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
            self._slot(group.weight_version, None)
        return kind

    def _hold(self, group: ScoredGroup) -> None:
        self._groups.append(group)
        if not self.fill:
            self._slot(group.weight_version, group)

    def _slot(self, weights: int, group: ScoredGroup | None) -> None:
        """A scored group's slot, after every slot of weights <= its own: a group generated earlier
        but scored later (scoring can finish out of order) is consumed before newer ones."""
        at = len(self._slots)
        while at and self._slots[at - 1][0] > weights:
            at -= 1
        self._slots.insert(at, (weights, group))

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
            self._slots = deque(x for x in self._slots if x[1] is None or id(x[1]) not in gone)
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

    def newest_in_next(self, k: int) -> int | None:
        """The newest weights among the groups `take(k)` would hand out now (None: no batch yet)."""
        if k <= 0:
            return None
        if self.fill:
            if len(self._groups) < k:
                return None
            return sorted(g.weight_version for g in self._groups)[k - 1]
        useful = [g.weight_version for _, g in list(self._slots)[:k] if g is not None]
        return max(useful) if len(self._slots) >= k and useful else None

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
            batch = [g for _, g in (self._slots.popleft() for _ in range(k)) if g is not None]
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
    """Padded arrays in one of two forms, told apart by `prompt_ids`.

    Flat (`prompt_ids` None): right-padded [b, L] rows of prompt + response. The trainer scores
    logits[:, :-1] against input_ids[:, 1:] and uses the [:, 1:] slices of the per-token arrays:
    loss_mask[i, t] = 1 means "token t of row i is a response token that counts", and
    behaviour_logprobs[i, t] is mu of that token. Position 0 is never in the loss (nothing predicts it).

    Shared prompts: `prompt_ids` [g, P] holds each group's prompt once, left-padded (so every
    prompt's last token sits in column P - 1), and row i of the [b, L] arrays is one response,
    right-padded, continuing prompt `row_prompt[i]`. The per-token arrays are aligned with the
    response tokens themselves, unshifted: token 0 is predicted by the prompt's last position,
    token t > 0 by response position t - 1."""

    input_ids: np.ndarray  # int64 [b, L] prompt + response (flat) | response (shared)
    attention_mask: np.ndarray  # int64 [b, L]
    loss_mask: np.ndarray  # float32 [b, L]
    behaviour_logprobs: np.ndarray  # float32 [b, L]
    advantages: np.ndarray  # float32 [b, L]
    n_tokens: int  # loss tokens: loss_mask[:, 1:].sum() flat, loss_mask.sum() shared
    prompt_ids: np.ndarray | None = None  # int64 [g, P], left-padded (shared form)
    prompt_mask: np.ndarray | None = None  # int64 [g, P]
    row_prompt: np.ndarray | None = None  # int64 [b]: the prompt row response row i continues

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def shared(self) -> bool:
        return self.prompt_ids is not None

    @property
    def positions(self) -> int:
        """Positions the forward computes, padding included."""
        return int(self.input_ids.size + (self.prompt_ids.size if self.prompt_ids is not None else 0))


def build_micro_batch(samples: list[TrainSample], pad_id: int = 0, mask_truncated: bool = False
                      ) -> MicroBatch:
    """Right-pad `samples` to their longest length (an empty list gives b = 0, L = 0)."""
    width = max((s.length for s in samples), default=0)
    shape = (len(samples), width)
    ids, attn, mask, mu, adv = _row_arrays(shape, pad_id)
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


def _row_arrays(shape: tuple[int, int], pad_id: int) -> tuple[np.ndarray, ...]:
    """A micro-batch's per-row arrays, empty: ids (pad_id), attention mask, loss mask, mu, advantages."""
    return (np.full(shape, pad_id, dtype=np.int64), np.zeros(shape, dtype=np.int64),
            np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32))


def build_shared_micro_batch(units: list[list[TrainSample]], pad_id: int = 0,
                             mask_truncated: bool = False) -> MicroBatch:
    """The shared-prompt form (MicroBatch) of `units`, each a list of samples with one prompt; no
    units give an empty one (b = 0) of this form, a filler (the trainer's filler makes the same
    calls as a shared micro-batch: under ZeRO-3 each is a collective)."""
    if not all(units):
        raise ValueError("every unit of a shared-prompt micro-batch needs a sample")
    if not units:
        empty = np.zeros((0, 0), dtype=np.int64)
        return MicroBatch(empty, empty, empty.astype(np.float32), empty.astype(np.float32),
                          empty.astype(np.float32), 0, empty, empty, np.zeros(0, dtype=np.int64))
    rows = [s for u in units for s in u]
    p_width = max(len(u[0].prompt_ids) for u in units)
    r_width = max(len(s.response_ids) for s in rows)
    prompt_ids = np.full((len(units), p_width), pad_id, dtype=np.int64)
    prompt_mask = np.zeros((len(units), p_width), dtype=np.int64)
    for g, u in enumerate(units):
        p = len(u[0].prompt_ids)
        if p:
            prompt_ids[g, p_width - p:] = u[0].prompt_ids
            prompt_mask[g, p_width - p:] = 1
    shape = (len(rows), r_width)
    ids, attn, mask, mu, adv = _row_arrays(shape, pad_id)
    for i, s in enumerate(rows):
        n = len(s.response_ids)
        ids[i, :n], attn[i, :n], mu[i, :n], adv[i, :n] = s.response_ids, 1, s.behaviour_logprobs, s.advantage
        if not (mask_truncated and s.truncated):
            mask[i, :n] = 1.0
    empty = prompt_mask.sum(axis=1) == 0  # nothing predicts the first token of a prompt-less response
    row_prompt = np.repeat(np.arange(len(units), dtype=np.int64), [len(u) for u in units])
    mask[empty[row_prompt], :1] = 0.0
    return MicroBatch(ids, attn, mask, mu, adv, int(mask.sum()), prompt_ids, prompt_mask, row_prompt)


def make_micro_batches(
    samples: list[TrainSample], token_budget: int, n_ranks: int, pad_id: int = 0, mask_truncated: bool = False,
    share_prompts: bool = False,
) -> tuple[list[list[MicroBatch]], dict[str, float]]:
    """Per rank, the same number of micro-batches of at most `token_budget` padded positions (see
    the module docstring). With `share_prompts`, both forms are planned and the one that computes
    fewer positions is built (the flat one on a tie): sharing saves a group's repeated prompt but
    pads each response to the longest in its micro-batch, which long responses of spread lengths can
    cost more than it saves. Metrics: learner/padding_frac (padded positions / all positions),
    learner/positions (all positions the forwards compute, padding included),
    learner/shared_prompts (1 if the shared form was built), learner/micro_batches (per rank),
    learner/rank_token_imbalance (max rank positions / mean), learner/loss_tokens (the batch's
    total_tokens for the loss)."""
    if token_budget < 1 or n_ranks < 1:
        raise ValueError(f"token_budget and n_ranks must be >= 1, got {token_budget}, {n_ranks}")
    plan = _plan([[s] for s in samples], token_budget, n_ranks, shared=False)
    if share_prompts and all(len(s.prompt_ids) for s in samples):  # (a prompt-less row has nothing to share)
        shared = _plan(_prompt_units(samples, token_budget), token_budget, n_ranks, shared=True)
        plan = shared if shared.positions < plan.positions else plan

    def build(mb: list[list[TrainSample]]) -> MicroBatch:
        if plan.shared:
            return build_shared_micro_batch(mb, pad_id, mask_truncated)
        return build_micro_batch([s for u in mb for s in u], pad_id, mask_truncated)

    packed = [[build(mb) for mb in mbs] for mbs in plan.per_rank]
    count = max(len(p) for p in packed)
    for p in packed:
        p.extend(build([]) for _ in range(count - len(p)))
    real = sum(plan.load)
    metrics = {
        "learner/padding_frac": 1.0 - real / plan.positions if plan.positions else 0.0,
        "learner/positions": float(plan.positions),
        "learner/shared_prompts": float(plan.shared),
        "learner/micro_batches": float(count),
        "learner/rank_token_imbalance": max(plan.load) / (real / n_ranks) if real else 1.0,
        "learner/loss_tokens": float(sum(mb.n_tokens for p in packed for mb in p)),
    }
    return packed, metrics


@dataclass
class _Plan:
    """Units dealt to ranks and packed into micro-batches, not yet built: `load` is each rank's real
    positions, `positions` all the forwards would compute, padding included."""

    shared: bool
    per_rank: list[list[list[list[TrainSample]]]]
    load: list[int]
    positions: int


def _plan(units: list[list[TrainSample]], token_budget: int, n_ranks: int, shared: bool) -> _Plan:
    ordered = sorted(units, key=_unit_cost, reverse=True)
    dealt: list[list[list[TrainSample]]] = [[] for _ in range(n_ranks)]
    load = [0] * n_ranks
    for u in ordered:
        r = min(range(n_ranks), key=lambda i: (load[i], i))
        dealt[r].append(u)
        load[r] += _unit_cost(u)
    packed = [_pack(lst, token_budget, shared) for lst in dealt]
    per_rank = [[mb for mb, _ in p] for p in packed]
    return _Plan(shared, per_rank, load, sum(size for p in packed for _, size in p))


def _prompt_units(samples: list[TrainSample], token_budget: int) -> list[list[TrainSample]]:
    """Samples grouped by prompt (same id and tokens), in first-seen order, each group's samples
    longest response first; a group over the budget is cut into pieces that fit with their prompt."""
    groups: dict[tuple[str, bytes], list[TrainSample]] = {}
    for s in samples:
        groups.setdefault((s.prompt_id, np.asarray(s.prompt_ids).tobytes()), []).append(s)
    units: list[list[TrainSample]] = []
    for group in groups.values():
        group.sort(key=lambda s: len(s.response_ids), reverse=True)
        piece: list[TrainSample] = []
        for s in group:  # longest first: a piece's width is its first response's
            if piece and len(s.prompt_ids) + (len(piece) + 1) * len(piece[0].response_ids) > token_budget:
                units.append(piece)
                piece = []
            piece.append(s)
        units.append(piece)
    return units


def _unit_cost(unit: list[TrainSample]) -> int:
    """Positions a unit puts through the model: its prompt once, then every response."""
    return len(unit[0].prompt_ids) + sum(len(s.response_ids) for s in unit)


def _pack(ordered: list[list[TrainSample]], token_budget: int, shared: bool
          ) -> list[tuple[list[list[TrainSample]], int]]:
    """Greedy packing of cost-descending units: a unit joins the open micro-batch while the padded
    size g * P + b * R stays within the budget (flat: P = 0 and R the longest row, so b * L);
    a unit over the budget alone. Returns (micro-batch, its padded size) pairs."""
    out: list[tuple[list[list[TrainSample]], int]] = []
    g = b = p = r = 0
    for u in ordered:
        up = len(u[0].prompt_ids) if shared else 0
        ur = max(len(s.response_ids) if shared else s.length for s in u)
        ng, nb, np_, nr = g + 1, b + len(u), max(p, up), max(r, ur)
        if out and ng * np_ + nb * nr <= token_budget:
            out[-1][0].append(u)
            g, b, p, r = ng, nb, np_, nr
        else:
            out.append(([u], 0))
            g, b, p, r = 1, len(u), up, ur
        out[-1] = (out[-1][0], g * p + b * r)
    return out
