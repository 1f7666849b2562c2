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

`StreamedTensors(partial, alive, deadline)`: the same views of a version still arriving (a
`PartialStore`), each yielded once every chunk it spans has landed and passed its crc, so an engine
that loads lazily (vLLM's in-place reload takes an iterator) loads tensor k while later chunks are
still on the wire. Its `specs` (names, shapes, dtypes) come from the manifest, so the engine checks
them before any parameter changes, as it does a whole store's.

`weight_file(named)`: where the tensors of `named_tensors(store)` live as a file other processes can
map (the store's /dev/shm file), or None; `write_weight_file(items)` makes such a file from any
tensors. Tensor-parallel vLLM workers load from it (actors/vllm_worker.py).

`expected_shapes(model_dir)`: the HF checkpoint names and shapes of a model folder, from a
meta-device instance of its architecture (no weights read), so engines can validate a store's names
and shapes before touching their parameters: a bad store is refused whole, never half-loaded.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from bus.weights.shm import SharedBuffer
    from bus.weights.store import PartialStore, WeightStore

WIRE_DTYPES = ("float32", "bfloat16", "float16")


class NamedTensors(Iterable):
    """Zero-copy (name, tensor) views of a store's buffer, in manifest order (iterable any number of
    times); `store` stays reachable so an engine can find the file they live in (`weight_file`)."""

    def __init__(self, store: "WeightStore"):
        self.store = store

    def __iter__(self) -> Iterator[tuple[str, "torch.Tensor"]]:
        for meta, (name, arr) in zip(self.store.manifest.tensors, self.store.arrays()):
            yield name, wire_tensor(arr, meta.dtype)


def wire_tensor(arr: np.ndarray, tag: str) -> "torch.Tensor":
    """A zero-copy torch view of one tensor's numpy view of a flat buffer, bfloat16 reinterpreted
    from its uint16 bits. A received or mapped buffer may be read-only; engines only read these
    views (copy_ into their parameters)."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if tag == "bfloat16" else t


def named_tensors(store: "WeightStore") -> NamedTensors:
    """Zero-copy (name, tensor) views of `store`'s buffer, in manifest order."""
    return NamedTensors(store)


class StreamBroken(RuntimeError):
    """A streamed version stopped arriving (its pull gave up, or a chunk missed the deadline) after
    the engine may have loaded part of it: the engine holds no whole version until one is loaded."""


class StreamedTensors(Iterable):
    """(name, tensor) views of a version being received, in manifest order, each yielded once all of
    its chunks are in (`PartialStore.wait`). Every chunk passed its crc on arrival, and the manifest's
    whole-buffer checksum is checked here to be the combination of its chunk crcs, so the bytes
    loaded are the ones the finished store will verify. Iterating raises StreamBroken when a chunk
    has not come by `deadline` (time.monotonic) or `alive()` turns False (the pull gave this partial
    up). Iterable once."""

    def __init__(self, partial: "PartialStore", alive: "Callable[[], bool]", deadline: float):
        from bus.weights.crc import combine_chunks

        m = partial.manifest
        if combine_chunks(list(m.chunk_crcs), m.chunk_bytes, m.total_bytes) != m.checksum:
            raise ValueError(f"version {m.version}: the manifest's checksum is not its chunks' crcs combined")
        self.partial, self.alive, self.deadline = partial, alive, deadline

    @property
    def specs(self) -> list[tuple[str, tuple[int, ...], bool]]:
        """(name, shape, floating) of each tensor, from the manifest: checked before anything loads."""
        return [(t.name, tuple(t.shape), t.dtype in WIRE_DTYPES) for t in self.partial.manifest.tensors]

    def __iter__(self) -> Iterator[tuple[str, "torch.Tensor"]]:
        import time

        from bus.codec import numpy_dtype

        p, cb = self.partial, self.partial.manifest.chunk_bytes
        for t in p.manifest.tensors:
            for i in range(t.offset // cb, -(-(t.offset + t.nbytes) // cb)):
                while not p.wait(i, 0.1):
                    if not self.alive() or time.monotonic() > self.deadline:
                        raise StreamBroken(f"version {p.version}: chunk {i} did not come "
                                           f"({'pull ended' if not self.alive() else 'deadline passed'})")
            arr = p.buffer[t.offset:t.offset + t.nbytes].view(numpy_dtype(t.dtype)).reshape(t.shape)
            yield t.name, wire_tensor(arr, t.dtype)


@dataclass
class WeightFile:
    """A flat weight buffer as a file another process can map: `path`, its identity `file_id`
    ("device:inode", so a reader never maps another file at that path) and where each tensor sits
    (name, wire dtype tag, shape, byte offset, nbytes). `owned`: made by `write_weight_file`, to
    be removed (`close`) once loaded."""

    path: str
    file_id: str
    entries: list[tuple[str, str, list[int], int, int]]
    owned: "SharedBuffer | None" = None  # the buffer of a file written here (unlinked by close)

    def with_alias(self, alias: str, of: str) -> "WeightFile":
        """The same file with `alias` also naming tensor `of` (vLLM's tied head, see vllm_engine)."""
        entry = next(e for e in self.entries if e[0] == of)
        return WeightFile(self.path, self.file_id, [*self.entries, (alias, *entry[1:])], self.owned)

    def close(self) -> None:
        if self.owned is not None:
            self.owned.unlink()
            self.owned = None


def weight_file(named: Any) -> WeightFile | None:
    """The file `named` (from `named_tensors`) lives in, if its store is in one (bus.shared_memory):
    None for any other iterable, or a store in private memory."""
    store = getattr(named, "store", None)
    shared = getattr(store, "shared", None) if store is not None else None
    if shared is None or not shared.file_id:
        return None
    entries = [(t.name, t.dtype, list(t.shape), t.offset, t.nbytes) for t in store.manifest.tensors]
    return WeightFile(str(shared.path), shared.file_id, entries)


def write_weight_file(items: list[tuple[str, "torch.Tensor"]]) -> WeightFile:
    """The tensors laid out in a new file (in /dev/shm when it has room, else the temp directory):
    one copy of the bytes, for workers in other processes to map. Close it after loading."""
    import tempfile
    from pathlib import Path

    import torch

    from bus.weights import shm

    metas, offset = [], 0
    for name, t in items:
        tag = str(t.dtype).removeprefix("torch.")
        if tag not in WIRE_DTYPES:
            raise ValueError(f"{name}: dtype {tag} cannot be loaded (one of {WIRE_DTYPES})")
        offset = -(-offset // 64) * 64
        nbytes = t.numel() * t.element_size()
        metas.append((name, tag, list(t.shape), offset, nbytes))
        offset += nbytes
    try:
        buf = shm.SharedBuffer.create(offset)
    except OSError:  # /dev/shm too small (e.g. Docker's 64 MB): an ordinary file, read through the page cache
        buf = shm.SharedBuffer.create(offset, shm_dir=Path(tempfile.gettempdir()))
    for (_, t), (_, _, _, off, _) in zip(items, metas):
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        if flat.dtype == torch.bfloat16:
            flat = flat.view(torch.uint16)
        if flat.numel():
            buf.write(off, flat.numpy().view(np.uint8))
    return WeightFile(str(buf.path), buf.file_id, metas, owned=buf)


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
    check_specs([(name, tuple(t.shape), t.is_floating_point()) for name, t in items], shapes, tied)
    return items


def check_specs(specs: Iterable[tuple[str, tuple[int, ...], bool]], shapes: Mapping[str, tuple[int, ...]],
                tied: bool) -> None:
    """`check_named`'s rule on (name, shape, floating) triples: what a streamed version is checked by
    before its first tensor arrives (`StreamedTensors.specs`)."""
    seen: set[str] = set()
    problems: list[str] = []
    for name, shape, floating in specs:
        if name in seen:
            problems.append(f"{name} given twice")
        seen.add(name)
        if name not in shapes:
            problems.append(f"unknown tensor {name}")
        elif tuple(shape) != shapes[name]:
            problems.append(f"{name} has shape {tuple(shape)}, expected {shapes[name]}")
        elif not floating:
            problems.append(f"{name} has a non-floating dtype")
    optional = {"lm_head.weight"} if tied else set()
    missing = sorted(set(shapes) - seen - optional)
    if missing:
        problems.append(f"{len(missing)} tensors missing, e.g. {missing[:3]}")
    if problems:
        raise ValueError("weights refused: " + "; ".join(problems[:5]))


def folder_dtype(model: str, dtype: str) -> str:
    """`dtype`, or for "auto" the folder's config dtype (float32 when it names none)."""
    if dtype != "auto":
        return dtype
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    return str(found).removeprefix("torch.")
