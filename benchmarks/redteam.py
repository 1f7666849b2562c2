"""Red-team pass against a live run on this machine: issue 15's "What held" table, rerun.

One small real run (the tiny model, HF engine, learner + 2 actors + 1 reward worker as real `or1`
processes, tests/e2e's small_config) trains while hostile peers and programs attack it. Every probe
targets 127.0.0.1 ports of processes this script started, every loop is bounded, and the script
stops everything it started by itself. Probes (one table row each):

 1  bus fuzz: a few thousand malformed messages to both ports (random bytes, wrong types, truncated
    headers, huge declared lengths, deep nesting, frame-count mismatches, empty frames, 70k-frame
    messages, one 200 MB frame per port) → every one answered, `bus/bad_messages` and
    `weights/bad_messages` in metrics.jsonl equal the counts sent, training goes on
 2  connection flood: 2,000 DEALER + 1,000 raw TCP connections held 20 s → `or1 status` latency,
    training goes on
 3  oversized fields: 100 KB ids / hosts / endpoints / keys / reasons, a 10k-entry stats map →
    refused, and no log line echoes them beyond a bounded prefix
 4  impostors (plaintext): a Hello claiming a live actor's / reward worker's id from another
    session → `id_in_use`, the real actor keeps leasing; a stranger actor asking Status/Set → forbidden
 5  a rogue reward peer (NaN, out of range, wrong count, results for requests it does not hold)
    → `bus/bad_scores`, `bus/late_results`, dropped (`bus/dropped_workers`), the run finishes
 6  SIGSTOP an actor, then the reward worker, 20 s each → declared dead, work requeued / reassigned,
    rejoin after SIGCONT, late work refused
 7  CurveZMQ (keys made by `or1 keys`, the real LearnerService on a real bus Server in this
    process): plaintext client, unknown key, wrongly pinned server key, reward key claiming actor,
    actor key asking Status or claiming admin → refused; key modes 0600/0700; a real `or1 learner`
    refuses a world-readable server.key_secret
 8  sandbox through `or1 score --kind code`: the verdict-forgery suite of tests/unit/rewards
    (frame walking, patched exit/builtins, verdict files, printed records, lying `__eq__` ...) on a
    wrong `add`, a disk filler (df sampled during the run), and the earlier escape attempts
    (/etc/shadow, secret keys, writes outside, TCP to the learner, kill(-1), fork bomb, 20 GB,
    1 GB of output, setsid daemon, ptrace, /proc/*/environ) → all 0, nothing outside changed
 9  `or1 score --kind math` on lone surrogates / bad JSON / missing fields → one line per record
10  math-verify bombs through `or1 score --kind math` → each returns within its timeout
and a last row: the run's ledger closed (tests/e2e check_ledger, closed=True), every step trained.

    .venv/bin/python benchmarks/redteam.py [--steps 150] [--out DIR]

Prints a Markdown table of the rows and ends with `RESULT probes=N held=M` (exit 0 only if every
row held). 150 steps, not 60: the live probes take ~100 s of training and the small run makes
~1 step/s here, so a shorter run ends before the SIGSTOP probes (a probe that finds the run over
says so). About 4–10 minutes on a busy 2-core machine; the run directory (`--out`, default
runs/redteam-<time>) is kept: logs, ledger, metrics and the generated attack files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from collections.abc import Callable
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), *(str(ROOT / "tests" / d) for d in ("", "e2e", "integration", "unit/rewards"))]
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path("~/.cache/or1/torch_extensions").expanduser()))
# Every process of the run inherits this; the sandbox probe looks for it in /proc/*/environ.
SECRET = "redteam-" + secrets.token_hex(8)
os.environ["OR1_REDTEAM_SECRET"] = SECRET

import msgpack  # noqa: E402
import numpy as np  # noqa: E402
import zmq  # noqa: E402

from bus import messages as M  # noqa: E402
from bus.client import Client, RemoteError  # noqa: E402
from bus.codec import decode, encode  # noqa: E402
from e2e_support import (  # noqa: E402
    REQUEUE_OUTCOMES, JsonlTail, check_ledger, last_step, ledger, log_events, make_fleet, metrics, open_leases,
    or1_cli, small_config,
)
from procs import or1, stop, wait_for  # noqa: E402

B, ETA = 4, 1
HOLD_S = 20.0  # flood hold and SIGSTOP length
HARD_LIMIT_S = 15 * 60  # the watchdog ends everything past this


# --- rows -------------------------------------------------------------------------------------


@dataclass
class Row:
    probe: str
    sent: str
    outcome: str
    figure: str
    held: bool


ROWS: list[Row] = []
_rows_lock = threading.Lock()


def add_row(row: Row) -> None:
    with _rows_lock:
        ROWS.append(row)
    print(f"[{'held' if row.held else 'FAILED'}] {row.probe}: {row.outcome} | {row.figure}", flush=True)


def guarded(name: str, sent: str, fn: Callable[[], Row]) -> None:
    """Run one probe; a bug in the probe itself becomes a failed row, never the end of the pass."""
    t0 = time.monotonic()
    print(f"--- {name} ({time.strftime('%H:%M:%S')})", flush=True)
    try:
        row = fn()
    except Exception as e:  # noqa: BLE001 - one broken probe must not stop the others
        traceback.print_exc()
        row = Row(name, sent, f"probe error: {type(e).__name__}: {e}"[:300], "-", False)
    row.figure += f"; {time.monotonic() - t0:.0f} s"
    add_row(row)


def table() -> str:
    out = ["| probe | what was sent | outcome | figure | held |", "|---|---|---|---|---|"]
    for r in ROWS:
        cells = [r.probe, r.sent, r.outcome, r.figure, "yes" if r.held else "**no**"]
        out.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(out)


# --- helpers ----------------------------------------------------------------------------------


def ts(event: dict) -> float:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


def events_after(path: Path, name: str, t: float, **match: Any) -> list[dict]:
    return [e for e in log_events(path, name) if "timestamp" in e and ts(e) >= t
            and all(e.get(k) == v for k, v in match.items())]


def bus_counts(fleet) -> dict[str, float]:
    rows = metrics(fleet)
    return {k: v for k, v in rows[-1].items() if k.startswith(("bus/", "weights/"))} if rows else {}


def wait_rows(fleet, n_rows: int, more: int, timeout: float) -> list[dict]:
    """Wait until metrics.jsonl has `more` rows beyond `n_rows` (or the learner exited / timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = metrics(fleet)
        if len(rows) >= n_rows + more or fleet.procs["learner"].poll() is not None:
            return rows
        time.sleep(0.3)
    return metrics(fleet)


def wait_until(pred: Callable[[], Any], timeout: float, interval: float = 0.3) -> Any:
    """`procs.wait_for`, but a timeout returns pred()'s last value instead of raising."""
    try:
        return wait_for(pred, timeout, interval)
    except TimeoutError:
        return pred()


def need_live(fleet) -> None:
    if fleet.procs["learner"].poll() is not None:
        raise RuntimeError("the run ended before this probe: raise --steps")


def dealer(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVHWM, 0)
    s.connect(endpoint)
    return s


def recv_reply(sock: zmq.Socket, timeout_s: float) -> M.Message | None:
    if not sock.poll(int(timeout_s * 1000)):
        return None
    return decode(sock.recv_multipart(), max_bytes=1 << 30)[0]


def timed_status(endpoint: str) -> tuple[float, bool]:
    t0 = time.monotonic()
    try:
        res = or1_cli("status", "--learner", endpoint, "--json", timeout=90)
        ok = res.returncode == 0 and '"version"' in res.stdout
    except subprocess.TimeoutExpired:
        ok = False
    return time.monotonic() - t0, ok


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the most resident memory the process ever had."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def fleet_ok(fleet) -> bool:
    """Every process of the run is alive, or has exited 0 (the run may be over)."""
    return all(p.poll() in (None, 0) for p in fleet.procs.values())


# --- probe 5: the rogue reward peer (runs for the whole run) ------------------------------------


class Rogue:
    """A reward worker that lies, as a real bus client in this process (tests/e2e/test_rogue_reward's,
    plus: it leaves when told the run is done, as a real worker does)."""

    LIES = (("nan", [M.ScoreOut(math.nan)]), ("7.0", [M.ScoreOut(7.0)]), ("-1", [M.ScoreOut(-1.0)]),
            ("no results", []), ("inf", [M.ScoreOut(math.inf)]))

    def __init__(self, endpoint: str):
        self.client = Client(endpoint, lambda: M.Hello(role=M.ROLE_REWARD, worker_id="rogue", host="evil"),
                             heartbeat_s=0.5)
        self.answers, self.foreign, self.kinds = 0, 0, []
        self.error = ""
        self.stop_evt = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True, name="rogue")

    def run(self) -> None:
        try:
            self.client.connect(timeout=400)
            self.client.send(M.Ready(credits=1000))
            while not self.stop_evt.is_set():
                msg = self.client.recv(timeout=0.2)
                if isinstance(msg, M.Wait) and msg.reason == M.WAIT_DONE:
                    return
                if isinstance(msg, M.ScoreRequest):
                    kind, lie = self.LIES[self.answers % len(self.LIES)]
                    results = lie * len(msg.items) if lie else []
                    self.client.send(M.ScoreResult(msg.request_id, results))
                    for other in (msg.request_id + 1, msg.request_id + 1000):  # requests it does not hold
                        self.client.send(M.ScoreResult(other, [M.ScoreOut(1.0)] * len(msg.items)))
                        self.foreign += 1
                    self.answers += 1
                    self.kinds.append(kind)
                    self.client.send(M.Ready(credits=1000))
        except Exception as e:  # noqa: BLE001
            self.error = f"{type(e).__name__}: {e}"

    def close(self) -> None:
        self.stop_evt.set()
        self.thread.join(5)
        self.client.close()


