"""Pid 1 of a sandbox (see sandbox.py): lock the filesystem, fork the program with limits, wait
for it until the wall-clock deadline, kill and reap everything below, report.

Run as `python -I sandbox_init.py SPEC_JSON STATUS_FD` inside fresh user, network, PID and mount
namespaces (or, unisolated, as a subreaper without them). It must stay stdlib-only and import
nothing from athanor: it runs before any of the program's code, and its report (JSON on
STATUS_FD) is the only thing the parent trusts.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import select
import signal
import sys
import time

# <sys/mount.h> and <linux/prctl.h>
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 32, 1024, 2048, 4096, 16384
MS_RELATIME, MS_STRICTATIME = 1 << 21, 1 << 24
OPTION_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 24, 38, 47, 4
PR_SET_CHILD_SUBREAPER = 36
CPUCLOCK_PROF = 0  # <linux/posix-timers.h>: the clock RLIMIT_CPU is checked against
# Virtual filesystems: the kernel itself guards writes there (and /proc is the sandbox's own).
VIRTUAL = ("/proc", "/sys")

libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _unescape(path: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    return path.encode().decode("unicode_escape").encode("latin-1").decode()


def lock_filesystem(work: str) -> None:
    """Everything read-only except `work` (its own bind mount stays writable)."""
    _check(libc.mount(work.encode(), work.encode(), None, MS_BIND, None), f"bind {work}")
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for fields in mounts:
        target, options = _unescape(fields[4]), fields[5].split(",")
        if target == work or "ro" in options:
            continue
        # A remount must repeat the flags a less privileged namespace may not drop (nosuid, ...).
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY
        for opt in options:
            flags |= OPTION_FLAGS.get(opt, 0)
        if libc.mount(None, target.encode(), None, flags, None) != 0:
            if target.startswith(VIRTUAL) or not os.path.exists(target):
                continue
            err = ctypes.get_errno()
            raise OSError(err, f"cannot make {target} read-only: {os.strerror(err)}")


def expose(paths: list[str]) -> None:
    """Make `paths` reachable for an unprivileged uid without opening anything else up.

    The interpreter may live under a directory only root may enter (e.g. pyenv in /root, mode
    0700), and so may the work dir (TMPDIR there). In this mount namespace, such a directory is
    covered by an empty tmpfs into which only the needed paths are bind-mounted back, so the rest
    of it stays out of sight. Each is held open (O_PATH) across the cover and bound back from its
    /proc/self/fd link, which still leads to the directory the tmpfs now hides.
    """
    groups: dict[str, list[str]] = {}
    for path in dict.fromkeys(os.path.realpath(p) for p in paths):
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            ancestor = "/" + "/".join(parts[:i])
            if not os.stat(ancestor).st_mode & 0o001:  # others may not traverse it
                groups.setdefault(ancestor, []).append(path)
                break
    for ancestor, inner in groups.items():
        held = [(os.open(path, os.O_PATH | os.O_DIRECTORY), path) for path in inner]
        _check(libc.mount(b"tmpfs", ancestor.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755,size=64k"),
               f"cover {ancestor}")
        for fd, path in held:
            os.makedirs(path, mode=0o755, exist_ok=True)
            _check(libc.mount(f"/proc/self/fd/{fd}".encode(), path.encode(), None, MS_BIND | MS_REC, None),
                   f"re-expose {path}")
            os.close(fd)


def drop_privileges(uid: int | None) -> None:
    """No capability survives exec: empty bounding and ambient sets, and no way to regain them.

    Started by real root, the program also becomes the unprivileged `uid`: the kernel never
    applies RLIMIT_NPROC to uid 0, whatever the namespace, so a fork bomb needs another uid.
    """
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        _check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def set_limits(limits: dict) -> None:
    mb = 1024 * 1024
    for res, value in ((resource.RLIMIT_AS, limits["memory_mb"] * mb), (resource.RLIMIT_NPROC, limits["max_procs"]),
                       (resource.RLIMIT_FSIZE, limits["file_mb"] * mb), (resource.RLIMIT_NOFILE, limits["max_files"]),
                       (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (value, value))
    # SIGXCPU at the limit ends a program that does not handle it; one that does gets SIGKILL a
    # second later (cpu_limit_reached tells that SIGKILL from any other).
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_s"], limits["cpu_s"] + 1))


def cpu_limit_reached(pid: int, sig: int, limits: dict) -> bool:
    """Whether the zombie `pid` died of the signal RLIMIT_CPU sends, at a limit it had reached.

    The kernel checks the limit against the process's tick-sampled profiling clock, which under
    load runs 10-25% ahead of the exact runtime that rusage reports; so compare the very clock
    the kernel compared, read from the unreaped zombie, with the limit that sends `sig`.
    """
    limit = {signal.SIGXCPU: limits["cpu_s"], signal.SIGKILL: limits["cpu_s"] + 1}.get(sig)
    if limit is None:
        return False
    try:
        return time.clock_gettime(((~pid) << 3) | CPUCLOCK_PROF) >= limit
    except OSError:
        return False


def descendants() -> list[int]:
    """Every live process below this one (pid 1 sees only its namespace; else all of /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # the name may hold spaces and ')'
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [os.getpid()]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def kill_descendants() -> None:
    """SIGKILL everything below this process, however it detached (setsid, double fork)."""
    for pid in descendants():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def reap_all() -> None:
    """Kill and reap until no descendant is left. As a subreaper this process inherits every
    orphan below it, so one that forked between a scan and its kill is found by the next scan."""
    while True:
        kill_descendants()
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def start_program(spec: dict) -> int:
    """Fork the program; its pid once it has exec'd. A failure before exec raises OSError."""
    err_r, err_w = os.pipe()  # close-on-exec: stays empty if exec succeeds
    pid = os.fork()
    if pid == 0:
        try:
            os.close(err_r)
            os.setsid()  # the program's own group: kill(0, ...) reaches only what it started
            os.chdir(spec["work"])
            if spec["isolated"]:
                drop_privileges(spec["uid"])
            set_limits(spec["limits"])
            os.execv(spec["python"], [spec["python"], "-E", "-s", "main.py"])
        except BaseException as e:
            os.write(err_w, str(e).encode()[:4000])
        os._exit(127)
    os.close(err_w)
    with os.fdopen(err_r, "rb") as f:
        why = f.read().decode(errors="replace")
    if why:
        os.waitpid(pid, 0)
        raise OSError(f"could not start the program: {why}")
    return pid


def main() -> None:
    spec, status_fd = json.loads(sys.argv[1]), int(sys.argv[2])
    os.set_inheritable(status_fd, False)
    report: dict = {}
    try:
        if spec["isolated"]:
            if spec["uid"] is not None:
                expose(spec["expose"])
            lock_filesystem(spec["work"])
        # Orphans below us come to us, not to the host's init, so the end of the run reaches them.
        _check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "subreaper")
        pid = start_program(spec)
        pidfd = os.pidfd_open(pid)
        exited, _, _ = select.select([pidfd], [], [], max(0.0, spec["deadline"] - time.monotonic()))
        os.close(pidfd)
        if not exited:
            report["timeout"] = True
            kill_descendants()
        # Look at the zombie before reaping it: only then can its CPU clock still be read.
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        if info.si_code == os.CLD_EXITED:
            report["returncode"] = info.si_status
        else:
            report.update(signal=info.si_status,
                          cpu_limit_reached=cpu_limit_reached(pid, info.si_status, spec["limits"]))
        os.waitpid(pid, 0)
    except OSError as e:
        report = {"error": f"sandbox setup failed: {e}"}
    reap_all()  # whatever the program left running, in the namespace or (unisolated) not
    os.write(status_fd, json.dumps(report).encode())


if __name__ == "__main__":
    main()
