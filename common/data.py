"""Problems: the records the learner hands out, loaded from built-in toy sets, local files, or the Hub.

Sources (`data_sources(DataConfig)`): either the short form `source`/`split`/`limit`, or several
`[[learner.data.sources]]` (path, split, weight, limit, kind, name) mixed by weight
(learner/mixture.py). Each source is read as rows (`load_rows`):
- `toy:NAME` → `toy_problems(NAME)` (generated, no files) as plain-schema rows: `addition` is every
  single-digit sum "a+b" (100 problems, kind math, reference the sum); `code` is small stdin/stdout
  programs (kind code, reference a JSON test spec `{"inputs": [...], "outputs": [...]}`); `chain` is
  200 running sums of 5–7 digits ("4+7+2+9+5", kind math, reference the sum) that the warm-started
  model answers with a worked scratchpad of 35–60 tokens (`chain_steps`).
- a local `.jsonl` / `.json` (JSON lines, or one JSON array) / `.parquet` file, read as it is (no
  schema unification, so `or1 filter` writes kept rows back unchanged);
- a local folder or a Hub name → `datasets.load_dataset(name, split=split)`.
Each row becomes a Problem by one of two schemas:
- Skywork-OR1-RL-Data: `prompt` (list of {role, content}), `ability` ("math"/"code"),
  `reward_model.ground_truth` (JSON text: for math a list of answers, any of which is right, or a
  string; for code the test spec, passed through as text), `extra_info.index`,
  `extra_info.model_difficulty`, `data_source`; id `"{data_source}-{index}"`.
- plain: `prompt` (a string → one user message, or a message list), optional `id`, `kind` (default
  the source's kind, else math), `data_source`, and `answer` or `reference` (read like ground_truth
  above; a code spec that is not text is JSON-encoded); id the `id` field or `"{source name}-{row}"`.
A math reference keeps every gold answer: one answer as its text, several as a JSON list of strings,
which the math scorer reads as "any of these" (rewards/math.py `parse_golds`).

Usable rows (`prepare`): a row is unusable when it fits neither schema, when the scorer cannot parse
its reference (the scorer's own parsing: `parse_golds` for math, `rewards.code.parse_spec` and the
static part of the assertion plan for code), or when its chat-templated prompt is longer than the
limit (`prompt_limit`: learner.data.max_prompt_tokens, a set actor.max_model_len, or the model's own
context, each less the longest stage's responses). `prepare` counts these per source and kind
(`or1 check-data`); `training_data` announces the prompts too long (with the setting that bounds them)
and refuses to start when more than `max_unusable_frac` of a source is unusable, unless
`allow_unusable`. `run_context` is the context the run's actors then need (actor.max_model_len). Ids are made
unique by suffixing `~row` (and prefixing `source:` across sources). `prompt_suffix` is appended to the
last user message (joined with a space unless it starts with whitespace).
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from common.log import get_logger

if TYPE_CHECKING:
    from common.config import Config, DataConfig

LOCAL_FORMATS = (".jsonl", ".json", ".parquet")
MAX_ROW_WARNINGS = 5
"""Skipped rows logged one by one; beyond this only the count is logged."""
KINDS = ("math", "code")
USABLE, UNPARSEABLE, TOO_LONG = "usable", "unparseable", "too_long"


class DataError(ValueError):
    """A data source that cannot be read or holds no usable problem."""


@dataclass
class Problem:
    """One prompt: `messages` in chat form, `kind` "math" | "code", `reference` the gold answer(s)
    (math) or the JSON test-spec text (code). `source` is the configured source's name, `data_source`
    the row's own (a benchmark's name in eval files; else the source's), `row` the row's index in its
    source, `difficulty` its `extra_info.model_difficulty` ({model: count of 16}) if any."""

    id: str
    messages: list[dict[str, str]]
    kind: str
    reference: str
    source: str = ""
    data_source: str = ""
    row: int = -1
    difficulty: dict[str, int] | None = None


@dataclass(frozen=True)
class Source:
    """One resolved data source (see `data_sources`)."""

    name: str
    path: str
    split: str = "train"
    weight: float = 1.0
    limit: int | None = None
    kind: str | None = None
    prompt_suffix: str = ""
    seed: int = 0


# ---------------------------------------------------------------- toy sets


def _addition(seed: int) -> list[Problem]:
    pairs = [(a, b) for a in range(10) for b in range(10)]
    random.Random(seed).shuffle(pairs)
    return [Problem(f"add-{a}+{b}", [{"role": "user", "content": f"{a}+{b}"}], "math", str(a + b)) for a, b in pairs]


def _chain(seed: int, n: int = 200) -> list[Problem]:
    """Running sums: "4+7+2+9+5" (5 to 7 digits 1-9), worked step by step (`chain_steps`). The set
    is fixed (drawn with seed 0: the warm start trains on it, and a tiny model learns these sums
    more than summing, 3 % right on a set drawn with another seed); `seed` orders it, as for addition."""
    rng = random.Random(0)
    out, seen = [], set()
    while len(out) < n:
        terms = tuple(rng.randint(1, 9) for _ in range(rng.choice((5, 6, 7))))
        if terms in seen:
            continue
        seen.add(terms)
        text = "+".join(map(str, terms))
        out.append(Problem(f"chain-{text}", [{"role": "user", "content": text}], "math", str(sum(terms))))
    random.Random(seed).shuffle(out)
    return out


def chain_steps(question: str) -> str:
    """The worked scratchpad of a `chain` problem: " 4+7=11, 11+2=13, 13+9=22, 22+5=27." (the
    warm start's target, followed by the boxed answer)."""
    terms = [int(t) for t in question.split("+")]
    steps, acc = [], terms[0]
    for t in terms[1:]:
        steps.append(f"{acc}+{t}={acc + t}")
        acc += t
    return " " + ", ".join(steps) + "."


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


# The tiny model's tokenizer is trained on these sets (common/tinymodel.py): changing one changes
# the tokenizer of new builds, so add a set rather than edit one.
TOY_SETS = {"addition": _addition, "code": _code, "chain": _chain}


def toy_problems(name: str, n: int | None = None, seed: int = 0) -> list[Problem]:
    """The built-in set `name` in a seeded order, at most `n` problems (every set is finite)."""
    if name not in TOY_SETS:
        raise DataError(f"unknown toy set {name!r}; known: {', '.join(sorted(TOY_SETS))}")
    problems = TOY_SETS[name](seed)
    return problems[:n] if n is not None else problems


# ---------------------------------------------------------------- sources


def _source_name(path: str, split: str) -> str:
    if path.startswith("toy:"):
        return path[4:]
    p = Path(path).expanduser()
    if p.is_file():
        return p.stem
    base = p.name if p.is_dir() else path.rstrip("/").rsplit("/", 1)[-1]
    return base if split == "train" else f"{base}-{split}"


def data_sources(cfg: "DataConfig") -> list[Source]:
    """The configured sources, named (unique, metric-safe, never a kind's name)."""
    from common.config import RESERVED_SOURCE_NAMES

    if cfg.sources:
        specs = [(s.path, s.split, s.weight, s.limit, s.kind, s.name,
                  cfg.prompt_suffix if s.prompt_suffix is None else s.prompt_suffix) for s in cfg.sources]
    else:
        specs = [(cfg.source, cfg.split, 1.0, cfg.limit, None, "", cfg.prompt_suffix)]
    taken = {name for *_, name, _ in specs if name}
    out = []
    for path, split, weight, limit, kind, name, suffix in specs:
        if not name:
            name = re.sub(r"[^A-Za-z0-9_.+-]", "_", _source_name(path, split)) or "data"
            if name in RESERVED_SOURCE_NAMES:
                name += "-data"
            base, k = name, 2
            while name in taken:
                name, k = f"{base}-{k}", k + 1
            taken.add(name)
        elif any(s.name == name for s in out):
            raise DataError(f"two data sources are named {name!r}: names must be unique")
        out.append(Source(name, path, split, weight, limit, kind, suffix, cfg.seed))
    return out


@dataclass
class BadRow:
    """A row that could not even be read (e.g. a jsonl line that is not JSON)."""

    reason: str


class JsonlRows(Sequence):
    """The rows of a JSON-lines file, read on demand (only line offsets are held); `line(i)` is the
    row's original text, for writing it back unchanged."""

    def __init__(self, path: Path, limit: int | None = None):
        self.path = path
        self._spans: list[tuple[int, int]] = []
        with open(path, "rb") as f:
            pos = 0
            for raw in f:
                if raw.strip():
                    self._spans.append((pos, len(raw)))
                    if limit is not None and len(self._spans) >= limit:
                        break
                pos += len(raw)

    def __len__(self) -> int:
        return len(self._spans)

    def line(self, i: int) -> bytes:
        start, size = self._spans[i]
        with open(self.path, "rb") as f:
            f.seek(start)
            return f.read(size).rstrip(b"\r\n")

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        return _json_row(self.line(i))

    def __iter__(self) -> Iterator[Any]:
        with open(self.path, "rb") as f:
            for start, size in self._spans:
                f.seek(start)
                yield _json_row(f.read(size))


def _json_row(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        return BadRow(f"not JSON: {e}")


class ArrowRows(Sequence):
    """The rows of a parquet file (an Arrow table, memory-mapped), as Python dicts on demand."""

    def __init__(self, table: Any):
        self.table = table

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        return self.table.slice(i, 1).to_pylist()[0]

    def __iter__(self) -> Iterator[Any]:
        for batch in self.table.to_batches(max_chunksize=1024):
            yield from batch.to_pylist()


def toy_rows(name: str, limit: int | None, seed: int) -> list[dict[str, Any]]:
    """A toy set as plain-schema rows."""
    return [{"id": p.id, "prompt": p.messages, "kind": p.kind, "reference": p.reference}
            for p in toy_problems(name, limit, seed=seed)]


def load_rows(src: Source) -> Sequence[Any]:
    """The source's rows (dicts; a `BadRow` for a line that cannot be read), at most `src.limit`."""
    if src.path.startswith("toy:"):
        return toy_rows(src.path[4:], src.limit, src.seed)
    path = Path(src.path).expanduser()
    if path.is_file():
        return _local_rows(path, src.limit)
    import datasets

    try:
        ds = datasets.load_dataset(str(path) if path.is_dir() else src.path, split=src.split)
    except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ValueError…)
        raise DataError(f"cannot load data source {src.path!r} (split {src.split!r}): {type(e).__name__}: {e}"
                        " — a Hub name or folder needs its split (Skywork-OR1-RL-Data: math, code)") from None
    if src.limit is not None and src.limit < len(ds):
        ds = ds.select(range(src.limit))
    return ds


def _local_rows(path: Path, limit: int | None) -> Sequence[Any]:
    suffix = path.suffix.lower()
    if suffix not in LOCAL_FORMATS:
        raise DataError(f"{path}: unknown file type (expected {', '.join(LOCAL_FORMATS)})")
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path, memory_map=True)
            return ArrowRows(table.slice(0, limit) if limit is not None else table)
        if suffix == ".json" and path.read_bytes()[:64].lstrip()[:1] == b"[":
            rows = json.loads(path.read_text())
            return rows[:limit] if limit is not None else rows
        return JsonlRows(path, limit)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {type(e).__name__}: {e}") from None


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


