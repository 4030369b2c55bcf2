"""Kill a real pre-training process with SIGKILL, resume it, and get bit-identical results."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import recipe_overrides

from athanor.train.loop import Checkpoints

pytestmark = pytest.mark.slow


def _cmd(out: Path, tokenizer_dir: Path, **train_kw) -> list[str]:
    return [sys.executable, "-m", "athanor", "pretrain", "--quiet", "--out", str(out),
            *recipe_overrides(tokenizer_dir, **train_kw)]


ENV = {**os.environ, "OMP_NUM_THREADS": "2"}


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "timed out waiting to kill"
        time.sleep(0.0005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_sigkill_midway_then_resume_is_bitwise_identical(tmp_path: Path, tokenizer_dir: Path) -> None:
    kw = dict(max_steps=40, ckpt_every=10, eval_every=20)
    straight = tmp_path / "straight"
    subprocess.run(_cmd(straight, tokenizer_dir, **kw), check=True, env=ENV, timeout=600)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(killed, tokenizer_dir, **kw), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ck = killed / "checkpoints"
    _kill_when(proc, lambda: (ck / "step_00000020.pt").exists())
    assert not (killed / "model.safetensors").exists()  # it really died mid-run
    subprocess.run(_cmd(killed, tokenizer_dir, **kw), check=True, env=ENV, timeout=600)

    assert (straight / "model.safetensors").read_bytes() == (killed / "model.safetensors").read_bytes()
    a, b = (json.loads((d / "eval.json").read_text()) for d in (straight, killed))
    assert a["val_loss"] == b["val_loss"] and b["resumed_from_step"] >= 20
    losses = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (straight, killed)]
    assert [r.get("loss") for r in losses[0]] == [r.get("loss") for r in losses[1]]  # no repeated or lost lines


def test_kill_during_checkpoint_write_leaves_a_loadable_latest(tmp_path: Path, tokenizer_dir: Path) -> None:
    """Checkpoint every step of a model big enough that writes take a while, and kill the
    process the moment a checkpoint's temporary file appears."""
    out = tmp_path / "run"
    cmd = _cmd(out, tokenizer_dir, max_steps=400, ckpt_every=1, keep_checkpoints=2)
    cmd += ["--model.hidden_size=256", "--model.intermediate_size=1024", "--model.num_hidden_layers=4"]
    ck = out / "checkpoints"
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def writing() -> bool:
        names = [p.name for p in ck.glob(".step_*")] if ck.is_dir() else []
        return bool(names) and any(ck.glob("step_*.pt"))

    _kill_when(proc, writing)
    assert list(ck.glob(".step_*.tmp")), "the kill should land mid-write"
    latest = Checkpoints(out, keep=2).load_latest()
    assert latest is not None and latest["step"] >= 1
    assert set(latest) >= {"model", "optimizer", "stage", "rng", "step"}
    assert torch.isfinite(next(iter(latest["model"].values()))).all()
    # And the run resumes from it and finishes.
    subprocess.run([*cmd, f"--train.max_steps={latest['step'] + 2}"], check=True, env=ENV, timeout=600)
    assert (out / "model.safetensors").is_file()
    # ...and leaves neither the killed write's temporary nor more than keep_checkpoints behind.
    assert not list(ck.glob(".step_*")) and len(list(ck.glob("step_*.pt"))) == 2
