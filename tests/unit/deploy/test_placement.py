"""deploy/placement.py: which GPU each role of `or1 run` gets (pure plans), and common/devices.py."""

from __future__ import annotations

import pytest

from common.devices import device_label, visible_gpus
from deploy.placement import Placement, place

GPUS = [str(i) for i in range(8)]


def test_enough_devices_each_role_its_own():
    p = place(GPUS, learner_ranks=2, actors=3, tp=2, memory=0.9)
    assert p.learner == ["0", "1"]
    assert p.actors == [["2", "3"], ["4", "5"], ["6", "7"]]
    assert p.memory == [None, None, None]
    assert p.learner_env() == {"CUDA_VISIBLE_DEVICES": "0,1"} and p.actor_env(1) == {"CUDA_VISIBLE_DEVICES": "4,5"}
    assert Placement.reward_env() == {"CUDA_VISIBLE_DEVICES": ""}


def test_more_actors_than_devices_share_the_rest_and_split_memory():
    p = place(GPUS[:4], learner_ranks=2, actors=4, tp=1, memory=0.9)
    assert p.actors == [["2"], ["3"], ["2"], ["3"]]
    assert p.memory == [0.45, 0.45, 0.45, 0.45]


def test_one_device_for_everything_leaves_the_learner_room():
    """gpu_smoke on one GPU: the learner and both actors on device 0; vLLM takes at most 0.4 of it
    in all, shared by the two engines."""
    p = place(["0"], learner_ranks=1, actors=2, tp=1, memory=0.9)
    assert p.learner == ["0"] and p.actors == [["0"], ["0"]]
    assert p.memory == [0.2, 0.2]


def test_tp_groups_from_the_whole_list_when_too_few_are_left():
    p = place(GPUS[:2], learner_ranks=1, actors=1, tp=2, memory=0.5)
    assert p.actors == [["0", "1"]] and p.memory == [0.4]


@pytest.mark.parametrize("gpus, ranks, tp, fix", [(["0"], 2, 1, "run.learner_ranks"),
                                                   (["0", "1"], 1, 4, "tensor_parallel_size")])
def test_impossible_plans_say_which_setting(gpus, ranks, tp, fix):
    with pytest.raises(ValueError, match=fix):
        place(gpus, learner_ranks=ranks, actors=1, tp=tp, memory=0.5)


def test_visible_gpus_and_label_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert visible_gpus() == ["2", "5"] and device_label() == "gpu 2,5"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == [] and device_label() == "cpu"


def test_no_nvidia_tools_means_cpu(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert visible_gpus() == [] and device_label() == "cpu"
