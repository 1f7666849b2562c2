"""Process-level isolation for `rewards/sandbox.py` (read its docstring for the whole design).

Two halves:
- the child side, run by ``subprocess`` between fork and exec (`ChildSetup`, a preexec_fn):
  unshare the namespaces, shadow world-writable directories with private tmpfs mounts, mount a
  size-limited tmpfs as the run's directory and write the run's files into it, fork the PID
  namespace's PID 1 (the parent stays behind as the holder), mount a fresh /proc, set rlimits,
  drop to the run's uid;
- the parent side: exclusive sandbox uids (`UidSlot`, an flock per uid), killing every process of
  a uid (`kill_uid`), reaping orphans (`reap_orphans`), and removing what killed scorers left
  (`clean_stale`).
"""

from __future__ import annotations

import ctypes
import fcntl
import glob
import os
import resource
import shutil
import signal
import tempfile
import time

# --- constants from <sched.h>, <sys/mount.h>, <sys/prctl.h> ------------------------------------
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 1 << 18
PR_SET_PDEATHSIG = 1

SHADOWED_DIRS = ("/tmp", "/var/tmp", "/run/lock", "/dev/shm")  # world-writable on a usual system
SHADOW_TMPFS_OPTS = b"size=16m,nr_inodes=4096,mode=1777"
WORKDIR_INODES = 8192  # files + directories a run may create in its own directory
UID_SLOTS = 1000  # sandbox uids per base: the most concurrent runs on one machine
SWEEP_ROUNDS = 20  # kill(-1) rounds before a uid is given up as unkillable

_libc = ctypes.CDLL(None, use_errno=True)


class SandboxError(RuntimeError):
    """The sandbox itself could not start or clean up a run (not the program's fault)."""


# --- child side (runs between fork and exec) ----------------------------------------------------


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: bytes | None, target: bytes, fstype: bytes | None, flags: int, data: bytes | None) -> None:
    _check(_libc.mount(source, target, fstype, ctypes.c_ulong(flags), data), f"mount {target!r}")


Rlimits = list[tuple[int, tuple[int, int]]]


def rlimits(cpu_s: int, memory_mb: int, fsize_mb: int, max_open_files: int, nproc: int) -> Rlimits:
    """The rlimits of one run, as (resource, (soft, hard)) pairs."""
    mem, fsize = memory_mb << 20, fsize_mb << 20
    return [
        # soft = hard: a SIGKILL at cpu_s. (The program is PID 1 of its namespace, and the kernel
        # drops default-action signals to a namespace init, its own SIGXCPU included.)
        (resource.RLIMIT_CPU, (cpu_s, cpu_s)),
        (resource.RLIMIT_AS, (mem, mem)),
        (resource.RLIMIT_FSIZE, (fsize, fsize)),
        (resource.RLIMIT_NOFILE, (max_open_files, max_open_files)),
        (resource.RLIMIT_CORE, (0, 0)),
        (resource.RLIMIT_NPROC, (nproc, nproc)),
    ]


def _hold_namespace(child: int) -> None:
    """The holder: wait for the namespace's PID 1 and leave with its status. Never returns."""
    code = 255
    try:
        os.closerange(0, 1 << 16)  # drop the pipes and subprocess's error pipe: Popen must not wait on us
        while True:
            try:
                _, status = os.waitpid(child, 0)
                break
            except InterruptedError:
                continue
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            code = 128 + sig
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)  # mirror the death so Popen reports -sig
        else:
            code = os.WEXITSTATUS(status)
    finally:
        os._exit(code)