# --- probe 1: bus fuzz ------------------------------------------------------------------------


def fuzz_generators(valid: list[M.Message], frames_of: Callable[[M.Message], list[bytes]]):
    """Malformed-message makers: (kind, rng -> frames). Each may occasionally produce a valid
    message; the caller keeps only what the codec refuses."""
    wrong = [None, True, False, -1, (1 << 64) - 1, -(1 << 63), 1.5, float("nan"), "", "x" * 9, b"\x00", [],
             [1, "a"], {}, {"k": [None]}, {"__nd__": 1, "dtype": "int32", "shape": [3]}]

    def header(rng):
        f = frames_of(rng.choice(valid))
        return f, msgpack.unpackb(f[0], raw=False)

    def pack(f, h):
        f[0] = msgpack.packb(h, use_bin_type=True)
        return f

    def replace_deep(rng, obj, value):
        if isinstance(obj, dict) and obj:
            k = rng.choice(sorted(obj, key=str))
            if k in ("v", "type", "rid") and rng.random() < 0.7:
                return obj
            obj[k] = replace_deep(rng, obj[k], value) if isinstance(obj[k], (dict, list)) and obj[k] \
                and rng.random() < 0.5 else value
        elif isinstance(obj, list) and obj:
            i = rng.randrange(len(obj))
            obj[i] = replace_deep(rng, obj[i], value) if rng.random() < 0.5 else value
        return obj

    def g_random(rng):
        return [rng.randbytes(rng.randint(0, 80)) for _ in range(rng.randint(1, 4))]

    def g_truncated(rng):
        f = frames_of(rng.choice(valid))
        f[0] = f[0][:rng.randint(0, len(f[0]) - 1)]
        return f

    def g_wrong_type(rng):
        f, h = header(rng)
        return pack(f, replace_deep(rng, h, rng.choice(wrong)))

    def g_missing(rng):
        f, h = header(rng)
        keys = sorted(h)
        h.pop(rng.choice(keys))
        return pack(f, h)

    def g_extra(rng):
        f, h = header(rng)
        h[rng.choice(["evil", "__nd__", "x" * 300, "pickle"])] = rng.choice(wrong)
        return pack(f, h)

    def g_header_noise(rng):
        f, h = header(rng)
        h[rng.choice(["v", "type", "rid"])] = rng.choice(wrong + [2, 0, "nope", "hello ", -5, 1 << 63])
        return pack(f, h)

    def g_huge_length(rng):
        choice = rng.randrange(6)
        if choice == 0:
            return [b"\xdb\xff\xff\xff\xff" + b"abc"]  # str32 declaring 4 GiB
        if choice == 1:
            return [b"\xc6\xff\xff\xff\xff" + b"x"]  # bin32 declaring 4 GiB
        if choice == 2:
            return [b"\xdd\xff\xff\xff\xff\x01"]  # array32 of 4G items
        if choice == 3:
            return [b"\xdf\xff\xff\xff\xff\xa1v\x01"]  # map32 of 4G entries
        shape = [[1 << 40], [1 << 14, 1 << 14, 1 << 14]][choice - 4]  # 2^40 / 2^42 declared elements
        h = {"v": 1, "type": "chunk", "rid": 0, "version": 1, "index": 0,
             "data": {"__nd__": 1, "dtype": "uint8", "shape": shape}}
        return [msgpack.packb(h), bytes(64)]

    def g_deep(rng):
        depth = rng.choice([2000, 20000, 200000])
        body = rng.choice([b"\x91" * depth + b"\xc0", b"\x81\xa1a" * depth + b"\xc0"])
        if rng.random() < 0.5:
            return [body]
        prefix = b"\x85" + b"".join(msgpack.packb(x) for x in ("v", 1, "type", "set", "rid", 0, "key",
                                                                 "max_staleness", "value"))
        return [prefix + body]  # a Set whose free-form value nests `depth` deep

    def g_frames(rng):
        msg = rng.choice([v for v in valid if isinstance(v, (M.Submit, M.Chunk))])
        f = frames_of(msg)
        h = msgpack.unpackb(f[0], raw=False)
        choice = rng.randrange(5)
        if choice == 0 and len(f) > 1:
            f.pop(rng.randrange(1, len(f)))  # a referenced frame missing
        elif choice == 1:
            f.append(rng.randbytes(rng.randint(0, 40)))  # an unreferenced extra frame
        elif choice == 2 and len(f) > 1:
            f[1] = f[1][: rng.randint(0, len(f[1]) - 1)]  # a frame shorter than its declared shape
        elif choice == 3:
            if "data" in h:
                h["data"]["__nd__"] = 7  # a frame that does not exist
            f[0] = msgpack.packb(h, use_bin_type=True)
            f = f[:1]
        else:
            if "groups" in h:  # two arrays claiming the same frame
                s = h["groups"][0]["samples"][0]
                s["logprobs"] = dict(s["token_ids"])
                f[0] = msgpack.packb(h, use_bin_type=True)
            else:
                f = [f[0]]
        return f

    def g_empty(rng):
        return [b""] * rng.randint(1, 3)

    return [("random", g_random), ("truncated", g_truncated), ("wrong_type", g_wrong_type),
            ("missing", g_missing), ("extra", g_extra), ("header_noise", g_header_noise),
            ("huge_length", g_huge_length), ("deep_nesting", g_deep), ("frame_mismatch", g_frames),
            ("empty_frames", g_empty)]


