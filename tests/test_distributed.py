"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 follow the single-process loss curve."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import recipe_overrides

pytestmark = pytest.mark.slow

# Same global batch (2 ranks x 4 = 1 x 8) over the same windows: only the order of floating-point
# reductions differs, so per-step losses agree to well under 1e-3 relative.
TOLERANCE = 1e-3


def _losses(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _run(out: Path, tokenizer_dir: Path, nproc: int, parallel: str = "auto") -> list[float]:
    kw = dict(max_steps=20, batch_size=8 // nproc, log_every=1, ckpt_every=10, parallel=parallel)
    args = ["-m", "athanor", "pretrain", "--quiet", "--out", str(out), *recipe_overrides(tokenizer_dir, **kw)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
        cmd = [torchrun, "--standalone", f"--nproc_per_node={nproc}", *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return _losses(out)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_follow_single_process(parallel: str, tmp_path: Path, tokenizer_dir: Path) -> None:
    single = _run(tmp_path / "single", tokenizer_dir, 1)
    multi = _run(tmp_path / parallel, tokenizer_dir, 2, parallel)
    assert len(single) == len(multi) == 20
    worst = max(abs(a - b) / abs(a) for a, b in zip(single, multi, strict=True))
    assert worst < TOLERANCE, (worst, single, multi)
    assert multi[-1] < multi[0] - 0.5  # and it actually trained
    # The exported model is a normal single-file checkpoint either way.
    assert (tmp_path / parallel / "model.safetensors").is_file()
