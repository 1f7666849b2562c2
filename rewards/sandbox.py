"""Run untrusted Python in a throw-away sandbox: ``run_program(code, stdin, limits) -> RunResult``.

Each run gets (strongest available mode first):

- ``python -I main.py`` in a fresh temporary directory as cwd, with an emptied environment
  (``PATH``, ``LANG`` only); the interpreter is ``limits.python`` or the first of this process's
  interpreters that the sandbox user can execute (``sandbox_python``: the venv's interpreter may
  sit under a 0700 home, so a system python is often the one that runs);
- rlimits set just before exec: CPU (a hard SIGKILL at ``cpu_s``: see below why not SIGXCPU),
  address space, file size, processes, open files, core = 0;
- a wall-clock timeout; ``start_new_session`` and, whatever happened, SIGKILL to the whole process
  group at the end; stdout/stderr read in a loop, kept up to ``max_output_bytes`` each, the run
  killed when either goes past it;
- **as root** (the usual case in containers): a *dedicated uid per concurrent run*, taken from
  ``uid_slots`` uids starting at ``uid_base`` under an ``flock`` (so two runs never share one).
  RLIMIT_NPROC is per user and root ignores it, so running as root would let a fork bomb
  through; as its own uid the run's process count is exactly its own, and it can neither signal
  the scorer, read other processes' environments (/proc/PID/environ), nor write anywhere but
  world-writable directories. After every run every process of that uid is killed (a forked
  helper takes the uid and calls ``kill(-1, SIGKILL)``, which the kernel applies atomically
  against concurrent forks) until /proc shows none: this catches children that left the process
  group with ``setsid`` even without namespaces. Run directories that a killed scorer left are
  removed when their uid is next taken, and by ``clean_stale`` when a pool worker starts.
- **namespaces** (root, or unprivileged through a user namespace where the kernel allows it):
  new network (only a down ``lo``: every connect fails with ENETUNREACH), mount, PID, IPC and
  UTS namespaces. In the mount namespace private tmpfs mounts (16 MiB) hide the world-writable
  directories (/tmp, /var/tmp, /run/lock, /dev/shm), so a write outside the run's directory lands
  in memory that vanishes with the run. The run's directory itself is a fresh tmpfs of
  ``disk_mb`` MiB (and ``WORKDIR_INODES`` files) mounted at the host directory's path, with
  ``main.py`` written into it: the program's total disk use is bounded (a write past it fails
  with ENOSPC) and nothing it writes reaches the host's disk. A fresh /proc shows only the run.
  The PID namespace: ``unshare(CLONE_NEWPID)`` applies to children, so the process ``subprocess``
  forked stays outside as a *holder* (no fds open, it waits and exits with the child's status)
  and forks the namespace's PID 1, which drops privileges and execs Python. (So the program is
  PID 1: the kernel drops default-action signals it gets from inside its namespace, e.g. its own
  SIGXCPU or ``os.kill(os.getpid(), SIGTERM)``; SIGKILL and faults still end it.) When PID 1 exits or
  is killed the kernel kills and reaps everything left in the namespace, so nothing survives a
  run. Both carry ``PR_SET_PDEATHSIG=SIGKILL``, so killing the scorer ends its runs too. At the
  end a run is stopped by killing PID 1 first (the holder reaps it), then the process group.
- **result channel** (``channel_bytes`` > 0): a pipe whose write end the program inherits, its fd
  number given as ``sys.argv[1]``; what arrives (up to ``channel_bytes``) is ``RunResult.channel``.
  ``watch``, if given, sees each chunk as it arrives; when it returns True the run is ended at once
  (``killed_reason`` "stopped": the caller has seen enough, e.g. a wrong answer).
  A pipe, not a file: it needs no disk, and closing or flooding it only loses the run's results.
- **fallback** (``network_isolation=False``, or namespaces refused by the OS: logged once): no
  namespaces, so the network is reachable, /tmp is shared, and the run's directory is on the
  host's disk, bounded per file only (RLIMIT_FSIZE; logged once); as root the dedicated uid still
  contains and cleans up everything. Not root and no user namespaces: the program runs as this
  user and the process-group kill is the only cleanup (a ``setsid`` escapee survives); a warning
  is logged once. RLIMIT_NPROC then counts this user's existing processes too, so it is set to
  their number plus ``max_processes``.

Cost: about 21 ms per run here against 10 ms for a bare ``subprocess.run`` of the same
interpreter (the preexec_fn forces fork over vfork; namespaces add ~2 ms).

Why not cgroups: they need a writable cgroup hierarchy (often absent in containers), while uid +
namespaces need only root, and give the same guarantees for CPU-bound and forking programs.
Known limits: the program can read world-readable files of the host (read-only); without
namespaces its disk use is bounded per file (RLIMIT_FSIZE), not in total.
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from common.config import RewardConfig

from rewards.isolation import (
    UID_SLOTS,
    ChildSetup,
    SandboxError,
    UidSlot,
    clean_stale,
    reap_orphans,
    rlimits,
    uid_processes,
)

__all__ = ["RunResult", "SandboxError", "SandboxLimits", "clean_stale", "run_program", "sandbox_problem",
           "sandbox_python"]

log = structlog.get_logger()

ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
READ_CHUNK = 1 << 16
EXIT_GRACE_S = 0.2  # after the main process exits, how long to wait for stray pipe holders


_CFG = RewardConfig()  # the limits' defaults are the reward config's (one source; documented there)


@dataclass
class SandboxLimits:
    """What one run may use (`rewards/code.py` `sandbox_limits` fills it from `[reward]`; the
    defaults are RewardConfig's). `python` empty = auto (see `sandbox_python`)."""

    wall_s: float = _CFG.code_timeout_s
    cpu_s: int = _CFG.code_cpu_s
    memory_mb: int = _CFG.code_memory_mb
    fsize_mb: int = _CFG.code_max_file_mb
    max_processes: int = _CFG.code_max_processes
    max_open_files: int = 256  # not a setting: a test needs a handful, and more is a descriptor leak
    max_output_bytes: int = _CFG.code_max_output_bytes
    disk_mb: int = _CFG.code_disk_mb
    network_isolation: bool = _CFG.code_network_namespace
    python: str = _CFG.code_python
    uid_base: int = _CFG.code_uid_base
    uid_slots: int = UID_SLOTS


@dataclass
class RunResult:
    """`returncode` is negative for a signal (Popen convention); `killed_reason` is "" or one of
    "timeout", "output_limit", "stopped" (by `watch`); stdout/stderr are decoded UTF-8 (errors
    replaced), capped;
    `channel` is what the program wrote to the result channel (raw bytes, capped)."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    killed_reason: str
    wall_s: float
    channel: bytes = b""


# --- isolation mode and interpreter --------------------------------------------------------------

_namespaces_broken = False  # set when a run failed to enter namespaces; later runs skip them


def _warn_once(event: str, **kw: object) -> None:
    if event not in _warned:
        _warned.add(event)
        log.warning(event, **kw)


_warned: set[str] = set()


def _use_namespaces(limits: SandboxLimits) -> bool:
    return limits.network_isolation and not _namespaces_broken


_python_cache: dict[tuple, str] = {}


def sandbox_python(limits: SandboxLimits) -> str:
    """The interpreter for sandboxed runs: `limits.python` if set, else the first of this process's
    interpreter, its real path, the base interpreter and `python3` on PATH that runs in a sandbox
    (probed once per process)."""
    if limits.python:
        return limits.python
    key = (limits.uid_base, limits.uid_slots, limits.network_isolation)
    if key not in _python_cache:
        _python_cache[key] = _probe_python(limits)
    return _python_cache[key]


def sandbox_problem(limits: SandboxLimits | None = None, namespaces: bool = False) -> str:
    """Why sandboxed runs cannot work here ("" when they can); with `namespaces`, also why the
    namespaces are missing (not root and no user namespaces, or a container without
    CAP_SYS_ADMIN). For tests and `or1` diagnostics."""
    limits = limits or SandboxLimits()
    try:
        sandbox_python(limits)  # its probe run tries the namespaces first
    except SandboxError as e:
        return str(e)
    if namespaces and (_namespaces_broken or not limits.network_isolation):
        return "the OS refused new namespaces (network, mount, pid) for sandboxed runs"
    return ""


def _probe_python(limits: SandboxLimits) -> str:
    candidates = [sys.executable, os.path.realpath(sys.executable), getattr(sys, "_base_executable", ""),
                  shutil.which("python3") or "", "/usr/bin/python3"]
    probe_limits = SandboxLimits(**{**limits.__dict__, "wall_s": 10.0, "cpu_s": 10, "memory_mb": 512})
    tried = []
    for exe in dict.fromkeys(c for c in candidates if c):
        try:
            probe = _run("print(1)", "", probe_limits, exe)
        except (OSError, SandboxError) as e:
            tried.append(f"{exe}: {e}")
            continue
        if probe.returncode == 0 and probe.stdout.strip() == "1":
            return exe
        tried.append(f"{exe}: rc={probe.returncode} {probe.stderr.strip()[-200:]}")
    raise SandboxError("no Python interpreter runs in the sandbox; set reward.code_python. Tried: "
                       + "; ".join(tried))


# --- the run ---------------------------------------------------------------------------------------


Watch = Callable[[bytes], bool]


def run_program(code: str, stdin: str, limits: SandboxLimits, channel_bytes: int = 0,
                watch: Watch | None = None) -> RunResult:
    """Run `code` as main.py with `stdin`, under `limits`; with `channel_bytes` > 0 the program also
    gets a result channel, which `watch` may follow (see the module doc). Raises SandboxError only
    when the sandbox itself fails, never for what the program does."""
    return _run(code, stdin, limits, sandbox_python(limits), (channel_bytes, watch))


def _run(code: str, stdin: str, limits: SandboxLimits, python: str,
         channel: tuple[int, Watch | None] = (0, None)) -> RunResult:
    global _namespaces_broken
    slot = UidSlot(limits.uid_base, limits.uid_slots) if os.geteuid() == 0 else None
    try:
        try:
            return _run_in_dir(code, stdin, limits, python, channel, slot, _use_namespaces(limits))
        except subprocess.SubprocessError as e:  # preexec_fn failed: namespaces are not allowed here
            if not _use_namespaces(limits):
                raise SandboxError(f"sandbox child setup failed: {e}") from None
            _namespaces_broken = True
            _warn_once("sandbox/no_namespaces", reason=str(e),
                       effect="no network/mount/pid isolation, no disk quota (RLIMIT_FSIZE per file only); "
                              "process-group and uid cleanup only")
            return _run_in_dir(code, stdin, limits, python, channel, slot, False)
    finally:
        if slot is not None:
            slot.close()
        else:
            reap_orphans(os.geteuid())  # (only a subreaper, e.g. a pool worker, gets any)


def _run_in_dir(code: str, stdin: str, limits: SandboxLimits, python: str, channel: tuple[int, Watch | None],
                slot: UidSlot | None, namespaces: bool) -> RunResult:
    prefix = f"or1-sbx-{slot.uid}-" if slot else "or1-sbx-"
    workdir = tempfile.mkdtemp(prefix=prefix)
    try:
        main = code.encode("utf-8")
        if not namespaces:  # with namespaces main.py goes into the run's tmpfs instead
            _warn_once("sandbox/no_disk_quota", effect="the run's directory is on the host's disk, bounded "
                       "per file (RLIMIT_FSIZE) but not in total")
            with open(os.path.join(workdir, "main.py"), "wb") as f:
                f.write(main)
        stdin_path = os.path.join(workdir, ".stdin")
        with open(stdin_path, "w", encoding="utf-8") as f:
            f.write(stdin)
        if slot:
            os.chown(workdir, slot.uid, slot.uid)
        elif not namespaces:
            _warn_once("sandbox/no_isolation", effect="not root and no namespaces: the program runs as this "
                       "user, with network, and a setsid'd child can outlive its run")
        nproc = limits.max_processes if slot else limits.max_processes + len(uid_processes(os.geteuid()))
        limits_now = rlimits(limits.cpu_s, limits.memory_mb, limits.fsize_mb, limits.max_open_files, nproc)
        setup = ChildSetup(limits_now, slot.uid if slot else None, namespaces, workdir,
                           files={"main.py": main} if namespaces else None, disk_mb=limits.disk_mb)
        with open(stdin_path, "rb") as stdin_f:
            return _execute([python, "-I", "main.py"], workdir, stdin_f, limits, setup, channel)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _execute(argv: list[str], cwd: str, stdin_f, limits: SandboxLimits, setup: ChildSetup,
             channel: tuple[int, Watch | None]) -> RunResult:
    t0 = time.monotonic()
    channel_bytes, watch = channel
    chan_r, chan_w = os.pipe() if channel_bytes > 0 else (-1, -1)
    try:
        proc = subprocess.Popen(argv + ([str(chan_w)] if chan_w >= 0 else []), cwd=cwd, stdin=stdin_f,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
                                start_new_session=True, preexec_fn=setup, close_fds=True,
                                pass_fds=(chan_w,) if chan_w >= 0 else ())
    except OSError as e:  # the interpreter could not be executed
        if chan_r >= 0:
            os.close(chan_r)
            os.close(chan_w)
        raise SandboxError(f"cannot start {argv[0]}: {e}") from None
    except BaseException:
        if chan_r >= 0:
            os.close(chan_r)
            os.close(chan_w)
        raise
    if chan_w >= 0:
        os.close(chan_w)  # ours; EOF comes when every process of the run has closed its copy
    cap = limits.max_output_bytes
    streams = [(proc.stdout.fileno(), cap), (proc.stderr.fileno(), cap)]
    if chan_r >= 0:
        streams.append((chan_r, channel_bytes))
    deadline = t0 + limits.wall_s
    bufs: list[bytes] = [b"", b"", b""]
    try:
        bufs[: len(streams)], reason = _collect(proc, deadline, streams, chan_r, watch)
        if not reason:  # pipes closed; the program may still run (it closed them itself)
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                reason = "timeout"
    finally:
        _stop(proc, setup.namespaces)
        if chan_r >= 0:
            os.close(chan_r)
    return RunResult(
        returncode=proc.returncode,
        stdout=bufs[0].decode("utf-8", "replace"),
        stderr=bufs[1].decode("utf-8", "replace"),
        timed_out=reason == "timeout",
        killed_reason=reason,
        wall_s=time.monotonic() - t0,
        channel=bufs[2],
    )


def _stop(proc: subprocess.Popen, namespaces: bool) -> None:
    """End a run whatever its state. With a PID namespace, kill its PID 1 first so the holder reaps
    it and exits by itself (killing the holder first would orphan a zombie); then SIGKILL the
    whole process group, and reap the holder."""
    if namespaces and proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                children = [int(c) for c in f.read().split()]
        except OSError:
            children = []
        for child in children:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        pipe.close()


def _collect(proc: subprocess.Popen, deadline: float, streams: list[tuple[int, int]], watched: int = -1,
             watch: Watch | None = None) -> tuple[list[bytes], str]:
    """Read the (fd, cap) pipes until EOF, the deadline, one of them passing its cap, or `watch`
    saying stop about a chunk of fd `watched`."""
    bufs = {fd: bytearray() for fd, _ in streams}
    caps = dict(streams)
    seen = {fd: 0 for fd, _ in streams}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    reason, exited_at = "", None
    try:
        while sel.get_map() and not reason:
            now = time.monotonic()
            if now >= deadline:
                reason = "timeout"
                break
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > EXIT_GRACE_S:
                break  # a stray descendant holds the pipes open; the group kill ends it
            wait = min(deadline - now, 0.05 if exited_at is not None else 0.5)
            for key, _ in sel.select(wait):
                chunk = os.read(key.fd, READ_CHUNK)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                seen[key.fd] += len(chunk)
                buf = bufs[key.fd]
                buf += chunk[: max(0, caps[key.fd] - len(buf))]
                if seen[key.fd] > caps[key.fd]:
                    reason = "output_limit"  # stop reading at once: the kill follows
                    break
                if watch is not None and key.fd == watched and watch(chunk):
                    reason = "stopped"
                    break
    finally:
        sel.close()
    return [bytes(bufs[fd]) for fd, _ in streams], reason