class FuzzPort:
    """A few raw DEALERs on one port: send a batch, then read every answer before the next one
    (the weights port queues at most 64 replies per peer)."""

    def __init__(self, ctx: zmq.Context, endpoint: str, n_sockets: int = 4):
        self.socks = [dealer(ctx, endpoint) for _ in range(n_sockets)]
        self.sent = self.answered = self.bad_answers = 0
        self.other_answers: list[str] = []
        self.i = 0

    def send(self, frames: list[Any]) -> None:
        sock = self.socks[self.i % len(self.socks)]
        self.i += 1
        sock.send_multipart(frames, copy=len(frames) > 1000 or sum(len(f) for f in frames) < (1 << 20))
        self.sent += 1

    def drain(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.answered < self.sent and time.monotonic() < deadline:
            got = False
            for s in self.socks:
                while s.poll(0):
                    got = True
                    reply = decode(s.recv_multipart(), max_bytes=1 << 30)[0]
                    self.answered += 1
                    if isinstance(reply, M.Error) and reply.code == M.ERR_BAD_MESSAGE:
                        self.bad_answers += 1
                    else:
                        self.other_answers.append(type(reply).__name__)
            if not got:
                time.sleep(0.005)


def probe_fuzz(fleet, n_control: int, n_weights: int, big_mb: int) -> Row:
    need_live(fleet)
    from test_bus_fuzz import VALID, frames_of

    cfg = fleet.cfg
    ctrl_ep = fleet.endpoint
    w_ep = f"tcp://127.0.0.1:{cfg.learner.weights_port}"
    max_bytes = cfg.bus.max_message_bytes
    gens = fuzz_generators(VALID, frames_of)
    rng = random.Random(15)
    base = bus_counts(fleet)
    step0 = last_step(fleet)
    lpid = fleet.procs["learner"].pid
    hwm0 = peak_rss_mb(lpid)
    ctx = zmq.Context(io_threads=1)
    ports = {"control": FuzzPort(ctx, ctrl_ep), "weights": FuzzPort(ctx, w_ep)}
    by_kind: dict[str, int] = {}
    skipped = 0
    t0 = time.monotonic()
    try:
        for port, n in (("control", n_control), ("weights", n_weights)):
            fp = ports[port]
            batch = attempts = 0
            while fp.sent < n and attempts < 20 * n:
                kind, gen = gens[attempts % len(gens)]
                attempts += 1
                frames = gen(rng)
                try:
                    decode(frames, max_bytes=max_bytes)
                    skipped += 1  # valid after all: not a malformed message, not sent
                    continue
                except M.ProtocolError:
                    pass
                fp.send(frames)
                by_kind[kind] = by_kind.get(kind, 0) + 1
                batch += 1
                if batch >= 40:
                    fp.drain(20)
                    batch = 0
            # Specials, once per port: more frames than MAX_FRAMES, and one 200 MB frame.
            hdr = frames_of(VALID[5])[0]
            fp.send([hdr] + [b""] * (M.MAX_FRAMES + 5))
            by_kind["70k_frames"] = by_kind.get("70k_frames", 0) + 1
            big = bytes(big_mb << 20)
            if port == "control":
                fp.send([big])  # a 200 MB header
            else:
                h = msgpack.unpackb(hdr, raw=False)
                h["data"] = {"__nd__": 1, "dtype": "uint8", "shape": [1000]}
                fp.send([msgpack.packb(h), big])  # a Chunk whose 200 MB frame does not match its shape
            by_kind[f"{big_mb}MB_frame"] = by_kind.get(f"{big_mb}MB_frame", 0) + 1
            del big
            fp.drain(60)
        send_s = time.monotonic() - t0
    finally:
        for fp in ports.values():
            for s in fp.socks:
                s.close(0)
        ctx.term()
    rows_at_end = len(metrics(fleet))
    sent = {p: fp.sent for p, fp in ports.items()}
    answered = {p: fp.answered for p, fp in ports.items()}
    # counters in metrics.jsonl: two rows written after every answer came back
    rows = wait_rows(fleet, rows_at_end, 2, 120)
    after = {k: v for k, v in rows[-1].items() if k.startswith(("bus/", "weights/"))} if rows else {}
    d_ctrl = after.get("bus/bad_messages", 0) - base.get("bus/bad_messages", 0)
    d_w = after.get("weights/bad_messages", 0) - base.get("weights/bad_messages", 0)
    d_handler = after.get("bus/handler_errors", 0) - base.get("bus/handler_errors", 0)
    step1 = last_step(fleet)
    hwm1 = peak_rss_mb(lpid)
    learner_up = fleet.procs["learner"].poll() is None or fleet.procs["learner"].returncode == 0
    all_bad = all(fp.bad_answers == fp.answered for fp in ports.values())
    held = (d_ctrl == sent["control"] and d_w == sent["weights"] and answered == sent and all_bad
            and d_handler == 0 and learner_up and step1 > step0)
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(by_kind.items()))
    return Row("1. bus fuzz during the run",
               f"{sum(sent.values())} malformed messages (control {sent['control']}, "
               f"weights {sent['weights']}): {kinds}",
               f"answered {sum(answered.values())}/{sum(sent.values())}, all Error(bad_message): {all_bad}; "
               f"bus/bad_messages +{d_ctrl:.0f}, weights/bad_messages +{d_w:.0f} (metrics.jsonl); handler "
               f"errors +{d_handler:.0f}; learner alive: {learner_up}, training went on",
               f"sent in {send_s:.1f} s; steps {step0} → {step1}; learner peak RSS {hwm0:.0f} → "
               f"{hwm1:.0f} MB; "
               f"{skipped} generated messages were valid after all and not sent",
               held)


# --- probe 2: connection flood --------------------------------------------------------------


def probe_flood(fleet, n_dealers: int, n_raw: int) -> Row:
    need_live(fleet)
    cfg = fleet.cfg
    ctrl_ep, w_port = fleet.endpoint, cfg.learner.weights_port
    w_ep = f"tcp://127.0.0.1:{w_port}"
    lpid = fleet.procs["learner"].pid
    base_s, base_ok = timed_status(ctrl_ep)
    if not base_ok:
        raise RuntimeError("`or1 status` failed before the flood")
    step0 = last_step(fleet)
    ctx = zmq.Context(io_threads=2)
    ctx.set(zmq.MAX_SOCKETS, n_dealers + 100)
    socks, raws = [], []
    t0 = time.monotonic()
    status_frames, manifest_frames = encode(M.Status()), encode(M.GetManifest(version=-1))
    try:
        for i in range(n_dealers):  # 3/4 on the control port (Status before Hello), 1/4 asking for manifests
            s = dealer(ctx, ctrl_ep if i % 4 else w_ep)
            s.send_multipart(status_frames if i % 4 else manifest_frames)
            socks.append(s)
        greeting = b"\xff" + bytes(8) + b"\x7f"  # a ZMTP greeting's first 10 bytes, then silence
        for i in range(n_raw):
            try:
                port = cfg.learner.control_port if i % 3 else w_port
                r = socket.create_connection(("127.0.0.1", port), timeout=5)
                if i % 2:
                    r.sendall(greeting)
                raws.append(r)
            except OSError:
                pass
        opened_s = time.monotonic() - t0
        time.sleep(3)
        try:
            fds = len(os.listdir(f"/proc/{lpid}/fd"))
        except OSError:
            fds = -1
        lat = []
        while time.monotonic() - t0 < HOLD_S:
            lat.append(timed_status(ctrl_ep))
            if len(lat) >= 3:
                break
            time.sleep(1)
        while time.monotonic() - t0 < HOLD_S:
            time.sleep(0.5)
        held_s = time.monotonic() - t0
        answered = sum(1 for s in socks if s.poll(0))
    finally:
        for s in socks:
            s.close(0)
        for r in raws:
            r.close()
        ctx.term()
    step1 = last_step(fleet)
    after_s, after_ok = timed_status(ctrl_ep)
    ok = all(o for _, o in lat) and lat and after_ok
    held = bool(ok) and step1 > step0 and fleet.procs["learner"].poll() is None
    during = ", ".join(f"{s:.1f}" for s, _ in lat)
    return Row("2. connection flood",
               f"{n_dealers} DEALER connections ({n_dealers * 3 // 4} control: Status before Hello; "
               f"{n_dealers // 4} weights: GetManifest) + {len(raws)}/{n_raw} raw TCP (2/3 control, "
               f"half with a partial ZMTP greeting), held {held_s:.0f} s",
               f"`or1 status` answered {sum(o for _, o in lat)}/{len(lat)} during the flood; "
               f"{answered}/{n_dealers} DEALERs answered; training went on",
               f"`or1 status` {during} s during (baseline {base_s:.1f} s, after {after_s:.1f} s; "
               f"process start included); learner fds {fds}; opened in {opened_s:.1f} s; "
               f"steps {step0} → {step1}",
               held)


# --- probe 3: oversized fields --------------------------------------------------------------


MARK = "Zq"


