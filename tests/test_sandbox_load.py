"""Sandbox verdicts on a busy machine: each must name its cause whatever else runs on the cores.

The fixture shares one core between the sandboxed program and a few processes that compute and
sleep by turns (1 ms each). Such neighbours make the kernel's tick-sampled CPU clock, which
RLIMIT_CPU is checked against, run some 20-25% ahead of the exact runtime that rusage reports;
steady busy loops do not (the ticks then fall fairly)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from athanor.rl.sandbox import Limits, run_python

NEIGHBOUR = """
import time
while True:
    start = time.perf_counter()
    while time.perf_counter() - start < 0.001:
        pass
    time.sleep(0.001)
"""


@pytest.fixture
def contended_core():
    """Pin this process (so every sandbox it starts) and 2 bursty neighbours onto one core."""
    saved = os.sched_getaffinity(0)
    neighbours: list[subprocess.Popen] = []
    try:
        os.sched_setaffinity(0, {min(saved)})
        for _ in range(2):
            neighbours.append(subprocess.Popen([sys.executable, "-c", NEIGHBOUR]))
        yield
    finally:
        os.sched_setaffinity(0, saved)
        for p in neighbours:
            p.kill()
            p.wait()


def run(code: str, **limits):
    return run_python(textwrap.dedent(code), Limits(**limits), allow_unisolated=True)


@pytest.mark.slow
def test_cpu_limit_is_a_timeout_every_time(contended_core):
    results = [run("while True: pass", cpu_s=3, wall_s=120) for _ in range(4)]
    assert [(r.verdict, r.detail) for r in results] == [("timeout", "CPU-time limit reached")] * 4


PROGRAMS = {
    # SIGXCPU handled: the hard limit's SIGKILL a second later is still the CPU limit.
    "ignores SIGXCPU": ("""
        import signal
        signal.signal(signal.SIGXCPU, signal.SIG_IGN)
        while True: pass
        """, {"cpu_s": 1}, ("timeout", 9, "CPU")),
    # Past its CPU limit, then killed by itself: a kill, not the limit's.
    "kills itself after its CPU limit": ("""
        import os, resource, signal
        signal.signal(signal.SIGXCPU, signal.SIG_IGN)
        while sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) < 1.0:
            pass
        os.kill(os.getpid(), signal.SIGKILL)
        """, {"cpu_s": 1}, ("killed", 9, "SIGKILL")),
    "kills itself": ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", {}, ("killed", 9, "SIGKILL")),
    "sleeps forever": ("import time; time.sleep(600)", {"wall_s": 2}, ("timeout", None, "wall-clock")),
    "allocates forever": ("""
        chunks = []
        while True: chunks.append(bytearray(50 * 1024 * 1024))
        """, {"memory_mb": 256}, ("memory", None, "memory")),
    "writes a huge file": ("""
        with open('big.bin', 'wb') as f:
            while True: f.write(b'x' * 1024 * 1024)
        """, {"file_mb": 4}, ("file_too_large", None, "file-size")),
    # More open files than the kernel allows anyone: the sandbox cannot start the program.
    "cannot be started": ("print('never')", {"max_files": 1 << 30}, ("error", None, "could not start")),
    "fails": ("raise SystemExit(3)", {}, ("failed", None, "")),
    "succeeds": ("print('fine')", {}, ("ok", None, "")),
}


@pytest.mark.parametrize("name", PROGRAMS)
def test_verdicts_under_load(contended_core, name):
    code, limits, (verdict, sig, why) = PROGRAMS[name]
    r = run(code, **{"wall_s": 60, **limits})
    assert (r.verdict, r.signal) == (verdict, sig) and why in r.detail, (r.detail, r.stderr[-500:])
