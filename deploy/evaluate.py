"""`or1 eval`, `or1 filter` and `or1 check-data`.

eval        Sample n responses per problem with an actor engine, score them with the training rewards
            (learner/evaluation.py), print avg@n and the unbiased pass@k per data source as one JSON
            line (`--out FILE`: each problem's rewards as JSONL).
filter      Skywork-OR1's offline difficulty filter (§6.2): keep the problems the model solves s of N
            times with 0 < s < N (N = 16 for math, 8 for code by default), i.e. drop the ones it always
            or never solves. A row that carries `extra_info.model_difficulty` is judged by it without
            sampling: keep iff 0 < d < 16 for the chosen model (the released filter scripts keep
            d ∈ [1, 15]; the rule is symmetric, so whether d counts correct or incorrect answers — the
            dataset card does not say — does not matter). Kept rows are written back as they were read:
            a jsonl line byte for byte, a parquet row in the input's schema (parquet → parquet), every
            other case as JSON of the row. `--report FILE`: one JSONL record per problem (how it was
            judged, solved/samples, kept).
check-data  The learner's pre-flight data check (common/data.py `prepare`): per source and kind,
            usable / unparseable / too-long rows and the commonest reasons; exit 1 when the learner
            would refuse to start.
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Sequence

from common.config import Config, DataConfig

DIFFICULTY_SAMPLES = 16  # Skywork-OR1-RL-Data's model_difficulty is measured over 16 samples


# ---------------------------------------------------------------- shared


def _data_config(cfg: Config, data: str | None, limit: int | None, split: str = "train") -> DataConfig:
    """`--data FILE` (one source, the config's prompt suffix), else the config's learner.data."""
    d = cfg.learner.data
    if data:
        return DataConfig(source=data, split=split, limit=limit, prompt_suffix=d.prompt_suffix, seed=d.seed)
    if limit is not None:
        if d.sources:
            return d.model_copy(update={"sources": [s.model_copy(update={"limit": limit}) for s in d.sources]})
        return d.model_copy(update={"limit": limit})
    return d


def _engine(model: str, cfg: Config, longest_prompt: int, max_tokens: int) -> Any:
    """An actor engine whose context holds the longest prompt and `max_tokens` of response."""
    from actors.engine import make_engine

    context = max(cfg.actor.max_model_len or 0, longest_prompt + max_tokens)
    actor = cfg.actor.model_copy(update={"max_model_len": context})
    return make_engine(cfg.actor.engine, model, actor)


def _sample(model: str, cfg: Config, pairs: Sequence, samples: dict[str, int], temperature: float,
            max_tokens: int, seed: int) -> list:
    """generate_and_score with an engine and a score pool made (and closed) here."""
    from bus.messages import SamplingSpec
    from learner.evaluation import generate_and_score
    from rewards.pool import ScorePool

    if not pairs:
        return []
    engine = _engine(model, cfg, max(len(ids) for _, ids in pairs), max_tokens)
    spec = SamplingSpec(n=1, temperature=temperature, top_p=cfg.learner.sampling.top_p, max_tokens=max_tokens,
                        seed=seed)
    try:
        with ScorePool(cfg.reward.workers, cfg.reward) as pool:
            return generate_and_score(engine, pairs, samples, spec, pool, cfg.learner.loss.zero_truncated_reward)
    finally:
        engine.close()


# ---------------------------------------------------------------- eval


def parse_ks(text: str | None, n: int) -> list[int]:
    """"1,4,16" → [1, 4, 16] (each 1 ≤ k ≤ n); None → 1, 2, 4, … n."""
    from learner.evaluation import default_ks

    if not text:
        return default_ks(n)
    try:
        ks = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--k takes comma-separated integers, got {text!r}") from None
    if not ks or ks[0] < 1 or ks[-1] > n:
        raise ValueError(f"--k values must lie in [1, --samples={n}], got {text!r}")
    return ks


def evaluate(model: str, cfg: Config, *, data: str | None = None, samples: int = 4, temperature: float | None = None,
             max_tokens: int | None = None, ks: str | None = None, limit: int | None = None,
             out: str | None = None, split: str = "train") -> int:
    """`or1 eval` (see the module docstring)."""
    from transformers import AutoTokenizer

    from common.data import load_problems, tokenize_prompts
    from learner.evaluation import summarize_by_source

    k_list = parse_ks(ks, samples)
    lc = cfg.learner
    temperature = temperature if temperature is not None else lc.sampling.temperature
    max_tokens = max_tokens or lc.stages[-1].max_response_tokens
    pairs = tokenize_prompts(load_problems(_data_config(cfg, data, limit, split)), AutoTokenizer.from_pretrained(model))
    results = _sample(model, cfg, pairs, {"math": samples, "code": samples}, temperature, max_tokens, lc.data.seed)
    summary = summarize_by_source([(p, r) for p, r, _ in results], k_list)
    if out:
        with open(out, "w") as f:
            for p, r, group in results:
                f.write(json.dumps({"id": p.id, "data_source": p.data_source, "kind": p.kind, "rewards": r,
                                    "solved": sum(x >= 1.0 for x in r),
                                    "response_len": [len(s.token_ids) for s in group],
                                    "responses": [s.text for s in group]}) + "\n")
    print(json.dumps({"model": model, "samples": samples, "temperature": temperature, "max_tokens": max_tokens,
                      **summary["overall"], "sources": summary["sources"]}))
    return 0


# ---------------------------------------------------------------- filter


def difficulty_key(model: str, keys: Sequence[str], chosen: str | None) -> str | None:
    """The model_difficulty entry to judge by: `chosen`, else the longest key contained in the model's
    name (case-insensitive), else None."""
    if chosen:
        return chosen
    name = model.lower()
    hits = [k for k in keys if k.lower() in name]
    return max(hits, key=len) if hits else None


def keep(solved: int, samples: int) -> bool:
    """Skywork-OR1's rule: neither always nor never solved."""
    return 0 < solved < samples


def offline_filter(model: str, out: str, cfg: Config, *, data: str | None = None, math_samples: int = 16,
                   code_samples: int = 8, use_difficulty: bool = True, difficulty_model: str | None = None,
                   difficulty_samples: int = DIFFICULTY_SAMPLES, temperature: float | None = None,
                   max_tokens: int | None = None, report: str | None = None, split: str = "train") -> int:
    """`or1 filter` (see the module docstring)."""
    from common.data import DataError, SourceReport, data_sources, load_rows, rows_to_problems

    lc = cfg.learner
    sources = data_sources(_data_config(cfg, data, None, split))
    rows_of, problems, reports = {}, [], {}
    for src in sources:
        rows_of[src.name] = load_rows(src)
        reports[src.name] = SourceReport(src.name)
        problems += rows_to_problems(rows_of[src.name], src, report=reports[src.name], check_references=True)
    keys = sorted({k for p in problems if p.difficulty for k in p.difficulty})
    key = difficulty_key(model, keys, difficulty_model) if use_difficulty else None
    if use_difficulty and keys and key is None:
        raise DataError(f"rows carry extra_info.model_difficulty for {', '.join(keys)}: pass --difficulty-model NAME "
                        "to filter by it, or --no-difficulty to sample with MODEL")
    verdicts: dict[int, dict[str, Any]] = {}
    to_sample = []
    for i, p in enumerate(problems):
        if key is not None and p.difficulty and key in p.difficulty:
            d = p.difficulty[key]
            verdicts[i] = {"method": "difficulty", "solved": d, "samples": difficulty_samples,
                           "kept": keep(d, difficulty_samples)}
        else:
            to_sample.append(i)
    if to_sample:
        _sample_verdicts(model, cfg, problems, to_sample, verdicts, {"math": math_samples, "code": code_samples},
                         temperature if temperature is not None else lc.sampling.temperature,
                         max_tokens or lc.stages[-1].max_response_tokens)
    kept = defaultdict(list)
    for i, p in enumerate(problems):
        if verdicts[i]["kept"]:
            kept[p.source].append(p.row)
    _write_rows(Path(out), sources, rows_of, kept)
    if report:
        with open(report, "w") as f:
            for i, p in enumerate(problems):
                f.write(json.dumps({"source": p.source, "row": p.row, "id": p.id, "kind": p.kind, **verdicts[i]}) + "\n")
    print(json.dumps(_filter_summary(problems, verdicts, reports, out, key)))
    return 0


def _sample_verdicts(model: str, cfg: Config, problems: list, todo: list[int], verdicts: dict, samples: dict[str, int],
                     temperature: float, max_tokens: int) -> None:
    from transformers import AutoTokenizer

    from common.data import tokenize_prompts

    pairs = tokenize_prompts([problems[i] for i in todo], AutoTokenizer.from_pretrained(model))
    index = {id(problems[i]): i for i in todo}
    for p, rewards, _ in _sample(model, cfg, pairs, samples, temperature, max_tokens, cfg.learner.data.seed):
        solved = sum(r >= 1.0 for r in rewards)
        verdicts[index[id(p)]] = {"method": "sampled", "solved": solved, "samples": len(rewards),
                                  "kept": keep(solved, len(rewards))}


def _write_rows(out: Path, sources: Sequence, rows_of: dict[str, Sequence], kept: dict[str, list[int]]) -> None:
    """The kept rows, each as it was read (see the module docstring)."""
    from common.data import ArrowRows, JsonlRows

    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = []
        for src in sources:
            rows, idx = rows_of[src.name], sorted(kept[src.name])
            tables.append(rows.table.take(idx) if isinstance(rows, ArrowRows)
                          else pa.Table.from_pylist([rows[i] for i in idx]))
        if len(tables) > 1 and len({t.schema for t in tables}) > 1:
            raise ValueError("sources of different schemas cannot share one parquet file: write .jsonl")
        pq.write_table(tables[0] if len(tables) == 1 else pa.concat_tables(tables), out)
        return
    with open(out, "wb") as f:
        for src in sources:
            rows = rows_of[src.name]
            for i in sorted(kept[src.name]):
                line = rows.line(i) if isinstance(rows, JsonlRows) else \
                    json.dumps(rows[i], ensure_ascii=False, default=str).encode()
                f.write(line + b"\n")


def _filter_summary(problems: list, verdicts: dict, reports: dict, out: str, key: str | None) -> dict[str, Any]:
    per: dict[str, Counter] = defaultdict(Counter)
    for i, p in enumerate(problems):
        v = verdicts[i]
        c = per[p.source]
        c["problems"] += 1
        c["kept"] += v["kept"]
        c[f"by_{v['method']}"] += 1
        c[f"{v['method']}_{'always' if v['solved'] == v['samples'] else 'never' if v['solved'] == 0 else 'mixed'}"] += 1
    for name, r in reports.items():
        per[name]["unparseable"] = r.total("unparseable")
    total = Counter()
    for c in per.values():
        total.update(c)
    return {"problems": total["problems"], "kept": total["kept"], "dropped": total["problems"] - total["kept"],
            "unparseable": total["unparseable"], "by_difficulty": total["by_difficulty"],
            "sampled": total["by_sampled"], "difficulty_model": key, "out": out,
            "sources": {k: dict(v) for k, v in per.items()}}


# ---------------------------------------------------------------- check-data


def check_data(cfg: Config, as_json: bool = False) -> int:
    """`or1 check-data` (see the module docstring)."""
    from transformers import AutoTokenizer

    from actors.engine import model_context_len
    from common.data import format_report, prepare, prompt_limit, report_dict, unusable_error
    from learner.run import resolve_model

    data = cfg.learner.data
    model = resolve_model(cfg)
    bound = prompt_limit(cfg, model_context_len(model))  # as the learner bounds them
    limit = bound.tokens
    prepared = prepare(data, AutoTokenizer.from_pretrained(model), limit)
    prepared.limit = bound
    why = unusable_error(prepared, data.max_unusable_frac)
    refused = bool(why) and not (data.allow_unusable and prepared.pairs)
    if as_json:
        print(json.dumps({"max_prompt_tokens": limit, "sources": report_dict(prepared), "usable": len(prepared.pairs),
                          "learner_starts": not refused, "error": why}))
    else:
        print(format_report(prepared, limit))
        print(f"usable problems: {len(prepared.pairs)}")
        if why:
            print(("refused: " if refused else "allowed (learner.data.allow_unusable): ") + why, file=sys.stderr)
    return 1 if refused else 0
