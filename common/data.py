"""Problems: the records the learner hands out, loaded from built-in toy sets, local files, or the Hub.

`load_problems(DataConfig)`:
- `toy:NAME` → `toy_problems(NAME)` (generated, no files): `addition` is every single-digit sum
  "a+b" (100 problems, kind math, reference the sum); `code` is small stdin/stdout programs (kind code,
  reference a JSON test spec `{"inputs": [...], "outputs": [...]}`).
- a local `.jsonl`/`.json`/`.parquet` file, a local folder, or a Hub name → `datasets.load_dataset`
  (the split applies to Hub names and folders; a single file is its own "train" split).
Each row becomes a Problem by one of two schemas:
- Skywork-OR1-RL-Data: `prompt` (list of {role, content}), `ability` ("math"/"code"),
  `reward_model.ground_truth` (JSON text: for math a list of answers — the first is taken — or a string;
  for code the test spec, passed through as text), `extra_info.index`, `data_source`; id
  `"{data_source}-{index}"`.
- plain: `prompt` (a string → one user message, or a message list), optional `id`, `kind` (default
  math), and `answer` or `reference` (read like ground_truth above: a math list gives its first item, a
  number its text; a code spec that is not text is JSON-encoded); id the `id` field or
  `"{source name}-{row}"`.
A row that fits neither is skipped with a warning naming the row and the reason; a source with no usable
row is an error. Ids are made unique by suffixing `~row`. `limit` keeps the first rows (before
conversion); `prompt_suffix` is appended to the last user message (joined with a space unless it starts
with whitespace).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from common.log import get_logger

if TYPE_CHECKING:
    from common.config import DataConfig

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
MAX_ROW_WARNINGS = 5
"""Skipped rows logged one by one; beyond this only the count is logged."""


class DataError(ValueError):
    """A data source that cannot be read or holds no usable problem."""


@dataclass
class Problem:
    """One prompt: `messages` in chat form, `kind` "math" | "code", `reference` the gold answer (math)
    or the JSON test-spec text (code)."""

    id: str
    messages: list[dict[str, str]]
    kind: str
    reference: str


# ---------------------------------------------------------------- toy sets


def _addition(seed: int) -> list[Problem]:
    pairs = [(a, b) for a in range(10) for b in range(10)]
    random.Random(seed).shuffle(pairs)
    return [Problem(f"add-{a}+{b}", [{"role": "user", "content": f"{a}+{b}"}], "math", str(a + b)) for a, b in pairs]


_CODE_TASKS: list[tuple[str, str, Any]] = [
    ("sum", "Read two integers from stdin and print their sum.", lambda a, b: a + b),
    ("product", "Read two integers from stdin and print their product.", lambda a, b: a * b),
    ("max", "Read two integers from stdin and print the larger one.", max),
    ("min", "Read two integers from stdin and print the smaller one.", min),
    ("diff", "Read two integers a and b from stdin and print a - b.", lambda a, b: a - b),
]


def _code(seed: int, cases: int = 3) -> list[Problem]:
    rng = random.Random(seed)
    out = []
    for name, text, fn in _CODE_TASKS:
        pairs = [(rng.randint(-20, 20), rng.randint(-20, 20)) for _ in range(cases)]
        spec = {"inputs": [f"{a} {b}\n" for a, b in pairs], "outputs": [f"{fn(a, b)}\n" for a, b in pairs]}
        out.append(Problem(f"code-{name}", [{"role": "user", "content": text}], "code", json.dumps(spec)))
    rng.shuffle(out)
    return out


TOY_SETS = {"addition": _addition, "code": _code}


def toy_problems(name: str, n: int | None = None, seed: int = 0) -> list[Problem]:
    """The built-in set `name` in a seeded order, at most `n` problems (every set is finite)."""
    if name not in TOY_SETS:
        raise DataError(f"unknown toy set {name!r}; known: {', '.join(sorted(TOY_SETS))}")
    problems = TOY_SETS[name](seed)
    return problems[:n] if n is not None else problems


# ---------------------------------------------------------------- rows → problems


def _messages(prompt: Any) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, (list, tuple)) and prompt:
        msgs = []
        for m in prompt:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise ValueError(f"prompt message is not {{role: str, content: str}}: {str(m)[:80]!r}")
            msgs.append({"role": m["role"], "content": m["content"]})
        return msgs
    raise ValueError(f"prompt must be a string or a non-empty message list, got {type(prompt).__name__}")


def _math_answer(ground_truth: Any) -> str:
    """First answer of a JSON list, or the string itself (JSON-decoded where it is JSON)."""
    value = ground_truth
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return value
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("ground_truth is an empty list")
        value = value[0]
    if isinstance(value, (dict, list)) or value is None:
        raise ValueError(f"math ground_truth is not an answer: {str(value)[:80]!r}")
    return str(value)


def _spec_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def row_to_problem(row: dict[str, Any], default_id: str) -> Problem:
    """One dataset row in either schema (see the module docstring); ValueError names what is wrong."""
    if "prompt" not in row:
        raise ValueError("no `prompt` field")
    messages = _messages(row["prompt"])
    if isinstance(row.get("reward_model"), dict) and row["reward_model"].get("ground_truth") is not None:
        kind = row.get("ability") or "math"
        gt = row["reward_model"]["ground_truth"]
        extra = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
        source, index = row.get("data_source"), extra.get("index")
        pid = f"{source}-{index}" if source is not None and index is not None else default_id
    else:
        kind = row.get("kind") or "math"
        # Arrow gives every row every column, so a missing field reads as None
        gt = next((row[k] for k in ("answer", "reference") if row.get(k) is not None), None)
        if gt is None:
            raise ValueError("no `answer`/`reference` field")
        pid = str(row["id"]) if row.get("id") is not None else default_id
    if kind not in ("math", "code"):
        raise ValueError(f"kind/ability {kind!r} is neither math nor code")
    reference = _math_answer(gt) if kind == "math" else _spec_text(gt)
    return Problem(pid, messages, kind, reference)


def with_suffix(messages: list[dict[str, str]], suffix: str) -> list[dict[str, str]]:
    """Copy of `messages` with `suffix` appended to the last user message."""
    if not suffix:
        return messages
    out = [dict(m) for m in messages]
    for m in reversed(out):
        if m["role"] == "user":
            sep = "" if suffix[:1].isspace() or not m["content"] else " "
            m["content"] = m["content"] + sep + suffix
            return out
    raise ValueError("prompt has no user message to append the suffix to")


def rows_to_problems(rows: Any, source_name: str, suffix: str = "") -> list[Problem]:
    """Convert rows (any iterable of dicts), skipping bad ones with a warning; ids made unique."""
    log = get_logger(source=source_name)
    problems: list[Problem] = []
    seen: set[str] = set()
    skipped = 0
    for i, row in enumerate(rows):
        try:
            p = row_to_problem(row, f"{source_name}-{i}")
            p.messages = with_suffix(p.messages, suffix)
        except (ValueError, TypeError, AttributeError) as e:
            skipped += 1
            if skipped <= MAX_ROW_WARNINGS:
                log.warning("data.row_skipped", row=i, reason=str(e))
            continue
        if p.id in seen:
            p.id = f"{p.id}~{i}"
        seen.add(p.id)
        problems.append(p)
    if skipped:
        log.warning("data.rows_skipped", skipped=skipped, kept=len(problems))
    if not problems:
        raise DataError(f"{source_name}: no usable problem ({skipped} rows skipped)")
    return problems


# ---------------------------------------------------------------- sources


def _load_rows(source: str, split: str, limit: int | None) -> Any:
    """A `datasets.Dataset` for a local file, a local folder, or a Hub name."""
    import datasets

    path = Path(source).expanduser()
    try:
        if path.is_file():
            builder = LOCAL_FORMATS.get(path.suffix.lower())
            if builder is None:
                raise DataError(f"{source}: unknown file type (expected {', '.join(LOCAL_FORMATS)})")
            ds = datasets.load_dataset(builder, data_files={"train": str(path)}, split="train")
        else:
            ds = datasets.load_dataset(str(path) if path.is_dir() else source, split=split)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ArrowInvalid…)
        raise DataError(f"cannot load data source {source!r} (split {split!r}): {type(e).__name__}: {e}") from None
    if limit is not None and limit < len(ds):
        ds = ds.select(range(limit))
    return ds


def load_problems(cfg: "DataConfig") -> list[Problem]:
    """All problems of `cfg.source` (see the module docstring), at most `cfg.limit`, with the suffix."""
    if cfg.source.startswith("toy:"):
        problems = toy_problems(cfg.source[4:], cfg.limit, seed=cfg.seed)
        for p in problems:
            p.messages = with_suffix(p.messages, cfg.prompt_suffix)
        return problems
    rows = _load_rows(cfg.source, cfg.split, cfg.limit)
    name = Path(cfg.source).stem if Path(cfg.source).expanduser().exists() else cfg.source.rsplit("/", 1)[-1]
    return rows_to_problems(rows, name, cfg.prompt_suffix)


def tokenize_prompts(
    problems: list[Problem], tokenizer: Any, max_prompt_tokens: int | None = None
) -> list[tuple[Problem, np.ndarray]]:
    """Prompt token ids (int32) through the tokenizer's chat template with the generation prompt.
    Problems longer than `max_prompt_tokens` are dropped (a truncated prompt is a different problem),
    with one warning giving the count."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the model's tokenizer has no chat template (tokenizer_config.json / chat_template.jinja)")
    out = []
    dropped = 0
    for p in problems:
        ids = tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=True)
        if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        arr = np.asarray(ids, dtype=np.int32)
        if max_prompt_tokens is not None and len(arr) > max_prompt_tokens:
            dropped += 1
            continue
        out.append((p, arr))
    if dropped:
        log = get_logger(max_prompt_tokens=max_prompt_tokens)
        log.warning("data.prompts_too_long", dropped=dropped, kept=len(out))
    return out
