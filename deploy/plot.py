"""`or1 plot RUN_DIR`: curves.png from metrics.jsonl — reward (with response length and truncation),
entropy and its coefficient, staleness, throughput."""

from __future__ import annotations

from pathlib import Path

from common.metrics import read_jsonl

PANELS = [
    ("reward", ["reward/mean"], ["reward/truncated_frac"]),
    ("entropy", ["entropy/mean"], ["entropy/coef"]),
    ("staleness", ["staleness/mean", "staleness/max"], []),
    ("throughput", ["actor/tokens_per_s"], ["learner/step_s"]),
]


def plot_run(run_dir: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "step" in r]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    for ax, (title, left, right) in zip(axes.flat, PANELS):
        _series(ax, rows, left, loc="upper left")
        ax.set_title(title)
        ax.set_xlabel("step")
        if right:
            _series(ax.twinx(), rows, right, style="--", loc="lower right")
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
            ax.plot(xs, ys, style, label=key)
    if any(ax.get_lines()):
        ax.legend(loc=loc, fontsize=8)
