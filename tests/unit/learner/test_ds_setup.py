"""learner/ds_setup.py own_partition: which elements of a ZeRO-3 parameter this rank holds, read
from the attributes DeepSpeed sets (`ds_id`, `ds_numel`, `ds_numel_aligned`, `ds_tensor.ds_numel`);
the real partitioning is checked against the gathered export in
tests/integration/test_trainer_multirank.py."""

from __future__ import annotations

import torch

from learner.ds_setup import UNKNOWN_LAYOUT, own_partition


def zero3_param(numel: int, world: int, rank: int, size: int | None = None) -> torch.Tensor:
    """A stand-in with the attributes DeepSpeed's `_partition_param` sets: rank r's flat
    partition holds elements [r·s, (r+1)·s) of the parameter padded to world·s."""
    s = size if size is not None else -(-numel // world)
    full = torch.arange(world * s, dtype=torch.float32)
    p = torch.nn.Parameter(torch.empty(0))
    p.ds_id, p.ds_numel, p.ds_numel_aligned = 7, numel, world * s
    p.ds_tensor = full[rank * s:(rank + 1) * s].clone()
    p.ds_tensor.ds_numel = s
    return p


def test_each_rank_gets_its_slice_and_the_last_loses_the_padding():
    numel, world = 10, 4  # s = 3: ranks hold 0-2, 3-5, 6-8, 9 (+2 padding)
    pieces = [own_partition(zero3_param(numel, world, r), r, world) for r in range(world)]
    assert [start for _, start in pieces] == [0, 3, 6, 9]
    assert torch.equal(torch.cat([t for t, _ in pieces]), torch.arange(numel, dtype=torch.float32))


def test_a_rank_past_the_end_holds_nothing():
    t, start = own_partition(zero3_param(2, 4, 3), 3, 4)  # s = 1: rank 3 holds only padding
    assert t.numel() == 0 and start == 3


def test_not_partitioned_and_unknown_layouts():
    assert own_partition(torch.zeros(3), 0, 2) is None  # a buffer, or ZeRO 0-2: rank 0 writes it whole
    odd = zero3_param(10, 2, 0)
    odd.ds_numel_aligned = 12  # not world · s: another partitioning (hierarchical, ...)
    assert own_partition(odd, 0, 2) is UNKNOWN_LAYOUT
