"""Weights → an ordinary Hugging Face folder (config, tokenizer, model.safetensors) that vLLM,
transformers and `or1 eval` load.

- `write_hf_folder(tensors, model_path, out)`: the base model folder's non-weight files (config,
  tokenizer, generation config, chat template) copied, the weights written as one safetensors file
  (a tied lm_head left out, as transformers saves it). Used by the learner for `run_dir/model`, for
  `checkpoints/step_N/hf` when `learner.export_checkpoints`, and by `or1 export`.
- `export_checkpoint(checkpoint, out)` (`or1 export CHECKPOINT DIR`): a checkpoint of a run, offline.
  If the learner already exported it (`step_N/hf`), that folder is copied. Otherwise the weights are
  read from DeepSpeed's files: ZeRO 0-2 keep the whole module in `mp_rank_00_model_states.pt` (in the
  training precision); ZeRO-3 partitions it (`zero_pp_rank_R_mp_rank_00_model_states.pt`), so the
  fp32 master weights are gathered from every rank's optimizer shard (deepspeed.utils.zero_to_fp32).
  They are cast to the base folder's dtype (or
  `dtype`). The base model folder is `--model`, else the run's `learner_config.json` (`learner.model`;
  "tiny" resolves to the cached tiny model).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from learner import checkpoint as ckpt

if TYPE_CHECKING:
    import torch

HF_DIR = "hf"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json", ".pt")
MODEL_STATES = "mp_rank_00_model_states.pt"  # ZeRO 0-2: the whole module
ZERO3_MODEL_STATES = "zero_pp_rank_*_mp_rank_00_model_states.pt"  # ZeRO-3: per-rank partitions


def tied(folder: str | Path) -> bool:
    """Whether the folder's config ties lm_head to the embedding."""
    try:
        return bool(json.loads((Path(folder) / "config.json").read_text()).get("tie_word_embeddings", False))
    except (OSError, ValueError):
        return False


def arrays_to_tensors(exported: Iterable[tuple[str, Any, str]]) -> dict[str, "torch.Tensor"]:
    """The learner's exported (name, array, dtype name) triples as tensors (bfloat16 arrays hold raw bits)."""
    import torch

    return {n: (torch.from_numpy(a).view(torch.bfloat16) if d == "bfloat16" else torch.from_numpy(a)).contiguous()
            for n, a, d in exported}


def write_hf_folder(tensors: dict[str, "torch.Tensor"], model_path: str | Path, out: str | Path) -> Path:
    """`out` as an HF folder: `model_path`'s non-weight files and `tensors` as model.safetensors."""
    from safetensors.torch import save_file

    src, out = Path(model_path), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.safetensors"):
        old.unlink()
    if src.is_dir():
        if not (src / "config.json").is_file():
            raise FileNotFoundError(f"{src} is not a model folder (no config.json): give the base model with --model")
        for f in src.iterdir():
            if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES):
                shutil.copy2(f, out / f.name)
    else:  # a Hub name: its config and tokenizer, from the local Hub cache the learner loaded it through
        from transformers import AutoConfig, AutoTokenizer

        AutoConfig.from_pretrained(str(model_path)).save_pretrained(str(out))
        AutoTokenizer.from_pretrained(str(model_path)).save_pretrained(str(out))
    if tied(out):
        tensors = {n: t for n, t in tensors.items() if n != "lm_head.weight"}
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def base_model(checkpoint: Path) -> str:
    """The run's model folder, from run_dir/learner_config.json beside checkpoints/."""
    run_dir = checkpoint.parent.parent
    path = run_dir / "learner_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no {path}: give the base model folder with --model")
    from common.config import load_config

    cfg = load_config(path)
    if cfg.learner.model != "tiny":
        return cfg.learner.model
    from common.tinymodel import tiny_model_for

    return str(tiny_model_for(cfg))


def deepspeed_state_dict(checkpoint: Path) -> dict[str, "torch.Tensor"]:
    """The module's weights from DeepSpeed's files (see the module docstring)."""
    import torch

    states = checkpoint / MODEL_STATES
    if states.is_file():  # ZeRO 0-2
        # DeepSpeed's own files hold more than tensors (its config, version, shapes): not weights_only
        doc = torch.load(states, map_location="cpu", weights_only=False)
        return {k: v for k, v in doc["module"].items() if isinstance(v, torch.Tensor)}
    if not any(checkpoint.glob(ZERO3_MODEL_STATES)):
        raise FileNotFoundError(f"{checkpoint}: no {MODEL_STATES} or {ZERO3_MODEL_STATES} "
                                "(not a DeepSpeed checkpoint of this learner)")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name))


def export_checkpoint(checkpoint: str | Path, out: str | Path, model: str | None = None,
                      dtype: str = "auto") -> Path:
    """`or1 export`: checkpoint → HF folder `out` (see the module docstring)."""
    import torch

    path = Path(checkpoint)
    ckpt.read_state(path)  # FileNotFoundError unless complete
    out = Path(out)
    ready = path / HF_DIR
    if ready.is_dir() and (ready / "model.safetensors").is_file() and model is None and dtype == "auto":
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(ready, out)
        return out
    base = model or base_model(path)
    state = deepspeed_state_dict(path)
    name = dtype if dtype != "auto" else _folder_dtype(base)
    target = getattr(torch, name)
    tensors = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
    return write_hf_folder(tensors, base, out)


def _folder_dtype(folder: str | Path) -> str:
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    name = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"