class ChildSetup:
    """preexec_fn: namespaces, mounts, the PID-namespace holder fork, rlimits, uid drop.
    `uid` None = stay this user (with a user namespace when `namespaces`). With namespaces the
    run's directory is a fresh tmpfs of `disk_mb` MiB at `workdir`'s path, holding `files`
    (name -> bytes); without, `files` must already be in `workdir` (the caller writes them)."""

    def __init__(self, limits: Rlimits, uid: int | None, namespaces: bool, workdir: str,
                 files: dict[str, bytes] | None = None, disk_mb: int = 64):
        self.limits, self.uid, self.namespaces = limits, uid, namespaces
        self.workdir = workdir.encode()
        self.files = {name.encode(): data for name, data in (files or {}).items()}
        self.outer_uid, self.outer_gid = os.geteuid(), os.getegid()
        owner = uid if uid is not None else self.outer_uid
        group = uid if uid is not None else self.outer_gid
        self.workdir_opts = (f"size={disk_mb}m,nr_inodes={WORKDIR_INODES},mode=0700,"
                             f"uid={owner},gid={group}").encode()
        self.shadowed = [d.encode() for d in SHADOWED_DIRS if os.path.isdir(d) and not os.path.islink(d)]

    def __call__(self) -> None:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if self.namespaces:
            self._enter_namespaces()
            child = os.fork()
            if child != 0:
                _hold_namespace(child)
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # die with the holder
            _mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
        for res, value in self.limits:
            resource.setrlimit(res, value)
        if self.uid is not None:
            os.setgroups([])
            os.setgid(self.uid)
            os.setuid(self.uid)

    def _enter_namespaces(self) -> None:
        flags = CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
        if self.uid is None:  # unprivileged: a user namespace grants the rights for the others
            flags |= CLONE_NEWUSER
        _check(_libc.unshare(flags), "unshare")
        if self.uid is None:
            for path, text in (
                ("/proc/self/setgroups", "deny"),
                ("/proc/self/uid_map", f"{self.outer_uid} {self.outer_uid} 1"),
                ("/proc/self/gid_map", f"{self.outer_gid} {self.outer_gid} 1"),
            ):
                with open(path, "w") as f:
                    f.write(text)
        _mount(None, b"/", None, MS_REC | MS_PRIVATE, None)  # nothing we mount leaks to the host
        for d in self.shadowed:
            _mount(b"tmpfs", d, b"tmpfs", MS_NOSUID | MS_NODEV, SHADOW_TMPFS_OPTS)
        # The run's directory: a tmpfs of its own at the host directory's path (under a shadow, or
        # over the host directory itself), so everything the program writes lands in memory that
        # is bounded in total (`disk_mb`) and vanishes with the run; nothing reaches the host disk.
        os.makedirs(self.workdir, mode=0o700, exist_ok=True)
        _mount(b"tmpfs", self.workdir, b"tmpfs", MS_NOSUID | MS_NODEV, self.workdir_opts)
        for name, data in self.files.items():
            fd = os.open(os.path.join(self.workdir, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
        os.chdir(self.workdir)


# --- uid slots -----------------------------------------------------------------------------------


def _lock_dir() -> str:
    path = os.path.join(tempfile.gettempdir(), f"or1-sandbox-locks-{os.geteuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def _proc_state(pid: int) -> tuple[str, int]:
    """(state letter, parent pid) from /proc/PID/stat; ("", 0) when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[0].decode(), int(fields[1])
    except (OSError, IndexError, ValueError):
        return "", 0


def uid_processes(uid: int, zombies: bool = False) -> list[int]:
    """Pids of processes owned by `uid` (as /proc shows it); zombies only when asked."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid != uid:
                    continue
            except OSError:
                continue
            if zombies or _proc_state(int(name))[0] not in ("Z", "X", ""):
                pids.append(int(name))
    return pids


def reap_orphans(uid: int) -> None:
    """Reap zombies of `uid` whose parent is this process (a child subreaper: see pool workers),
    so they stop counting against the uid's RLIMIT_NPROC."""
    me = os.getpid()
    for pid in uid_processes(uid, zombies=True):
        state, ppid = _proc_state(pid)
        if state == "Z" and ppid == me:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


def kill_uid(uid: int) -> None:
    """SIGKILL every process of `uid` (root only): a forked child takes the uid and kill(-1)s.
    Repeats until /proc shows none; raises SandboxError if some survive every round."""
    for _ in range(SWEEP_ROUNDS):
        if not uid_processes(uid):
            return
        pid = os.fork()
        if pid == 0:
            try:
                os.setgid(uid)
                os.setuid(uid)
                os.kill(-1, signal.SIGKILL)  # every process this uid may signal, except ourselves
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        time.sleep(0.005)
    if uid_processes(uid):
        raise SandboxError(f"processes of sandbox uid {uid} survive SIGKILL")


def clean_stale(uid_base: int, uid_slots: int) -> int:
    """Remove run directories (and kill processes) of sandbox uids nobody holds: what a scorer
    killed mid-run left. Returns how many directories were removed. Root only; else a no-op."""
    if os.geteuid() != 0:
        return 0
    removed = 0
    for path in glob.glob(os.path.join(tempfile.gettempdir(), "or1-sbx-*-*")):
        uid_text = os.path.basename(path).split("-")[2]
        if not uid_text.isdigit() or not uid_base <= int(uid_text) < uid_base + uid_slots:
            continue
        fd = os.open(os.path.join(_lock_dir(), f"{uid_text}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # in use by a live run
        try:
            kill_uid(int(uid_text))
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
        finally:
            os.close(fd)
    return removed


class UidSlot:
    """An exclusive sandbox uid, held by an flock for as long as this object is open."""

    def __init__(self, uid_base: int, uid_slots: int):
        start = (os.getpid() * 7919) % uid_slots
        for k in range(uid_slots):
            uid = uid_base + (start + k) % uid_slots
            fd = os.open(os.path.join(_lock_dir(), f"{uid}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.uid, self._fd = uid, fd
            self._clean()  # whatever a crashed previous holder left
            return
        raise SandboxError(f"all {uid_slots} sandbox uids are busy")

    def _clean(self) -> None:
        kill_uid(self.uid)
        for stale in glob.glob(os.path.join(tempfile.gettempdir(), f"or1-sbx-{self.uid}-*")):
            shutil.rmtree(stale, ignore_errors=True)

    def close(self) -> None:
        try:
            kill_uid(self.uid)
            reap_orphans(self.uid)
        finally:
            os.close(self._fd)
