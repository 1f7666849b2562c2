"""`or1 plot RUN_DIR`: curves.png from metrics.jsonl — reward (with response length and truncation),
reward per kind and per data source, entropy and its coefficient, staleness, throughput, and the
periodic validation (eval/avg@n, eval/pass@k) when the run has it."""

from __future__ import annotations

import re
from pathlib import Path

from common.metrics import read_jsonl

PANELS = [
    ("reward", ["reward/mean"], ["reward/truncated_frac"]),
    ("entropy", ["entropy/mean"], ["entropy/coef"]),
    ("staleness", ["staleness/mean", "staleness/max"], []),
    ("throughput", ["actor/tokens_per_s"], ["learner/step_s"]),
]
KIND_MEAN = re.compile(r"^reward/[^/]+/mean$")  # reward/math/mean, reward/<source>/mean
EVAL_OVERALL = re.compile(r"^eval/(avg|pass)@\d+$")  # eval/avg@4, eval/pass@1 (not per source)


def panels(rows: list[dict]) -> list[tuple[str, list[str], list[str]]]:
    """The fixed panels, plus "reward by kind / source" and "eval" when the run logged those keys."""
    keys = sorted({k for r in rows for k in r})
    out = list(PANELS)
    by_kind = [k for k in keys if KIND_MEAN.match(k)]
    if by_kind:
        out.insert(1, ("reward by kind / source", by_kind, []))
    evals = sorted((k for k in keys if EVAL_OVERALL.match(k)), key=lambda k: (k.split("@")[0], int(k.split("@")[1])))
    if evals:
        out.append(("eval", evals, []))
    return out


def plot_run(run_dir: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "step" in r]
    chosen = panels(rows)
    cols = 2 if len(chosen) <= 4 else 3
    nrows = -(-len(chosen) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 3.5 * nrows), constrained_layout=True, squeeze=False)
    for ax, (title, left, right) in zip(axes.flat, chosen):
        _series(ax, rows, left, loc="upper left")
        ax.set_title(title)
        ax.set_xlabel("step")
        if right:
            _series(ax.twinx(), rows, right, style="--", loc="lower right")
    for ax in list(axes.flat)[len(chosen):]:
        ax.set_visible(False)
    fig.suptitle(f"or1 run {run_dir.name}")
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _series(ax, rows: list[dict], keys: list[str], style: str = "-", loc: str = "best") -> None:
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            xs, ys = zip(*pts)
            # eval points are sparse: mark them so a single one still shows
            ax.plot(xs, ys, style + ("o" if key.startswith("eval/") else ""), label=key)
    if any(ax.get_lines()):
        ax.legend(loc=loc, fontsize=8)
