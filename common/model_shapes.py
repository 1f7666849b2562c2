"""Real model shapes with random weights and no download: `or1 make-model --like qwen2.5-0.5b DIR`.

Writes an ordinary HF folder (config.json, safetensors shards + index, generation_config.json and a
tokenizer) that the learner (`or1 learner --model DIR`, `or1 run --model DIR`) and the actors (HF
and vLLM engines) load like the tiny model, so memory, speed and the long-vocabulary code paths can be
measured at the real sizes on any machine.

Shapes (SHAPES) are the architectures' own config.json values: hidden, MLP, layers, query and KV
heads, vocabulary (151,936 up to 3B, 152,064 from 7B on), RoPE theta, tied embeddings and context
length; the qwen2.5-* entries follow the -Instruct releases (32K positions), the r1-distill-* ones
DeepSeek-R1-Distill-Qwen (Skywork-OR1's starting points: Qwen2.5-Math based, 128K positions, θ 10,000).
What is NOT real: the weights (normal(0, initializer_range) matrices, unit norms, zero biases,
seeded per tensor) and the tokenizer, which is the tiny model's byte-level BPE
(`common/tinymodel.train_tokenizer`: specials <|endoftext|>=0 (pad), <|im_start|>=1, <|im_end|>=2
(eos), its chat template) with its vocabulary padded by unreachable filler tokens to exactly the
model's vocabulary size, so every id a random model samples decodes (to some bytes).

Memory: the model is never built. Parameter names and shapes come from the architecture built on
the meta device; each tensor is then drawn in row blocks straight into the output dtype (bfloat16 by
default, like the real folders) and written shard by shard (SHARD_BYTES), so writing the 7B shape
holds about one shard (2 GB), not the model's 15 GB (bf16) or 30 GB (fp32).
"""

from __future__ import annotations

import itertools
import json
import sys
import time
import zlib
from pathlib import Path
from typing import Any


def _qwen2(hidden: int, mlp: int, layers: int, heads: int, kv_heads: int, vocab: int, theta: float,
           positions: int, tied: bool, window_layers: int, window: int) -> dict[str, Any]:
    return dict(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab, rope_theta=theta,
                max_position_embeddings=positions, tie_word_embeddings=tied, max_window_layers=window_layers,
                sliding_window=window)


SHAPES: dict[str, dict[str, Any]] = {
    # hidden, MLP, layers, query/KV heads, vocab, rope θ, positions, tied, max_window_layers, sliding_window
    "qwen2.5-0.5b": _qwen2(896, 4864, 24, 14, 2, 151936, 1e6, 32768, True, 21, 32768),
    "qwen2.5-1.5b": _qwen2(1536, 8960, 28, 12, 2, 151936, 1e6, 32768, True, 21, 32768),
    "qwen2.5-3b": _qwen2(2048, 11008, 36, 16, 2, 151936, 1e6, 32768, True, 70, 32768),
    "qwen2.5-7b": _qwen2(3584, 18944, 28, 28, 4, 152064, 1e6, 32768, False, 28, 131072),
    "r1-distill-qwen-1.5b": _qwen2(1536, 8960, 28, 12, 2, 151936, 1e4, 131072, False, 21, 4096),
    "r1-distill-qwen-7b": _qwen2(3584, 18944, 28, 28, 4, 152064, 1e4, 131072, False, 28, 4096),
}
COMMON = dict(hidden_act="silu", rms_norm_eps=1e-6, initializer_range=0.02, use_sliding_window=False,
              attention_dropout=0.0)
"""Values every Qwen2 shape above shares."""
SHARD_BYTES = 2 << 30
DTYPES = ("bfloat16", "float32", "float16")
ROW_BLOCK_ELEMENTS = 1 << 24  # a weight is drawn this many float32 values at a time (64 MB)


def qwen2_config(like: str, *, layers: int | None = None, dtype: str = "bfloat16", eos_id: int = 2,
                 pad_id: int = 0) -> Any:
    """The transformers Qwen2Config of shape `like` (optionally with fewer layers), our token ids."""
    from transformers import Qwen2Config

    if like not in SHAPES:
        raise ValueError(f"unknown shape {like!r}; known: {', '.join(SHAPES)}")
    if layers is not None and layers < 1:
        raise ValueError(f"--layers must be >= 1, got {layers}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    shape = {**COMMON, **SHAPES[like]}
    if layers is not None:
        shape["num_hidden_layers"] = layers
        shape["max_window_layers"] = min(shape["max_window_layers"], layers)
    config = Qwen2Config(bos_token_id=None, eos_token_id=eos_id, pad_token_id=pad_id, **shape)
    config.architectures = ["Qwen2ForCausalLM"]
    config.dtype = dtype
    return config


def padded_tokenizer(vocab_size: int, max_length: int):
    """The tiny model's BPE tokenizer (same corpus, specials and chat template) with filler tokens
    appended until it has exactly `vocab_size` ids. Fillers are strings of the byte-level alphabet
    that no merge produces: never the result of encoding, but decodable like any other token."""
    from tokenizers import Tokenizer, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from common.tinymodel import default_corpus, train_tokenizer

    base = train_tokenizer(default_corpus())
    data = json.loads(base.backend_tokenizer.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    if len(vocab) > vocab_size:
        raise ValueError(f"the tokenizer has {len(vocab)} tokens, more than the vocabulary of {vocab_size}")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    fillers = ("".join(t) for n in itertools.count(2) for t in itertools.product(alphabet, repeat=n))
    next_id = max(vocab.values()) + 1
    for text in fillers:
        if next_id >= vocab_size:
            break
        if text not in vocab:
            vocab[text] = next_id
            next_id += 1
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)), eos_token=base.eos_token,
        pad_token=base.pad_token, unk_token=None, bos_token=None, additional_special_tokens=["<|im_start|>"],
        model_max_length=max_length, clean_up_tokenization_spaces=False)
    tok.chat_template = base.chat_template
    return tok