def probe_oversized(fleet) -> Row:
    need_live(fleet)
    big = MARK * 51200  # 100 KB
    ctx = zmq.Context()
    t_start = time.time()
    base = bus_counts(fleet)
    results: dict[str, str] = {}
    try:
        sock = dealer(ctx, fleet.endpoint)
        sock.send_multipart(encode(M.Hello(role=M.ROLE_ACTOR, worker_id="redteam-ovs", session="s-ovs"), 1))
        welcome = recv_reply(sock, 30)
        hostile: list[tuple[str, M.Message]] = [
            ("Hello.worker_id 100 KB", M.Hello(role=M.ROLE_ACTOR, worker_id=big)),
            ("Hello.host 100 KB", M.Hello(role=M.ROLE_ACTOR, worker_id="ovs-h", host=big)),
            ("Hello.relay_endpoint 100 KB",
             M.Hello(role=M.ROLE_ACTOR, worker_id="ovs-r", relay_endpoint="tcp://" + big)),
            ("Hello.admin_key 100 KB", M.Hello(role=M.ROLE_ADMIN, worker_id="ovs-a", admin_key=big)),
            ("Hello.session 100 KB", M.Hello(role=M.ROLE_ACTOR, worker_id="ovs-s", session=big)),
            ("Heartbeat 10k stats", M.Heartbeat(stats={f"{MARK}{i}": 1.0 for i in range(10_000)})),
            ("Heartbeat.problem 100 KB", M.Heartbeat(problem=big)),
            ("Bye.reason 100 KB", M.Bye(reason=big)),
            ("ScoreResult.error 100 KB", M.ScoreResult(1, [M.ScoreOut(0.0, error=big)])),
            ("Set.key 100 KB", M.Set(key=big, value=1)),
        ]
        for name, msg in hostile:
            sock.send_multipart(encode(msg, 2))
            reply = recv_reply(sock, 30)
            results[name] = reply.code if isinstance(reply, M.Error) else type(reply).__name__
        # the bound, not a blanket refusal: an id of exactly MAX_ID_CHARS is welcome
        edge = dealer(ctx, fleet.endpoint)
        edge.send_multipart(encode(M.Hello(role=M.ROLE_ACTOR, worker_id="e" * M.MAX_ID_CHARS), 3))
        edge_reply = recv_reply(edge, 30)
        edge.send_multipart(encode(M.Bye(reason="done")))
        sock.send_multipart(encode(M.Bye(reason="done")))
        time.sleep(0.5)
        edge.close(0)
        sock.close(0)
    finally:
        ctx.term()
    refused = sum(1 for v in results.values() if v == M.ERR_BAD_MESSAGE)
    rows = wait_rows(fleet, len(metrics(fleet)), 2, 90)
    d_bad = (rows[-1].get("bus/bad_messages", 0) - base.get("bus/bad_messages", 0)) if rows else float("nan")
    # the learner's log: the longest run of the marker in any line, and the longest line written meanwhile
    text = fleet.log("learner").read_text(errors="replace")
    longest_mark = 0
    for line in text.splitlines():
        if MARK * 4 in line:
            i = line.find(MARK * 4)
            j = i
            while line.startswith(MARK, j):
                j += len(MARK)
            longest_mark = max(longest_mark, j - i)
    longest_line = max((len(line) for line, e in _json_lines(fleet.log("learner")) if "timestamp" in e
                        and ts(e) >= t_start), default=0)
    held = (refused == len(hostile) and isinstance(welcome, M.Welcome) and isinstance(edge_reply, M.Welcome)
            and longest_mark < 1000 and d_bad == len(hostile))
    edge = "welcomed" if isinstance(edge_reply, M.Welcome) else type(edge_reply).__name__
    return Row("3. oversized fields",
               f"{len(hostile)} messages: {', '.join(results)}; control: a {M.MAX_ID_CHARS}-char worker_id",
               f"refused {refused}/{len(hostile)} (Error(bad_message)); the {M.MAX_ID_CHARS}-char id {edge}; "
               f"bus/bad_messages +{d_bad:.0f}",
               f"longest echo of the payload in the learner log: {longest_mark} chars; longest learner log "
               f"line meanwhile: {longest_line} chars",
               held)


