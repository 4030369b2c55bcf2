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
from pathlib import Path

import pytest

from athanor.rl import sandbox
from athanor.rl.sandbox import Limits, run_many, run_python

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
        yield neighbours
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


# One limit set for a whole batch (as an RL batch is graded): the expected verdict of each program.
BULK_LIMITS = Limits(wall_s=20, cpu_s=1, memory_mb=256, file_mb=4)
BULK = [
    ("import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True: pass", "timeout", "CPU"),
    ("import time; time.sleep(600)", "timeout", "wall-clock"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "killed", "SIGKILL"),
    ("chunks = []\nwhile True: chunks.append(bytearray(50 * 1024 * 1024))", "memory", "memory"),
    ("with open('big.bin', 'wb') as f:\n    while True: f.write(b'x' * 1024 * 1024)", "file_too_large", "file-size"),
    # Forks sleepers until the process limit refuses one, then fails: the sleepers go with the sandbox.
    ("import os, time\nwhile True:\n    if os.fork() == 0:\n        time.sleep(600)", "failed", ""),
    ("assert 1 + 1 == 3", "failed", ""),
    ("import sys\nprint(sys.stdin.read()[::-1])", "ok", ""),
]


@pytest.mark.slow
@pytest.mark.skipif(sandbox.isolation_error() is not None, reason="the fork bomb needs the sandbox's own uid")
def test_run_many_keeps_exact_verdicts_and_cleans_up(contended_core, own_tempdir):
    """24 sandboxes, 4 at a time, on one core shared with bursty neighbours: each verdict is its own
    program's, each output answers its own stdin, and no work dir or process is left behind."""
    batch = [BULK[(i * 5) % len(BULK)] for i in range(3 * len(BULK))]  # every kind 3 times, interleaved
    stdins = [f"answer-{i}" for i in range(len(batch))]
    results = run_many([code for code, _, _ in batch], BULK_LIMITS, stdins=stdins, workers=4)
    for (code, verdict, why), stdin, r in zip(batch, stdins, results, strict=True):
        assert r.verdict == verdict and why in r.detail, (code, r.verdict, r.detail, r.stderr[-300:])
        if verdict == "ok":
            assert r.stdout == stdin[::-1] + "\n"
    assert list(own_tempdir.iterdir()) == []
    children = {c for task in Path("/proc/self/task").iterdir() for c in (task / "children").read_text().split()}
    assert children == {str(p.pid) for p in contended_core}