def plan(config: Any) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every saved tensor, in the architecture's order (a tied head is not saved)."""
    import torch
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]  # named_parameters drops tied aliases


def draw(name: str, shape: tuple[int, ...], dtype: Any, std: float, seed: int):
    """One tensor: unit RMSNorm weights, zero biases, normal(0, std) otherwise; seeded by name, drawn
    in row blocks so a [152064, 3584] embedding never exists in float32."""
    import torch

    if len(shape) == 1:
        return (torch.ones if name.endswith("norm.weight") else torch.zeros)(shape, dtype=dtype)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    out = torch.empty(shape, dtype=dtype)
    rows = max(1, ROW_BLOCK_ELEMENTS // _prod(shape[1:]))
    for start in range(0, shape[0], rows):
        block = torch.empty((min(rows, shape[0] - start), *shape[1:]), dtype=torch.float32)
        out[start : start + block.shape[0]] = block.normal_(0.0, std, generator=gen).to(dtype)
    return out


def _prod(xs: tuple[int, ...]) -> int:
    n = 1
    for x in xs:
        n *= x
    return n


def write_weights(out: Path, config: Any, dtype_name: str, seed: int) -> int:
    """Write the shards (and index) of random weights; returns the parameter count."""
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, dtype_name)
    item = torch.empty((), dtype=dtype).element_size()
    tensors = plan(config)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = _prod(shape) * item
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for file, shard in zip(files, shards):
        data = {name: draw(name, shape, dtype, config.initializer_range, seed) for name, shape in shard}
        save_file(data, str(out / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in data})
        del data
    if len(files) > 1:
        total = sum(_prod(s) * item for _, s in tensors)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return sum(_prod(s) for _, s in tensors)


def make_model(out_dir: str | Path, like: str, *, layers: int | None = None, dtype: str = "bfloat16",
               seed: int = 0) -> Path:
    """Write a random-weight model of shape `like` with the padded tiny tokenizer into `out_dir`
    (created; must be empty or absent). Returns the folder."""
    from transformers import GenerationConfig

    from common.tinymodel import ENDOFTEXT, IM_END, _save_tokenizer

    config = qwen2_config(like, layers=layers, dtype=dtype)  # checks the arguments before any file is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise FileExistsError(f"make-model: {out} is not empty")
    tokenizer = padded_tokenizer(config.vocab_size, config.max_position_embeddings)
    eos_id, pad_id = tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    config.eos_token_id, config.pad_token_id = eos_id, pad_id
    _save_tokenizer(tokenizer, out)
    config.save_pretrained(str(out))
    params = write_weights(out, config, dtype, seed)
    gen = GenerationConfig(eos_token_id=[eos_id, pad_id], pad_token_id=pad_id, bos_token_id=None,
                           do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
    gen.save_pretrained(str(out))
    info = {"like": like, "layers": config.num_hidden_layers, "dtype": dtype, "seed": seed, "params": params,
            "vocab": config.vocab_size, "weights": "random", "tokenizer": "or1 tiny BPE, padded"}
    (out / "or1_model.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def main(out_dir: str, like: str, layers: int | None = None, dtype: str = "bfloat16", seed: int = 0) -> int:
    """`or1 make-model --like SHAPE DIR`: write the folder and print a one-line summary."""
    t0 = time.perf_counter()
    try:
        out = make_model(out_dir, like, layers=layers, dtype=dtype, seed=seed)
    except (OSError, ValueError) as e:
        print(f"or1 make-model: {e}", file=sys.stderr)
        return 1
    info = json.loads((out / "or1_model.json").read_text())
    print(f"wrote {out}: {like} shape, {info['layers']} layers, {info['params']:,} parameters, vocab "
          f"{info['vocab']:,}, {dtype}, random weights ({time.perf_counter() - t0:.1f}s)")
    return 0
