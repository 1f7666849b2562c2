"""deploy/plot.py: curves.png gains the per-kind reward and eval panels when a run logged them."""

from __future__ import annotations

import json

from deploy.plot import PANELS, panels, plot_run


def test_panels_follow_the_logged_keys():
    assert panels([{"step": 1, "reward/mean": 0.5}]) == PANELS
    rows = [{"step": 1, "reward/mean": 0.5, "reward/math/mean": 0.6, "reward/code/mean": 0.1, "reward/math/samples": 8,
             "reward/errors/bad_reference": 1},
            {"step": 5, "eval/avg@4": 0.3, "eval/pass@1": 0.3, "eval/pass@4": 0.6, "eval/aime/avg@4": 0.2}]
    got = dict((title, keys) for title, keys, _ in panels(rows))
    assert got["reward by kind / source"] == ["reward/code/mean", "reward/math/mean"]
    assert got["eval"] == ["eval/avg@4", "eval/pass@1", "eval/pass@4"]


def test_plot_writes_a_png_with_eval(tmp_path):
    rows = [{"step": s, "reward/mean": s / 10, "reward/math/mean": s / 8, "entropy/mean": 0.3} for s in range(1, 7)]
    rows += [{"step": 3, "eval/avg@2": 0.25, "eval/pass@2": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = plot_run(tmp_path)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
