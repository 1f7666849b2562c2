"""Between a flat weight store and named torch tensors, both ways.

`named_tensors(store)`: for each manifest entry, a zero-copy torch view of the store's flat uint8
buffer: `torch.from_numpy` on the numpy view `WeightStore.arrays()` already made (same memory), and
for "bfloat16" entries (which arrive as uint16 bit patterns, numpy having no bf16) a
`Tensor.view(torch.bfloat16)` reinterpretation of those bits. Nothing is copied until the engine copies
each tensor into its parameter, so loading a version costs one pass over the bytes.

`state_dict_arrays(model_or_state_dict, dtype)`: the inverse, used by the learner to publish and by
tests: every state-dict entry cast to `dtype` (floating tensors only; integer buffers keep theirs),
made contiguous on CPU, as numpy arrays; bfloat16 as `bus.codec.BFloat16Array` (a uint16 ndarray
subclass holding the bit patterns, so `WeightStore.from_arrays` tags it "bfloat16"). A model with
tied embeddings gets `lm_head.weight` even when the given state dict lacks it, because engines load
checkpoint-format names and vLLM's tied head is fed through the embedding's name.

`expected_shapes(model_dir)`: the HF checkpoint names and shapes of a model folder, from a
meta-device instance of its architecture (no weights read), so engines can validate a store's names
and shapes before touching their parameters: a bad store is refused whole, never half-loaded.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from bus.weights import WeightStore

WIRE_DTYPES = ("float32", "bfloat16", "float16")


def named_tensors(store: "WeightStore") -> Iterator[tuple[str, "torch.Tensor"]]:
    """Zero-copy (name, tensor) views of `store`'s buffer, in manifest order."""
    import torch

    for meta, (name, arr) in zip(store.manifest.tensors, store.arrays()):
        with warnings.catch_warnings():
            # A received buffer may be read-only; the engines only read these views (copy_ into params).
            warnings.filterwarnings("ignore", message=".*not writable.*")
            t = torch.from_numpy(np.asarray(arr).view(arr.dtype))
        yield name, (t.view(torch.bfloat16) if meta.dtype == "bfloat16" else t)


def state_dict_arrays(model_or_state_dict: Any, dtype: str = "auto") -> list[tuple[str, np.ndarray]]:
    """State dict → [(name, array)] in `dtype` ("auto" keeps each tensor's own); see the module doc."""
    import torch

    from bus.codec import as_bfloat16

    if dtype != "auto" and dtype not in WIRE_DTYPES:
        raise ValueError(f"dtype must be auto or one of {WIRE_DTYPES}, got {dtype!r}")
    state = _state_dict(model_or_state_dict)
    target = None if dtype == "auto" else getattr(torch, dtype)
    out: list[tuple[str, np.ndarray]] = []
    for name, t in state.items():
        t = t.detach().to("cpu")
        if target is not None and t.is_floating_point():
            t = t.to(target)
        t = t.contiguous()
        if t.dtype == torch.bfloat16:
            out.append((name, as_bfloat16(t.view(torch.uint16).numpy())))
        else:
            out.append((name, t.numpy()))
    return out


def _state_dict(model_or_state_dict: Any) -> dict[str, "torch.Tensor"]:
    if isinstance(model_or_state_dict, Mapping):
        return dict(model_or_state_dict)
    if not hasattr(model_or_state_dict, "state_dict"):
        raise TypeError(f"expected a model or a state dict, got {type(model_or_state_dict).__name__}")
    state = dict(model_or_state_dict.state_dict())
    config = getattr(model_or_state_dict, "config", None)
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in state:
        embed = model_or_state_dict.get_input_embeddings().weight
        state["lm_head.weight"] = embed
    return state


def expected_shapes(model_dir: str) -> tuple[dict[str, tuple[int, ...]], bool]:
    """({checkpoint name: shape}, tied) of the model folder's architecture (meta device, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied:
        shapes.setdefault("lm_head.weight", tuple(model.get_input_embeddings().weight.shape))
    return shapes, tied


def check_named(named: Iterable[tuple[str, "torch.Tensor"]], shapes: Mapping[str, tuple[int, ...]],
                tied: bool) -> list[tuple[str, "torch.Tensor"]]:
    """Materialise `named` (views: no copy) and check it against the expected names and shapes:
    every name known, none twice, every expected one present (a tied model may omit lm_head.weight),
    shapes equal, floating dtypes. ValueError naming the first problems otherwise."""
    items = list(named)
    seen: set[str] = set()
    problems: list[str] = []
    for name, t in items:
        if name in seen:
            problems.append(f"{name} given twice")
        seen.add(name)
        if name not in shapes:
            problems.append(f"unknown tensor {name}")
        elif tuple(t.shape) != shapes[name]:
            problems.append(f"{name} has shape {tuple(t.shape)}, expected {shapes[name]}")
        elif not t.is_floating_point():
            problems.append(f"{name} has non-floating dtype {t.dtype}")
    optional = {"lm_head.weight"} if tied else set()
    missing = sorted(set(shapes) - seen - optional)
    if missing:
        problems.append(f"{len(missing)} tensors missing, e.g. {missing[:3]}")
    if problems:
        raise ValueError("weights refused: " + "; ".join(problems[:5]))
    return items


def folder_dtype(model: str, dtype: str) -> str:
    """`dtype`, or for "auto" the folder's config dtype (float32 when it names none)."""
    if dtype != "auto":
        return dtype
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    return str(found).removeprefix("torch.")
