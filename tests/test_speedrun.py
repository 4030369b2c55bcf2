"""The speedrun end to end, shortened: every stage runs and the report says what it should."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_short_speedrun_writes_a_report_that_beats_unigram(tmp_path: Path) -> None:
    out = tmp_path / "speedrun"
    r = subprocess.run([sys.executable, "-m", "athanor", "speedrun", "--quiet", "--out", str(out),
                        "--train.max_steps=80", "--train.eval_every=40", "--train.warmup_steps=20"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    report = (out / "report.md").read_text()
    for heading in ["## Held-out result", "## Stages and timings", "## Loss curve", "## Samples", "## Serving",
                    "## Settings"]:
        assert heading in report
    result = json.loads((out / "eval.json").read_text())
    assert result["val_bpb"] < 0.9 * result["unigram_bpb"]
    assert f"{result['val_bpb']:.3f}" in report and f"{result['unigram_bpb']:.3f}" in report
    assert (out / "loss.png").stat().st_size > 10_000
    sft = json.loads((out / "sft" / "eval.json").read_text())["behavior"]  # post-training stage
    assert "## Post-training: SFT" in report and sft["sft"]["answer_rate"] > sft["base"]["answer_rate"] + 0.5
