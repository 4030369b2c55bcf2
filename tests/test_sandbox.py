"""Hostile programs against the sandbox: each must be contained, with a clear verdict, and the
test process (the parent) must come through every one of them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from athanor.rl import sandbox
from athanor.rl.sandbox import Limits, SandboxUnavailable, run_python

pytestmark = pytest.mark.skipif(sandbox.isolation_error() is not None,
                                reason=f"no namespaces here: {sandbox.isolation_error()}")


def _leftovers(work: str) -> list[int]:
    """Pids still working in `work`, the run's own work dir (unique to it, and printed by the
    program): other sandboxes on the machine, this test's own included, are not this run's."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "cwd").removesuffix(" (deleted)") == work:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def run(code: str, **limits) -> sandbox.SandboxResult:
    return run_python(textwrap.dedent(code), Limits(**limits))


def test_ordinary_program_runs_and_returns_output():
    r = run("import sys; print(sum(range(10))); print('warn', file=sys.stderr); open('out.txt','w').write('x')")
    assert r.verdict == "ok" and r.returncode == 0 and r.isolated
    assert r.stdout.strip() == "45" and "warn" in r.stderr


def test_failing_program_is_failed_with_its_exit_code():
    r = run("raise SystemExit(3)")
    assert (r.verdict, r.returncode) == ("failed", 3)


def test_infinite_loop_hits_the_cpu_limit():
    r = run("while True: pass", cpu_s=1, wall_s=60)
    assert r.verdict == "timeout" and "CPU" in r.detail


def test_sleeping_forever_hits_the_wall_clock_limit():
    r = run("import os, time; print(os.getcwd(), flush=True); time.sleep(600)", wall_s=1.5)
    assert r.verdict == "timeout" and "wall-clock" in r.detail
    assert not _leftovers(r.stdout.split()[0])


def test_fork_bomb_is_capped_and_leaves_nothing_behind():
    # Fork until the kernel says no, report how far it got, then keep forking forever.
    r = run("""
        import os, sys, time
        print(os.getcwd(), flush=True)
        n = 0
        while True:
            try:
                if os.fork() == 0:
                    time.sleep(600)
                    os._exit(0)
                n += 1
            except OSError:
                break
        print(n, flush=True)
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """, max_procs=8, wall_s=3)
    assert r.verdict == "timeout"
    work, forked = r.stdout.split()[:2]
    assert int(forked) < 8  # RLIMIT_NPROC counted the sandbox's processes only
    assert not _leftovers(work)


def test_another_sandbox_running_is_no_leftover_of_this_one(own_tempdir):
    # A second run, in the background, until this test drops a `stop` file into its work dir.
    tmp_path = own_tempdir
    background: list[sandbox.SandboxResult] = []
    other = threading.Thread(target=lambda: background.append(run("""
        import os, time
        print('running', flush=True)
        while not os.path.exists('stop'):
            time.sleep(0.02)
        """, wall_s=300)))
    other.start()
    try:
        while other.is_alive() and "running" not in "".join(
                p.read_text() for p in tmp_path.glob("athanor-sbx-*/stdout")):
            time.sleep(0.02)
        r = run("import os; print(os.getcwd())")
        assert r.verdict == "ok" and not _leftovers(r.stdout.strip())
    finally:
        for work in tmp_path.glob("athanor-sbx-*/work"):
            (work / "stop").write_text("")
        other.join()
    assert background[0].verdict == "ok"  # it ran alongside, to the end


def test_memory_hog_hits_the_memory_limit():
    r = run("chunks = []\nwhile True: chunks.append(bytearray(50 * 1024 * 1024))", memory_mb=256)
    assert r.verdict == "memory"


def test_huge_file_write_hits_the_file_size_limit():
    r = run("""
        with open('big.bin', 'wb') as f:
            for _ in range(1000):
                f.write(b'x' * 1024 * 1024)
        """, file_mb=4)
    assert r.verdict == "file_too_large"


def test_network_connect_fails_and_reaches_nobody():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        r = run(f"""
            import socket
            socket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'exfiltrated')
            """)
        assert r.verdict == "failed" and "Network is unreachable" in r.stderr
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody knocked
    finally:
        server.close()