def math_reference(ground_truth: Any) -> str:
    """Every gold answer of a ground truth, as the math scorer reads it back: one answer as its text,
    several as a JSON list of strings ("any of these"). Accepts a JSON list or string (as text or
    decoded) or a number."""
    from rewards.math import parse_golds

    value = ground_truth
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return value
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise ValueError("ground_truth is an empty list")
    for v in items:
        if isinstance(v, (dict, list, tuple)) or v is None:
            raise ValueError(f"math ground_truth is not an answer: {str(v)[:80]!r}")
    golds = [str(v) for v in items]
    text = golds[0] if len(golds) == 1 else json.dumps(golds)
    if parse_golds(text) != [g.strip() for g in golds]:  # e.g. one answer that reads as a JSON list
        text = json.dumps(golds)
    return text


def _spec_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _difficulty(extra: dict) -> dict[str, int] | None:
    d = extra.get("model_difficulty")
    if not isinstance(d, dict):
        return None
    out = {str(k): int(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out or None


def row_to_problem(row: dict[str, Any], default_id: str, default_kind: str | None = None) -> Problem:
    """One dataset row in either schema (see the module docstring); ValueError names what is wrong."""
    if not isinstance(row, dict):
        raise ValueError(row.reason if isinstance(row, BadRow) else f"row is a {type(row).__name__}, not an object")
    if row.get("prompt") is None:
        raise ValueError("no `prompt` field")
    messages = _messages(row["prompt"])
    extra = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
    if isinstance(row.get("reward_model"), dict) and row["reward_model"].get("ground_truth") is not None:
        stated = row.get("ability")
        gt = row["reward_model"]["ground_truth"]
        source, index = row.get("data_source"), extra.get("index")
        pid = f"{source}-{index}" if source is not None and index is not None else default_id
    else:
        stated = row.get("kind")
        # Arrow gives every row every column, so a missing field reads as None
        gt = next((row[k] for k in ("answer", "reference") if row.get(k) is not None), None)
        if gt is None:
            raise ValueError("no `answer`/`reference` field")
        pid = str(row["id"]) if row.get("id") is not None else default_id
    if stated and default_kind and stated != default_kind:
        raise ValueError(f"row kind {stated!r} differs from the source's kind {default_kind!r}")
    kind = stated or default_kind or "math"
    if kind not in KINDS:
        raise ValueError(f"kind/ability {kind!r} is neither math nor code")
    reference = math_reference(gt) if kind == "math" else _spec_text(gt)
    data_source = row.get("data_source") if isinstance(row.get("data_source"), str) else ""
    return Problem(pid, messages, kind, reference, data_source=data_source, difficulty=_difficulty(extra))


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


def _static_oracle(prefix: str, setup: list[str], exprs: list[str]) -> list[tuple[bool, Any]]:
    """Stands in for the scorer's sandboxed oracle in the data check: every expected value 'evaluates',
    so building the plan checks what needs no run (parsing, entry point, check(), some assert)."""
    return [(True, None)] * len(exprs)


def reference_error(kind: str, reference: str) -> str:
    """"" when the scorer can parse `reference`, else why not — through the scorer's own parsing:
    math `parse_golds` (some non-empty gold), code `parse_spec` and, for assertion tests, the plan
    (test code and prefix parse, entry point, a check() that checks something) without the oracle's
    sandbox run (a prefix that fails only when run is found when scoring: bad_reference)."""
    if kind == "math":
        from rewards.math import parse_golds

        return "" if any(parse_golds(reference)) else "empty math reference"
    from rewards.asserts import BadReference, build_plan
    from rewards.code import AssertTests, parse_spec

    try:
        spec = parse_spec(reference)
        if isinstance(spec, AssertTests):
            build_plan(spec.test, spec.entry_point, spec.prefix, _static_oracle)
    except (ValueError, BadReference) as e:  # BadReference is a ValueError; named for the reader
        return str(e)
    return ""


@dataclass
class SourceReport:
    """What `prepare` made of one source: rows per kind and outcome, and why rows were unusable."""

    source: str
    rows: int = 0
    counts: dict[str, Counter] = field(default_factory=dict)  # kind -> Counter(usable, unparseable, too_long)
    reasons: Counter = field(default_factory=Counter)  # reason -> rows

    def add(self, kind: str, outcome: str, reason: str = "") -> None:
        self.counts.setdefault(kind, Counter())[outcome] += 1
        if reason:
            self.reasons[reason[:160]] += 1

    def total(self, outcome: str) -> int:
        return sum(c[outcome] for c in self.counts.values())

    @property
    def unusable_frac(self) -> float:
        return 1.0 - self.total(USABLE) / self.rows if self.rows else 0.0


def rows_to_problems(rows: Any, src: Source | str, suffix: str = "", report: SourceReport | None = None,
                     check_references: bool = False) -> list[Problem]:
    """Convert rows (any iterable of dicts), skipping bad ones (counted in `report`, logged); ids made
    unique. `check_references`: also drop rows whose reference the scorer cannot parse."""
    if isinstance(src, str):
        src = Source(src, src, prompt_suffix=suffix)
    report = report if report is not None else SourceReport(src.name)
    log = get_logger(source=src.name)
    problems: list[Problem] = []
    seen: set[str] = set()
    skipped = 0
    for i, row in enumerate(rows):
        report.rows += 1
        kind = src.kind or (row.get("ability") or row.get("kind") if isinstance(row, dict) else None)
        kind = kind if kind in KINDS else "unknown"
        try:
            p = row_to_problem(row, f"{src.name}-{i}", src.kind)
            p.messages = with_suffix(p.messages, src.prompt_suffix)
            why = reference_error(p.kind, p.reference) if check_references else ""
        except (ValueError, TypeError, AttributeError) as e:
            why = str(e) or type(e).__name__
        if why:
            skipped += 1
            report.add(kind, UNPARSEABLE, why)
            if skipped <= MAX_ROW_WARNINGS:
                log.warning("data.row_skipped", row=i, reason=why[:200])
            continue
        p.source, p.row = src.name, i
        p.data_source = p.data_source or src.name
        if p.id in seen:
            p.id = f"{p.id}~{i}"
        seen.add(p.id)
        problems.append(p)
    if skipped:
        log.warning("data.rows_skipped", skipped=skipped, kept=len(problems))
    return problems


def load_source(src: Source, report: SourceReport | None = None, check_references: bool = False) -> list[Problem]:
    """The problems of one source; DataError when it has no usable row."""
    report = report if report is not None else SourceReport(src.name)
    problems = rows_to_problems(load_rows(src), src, report=report, check_references=check_references)
    if not problems:
        raise DataError(f"{src.name} ({src.path}): no usable problem ({report.rows} rows; "
                        f"{_top_reasons(report, 3) or 'empty'})")
    return problems


def _unique_across(groups: list[list[Problem]]) -> list[Problem]:
    out: list[Problem] = []
    seen: set[str] = set()
    for problems in groups:
        for p in problems:
            if p.id in seen:
                p.id = f"{p.source}:{p.id}"
            seen.add(p.id)
            out.append(p)
    return out


def load_problems(cfg: "DataConfig") -> list[Problem]:
    """All problems of every configured source (see the module docstring), with their suffixes."""
    return _unique_across([load_source(src) for src in data_sources(cfg)])


# ---------------------------------------------------------------- tokens, checks


def _prompt_ids(problem: Problem, tokenizer: Any) -> np.ndarray:
    ids = tokenizer.apply_chat_template(problem.messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return np.asarray(ids, dtype=np.int32)


def _need_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the model's tokenizer has no chat template (tokenizer_config.json / chat_template.jinja)")


def tokenize_prompts(
    problems: list[Problem], tokenizer: Any, max_prompt_tokens: int | None = None
) -> list[tuple[Problem, np.ndarray]]:
    """Prompt token ids (int32) through the tokenizer's chat template with the generation prompt.
    Problems longer than `max_prompt_tokens` are dropped (a truncated prompt is a different problem),
    with one warning giving the count."""
    _need_template(tokenizer)
    out = []
    dropped = 0
    for p in problems:
        arr = _prompt_ids(p, tokenizer)
        if max_prompt_tokens is not None and len(arr) > max_prompt_tokens:
            dropped += 1
            continue
        out.append((p, arr))
    if dropped:
        log = get_logger(max_prompt_tokens=max_prompt_tokens)
        log.warning("data.prompts_too_long", dropped=dropped, kept=len(out))
    return out


@dataclass(frozen=True)
class PromptLimit:
    """The longest prompt a run can use (`tokens`; None = any) and what sets it (`setting`, named in
    messages, with `fix`: what to change so more prompts fit)."""

    tokens: int | None
    setting: str = ""
    fix: str = ""


def longest_response(cfg: "Config") -> int:
    return max(s.max_response_tokens for s in cfg.learner.stages)


def prompt_limit(cfg: "Config", model_len: int | None = None) -> PromptLimit:
    """The tightest of: learner.data.max_prompt_tokens; what a set actor.max_model_len leaves after
    the longest stage's responses; what the model's own context (`model_len`, its
    max_position_embeddings) leaves after them. None of them set: no limit. DataError when the
    binding one leaves no room for any prompt."""
    longest = longest_response(cfg)
    data, actor_len = cfg.learner.data, cfg.actor.max_model_len
    bounds = []
    if data.max_prompt_tokens:
        bounds.append(PromptLimit(data.max_prompt_tokens, "learner.data.max_prompt_tokens",
                                  "raise learner.data.max_prompt_tokens"))
    after = f"less the longest stage's max_response_tokens ({longest})"
    if actor_len:
        bounds.append(PromptLimit(actor_len - longest, f"actor.max_model_len ({actor_len}) {after}",
                                  "raise actor.max_model_len, or unset it (the actors then take the run's "
                                  "context)"))
    if model_len:
        bounds.append(PromptLimit(model_len - longest, f"the model's context ({model_len} positions) {after}",
                                  "lower the longest stage's max_response_tokens, or use a model with a "
                                  "longer context"))
    if not bounds:
        return PromptLimit(None)
    tightest = min(bounds, key=lambda b: b.tokens)
    if tightest.tokens < 1:
        raise DataError(f"no prompt can fit: {tightest.setting} leaves {tightest.tokens} tokens; "
                        f"{tightest.fix}")
    return tightest


def prompt_token_limit(cfg: "Config", model_len: int | None = None) -> int | None:
    """Longest usable prompt in tokens (None = any): see `prompt_limit`."""
    return prompt_limit(cfg, model_len).tokens


def run_context(cfg: "Config", pairs: list[tuple[Problem, np.ndarray]]) -> int:
    """Prompt + response tokens the run's actors need (their max_model_len unless set): the longest
    stage's max_response_tokens plus the prompt bound — learner.data.max_prompt_tokens, or what a set
    actor.max_model_len leaves, else the longest prompt in the data."""
    longest = longest_response(cfg)
    caps = [c for c in (cfg.learner.data.max_prompt_tokens,
                        cfg.actor.max_model_len and cfg.actor.max_model_len - longest) if c]
    return longest + (min(caps) if caps else max((len(ids) for _, ids in pairs), default=1))


@dataclass
class Prepared:
    """Usable problems with their prompt ids, and a report per source."""

    pairs: list[tuple[Problem, np.ndarray]]
    reports: list[SourceReport]
    sources: list[Source]
    limit: PromptLimit = PromptLimit(None)

    def total(self, outcome: str) -> int:
        return sum(r.total(outcome) for r in self.reports)

    def metrics(self) -> dict[str, float]:
        """Run-level data counts, written with the first step (data/*)."""
        return {"data/prompts": float(len(self.pairs)), "data/dropped_too_long": float(self.total(TOO_LONG)),
                "data/unparseable": float(self.total(UNPARSEABLE))}


def prepare(cfg: "DataConfig", tokenizer: Any, max_prompt_tokens: int | None) -> Prepared:
    """Load every source, parse every reference with the scorer's parsing, tokenize every prompt;
    count per source and kind: usable, unparseable, too long. Raises DataError only for a source that
    cannot be read at all (the share of unusable rows is judged by the caller)."""
    _need_template(tokenizer)
    sources = data_sources(cfg)
    groups, reports = [], []
    for src in sources:
        report = SourceReport(src.name)
        problems = rows_to_problems(load_rows(src), src, report=report, check_references=True)
        kept = []
        for p in problems:
            ids = _prompt_ids(p, tokenizer)
            if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
                report.add(p.kind, TOO_LONG, f"prompt longer than {max_prompt_tokens} tokens")
                continue
            report.add(p.kind, USABLE)
            kept.append((p, ids))
        groups.append(kept)
        reports.append(report)
    ids_of = {id(p): ids for kept in groups for p, ids in kept}
    problems = _unique_across([[p for p, _ in kept] for kept in groups])
    return Prepared([(p, ids_of[id(p)]) for p in problems], reports, sources)


def unusable_error(prepared: Prepared, max_frac: float) -> str:
    """Why the learner should not start ("" = fine): a source with no usable row, or more than
    `max_frac` of its rows unusable. When prompts too long for the run are among them, it names the
    setting that bounds them and what to change."""
    bad = [r for r in prepared.reports if r.rows == 0 or r.total(USABLE) == 0 or r.unusable_frac > max_frac]
    if not bad:
        return ""
    parts = [f"{r.source}: {r.rows - r.total(USABLE)} of {r.rows} rows unusable ({100 * r.unusable_frac:.1f} %"
             f"{'; ' + _top_reasons(r, 2) if r.reasons else ''})" for r in bad]
    too_long = sum(r.total(TOO_LONG) for r in bad)
    lim = prepared.limit
    fix = (f"{too_long} prompts are longer than {lim.tokens} tokens, the limit set by {lim.setting}: "
           f"{lim.fix}; " if too_long and lim.tokens else "")
    return (f"data check failed (more than {100 * max_frac:g} % of a source unusable): " + "; ".join(parts)
            + f". {fix}See `or1 check-data CONFIG`; fix the data, or set learner.data.allow_unusable = true "
              "to train on the usable rows")


def _top_reasons(report: SourceReport, n: int) -> str:
    return ", ".join(f"{reason} ×{k}" for reason, k in report.reasons.most_common(n))


def format_report(prepared: Prepared, max_prompt_tokens: int | None) -> str:
    """The check as a table: one line per source and kind, then the commonest reasons per source."""
    head = f"{'source':<28} {'kind':<8} {'rows':>8} {'usable':>8} {'unparseable':>12} {'too_long':>9} {'unusable':>9}"
    lines = [f"prompts up to {max_prompt_tokens} tokens" if max_prompt_tokens else "no prompt length limit", head]
    for r, src in zip(prepared.reports, prepared.sources):
        for kind, c in sorted(r.counts.items()):
            rows = sum(c.values())
            frac = 1 - c[USABLE] / rows if rows else 0.0
            lines.append(f"{r.source:<28} {kind:<8} {rows:>8} {c[USABLE]:>8} {c[UNPARSEABLE]:>12} "
                         f"{c[TOO_LONG]:>9} {100 * frac:>8.1f}%")
        if not r.counts:
            lines.append(f"{r.source:<28} {'-':<8} {0:>8} {0:>8} {0:>12} {0:>9} {'-':>9}")
        for reason, k in r.reasons.most_common(5):
            lines.append(f"    {r.source}: {k} × {reason}")
    return "\n".join(lines)


def report_dict(prepared: Prepared) -> dict[str, Any]:
    """The check as JSON: {source: {kind: {usable, unparseable, too_long}, "unusable_frac", "reasons"}}."""
    return {r.source: {**{k: {o: c[o] for o in (USABLE, UNPARSEABLE, TOO_LONG)} for k, c in r.counts.items()},
                       "rows": r.rows, "unusable_frac": round(r.unusable_frac, 6),
                       "reasons": dict(r.reasons.most_common(10))} for r in prepared.reports}


def training_data(cfg: "Config", tokenizer: Any, model_len: int | None = None) -> Prepared:
    """What the learner trains on: `prepare` with the run's prompt limit (`prompt_limit`; `model_len`
    the model's own context), logged per source; prompts too long to fit are counted and announced
    with the setting to change; DataError when a source is too unusable (more than
    learner.data.max_unusable_frac, unless learner.data.allow_unusable)."""
    data = cfg.learner.data
    limit = prompt_limit(cfg, model_len)
    prepared = prepare(data, tokenizer, limit.tokens)
    prepared.limit = limit
    log = get_logger()
    for r in prepared.reports:
        log.info("data.source", source=r.source, rows=r.rows, usable=r.total(USABLE),
                 unparseable=r.total(UNPARSEABLE), too_long=r.total(TOO_LONG),
                 kinds={k: c[USABLE] for k, c in r.counts.items()})
    too_long = prepared.total(TOO_LONG)
    if too_long:
        rows = sum(r.rows for r in prepared.reports)
        log.warning("data.prompts_too_long", dropped=too_long, rows=rows,
                    percent=round(100 * too_long / rows, 2), max_prompt_tokens=limit.tokens,
                    set_by=limit.setting, fix=limit.fix)
    why = unusable_error(prepared, data.max_unusable_frac)
    if why and not (data.allow_unusable and prepared.pairs):
        raise DataError(why)
    if why:
        log.warning("data.unusable_allowed", reason=why)
    return prepared


def training_prompts(cfg: "Config", tokenizer: Any,
                     model_len: int | None = None) -> list[tuple[Problem, np.ndarray]]:
    """The (problem, prompt ids) pairs of `training_data`."""
    return training_data(cfg, tokenizer, model_len).pairs