def _json_lines(path: Path) -> list[tuple[str, dict]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append((line, json.loads(line)))
            except json.JSONDecodeError:
                pass
    return out


# --- probe 4: impostors ---------------------------------------------------------------------


def probe_impostors(fleet) -> Row:
    need_live(fleet)
    ep = fleet.endpoint
    llog = fleet.log("learner")
    t_start = time.time()
    def leases() -> int:
        return sum(1 for e in ledger(fleet) if e["event"] == "lease" and e.get("actor") == "actor0")

    leases0 = leases()
    out: dict[str, str] = {}
    ctx = zmq.Context()
    try:
        for wid, role in (("actor0", M.ROLE_ACTOR), ("rw0", M.ROLE_REWARD)):
            # a raw Hello, to see the answer itself (bus.client keeps retrying an id_in_use Hello by design)
            sock = dealer(ctx, ep)
            relay = "tcp://127.0.0.1:9" if role == M.ROLE_ACTOR else ""  # weight pulls pointed at itself
            hello = M.Hello(role=role, worker_id=wid, host="evil", session="impostor-" + secrets.token_hex(4),
                            relay_endpoint=relay)
            sock.send_multipart(encode(hello, 1))
            reply = recv_reply(sock, 30)
            refused = isinstance(reply, M.Error)
            out[f"claim {wid}"] = reply.code if refused else f"ANSWERED {type(reply).__name__}"
            if not refused:
                sock.send_multipart(encode(M.Bye(reason="impostor")))
            sock.close(0)
    finally:
        ctx.term()
    stranger = Client(ep, lambda: M.Hello(role=M.ROLE_ACTOR, worker_id="stranger", host="evil"),
                      heartbeat_s=0.5)
    try:
        stranger.connect(timeout=20)
        for name, msg in (("Status", M.Status()), ("Set", M.Set(key="max_staleness", value=7))):
            try:
                r = stranger.request(msg, timeout=20)
                out[f"stranger {name}"] = f"ANSWERED {type(r).__name__}"
            except RemoteError as e:
                out[f"stranger {name}"] = e.code
    finally:
        stranger.close()
    wait_until(lambda: leases() > leases0 or fleet.procs["learner"].poll() is not None, 60)
    leases_after = leases()
    warned = bool(log_events(llog, "bus.plaintext"))
    refused_logged = len(events_after(llog, "hello refused: worker id in use", t_start))
    kicked = [e for e in events_after(llog, "peer joined", t_start) 
              if e.get("worker_id") in ("actor0", "rw0")]
    held = (out.get("claim actor0") == M.ERR_ID_IN_USE and out.get("claim rw0") == M.ERR_ID_IN_USE
            and out.get("stranger Status") == M.ERR_FORBIDDEN and out.get("stranger Set") == M.ERR_FORBIDDEN
            and leases_after > leases0 and not kicked)
    return Row("4. impostors (plaintext)",
               "Hello as actor0 (with a relay endpoint of its own) and as rw0 from other sessions; "
               "a stranger (role actor) asking Status and Set",
               "; ".join(f"{k}: {v}" for k, v in out.items())
               + f"; actor0 kept leasing; real peers re-joined meanwhile: {len(kicked)}",
               f"actor0 leases {leases0} → {leases_after}; learner log 'worker id in use' {refused_logged}; "
               f"plaintext warning at learner start: {warned}",
               held)


# --- probe 6: SIGSTOP ------------------------------------------------------------------------


def probe_sigstop(fleet, name: str, role: str) -> Row:
    """SIGSTOP `name` for HOLD_S: the learner must declare it dead (liveness × heartbeat), give its
    work to others, welcome it back after SIGCONT and refuse what it then sends for the old work."""
    need_live(fleet)
    llog = fleet.log("learner")
    pid = fleet.procs[name].pid
    base = bus_counts(fleet)
    step0 = last_step(fleet)
    tail = JsonlTail(fleet.run_dir / "ledger.jsonl")
    events0, holding = tail.poll(), set()
    deadline = time.monotonic() + 30
    while role == M.ROLE_ACTOR and time.monotonic() < deadline:  # stop it while it holds work
        events0 = tail.poll()
        holding = open_leases(events0, name)
        if holding:
            break
        time.sleep(0.01)
    n_events0 = len(events0)
    t_stop = time.time()
    os.killpg(pid, signal.SIGSTOP)
    try:
        dead = wait_until(lambda: events_after(llog, "peer dead", t_stop, worker_id=name), HOLD_S, 0.1)
        time.sleep(max(0.0, HOLD_S - (time.time() - t_stop)))
        step_mid = last_step(fleet)
    finally:
        t_cont = time.time()
        os.killpg(pid, signal.SIGCONT)
    joined = wait_until(lambda: events_after(llog, "peer joined", t_cont, worker_id=name), 60)
    if role == M.ROLE_ACTOR and holding:  # the lease it was generating comes back late: let it arrive
        wait_until(lambda: events_after(llog, "submit.rejected", t_cont, peer=name), 30)
    else:
        time.sleep(8)
    step_after = wait_until(lambda: (last_step(fleet) > max(step_mid, step0)
                                     or fleet.procs["learner"].poll() is not None) and last_step(fleet), 90)
    step_after = step_after or last_step(fleet)
    latency = ts(dead[0]) - t_stop if dead else float("nan")
    new = ledger(fleet)[n_events0:]
    if role == M.ROLE_ACTOR:
        closed = {e["lease_id"] for e in new if e["event"] == "end" and e.get("reason") == "actor_dead"}
        requeued = sum(1 for e in new if e["event"] == "end" and e.get("reason") == "actor_dead"
                       and e["outcome"] in REQUEUE_OUTCOMES)
        rejected = sum(1 for e in new if e["event"] == "reject" and e["lease_id"] in closed)
        accepted_late = sum(1 for e in new if e["event"] == "accept" and e["lease_id"] in closed)
        ended = {e["lease_id"] for e in new if e["event"] == "lease_end"}
        work = (f"held {len(holding)} leases at the stop; {requeued} prompts of {len(closed)} leases "
                f"requeued (ledger: actor_dead)")
        late = f"its late submit refused: {rejected} groups rejected, {accepted_late} accepted"
        work_ok = bool(holding) and holding <= ended and accepted_late == 0
    else:
        gone = events_after(llog, "reward.gone", t_stop, peer=name)
        d_late = bus_counts(fleet).get("bus/late_results", 0) - base.get("bus/late_results", 0)
        work = f"{gone[0].get('reassigned', 0) if gone else '?'} score requests reassigned"
        late = f"results it sent late for reassigned work: bus/late_results +{d_late:.0f}"
        work_ok = bool(gone)
    back = f"after {ts(joined[0]) - t_cont:.1f} s" if joined else "NEVER"
    silent = dead[0].get("silent_s") if dead else "?"
    held = bool(dead) and latency <= 3.5 and bool(joined) and work_ok and step_after > step0
    return Row(f"6. SIGSTOP {role} ({name})",
               f"SIGSTOP to its process group for {t_cont - t_stop:.0f} s, then SIGCONT",
               f"declared dead after {latency:.1f} s (learner: silent {silent} s); "
               f"{work}; rejoined {back}; {late}",
               f"heartbeat {fleet.cfg.bus.heartbeat_s} s × liveness {fleet.cfg.bus.liveness}; "
               f"steps {step0} → {step_mid} while stopped → {step_after} after",
               held)


# --- probe 7: CurveZMQ ------------------------------------------------------------------------


def key_modes(out: Path, keys: Path) -> tuple[bool, str]:
    """`or1 keys` writes secret keys 0600 in 0700 folders."""
    dirs = {str(p.relative_to(out)): oct(stat.S_IMODE(p.stat().st_mode)) for p in (keys, keys / "clients")}
    secret_files = [keys / "server.key_secret", *(keys / "clients").glob("*.key_secret")]
    modes = {oct(stat.S_IMODE(p.stat().st_mode)) for p in secret_files}
    ok = set(dirs.values()) == {"0o700"} and modes == {"0o600"}
    listed = ", ".join(f"{k} {v}" for k, v in dirs.items())
    return ok, f"dirs {listed}; {len(secret_files)} secret keys {'/'.join(modes)}"


def curve_attempts(out: Path, keys: Path) -> dict[str, str]:
    """Hostile and honest clients against the real LearnerService on a CurveZMQ bus Server."""
    from bus.auth import CurveConfig, client_curve, make_keys, make_layout, server_curve
    from bus.server import Server
    from common.config import load_config
    from learner.scheduler import Prompt, Scheduler
    from learner.service import LearnerService

    make_keys(out / "strangers", "actor")  # a key the learner does not list
    make_layout(out / "other", ["actor"])  # another learner's server key
    cfg = load_config(overrides=["bus.heartbeat_s=0.2"])
    sched = Scheduler.from_config([Prompt("p0", np.array([1, 2], np.int32), "math", "1")], cfg.learner, 0)
    svc = LearnerService(cfg, sched, run_id="redteam", model="m", weights_endpoint="tcp://127.0.0.1:1")
    srv = Server("tcp://127.0.0.1:0", heartbeat_s=0.2, curve=server_curve(str(keys)))
    svc.attach(srv)
    srv.start()
    res: dict[str, str] = {}

    def attempt(label: str, role: str, curve: Any, request: M.Message | None = None,
                timeout: float = 4.0) -> None:
        wid = label.replace(" ", "-")
        c = Client(srv.endpoint, lambda: M.Hello(role=role, worker_id=wid), heartbeat_s=0.2, curve=curve)
        try:
            c.connect(timeout=timeout)
            res[label] = "welcomed" if request is None else \
                f"answered {type(c.request(request, timeout=10)).__name__}"
        except RemoteError as e:
            res[label] = e.code
        except TimeoutError:
            res[label] = "no answer"
        finally:
            c.close(bye=None)

    server_pub, mine = keys / "server.key", keys / "clients" / "actor.key_secret"
    stranger, other = out / "strangers" / "actor.key_secret", out / "other" / "server.key"
    try:
        attempt("plaintext client", M.ROLE_ACTOR, None)
        attempt("unknown key", M.ROLE_ACTOR, CurveConfig.client(stranger, server_pub))
        attempt("wrong server key pinned", M.ROLE_ACTOR, CurveConfig.client(mine, other))
        attempt("reward key as actor", M.ROLE_ACTOR, client_curve(str(keys), "reward"))
        attempt("actor key as admin", M.ROLE_ADMIN, client_curve(str(keys), "actor"))
        attempt("actor key asks Status", M.ROLE_ACTOR, client_curve(str(keys), "actor"), M.Status(), 10)
        attempt("admin key asks Status (control)", M.ROLE_ADMIN, client_curve(str(keys), "admin"), M.Status(),
                10)
    finally:
        srv.stop()
    return res


def probe_curve(out: Path, keys: Path, badkey_learner: dict) -> Row:
    modes_ok, modes = key_modes(out, keys)
    res = curve_attempts(out, keys)
    refused = {"plaintext client": "no answer", "unknown key": "no answer",
               "wrong server key pinned": "no answer", "reward key as actor": M.ERR_FORBIDDEN,
               "actor key as admin": M.ERR_FORBIDDEN, "actor key asks Status": M.ERR_FORBIDDEN}
    attacks_ok = all(res.get(k) == v for k, v in refused.items())
    control_ok = res.get("admin key asks Status (control)") == "answered StatusReply"
    # the real learner, started at the beginning with a world-readable copy of server.key_secret
    proc: subprocess.Popen = badkey_learner["proc"]
    try:
        rc = proc.wait(360)
    except subprocess.TimeoutExpired:
        rc = stop(proc)
    said = "readable by other users" in badkey_learner["log"].read_text(errors="replace")
    held = modes_ok and attacks_ok and control_ok and rc != 0 and said
    verdict = "refused, with the chmod to run" if said else "NO refusal"
    return Row("7. CurveZMQ (keys from `or1 keys`)",
               "plaintext client; unknown key; wrongly pinned server key; reward key claiming actor; "
               "actor key claiming admin; actor key asking Status; `or1 learner` with server.key_secret 0644",
               "; ".join(f"{k}: {v}" for k, v in res.items())
               + f"; learner with a 0644 secret key: exit {rc}, {verdict}",
               modes, held)


# --- probe 8: sandbox -------------------------------------------------------------------------


STDIO_OK = json.dumps({"inputs": [""], "outputs": ["ok"]})


def escape_programs(keys: Path, port: int, host_pids: list[int], marker: str,
                    outside: list[str]) -> dict[str, str]:
    """Each prints "ok" (reward 1) only if its escape worked as seen from inside, except where the
    effect is only visible outside (writes, kills, daemons, disk use): the host checks those."""
    secret_files = [str(keys / "server.key_secret"), str(keys / "clients" / "admin.key_secret")]
    try_each = ("n = 0\nfor p in {paths!r}:\n    try:\n        {action}\n        n += 1\n"
                "    except OSError:\n        pass\n")
    pids = [str(p) for p in host_pids]
    return {
        "read_etc_shadow": "data = open('/etc/shadow').read()\nprint('ok' if data else 'empty')",
        "read_secret_keys": (try_each.format(paths=secret_files, action="open(p).read()")
                             + "print('ok' if n else 'no')"),
        "write_outside": (try_each.format(paths=outside, action="open(p, 'w').write('escaped')")
                          + "print('wrote', n)"),
        "tcp_to_learner": (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                           "s.sendall(b'\\xff' * 64)\nprint('ok')"),
        "kill_minus_1": ("import os, signal\ntry:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError as e:\n"
                         f"    print('refused', e)\nfor pid in {host_pids!r}:\n    try:\n"
                         "        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n"
                         "print('survived')"),
        "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "alloc_20gb": "x = bytearray(20 * 1024**3)\nprint('ok')",
        "output_1gb": ("import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n"
                       "    sys.stdout.write(chunk)\nprint('ok')"),
        "setsid_daemon": ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    try:\n"
                          f"        os.execv('/bin/sleep', ['sleep', {marker!r}])\n    finally:\n"
                          "        time.sleep(120)\n        os._exit(0)\nprint('daemon started')"),
        "ptrace": ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                   "targets = [int(p) for p in os.listdir('/proc')\n"
                   "           if p.isdigit() and int(p) != os.getpid()]\n"
                   f"hits = [p for p in targets + {host_pids!r} if libc.ptrace(16, p, 0, 0) == 0]\n"
                   "print('ok' if hits else 'denied')"),
        "proc_environ": ("import os\nfound = []\n"
                         f"for p in [x for x in os.listdir('/proc') if x.isdigit()] + {pids!r}:\n"
                         "    try:\n        data = open(f'/proc/{p}/environ', 'rb').read()\n"
                         f"    except OSError:\n        continue\n    if {SECRET.encode()!r} in data:\n"
                         "        found.append(p)\nprint('ok' if found else 'clean')"),
        "disk_fill_2gb": ("n = 0\ntry:\n    while n < 2048:\n        with open(f'f{n}', 'wb') as f:\n"
                          "            f.write(b'x' * (1 << 20))\n        n += 1\nexcept OSError as e:\n"
                          "    print('wrote', n, 'MB, then errno', e.errno)\n    raise\nprint('ok')"),
    }