def test_writes_outside_the_work_dir_fail(tmp_path):
    target = tmp_path / "pwned.txt"
    r = run(f"""
        import os, subprocess
        for path in [{str(target)!r}, '/tmp/athanor-pwned', os.path.expanduser('~/../pwned')]:
            try:
                open(path, 'w').write('x')
                print('WROTE', path)
            except OSError as e:
                print('refused', path, e.strerror)
        # Nor can it undo the read-only mounts: no capability survived into the program.
        print(subprocess.run(['mount', '-o', 'remount,rw', '/'], capture_output=True).returncode)
        open('inside.txt', 'w').write('fine')
        """)
    assert r.verdict == "ok", r.stderr
    assert "WROTE" not in r.stdout and r.stdout.count("refused") == 3
    assert r.stdout.split()[-1] != "0"  # the remount failed
    assert not target.exists() and not Path("/tmp/athanor-pwned").exists()


def test_parent_environment_secrets_are_out_of_reach(monkeypatch):
    secret = "athanor-secret-7f3a9c"
    monkeypatch.setenv("ATHANOR_TEST_SECRET", secret)
    r = run(f"""
        import os
        print(dict(os.environ))
        for pid in [{os.getpid()}, {os.getppid()}, 1]:
            try:
                print(open(f'/proc/{{pid}}/environ').read())
            except OSError as e:
                print('no', pid, e.strerror)
        """)
    assert r.verdict == "ok", r.stderr
    assert secret not in r.stdout + r.stderr
    assert "ATHANOR_TEST_SECRET" not in r.stdout


def test_killing_the_parent_fails_and_the_parent_survives():
    canary = subprocess.Popen(["sleep", "60"])
    try:
        r = run(f"""
            import os, signal
            for target in [os.getppid(), {os.getpid()}, {canary.pid}, -1]:
                try:
                    os.kill(target, signal.SIGKILL)
                    print('sent', target, flush=True)
                except OSError as e:
                    print('refused', target, e.strerror, flush=True)
            os.killpg(0, signal.SIGKILL)  # its own group, which holds only itself
            """)
        assert r.verdict == "killed" and r.signal == 9
        assert canary.poll() is None  # a process outside the sandbox survived kill(-1) too
        assert f"refused {os.getpid()}" in r.stdout and f"refused {canary.pid}" in r.stdout
    finally:
        canary.kill()
        canary.wait()


def test_files_in_and_out():
    r = run_python("import helper; open('answer.txt', 'w').write(str(helper.VALUE * 2))",
                   files={"helper.py": "VALUE = 21\n"}, read_back=("answer.txt", "missing.txt"))
    assert r.ok and r.files == {"answer.txt": b"42"}


def test_fails_closed_without_namespaces(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no `unshare` program: isolation impossible
    sandbox.isolation_error.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match="Refusing to run"):
            run_python("print('never')")
        r = run_python("print('trusted')", allow_unisolated=True)
        assert r.ok and not r.isolated and r.stdout.strip() == "trusted"
    finally:
        sandbox.isolation_error.cache_clear()


def test_private_directories_stay_hidden_and_nothing_is_left_behind():
    secret_dir = Path.home()
    r = run(f"""
        import os, sys
        try:
            print(sorted(os.listdir({str(secret_dir)!r})))
        except OSError as e:
            print('refused', e.strerror)
        print(os.getcwd())
        print('x' * 200_000)
        """, output_kb=16)
    assert r.verdict == "ok", r.stderr
    work = r.stdout.splitlines()[1]
    assert not Path(work).exists()  # the throwaway work dir is gone
    assert r.stdout.endswith("[... output truncated]") and len(r.stdout) < 17 * 1024
    listing = r.stdout.splitlines()[0]
    for name in os.listdir(secret_dir):  # none of the parent's home shows, beyond what the interpreter needs
        if name not in sys.prefix + sys.base_prefix:
            assert f"'{name}'" not in listing


def test_temp_dir_under_a_directory_only_root_may_enter(own_tempdir):
    # E.g. TMPDIR under /root: the program's uid (a random one under root) gets its work dir and
    # nothing else of that directory.
    own_tempdir.chmod(0o700)
    (own_tempdir / "private.txt").write_text("root's")
    r = run(f"import os; print(os.listdir({str(own_tempdir)!r})); open('out.txt', 'w').write('x')")
    assert r.verdict == "ok", (r.detail, r.stderr)
    assert "private.txt" not in r.stdout
