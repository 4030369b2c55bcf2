"""The one way athanor runs model-written code: `run_python(code, limits)` -> `SandboxResult`.

Model-written code is hostile until proven otherwise (it loops, forks, allocates, writes, dials
out, reads secrets, kills its parent), so it runs in a separate process tree built like this:

    parent ──Popen──▶ unshare [--user --map-root-user] --net --pid --fork --mount --mount-proc
                        └─▶ bootstrap (pid 1 of a new PID namespace)  [sandbox_init.py]
                              - bind-mounts the work dir, then remounts every other mount read-only
                              - sets the rlimits (CPU seconds, address space, processes, file size, fds)
                              - drops every capability from the bounding set, sets no_new_privs;
                                started by root, switches to a random unprivileged uid
                              └─▶ the user's program (python -E -s), forked, waited for, reported

- Network: a fresh network namespace holds only a loopback device that is down; any connect fails.
- Processes: RLIMIT_NPROC counts the processes of the program's uid: a fresh random uid under
  root, a per-namespace count inside a user namespace otherwise, so a fork bomb hits the wall fast; when pid 1 exits,
  the kernel kills every process left in its PID namespace, so nothing outlives the run.
- Time: RLIMIT_CPU bounds CPU seconds (SIGXCPU at the limit, SIGKILL a second later for a program
  that handles SIGXCPU); the bootstrap tells a CPU-limit death from any other by the kernel's own
  CPU clock, not by rusage, which under load reads 10-25% below it. The bootstrap also enforces the
  wall-clock deadline: it is a subreaper (PR_SET_CHILD_SUBREAPER), so every descendant, however it
  detached (setsid, double fork), stays below it, and at the deadline and at the end of every run
  it kills and reaps them all. The parent keeps a backstop: if no report comes a little after the
  deadline, it kills the whole session (its own process group, started with `start_new_session`).
- Files: the program's writes land in a throwaway work dir; everything else is read-only, and the
  new /proc shows only the sandbox's processes (the parent's environ is not there to read).
- Environment: a fixed, minimal one (PATH, HOME and TMPDIR = the work dir); nothing inherited.

Where the kernel forbids unprivileged user namespaces (some hardened hosts), isolation is not
available and `run_python` fails closed with `SandboxUnavailable` unless the caller passes
`allow_unisolated=True` for trusted code, which then runs with the rlimits and the subreaper's
clean-up only (a program that kills the bootstrap, same uid there, can then leave orphans behind).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Literal

from athanor.errors import AthanorError

Verdict = Literal["ok", "failed", "timeout", "memory", "file_too_large", "killed", "error"]

NAMESPACE_FLAGS = ["--net", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc"]
# Run by root, the program becomes a random unprivileged uid from this range (one per run, so
# concurrent sandboxes neither share a process count nor can signal each other).
SANDBOX_UIDS = (200_000, 1_000_000)
BOOTSTRAP = Path(__file__).with_name("sandbox_init.py")
# The bootstrap reports at the deadline; the parent kills the session only if it has not reported
# this long after (it was stopped or killed), so load on the machine cannot pre-empt its report.
BACKSTOP_S = 10.0
SHARE = "share"  # where run_python's `share` directory lies inside the work dir


class SandboxUnavailable(AthanorError):
    """The kernel (or a missing `unshare`) does not allow an isolated sandbox here."""


@dataclass
class Limits:
    """Resource limits of one run. Defaults suit unit tests of small functions."""

    wall_s: float = 10.0  # wall-clock seconds from the start of the run, enforced by the bootstrap
    cpu_s: int = 5  # CPU seconds (RLIMIT_CPU)
    memory_mb: int = 512  # address space (RLIMIT_AS)
    max_procs: int = 16  # processes and threads of the sandbox (RLIMIT_NPROC in its user namespace)
    file_mb: int = 16  # largest file the program may write (RLIMIT_FSIZE)
    max_files: int = 64  # open file descriptors (RLIMIT_NOFILE)
    output_kb: int = 64  # stdout / stderr kept for the result (each)


@dataclass
class SandboxResult:
    """What happened. `verdict` is the one field to branch on."""

    verdict: Verdict
    returncode: int | None  # exit code of the program; None when it did not exit by itself
    signal: int | None  # the signal that ended it, if any
    stdout: str
    stderr: str
    wall_s: float
    isolated: bool  # False only for allow_unisolated runs without namespaces
    detail: str = ""
    files: dict[str, bytes] = field(default_factory=dict)  # requested outputs read back from the work dir

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"


def _unshare_flags() -> list[str]:
    # Root needs no user namespace to create the others (and must not use one: the program's
    # uid would map back to 0, which RLIMIT_NPROC never applies to); anyone else needs one.
    return NAMESPACE_FLAGS if os.geteuid() == 0 else ["--user", "--map-root-user", *NAMESPACE_FLAGS]


@cache
def isolation_error() -> str | None:
    """None if namespaces work here, else why not (probed once per process)."""
    exe = shutil.which("unshare")
    if exe is None:
        return "the `unshare` program (util-linux) is not installed"
    try:
        proc = subprocess.run([exe, *_unshare_flags(), "true"], capture_output=True, timeout=20,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare failed to start: {e}"
    if proc.returncode != 0:
        return ("the kernel refused new user/network/PID namespaces "
                f"({proc.stderr.decode(errors='replace').strip()[:200]}); "
                "enable unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1)")
    return None


def _read_capped(path: Path, limit: int) -> str:
    with path.open("rb") as f:
        data = f.read(limit + 1)
    text = data[:limit].decode("utf-8", errors="replace")
    return text + ("\n[... output truncated]" if len(data) > limit else "")


def _verdict(status: dict, stderr: str, timed_out: bool) -> tuple[Verdict, int | None, int | None, str]:
    if timed_out or status.get("timeout"):
        return "timeout", None, None, "wall-clock limit reached; the whole process tree was killed"
    if "error" in status:
        return "error", None, None, status["error"]
    code, sig = status.get("returncode"), status.get("signal")
    if sig is not None:
        if status.get("cpu_limit_reached"):
            return "timeout", None, sig, "CPU-time limit reached"
        if sig == signal.SIGXFSZ:
            return "file_too_large", None, sig, "file-size limit reached"
        return "killed", None, sig, f"killed by signal {signal.Signals(sig).name}"
    tail = stderr[-2000:]
    if "MemoryError" in tail or "Cannot allocate memory" in tail:
        return "memory", code, None, "memory limit reached"
    if "File too large" in tail:
        return "file_too_large", code, None, "file-size limit reached"
    return ("ok" if code == 0 else "failed"), code, None, ""


def run_python(code: str, limits: Limits | None = None, *, stdin: str = "", files: dict[str, str] | None = None,
               read_back: tuple[str, ...] = (), share: str | Path | None = None,
               allow_unisolated: bool = False) -> SandboxResult:
    """Run the Python program `code` in the sandbox and say what happened.

    `files` are written into the work dir first (e.g. a test file next to the solution);
    `read_back` names work-dir files to return in `result.files`. `share`: a directory of the
    caller's (an agent's work dir) copied into the work dir as `share/` before the run and made
    equal to what the program left there after it (see `_copy_back`). Raises `SandboxUnavailable`
    where namespaces are not allowed, unless `allow_unisolated` (trusted code only).
    """
    limits = limits or Limits()
    why = isolation_error()
    if why is not None and not allow_unisolated:
        raise SandboxUnavailable(f"cannot isolate model-written code: {why}. Refusing to run it "
                                 "(callers running trusted code may pass allow_unisolated=True)")
    with tempfile.TemporaryDirectory(prefix="athanor-sbx-", ignore_cleanup_errors=True) as tmp:
        tmp_path = Path(tmp)
        work = tmp_path / "work"
        work.mkdir()
        (work / "main.py").write_text(code)
        for name, content in (files or {}).items():
            target = (work / name).resolve()
            if work.resolve() not in target.parents:
                raise AthanorError(f"sandbox file name {name!r} leaves the work dir")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
        if share is not None:
            # A copy, not a bind mount: the program never holds a handle on the caller's files, and
            # what comes back is checked file by file (no links, no devices) on the way out.
            shutil.copytree(share, work / SHARE, symlinks=True)
        (tmp_path / "stdin").write_text(stdin)
        uid = None
        if why is None and os.geteuid() == 0:
            uid = random.SystemRandom().randrange(*SANDBOX_UIDS)
            tmp_path.chmod(0o711)  # the program's uid may pass through to its work dir, not list here
            for path in (work, *work.rglob("*")):
                os.chown(path, uid, uid, follow_symlinks=False)  # a shared dir may hold links
        needed = [str(work), sys.prefix, sys.base_prefix, sys.exec_prefix,
                  os.path.dirname(os.path.realpath(sys.executable))]
        # CLOCK_MONOTONIC is one clock for the whole host (no time namespace here): the deadline
        # counts from now, so the bootstrap's own start-up is part of the program's wall time.
        deadline = time.monotonic() + limits.wall_s
        spec = {"work": str(work), "python": sys.executable, "isolated": why is None, "uid": uid,
                "deadline": deadline,
                "expose": needed,
                "limits": {"cpu_s": limits.cpu_s, "memory_mb": limits.memory_mb, "max_procs": limits.max_procs,
                           "file_mb": limits.file_mb, "max_files": limits.max_files}}
        status_r, status_w = os.pipe()
        cmd = [sys.executable, "-I", str(BOOTSTRAP), json.dumps(spec), str(status_w)]
        if why is None:
            cmd = [shutil.which("unshare") or "unshare", *_unshare_flags(), *cmd]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1"}
        started = time.perf_counter()
        with open(tmp_path / "stdin", "rb") as fin, open(tmp_path / "stdout", "wb") as fout, \
                open(tmp_path / "stderr", "wb") as ferr:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=fin, stdout=fout, stderr=ferr,
                                    start_new_session=True, pass_fds=(status_w,))
        os.close(status_w)
        timed_out = False
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()) + BACKSTOP_S)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            # Kill the session either way (the bootstrap has normally exited already): with
            # namespaces the kernel then reaps the whole PID namespace.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        wall = time.perf_counter() - started
        with os.fdopen(status_r, "rb") as f:
            raw = f.read(65536)
        try:
            # No report: pid 1 died before writing it, which only a signal from inside the
            # sandbox's own session can cause (the program killed its supervisor).
            status = json.loads(raw) if raw else {"signal": signal.SIGKILL, "orphaned": True}
        except json.JSONDecodeError:
            status = {"error": "sandbox bootstrap wrote a malformed report"}
        cap = limits.output_kb * 1024
        stdout, stderr = _read_capped(tmp_path / "stdout", cap), _read_capped(tmp_path / "stderr", cap)
        verdict, code, sig, detail = _verdict(status, stderr, timed_out)
        if share is not None:
            _copy_back(work / SHARE, Path(share))
        back = {}
        for name in read_back:
            p = work / name
            if p.is_file() and not p.is_symlink():
                back[name] = p.read_bytes()[:cap]
        return SandboxResult(verdict, code, sig, stdout, stderr, wall, why is None, detail, back)


def _copy_back(src: Path, dst: Path) -> None:
    """Make `dst` hold what the program left in `src`: its regular files and directories only. A
    symbolic link (it could point anywhere on the host once outside), a FIFO or a device is not
    brought back; a file the program deleted is deleted."""
    dst.mkdir(parents=True, exist_ok=True)
    kept = set()
    for entry in src.iterdir() if src.is_dir() and not src.is_symlink() else ():
        kept.add(entry.name)
        target = dst / entry.name
        if entry.is_symlink() or not (entry.is_file() or entry.is_dir()):
            continue
        if entry.is_dir():
            if target.is_file() or target.is_symlink():
                target.unlink()
            _copy_back(entry, target)
        else:
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.is_symlink():
                target.unlink()
            shutil.copyfile(entry, target)
    for old in dst.iterdir():
        if old.name not in kept:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()


def run_many(programs: Sequence[str], limits: Limits | None = None, *, stdins: Sequence[str] | None = None,
             workers: int | None = None, allow_unisolated: bool = False) -> list[SandboxResult]:
    """`run_python` over many programs at once (an RL batch's answers), results in the programs' order.

    Each program gets its own sandbox (work dir, namespaces, random uid, limits), so a verdict does
    not depend on what runs beside it; `workers` sandboxes run at a time, by default as many as the
    cores this process may use (threads only wait on the sandboxes' processes)."""
    stdins = list(stdins) if stdins is not None else [""] * len(programs)
    if len(stdins) != len(programs):
        raise AthanorError(f"{len(stdins)} stdins for {len(programs)} programs")

    def one(program_stdin: tuple[str, str]) -> SandboxResult:
        return run_python(program_stdin[0], limits, stdin=program_stdin[1], allow_unisolated=allow_unisolated)

    with ThreadPoolExecutor(max_workers=workers or len(os.sched_getaffinity(0)), thread_name_prefix="sandbox") as pool:
        return list(pool.map(one, zip(programs, stdins, strict=True)))