def sandbox_records(escapes: dict[str, str]) -> list[dict]:
    """Controls (must score 1), the forgery suite of tests/unit/rewards on a wrong `add` in every
    reference format and both orders, its lying values, then the escapes (all must score 0)."""
    from reward_refs import ADD_REFS, ADD_RIGHT, ADD_WRONG, block
    from test_forgery import LIAR_VALUES, PREAMBLES, liar_program

    def rec(rid: str, program: str, reference: str, want: float) -> dict:
        return {"id": rid, "response": block(program), "reference": reference, "want": want}

    recs = [rec(f"control/{fmt}", ADD_RIGHT[fmt], ref, 1.0) for fmt, ref in ADD_REFS.items()]
    recs.append(rec("control/escape-format", "print('ok')", STDIO_OK, 1.0))
    for attack, pre in PREAMBLES.items():
        for fmt, ref in ADD_REFS.items():
            recs.append(rec(f"forgery/{attack}/{fmt}/after", ADD_WRONG[fmt] + "\n" + pre, ref, 0.0))
            recs.append(rec(f"forgery/{attack}/{fmt}/before", pre + "\n" + ADD_WRONG[fmt], ref, 0.0))
    for liar, value in LIAR_VALUES.items():
        for fmt, ref in ADD_REFS.items():
            recs.append(rec(f"liar/{liar}/{fmt}", liar_program(fmt, value), ref, 0.0))
    recs += [rec(f"escape/{name}", prog, STDIO_OK, 0.0) for name, prog in escapes.items()]
    recs.append(rec("control/after-attacks", "print('ok')", STDIO_OK, 1.0))  # the scorer still works
    return recs


def marker_processes(marker: str) -> list[int]:
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{name}/cmdline").read_bytes():
                found.append(int(name))
        except OSError:
            continue
    return found


class DiskPeak:
    """Samples the used bytes of / every 0.1 s while a block runs."""

    def __enter__(self) -> DiskPeak:
        self.before = self.peak = shutil.disk_usage("/").used
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, shutil.disk_usage("/").used)
            self._done.wait(0.1)

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(2)
        self.after = shutil.disk_usage("/").used


def probe_sandbox(fleet, out: Path, keys: Path) -> Row:
    nonce = secrets.token_hex(6)
    marker = f"{100 + random.randrange(800)}.{int(nonce, 16) % 10**9:09d}"  # sleep's argument, unique
    name = f"or1-redteam-{nonce}"
    outside = [f"/tmp/{name}", f"/var/tmp/{name}", f"/dev/shm/{name}", str(ROOT / name),
               str(fleet.run_dir / name), f"/{name}"]
    host_pids = [os.getpid()] + [p.pid for p in fleet.procs.values()]
    escapes = escape_programs(keys, fleet.cfg.learner.control_port, host_pids, marker, outside)
    recs = sandbox_records(escapes)
    t0 = time.monotonic()
    # the disk filler alone, in a window of its own: the disk is shared with other work
    filler_recs = [r for r in recs if r["id"] == "escape/disk_fill_2gb"]
    with DiskPeak() as disk:
        res_fill = score_code_file(out / "sandbox_disk_fill.jsonl", filler_recs)
    res = score_code_file(out / "sandbox_attacks.jsonl", [r for r in recs if r not in filler_recs])
    wall = time.monotonic() - t0
    lines = [json.loads(x) for r in (res, res_fill) for x in r.stdout.splitlines() if x.startswith("{")]
    by_id = {x.get("id"): x for x in lines}
    wrong = [r["id"] for r in recs if by_id.get(r["id"], {}).get("reward") != r["want"]]
    attacks = [r for r in recs if r["want"] == 0.0]
    zero = sum(1 for r in attacks if by_id.get(r["id"], {}).get("reward") == 0.0)
    controls_ok = all(by_id.get(r["id"], {}).get("reward") == 1.0 for r in recs if r["want"] == 1.0)
    for n in escapes:  # why each escape scored what it did, for the log
        x = by_id.get(f"escape/{n}", {})
        why = f"{x.get('error', '')} {x.get('detail', '')}"
        print(f"    escape/{n}: reward {x.get('reward')} {why}"[:200], flush=True)
    leaked_files = [p for p in outside if os.path.exists(p)]
    for p in leaked_files:
        os.remove(p)
    time.sleep(1)
    daemons = marker_processes(marker)
    for pid in daemons:
        os.kill(pid, signal.SIGKILL)
    peak_mb = (disk.peak - disk.before) / 2**20
    fill = by_id.get("escape/disk_fill_2gb", {})
    filler = fill.get("detail") or fill.get("error") or "?"
    n_forgery = sum(1 for r in attacks if r["id"].startswith(("forgery/", "liar/")))
    held = (res.returncode == 0 and res_fill.returncode == 0 and len(lines) == len(recs) and not wrong
            and controls_ok and not leaked_files and not daemons and fleet_ok(fleet) and peak_mb < 500)
    return Row("8. sandbox (`or1 score --kind code`)",
               f"{n_forgery} forgery attempts on a wrong `add` ({len(preamble_names())} attacks of "
               f"tests/unit/rewards/test_forgery.py × 4 formats × 2 orders, 6 lying values × 4 formats); "
               f"{len(escapes)} escapes ({', '.join(escapes)}); {len(recs) - len(attacks)} controls",
               f"{zero}/{len(attacks)} attacks scored 0; controls scored 1: {controls_ok}"
               + (f"; WRONG: {wrong[:6]}" if wrong else "")
               + f"; files outside: {len(leaked_files)}; surviving daemons: {len(daemons)}; "
                 f"the run's processes unharmed: {fleet_ok(fleet)}; disk filler: {filler[:60]}",
               f"host disk use while the 2 GB filler ran: peak +{peak_mb:.0f} MB, after "
               f"{(disk.after - disk.before) / 2**20:+.0f} MB; {len(lines)}/{len(recs)} lines in "
               f"{wall:.0f} s",
               held)


