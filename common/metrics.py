"""Metrics sinks: one interface (`write(step, metrics)` + `close()`), jsonl and TensorBoard writers.

Pure code returns metric dicts with namespaced keys (`loss/…`, `entropy/…`, `actor/…`, `bus/…`);
the caller that owns a sink logs them. Values are floats; a key holding a list is written to the
jsonl file as is (histograms) and skipped by TensorBoard's scalar writer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping, Protocol


class MetricsSink(Protocol):
    def write(self, step: int, metrics: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """One JSON object per line: {"step": k, "time": unix seconds, **metrics}. Flushed every write
    so `or1 plot` and tail -f see a live run."""

    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a", buffering=1)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._f.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}, default=float) + "\n")

    def close(self) -> None:
        self._f.close()


class TensorBoardSink:
    """Scalars to TensorBoard event files: one event per step holding all of its scalars, written
    with torch's FileWriter (imported lazily) and flushed every write so TensorBoard sees a live
    run. One `Summary` of ~90 values costs ~0.5 ms; `SummaryWriter.add_scalar` per value cost ~4.5
    ms a step, on the learner's critical path between two steps (the embedded run steps every
    ~0.1 s). TensorBoard reads each value of the event as that tag's point at this step."""

    def __init__(self, log_dir: str | Path):
        from torch.utils.tensorboard.writer import FileWriter

        self._w = FileWriter(str(log_dir))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=key, simple_value=float(value)) for key, value in metrics.items()
                  if isinstance(value, (int, float)) and not isinstance(value, bool)]
        self._w.add_summary(Summary(value=values), step)
        self._w.flush()

    def close(self) -> None:
        self._w.close()


class MultiSink:
    def __init__(self, *sinks: MetricsSink):
        self.sinks = list(sinks)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        for s in self.sinks:
            s.write(step, metrics)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


class NullSink:
    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlTail:
    """The records appended to a live metrics.jsonl since the last `new()` call: each line is read
    and parsed once (re-reading the whole file every half second cost `or1 run` ~13 % of a core by
    the end of a short run). A line still being written waits for its newline."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._offset = 0
        self._partial = b""

    def new(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl (a torn last line of a live run is skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
