"""The real `athanor` command in a subprocess: help texts, and one clear line for bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import recipe_overrides


def athanor(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "athanor", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


@pytest.mark.parametrize("cmd", [[], ["speedrun"], ["pretrain"], ["generate"], ["tokenizer"], ["tokenizer", "train"]])
def test_every_command_has_help(cmd: list[str]) -> None:
    r = athanor(*cmd, "--help")
    assert r.returncode == 0 and "usage: athanor" in r.stdout and len(r.stdout) > 200


def _fails_with_one_line(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith(("tokenize", "["))]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("athanor: error: ")
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_inputs(tmp_path: Path, tokenizer_dir: Path) -> None:
    base = ["pretrain", "--quiet", f"--tokenizer_path={tokenizer_dir}"]
    _fails_with_one_line(athanor(*base, "--out", str(tmp_path / "r1"), f"--data.paths={tmp_path}/nope.txt"),
                         "nope.txt", "no such file")
    (tmp_path / "empty.txt").write_text("\n\n")
    _fails_with_one_line(athanor(*base, "--out", str(tmp_path / "r2"), f"--data.paths={tmp_path}/empty.txt"),
                         "empty")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + '{"text": "unterminated\n')
    _fails_with_one_line(athanor(*base, "--out", str(tmp_path / "r3"), f"--data.paths={bad}"),
                         f"{bad}:2:", "malformed JSON")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    _fails_with_one_line(athanor(*base, "--out", str(tmp_path / "r4"), f"--data.paths={tmp_path}/t.parquet"),
                         "t.parquet", "'text'", "body")
    _fails_with_one_line(athanor(*base, "--train.warmup=3"), "train.warmup")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  hidden: 64\n")
    _fails_with_one_line(athanor(*base, "--recipe", str(recipe)), "r.yaml", "model.hidden")
    _fails_with_one_line(athanor("generate", str(tmp_path / "no-run")), "no-run", "config.json")


def test_pretrain_then_generate(tmp_path: Path, tokenizer_dir: Path) -> None:
    out = tmp_path / "run"
    r = athanor("pretrain", "--quiet", "--out", str(out), *recipe_overrides(tokenizer_dir))
    assert r.returncode == 0, r.stderr
    for name in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "athanor.yaml",
                 "metrics.jsonl", "loss.png", "eval.json"]:
        assert (out / name).is_file(), name
    result = json.loads((out / "eval.json").read_text())
    assert result["val_bpb"] < result["unigram_bpb"] * 1.5 and result["steps"] == 20
    g = athanor("generate", str(out), "--prompt", "def ", "--max-new-tokens", "12", "--seed", "0")
    assert g.returncode == 0 and g.stdout.startswith("def ")
    assert g.stdout == athanor("generate", str(out), "--prompt", "def ", "--max-new-tokens", "12",
                               "--seed", "0").stdout