def score_code_file(path: Path, recs: list[dict]) -> subprocess.CompletedProcess:
    path.write_text("".join(json.dumps({k: r[k] for k in ("id", "response", "reference")}) + "\n"
                            for r in recs))
    return or1_cli("score", str(path), "--kind", "code", "--workers", "2", "--set", "reward.code_timeout_s=4",
                   timeout=480)


def preamble_names() -> list[str]:
    from test_forgery import PREAMBLES

    return list(PREAMBLES)


# --- probe 9: or1 score on malformed records ----------------------------------------------------


SCORE_RECORDS: list[tuple[str, bytes]] = [
    ("valid", b'{"id": "good", "response": "so \\\\boxed{2}", "reference": "2"}'),
    ("lone surrogate in id", b'{"id": "\\ud800", "response": "\\\\boxed{2}", "reference": "2"}'),
    ("lone surrogate in response", b'{"id": "s2", "response": "\\\\boxed{\\udfff}", "reference": "2"}'),
    ("lone surrogate in reference", b'{"id": "s3", "response": "\\\\boxed{2}", "reference": "\\ud800"}'),
    ("lone surrogate as the answer",
     b'{"id": "s4", "response": "\\\\boxed{\\ud800\\ud800}", "reference": "\\ud800"}'),
    ("bad JSON", b'{"id": 3, "response": '),
    ("not an object", b"[1, 2, 3]"),
    ("missing response", b'{"id": "m1", "reference": "2"}'),
    ("missing reference", b'{"id": "m2", "response": "\\\\boxed{2}"}'),
    ("non-string response", b'{"id": "m3", "response": 5, "reference": "2"}'),
    ("not UTF-8", b'{"id": "\xff\xfe", "response": "\\\\boxed{2}", "reference": "2"}'),
    ("100k-deep JSON", b"[" * 100_000),
    ("5000-deep id", b'{"id": ' + b"[" * 5000 + b"]" * 5000 + b', "response": "x", "reference": "2"}'),
    ("NUL and controls", b'{"id": "c", "response": "\\u0000\\u0007\\\\boxed{2}", "reference": "2"}'),
    ("empty object", b"{}"),
    ("null", b"null"),
    ("valid, last", b'{"id": "last", "response": "\\\\boxed{4}", "reference": "4"}'),
]


def probe_score_records(out: Path) -> Row:
    body, want_lines, n = b"", [], 0
    for i, (_, raw) in enumerate(SCORE_RECORDS):
        n += 1
        body += raw + b"\n"
        want_lines.append(n)
        if i == 4:  # a blank line is skipped, not a record
            body += b"\n"
            n += 1
    path = out / "score_records.jsonl"
    path.write_bytes(body)
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "deploy.cli", "score", str(path), "--kind", "math", "--workers", "1"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=300, check=False)
    wall = time.monotonic() - t0
    parsed = [json.loads(x) for x in res.stdout.decode("utf-8", errors="strict").splitlines() if x.strip()]
    got_lines = [p.get("line") for p in parsed]
    rewards = {p.get("id"): p.get("reward") for p in parsed if isinstance(p.get("id"), str)}
    valid_ok = rewards.get("good") == 1.0 and rewards.get("last") == 1.0
    held = res.returncode == 0 and got_lines == want_lines and valid_ok
    return Row("9. `or1 score` on malformed records",
               f"{len(SCORE_RECORDS)} records + 1 blank line: " + ", ".join(k for k, _ in SCORE_RECORDS),
               f"exit {res.returncode}; {len(parsed)} output lines for {len(SCORE_RECORDS)} records, "
               f"line numbers in order: {got_lines == want_lines}; first and last valid records scored 1: "
               f"{valid_ok}; "
               f"output valid UTF-8 JSON",
               f"{sum(1 for p in parsed if 'error' in p)} lines carry an error (reward 0); {wall:.1f} s"
               + ("" if res.returncode == 0 else f"; stderr: {res.stderr.decode(errors='replace')[-200:]}"),
               held)


# --- probe 10: math-verify bombs --------------------------------------------------------------


def math_bombs() -> list[tuple[str, str, str]]:
    """(name, response, gold); the control first, so its line also carries the pool's start."""
    return [
        ("control", "\\boxed{2}", "2"),
        ("nested \\frac ×2000", "\\boxed{" + "\\frac{1}{" * 2000 + "1" + "}" * 2000 + "}", "1"),
        ("nested parens ×5000", "\\boxed{" + "(" * 5000 + "1" + ")" * 5000 + "}", "1"),
        ("nested \\sqrt ×3000", "\\boxed{" + "\\sqrt{" * 3000 + "2" + "}" * 3000 + "}", "2"),
        ("power tower 9^9^9^9^9", "\\boxed{9^{9^{9^{9^{9}}}}}", "1"),
        ("10^{10^{10}} vs +1", "\\boxed{10^{10^{10}}}", "10^{10^{10}}+1"),
        ("(10^{10})!", "\\boxed{(10^{10})!}", "1"),
        ("10^6-digit number", "\\boxed{" + "9" * 10**6 + "}", "9" * 10**6 + "8"),
        ("10^6 digits vs 10^{999999}", "\\boxed{1" + "0" * 999_999 + "}", "10^{999999}"),
        ("sum of 50k terms", "\\boxed{" + "+".join(["x"] * 50_000) + "}", "50000x"),
        ("2000-entry matrix", "\\boxed{\\begin{pmatrix}" + "&".join(["1"] * 2000) + "\\end{pmatrix}}", "1"),
        ("100k \\boxed", "\\boxed{1}" * 100_000, "2"),
        ("huge integral", "\\boxed{\\int_0^{10^{100}} x^{10^{10}}\\,dx}", "0"),
        ("(x+1)^(10^9)", "\\boxed{(x+1)^{1000000000}}", "x^{1000000000}+1"),
    ]


