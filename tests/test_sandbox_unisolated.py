"""The unisolated mode (trusted code, no namespaces): the wall clock must still reach every process
the program started, however it detached from it. Forced here by hiding `unshare`."""

from __future__ import annotations

import os
import signal
import textwrap

import pytest

from athanor.rl import sandbox
from athanor.rl.sandbox import Limits, run_python


@pytest.fixture
def unisolated(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no `unshare` program: no namespaces
    sandbox.isolation_error.cache_clear()
    try:
        yield
    finally:
        sandbox.isolation_error.cache_clear()


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (tells a reused pid apart), None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


# The program and the process it starts each report "pid start-time"; then the program does
# `then` (waits forever, or ends) and the other one waits forever.
ESCAPE = """
    import os, time
    def me():
        with open('/proc/self/stat') as f:
            return f'{{os.getpid()}} {{f.read().rsplit(")", 1)[1].split()[19]}} '
    r, w = os.pipe()
    if os.fork() == 0:
        {detach}
        os.write(w, me().encode())
        {body}
    print(me() + os.read(r, 100).decode(), flush=True)
    {then}
    """
DETACH = {
    "same-group": "pass",
    "setsid": "os.setsid()",
    "double-fork": "os.setsid()\n    if os.fork():\n        os._exit(0)",  # the middle process exits
}
BODY = {"sleeps": "time.sleep(600)", "busy-loops": "while True: pass"}


def _run_and_check_all_gone(detach: str, body: str, then: str, verdict: str) -> None:
    code = textwrap.dedent(ESCAPE).format(detach=DETACH[detach], body=BODY[body], then=then)
    r = run_python(code, Limits(wall_s=3, cpu_s=60), allow_unisolated=True)
    words = r.stdout.split()
    started = {int(pid): start for pid, start in zip(words[::2], words[1::2], strict=True)}
    try:
        assert not r.isolated and len(started) == 2
        assert r.verdict == verdict, (r.detail, r.stderr[-500:])
        assert not [pid for pid, start in started.items() if _start_time(pid) == start]  # gone (or pid reused)
    finally:
        for pid, start in started.items():
            if _start_time(pid) == start:  # the old sandbox let it live: do not leave it running
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(("detach", "body"), [("same-group", "sleeps"), ("setsid", "sleeps"),
                                              ("setsid", "busy-loops"), ("double-fork", "sleeps")])
def test_wall_clock_kills_every_descendant(unisolated, detach, body):
    _run_and_check_all_gone(detach, body, then="time.sleep(600)", verdict="timeout")


def test_nothing_outlives_a_program_that_ends(unisolated):
    _run_and_check_all_gone("double-fork", "sleeps", then="pass", verdict="ok")
