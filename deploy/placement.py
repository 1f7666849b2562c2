"""Which accelerator each role of `or1 run` gets, through `CUDA_VISIBLE_DEVICES`.

On a machine with GPUs every child would otherwise see every device and start on cuda:0. The
plan, for `L` learner ranks and `A` actors of tensor-parallel size `T` over the visible GPUs `G`:

- enough devices (`G ≥ L + A·T`): the learner ranks take the first L (torchrun gives rank r its
  r-th visible device), each actor the next T of its own;
- fewer: the learner keeps its L (`G ≥ L` is required), and the actors share what is left — or,
  when no T devices are left, the whole list — round-robin in groups of T. Sharing actors split
  vLLM's memory: each gets `gpu_memory_utilization / k` for k engines on its device, and 0.4 / k
  where a learner rank trains on that device too (vLLM reserves its share up front);
- reward workers see no device (`CUDA_VISIBLE_DEVICES=""`): they score text.

The visible GPUs are the ids in `CUDA_VISIBLE_DEVICES` when it is set, else `nvidia-smi -L`'s; a
machine without either is a CPU machine and nothing changes. Pure functions but `visible_gpus`;
tests/unit/deploy/test_placement.py covers the plans.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LEARNER_SHARE = 0.4  # most of a device vLLM may take where a learner rank trains on it too


@dataclass(frozen=True)
class Placement:
    """Device ids per role: `learner` for its ranks, `actors[i]` for actor i (T ids each), and the
    vLLM memory share of each actor (None = its configured one)."""

    learner: list[str]
    actors: list[list[str]]
    memory: list[float | None] = field(default_factory=list)

    def env(self, devices: list[str]) -> dict[str, str]:
        return {"CUDA_VISIBLE_DEVICES": ",".join(devices)}

    def learner_env(self) -> dict[str, str]:
        return self.env(self.learner)

    def actor_env(self, i: int) -> dict[str, str]:
        return self.env(self.actors[i])

    @staticmethod
    def reward_env() -> dict[str, str]:
        return {"CUDA_VISIBLE_DEVICES": ""}

    def lines(self) -> list[str]:
        out = [f"learner ranks → GPU {','.join(self.learner)}"]
        for i, (d, m) in enumerate(zip(self.actors, self.memory)):
            out.append(f"actor{i} → GPU {','.join(d)}" + (f" (gpu_memory_utilization {m:.2f}, shared)" if m else ""))
        return out


def place(gpus: list[str], learner_ranks: int, actors: int, tp: int, memory: float) -> Placement:
    """The plan of the module doc. ValueError when the learner's ranks do not get a device each,
    or a TP group would not fit on the machine at all."""
    if len(gpus) < learner_ranks:
        raise ValueError(f"{len(gpus)} GPU(s) for {learner_ranks} learner ranks: set run.learner_ranks "
                         f"to at most {len(gpus)}")
    if tp > len(gpus):
        raise ValueError(f"actor.tensor_parallel_size = {tp} needs {tp} GPUs; this machine shows {len(gpus)}")
    learner = gpus[:learner_ranks]
    rest = gpus[learner_ranks:]
    if len(rest) >= actors * tp:
        return Placement(learner, [rest[i * tp:(i + 1) * tp] for i in range(actors)], [None] * actors)
    pool = rest if len(rest) >= tp else gpus
    groups = [pool[k * tp:(k + 1) * tp] for k in range(len(pool) // tp)]
    chosen = [groups[i % len(groups)] for i in range(actors)]
    mem = []
    for devices in chosen:
        k = sum(1 for c in chosen if set(c) & set(devices))
        with_learner = bool(set(devices) & set(learner))
        mem.append(round(min(memory, LEARNER_SHARE) / k if with_learner else memory / k, 3))
    return Placement(learner, chosen, mem)