def probe_math_bombs(out: Path, timeout_s: float) -> Row:
    bombs = math_bombs()
    path = out / "math_bombs.jsonl"
    path.write_text("".join(json.dumps({"id": n, "response": r, "reference": g}) + "\n" for n, r, g in bombs))
    cmd = [sys.executable, "-m", "deploy.cli", "score", str(path), "--kind", "math", "--workers", "1",
           "--set", f"reward.math_timeout_s={timeout_s}"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    arrivals: list[tuple[float, dict]] = []
    killer = threading.Timer(len(bombs) * (timeout_s + 10) + 60, proc.kill)
    killer.start()
    try:
        assert proc.stdout is not None and proc.stderr is not None
        for line in proc.stdout:
            if line.startswith("{"):
                arrivals.append((time.monotonic(), json.loads(line)))
        rc = proc.wait()
        err = proc.stderr.read()
    finally:
        killer.cancel()
    wall = time.monotonic() - t0
    # one worker: items run one after another, so the gap between two lines is the later item's time
    gaps = [(arrivals[i][0] - arrivals[i - 1][0], arrivals[i][1]) for i in range(1, len(arrivals))]
    limit = timeout_s + 2.0 + 3.0  # the pool's hard deadline (timeout + 2 s) + starting a fresh worker
    slow = [f"{r.get('id')} {g:.1f}s" for g, r in gaps if g > limit]
    timeouts = sum(1 for _, r in arrivals if "timeout" in str(r.get("error", "")))
    worst = max(gaps, default=(0.0, {}), key=lambda x: x[0])
    held = (rc == 0 and len(arrivals) == len(bombs) and not slow and arrivals[0][1].get("reward") == 1.0
            and all(r.get("reward") == 0.0 for _, r in arrivals[1:]))
    return Row("10. math-verify bombs (`or1 score --kind math`)",
               f"{len(bombs) - 1} bombs + 1 control: " + ", ".join(n for n, _, _ in bombs[1:]),
               f"{len(arrivals)}/{len(bombs)} answered; each within its {timeout_s:.0f} s timeout (+2 s pool "
               f"grace): {not slow}{' ' + str(slow) if slow else ''}; {timeouts} timed out cleanly, the rest "
               f"scored 0, control 1",
               f"slowest {worst[1].get('id')} {worst[0]:.1f} s; total {wall:.0f} s"
               + ("" if rc == 0 else f"; exit {rc}: {err[-200:]}"),
               held)


# --- the run: rogue, ledger -------------------------------------------------------------------


def probe_rogue(fleet, rogue: Rogue) -> Row:
    rows = metrics(fleet)
    last = rows[-1] if rows else {}

    def m(key: str) -> str:
        return f"{key} {last.get(key, 0):.0f}"

    dropped = any(e.get("peer") == "rogue" for e in log_events(fleet.log("learner"), "reward.dropped"))
    rc = fleet.procs["learner"].returncode
    held = (rogue.answers >= 3 and last.get("bus/bad_scores", 0) >= 3 and dropped and rc == 0
            and last.get("bus/dropped_workers", 0) >= 1 and last.get("bus/late_results", 0) >= 1)
    return Row("5. rogue reward peer",
               f"{rogue.answers} lying ScoreResults ({', '.join(rogue.kinds[:5])}, ...; the requests it held "
               f"when dropped were answered too) + {rogue.foreign} results for requests it did not hold",
               f"{m('bus/bad_scores')}, {m('bus/late_results')}, {m('bus/dropped_workers')} (learner log "
               f"reward.dropped peer=rogue: {dropped}); the run finished (learner exit {rc})",
               f"{m('bus/score_reassigned')}, {m('bus/score_failed')}"
               + (f"; rogue error: {rogue.error}" if rogue.error else ""),
               held)


def probe_ledger(fleet, steps: int) -> Row:
    events = ledger(fleet)
    rows = metrics(fleet)
    final = rows[-1]["step"] if rows else 0
    rc = fleet.procs["learner"].returncode
    try:
        s = check_ledger(events, B, steps, eta_max=ETA, closed=True)
        abandoned = sum(1 for e in events if e["event"] == "end" and e["outcome"] == "abandoned")
        trained = sum(s.trained_per_step.values())
        outcome = "every grant ended exactly once, nothing trained twice, every step trained B groups"
        figure = (f"{len(s.grants)} grants, {sum(s.ends.values())} ends ({trained} trained, "
                  f"{abandoned} abandoned at the end), 0 open")
        ok = True
    except AssertionError as e:
        ok, outcome, figure = False, f"VIOLATED: {str(e)[:300]}", f"{len(events)} ledger events"
    reward = rows[-1].get("reward/mean", float("nan")) if rows else float("nan")
    return Row("ledger and steps of the run", f"check_ledger(closed=True) over {len(events)} events",
               f"{outcome}; learner exit {rc}",
               f"{figure}; final step {final}/{steps}; last reward/mean {reward:.2f}",
               ok and final == steps and rc == 0)


# --- main -------------------------------------------------------------------------------------


def start_badkey_learner(out: Path, keys: Path, model: Path) -> dict[str, Any]:
    """A real `or1 learner` given a world-readable copy of the server's secret key: it must refuse."""
    bad_keys = out / "keys-0644"
    shutil.copytree(keys, bad_keys)
    os.chmod(bad_keys / "server.key_secret", 0o644)
    _, path = small_config(out / "badkey", model, steps=1, eta=ETA, extra=(f"bus.curve_dir={bad_keys}",))
    log = out / "badkey" / "learner.log"
    return {"log": log, "proc": or1("learner", "--config", str(path), "--log-format", "json", log=log)}


def live_probes(fleet, out: Path, keys: Path, args: argparse.Namespace) -> threading.Thread:
    """The probes that need training going on, one after another; the sandbox probe runs beside them
    (it needs the learner's port live). Returns the sandbox thread."""
    sandbox = threading.Thread(target=guarded, name="sandbox",
                               args=("8. sandbox", "code attacks", lambda: probe_sandbox(fleet, out, keys)))
    sandbox.start()
    guarded("1. bus fuzz", "malformed messages",
            lambda: probe_fuzz(fleet, args.fuzz_control, args.fuzz_weights, args.big_mb))
    guarded("3. oversized fields", "oversized fields", lambda: probe_oversized(fleet))
    guarded("4. impostors", "impostor hellos", lambda: probe_impostors(fleet))
    guarded("2. connection flood", "connections", lambda: probe_flood(fleet, args.dealers, args.raw))
    guarded("6. SIGSTOP actor", "SIGSTOP actor1", lambda: probe_sigstop(fleet, "actor1", M.ROLE_ACTOR))
    guarded("6. SIGSTOP reward", "SIGSTOP rw0", lambda: probe_sigstop(fleet, "rw0", M.ROLE_REWARD))
    return sandbox


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--out", default=None)
    ap.add_argument("--fuzz-control", type=int, default=2400)
    ap.add_argument("--fuzz-weights", type=int, default=800)
    ap.add_argument("--big-mb", type=int, default=200)
    ap.add_argument("--dealers", type=int, default=2000)
    ap.add_argument("--raw", type=int, default=1000)
    ap.add_argument("--math-timeout", type=float, default=5.0)
    args = ap.parse_args()
    t_begin = time.monotonic()
    out = Path(args.out or ROOT / "runs" / f"redteam-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o755)  # like a runs/ folder: the sandbox may look in; the keys folder stays 0700

    from common.tinymodel import ensure_tiny_model

    model = ensure_tiny_model(Path(os.environ.get("OR1_CACHE", "~/.cache/or1")).expanduser(), warm=True)
    cfg, path = small_config(out, model, steps=args.steps, eta=ETA, batch=B)
    fleet = make_fleet(out, cfg, path)
    background: list[subprocess.Popen] = []

    def watchdog() -> None:
        time.sleep(HARD_LIMIT_S)
        print(f"redteam: past {HARD_LIMIT_S} s, stopping everything\n{table()}", flush=True)
        fleet.close()
        for p in background:
            stop(p, 5)
        os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    rogue = Rogue(fleet.endpoint)
    keys = out / "keys"
    try:
        print(f"redteam: run directory {out}", flush=True)
        fleet.learner()
        rogue.thread.start()  # before the real reward worker, so it takes the first score requests
        fleet.actor("actor0")
        fleet.actor("actor1")
        fleet.reward("rw0")
        res = or1_cli("keys", str(keys), timeout=60)
        assert res.returncode == 0, res.stderr
        badkey = start_badkey_learner(out, keys, model)
        background.append(badkey["proc"])

        def offline() -> None:  # no run needed: while the fleet starts and trains
            guarded("9. or1 score records", "malformed records", lambda: probe_score_records(out))
            guarded("10. math bombs", "math-verify bombs", lambda: probe_math_bombs(out, args.math_timeout))
            guarded("7. CurveZMQ", "curve probes", lambda: probe_curve(out, keys, badkey))

        side = [threading.Thread(target=offline, name="offline")]
        side[0].start()
        wait_until(lambda: last_step(fleet) >= 2 or fleet.procs["learner"].poll() is not None, 420, 0.5)
        if last_step(fleet) < 2:
            raise RuntimeError(f"the run did not start training:\n{fleet.tails()}")
        print(f"redteam: training (step {last_step(fleet)}) after {time.monotonic() - t_begin:.0f} s",
              flush=True)
        side.append(live_probes(fleet, out, keys, args))
        print(f"redteam: live probes done at step {last_step(fleet)}, {time.monotonic() - t_begin:.0f} s",
              flush=True)
        for t in side:
            t.join(600)
        try:
            fleet.procs["learner"].wait(420)
        except subprocess.TimeoutExpired:
            pass
        for name in ("actor0", "actor1", "rw0"):
            try:
                fleet.procs[name].wait(60)
            except subprocess.TimeoutExpired:
                pass
        rogue.close()
        guarded("5. rogue reward", "rogue results", lambda: probe_rogue(fleet, rogue))
        guarded("ledger", "ledger", lambda: probe_ledger(fleet, args.steps))
    finally:
        rogue.close()
        fleet.close()
        for p in background:
            stop(p, 5)
    order = ["1.", "2.", "3.", "4.", "5.", "6.", "7.", "8.", "9.", "10.", "ledger"]
    ROWS.sort(key=lambda r: next((i for i, o in enumerate(order) if r.probe.startswith(o)), len(order)))
    held = sum(r.held for r in ROWS)
    print(f"\n{table()}\n\nredteam: {time.monotonic() - t_begin:.0f} s wall; run directory {out}")
    print(f"RESULT probes={len(ROWS)} held={held}")
    return 0 if held == len(ROWS) else 1


if __name__ == "__main__":
    sys.exit(main())
