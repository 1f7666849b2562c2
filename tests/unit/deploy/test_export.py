"""`or1 export` (learner/export.py): a learner checkpoint as an ordinary HF folder. A trainer (ZeRO 0
and 3, one gloo rank on CPU) takes a step, saves a checkpoint; the export, loaded by transformers,
holds exactly the trained weights (not the base model's), with the base folder's config and tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common.config import LearnerConfig
from learner import checkpoint as ckpt
from learner.buffer import TrainSample, build_micro_batch
from learner.export import HF_DIR, arrays_to_tensors, export_checkpoint, write_hf_folder
from learner.trainer import Trainer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from common.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def trained(model_dir, stage: int) -> Trainer:
    cfg = LearnerConfig()
    cfg.trainer.zero_stage, cfg.optim.lr = stage, 1e-3
    t = Trainer(model_dir, cfg, temperature=1.0)
    rng = np.random.default_rng(0)
    samples = [TrainSample(rng.integers(0, 2000, 4).astype(np.int32), rng.integers(0, 2000, 6).astype(np.int32),
                           np.full(6, -7.6, np.float32), 1.0 if i % 2 else -1.0, 0.0, False, 0, str(i))
               for i in range(4)]
    mb = build_micro_batch(samples)
    t.train_step([mb], mb.n_tokens, 0.0)
    return t


def load(folder) -> dict[str, np.ndarray]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("stage", [0, 3])
def test_export_holds_the_trained_weights(stage, tiny_model, tmp_path):
    t = trained(tiny_model, stage)
    want = {n: a for n, a, _ in t.export_weights("float32")}
    path = t.save_checkpoint(ckpt.checkpoint_dir(tmp_path / "run", t.version), {"epoch": 0})
    out = export_checkpoint(path, tmp_path / "hf", model=str(tiny_model))
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        assert (out / f).is_file(), f
    got, base = load(out), load(tiny_model)
    assert set(got) == set(want)
    for name, value in want.items():
        assert np.array_equal(got[name], value), name
    assert any(not np.array_equal(base[n], want[n]) for n in want), "the step changed nothing: a useless test"


def test_learner_export_on_save_is_copied_and_base_model_read_from_the_run(tiny_model, tmp_path):
    """export_checkpoints writes step_N/hf; `or1 export` copies it; without it, the run's
    learner_config.json names the base model."""
    from common.config import Config, save_config

    t = trained(tiny_model, 0)
    run = tmp_path / "run"
    cfg = Config()
    cfg.learner.model = str(tiny_model)
    save_config(cfg, run / "learner_config.json")
    path = t.save_checkpoint(ckpt.checkpoint_dir(run, t.version), {"epoch": 0})
    out = export_checkpoint(path, tmp_path / "from_ds")  # base model from learner_config.json
    want = {n: a for n, a, _ in t.export_weights("float32")}
    assert all(np.array_equal(load(out)[n], want[n]) for n in want)

    write_hf_folder(arrays_to_tensors(t.export_weights()), tiny_model, path / HF_DIR)
    (path / HF_DIR / "marker.txt").write_text("exported by the learner")
    copied = export_checkpoint(path, tmp_path / "copied")
    assert (copied / "marker.txt").is_file()
    assert json.loads((copied / "config.json").read_text()) == json.loads((tiny_model / "config.json").read_text())


def test_incomplete_checkpoint_is_refused(tmp_path):
    bad = ckpt.checkpoint_dir(tmp_path, 3)
    bad.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        export_checkpoint(bad, tmp_path / "out", model="x")
