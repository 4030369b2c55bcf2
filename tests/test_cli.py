"""The real `athanor` command in a subprocess: help texts, and one clear line for bad input."""

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import recipe_overrides

from athanor.cli import build_parser, main


def athanor(*args: str, cwd: Path | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "athanor", *args], input=stdin, capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path the parser accepts, groups (like `tokenizer`) and their actions alike."""
    out = [path]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _commands(sub, (*path, name))
    return out


def test_every_command_has_help(capsys: pytest.CaptureFixture) -> None:
    commands = _commands(build_parser())
    assert len(commands) > 15
    for cmd in commands:
        with pytest.raises(SystemExit) as stop:
            build_parser().parse_args([*cmd, "--help"])
        text = capsys.readouterr().out
        assert stop.value.code == 0 and text.startswith(f"usage: athanor {' '.join(cmd)}".rstrip()), cmd
        description = text.split("\n\n")[1]  # after the usage block: what the command does
        assert len(description) > 40, (cmd, description)
    r = athanor("--help")  # and the installed entry point prints the same
    assert r.returncode == 0 and r.stdout.startswith("usage: athanor")


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
    assert result["steps"] == 20
    # 20 tiny steps do not beat the unigram baseline yet, but they must leave the uniform guess
    # (ln 512 = 6.24 nats per token) well behind and the logged training loss must fall.
    assert result["val_loss"] < math.log(512) - 0.5
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[-1] < losses[0] - 0.4
    g = athanor("generate", str(out), "--prompt", "def ", "--max-new-tokens", "12", "--seed", "0")
    assert g.returncode == 0 and g.stdout.startswith("def ")
    assert g.stdout == athanor("generate", str(out), "--prompt", "def ", "--max-new-tokens", "12",
                               "--seed", "0").stdout


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    from serve_helpers import make_run_dir

    return make_run_dir(tmp_path_factory.mktemp("tiny-run"), tokenizer_dir)  # a 128-token context


def without_serve_extra(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """`athanor ARGS` in a Python where fastapi and uvicorn cannot be imported, as without the serve extra."""
    code = ("import sys; sys.modules.update(fastapi=None, uvicorn=None); from athanor.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *args], input=stdin, capture_output=True, text=True,
                          timeout=300)


def test_serve_and_demo_without_the_serve_extra_say_what_to_install(tiny_run: Path) -> None:
    for command in ("serve", "demo"):
        r = without_serve_extra(command, str(tiny_run))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        _fails_with_one_line(r, f"athanor {command}", "pip install", "[serve]")
    chat = without_serve_extra("chat", str(tiny_run), "--max-tokens", "4", stdin="hi\n/quit\n")
    assert chat.returncode == 0 and "assistant> " in chat.stdout, chat.stderr  # chat needs no HTTP server


def test_generate_rejects_bad_settings_and_clamps_to_the_context(tiny_run: Path) -> None:
    run = str(tiny_run)
    _fails_with_one_line(athanor("generate", run, "--prompt", "x " * 400), "prompt", "context is 128")
    _fails_with_one_line(athanor("generate", run, "--temperature", "-1"), "temperature", "-1")
    _fails_with_one_line(athanor("generate", run, "--top-p", "0"), "top_p")
    _fails_with_one_line(athanor("generate", run, "--max-new-tokens", "-3"), "max_tokens")
    _fails_with_one_line(athanor("generate", run, "--num-samples", "0"), "num-samples")
    # Too many new tokens is not an error: as on the server, generation ends where the context is full.
    r = athanor("generate", run, "--max-new-tokens", "100000", "--temperature", "0")
    assert r.returncode == 0, r.stderr


def test_chat_checks_its_settings_before_the_first_message(tiny_run: Path) -> None:
    _fails_with_one_line(athanor("chat", str(tiny_run), "--temperature", "3", stdin=""), "temperature")
    # One message longer than the whole context is refused, and the chat goes on.
    r = athanor("chat", str(tiny_run), "--max-tokens", "4", stdin="x " * 400 + "\nhello\n/quit\n")
    assert r.returncode == 0, r.stderr
    assert "context is 128" in r.stdout and r.stdout.count("assistant> ") == 1



def _writer_args(command: str, tmp_path: Path) -> list[str]:
    """Arguments (all but --out) for a small run of a command that writes a fresh directory."""
    if command == "tokenizer train":
        text = tmp_path / "notes.txt"
        text.write_text("def add(a, b):\n    return a + b\n" * 50)
        return ["tokenizer", "train", "--data", str(text), "--vocab-size", "300", "--quiet"]
    if command == "synth tasks":
        return ["synth", "tasks", "--train", "4", "--heldout", "2"]
    from conftest import tiny_model_config

    from athanor.model.hf import save_pretrained
    from athanor.model.llama import LlamaModel
    from athanor.model.lora import LoraConfig, apply_lora, save_adapter

    model = LlamaModel(tiny_model_config())
    save_pretrained(model, tmp_path / "base")
    save_adapter(model, apply_lora(model, LoraConfig(r=2), seed=0), tmp_path / "adapter")
    return ["lora", "merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter")]


@pytest.mark.parametrize("command", ["tokenizer train", "synth tasks", "lora merge"])
def test_writers_refuse_to_overwrite_without_force(command: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    args = _writer_args(command, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert main([*args, "--out", str(out)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("athanor: error: ") and "--force" in err[0], err
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"
    assert main([*args, "--out", str(out), "--force"]) == 0
    assert len(list(out.iterdir())) > 1
