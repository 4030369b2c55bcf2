"""The teacher trick against real teachers: a local run dir, and a real model behind a loopback HTTP server."""

from __future__ import annotations

import functools
import http.server
import json
import socket
import threading

import pytest
import torch
from conftest import tiny_model_config
from teacher_server import TeacherServer

from athanor.cli import main
from athanor.data.distill import DistillConfig, _verify_code, distill, make_teacher, seed_instructions
from athanor.data.formats import load_examples
from athanor.errors import AthanorError
from athanor.lm.endpoint import EndpointError, EndpointLM
from athanor.model.hf import save_pretrained
from athanor.model.llama import LlamaModel
from athanor.rl import sandbox

# An untrained model is a poor but real teacher: most of its tasks are too short, so allow many tries.
CFG = DistillConfig(n=3, max_tokens=20, min_instruction_chars=3, near_dup_jaccard=0.9, max_attempts_factor=60)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer_dir):
    out = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    save_pretrained(LlamaModel(tiny_model_config()), out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((tokenizer_dir / name).read_bytes())
    return out


def test_local_run_dir_teacher_writes_alpaca_records(teacher_dir, tmp_path):
    out = tmp_path / "d.jsonl"
    r = distill(make_teacher(str(teacher_dir)), out, seed_instructions(None, 0), CFG)
    assert r["accepted"] == 3
    examples = load_examples(out)  # valid Alpaca data for `athanor sft`
    assert [e.format for e in examples] == ["alpaca"] * 3
    assert len({e.messages[0]["content"] for e in examples}) == 3


def test_http_teacher_down_midway_keeps_everything_and_resumes(teacher_dir, tmp_path):
    out = tmp_path / "d.jsonl"
    seeds = seed_instructions(None, 0)
    with TeacherServer(teacher_dir) as url:
        assert distill(EndpointLM(url, "tiny"), out, seeds, CFG)["accepted"] == 3
    first = out.read_text()
    # The server is gone: a clear error, and the three records are still there.
    with pytest.raises(EndpointError, match=r"unreachable.*3 accepted examples so far are safe"):
        distill(EndpointLM(url, "tiny", retries=0), out, seeds, DistillConfig(**{**CFG.__dict__, "n": 5}))
    assert out.read_text() == first
    with TeacherServer(teacher_dir) as url2:
        r = distill(EndpointLM(url2, "tiny"), out, seeds, DistillConfig(**{**CFG.__dict__, "n": 5}))
    assert r["accepted"] == 5 and out.read_text().startswith(first)
    assert len(out.read_text().splitlines()) == 5


def test_a_server_that_is_not_a_chat_api_is_a_clear_error(tmp_path):
    # A real web server (a static file server), simply the wrong kind: it refuses POST.
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(EndpointError, match="answered HTTP 501"):
            distill(EndpointLM(f"http://127.0.0.1:{server.server_address[1]}/v1", "x"), tmp_path / "o.jsonl",
                    ["Say hello."], CFG)
    finally:
        server.shutdown()
        server.server_close()
    assert not (tmp_path / "o.jsonl").exists()


def test_torn_last_line_is_dropped_on_resume(teacher_dir, tmp_path):
    out = tmp_path / "d.jsonl"
    out.write_text(json.dumps({"instruction": "Name a colour of the sky.", "input": "", "output": "blue"}) + "\n"
                   + '{"instruction": "half a rec')
    r = distill(make_teacher(str(teacher_dir)), out, ["Say hello."], CFG)
    lines = out.read_text().splitlines()
    assert r["accepted"] == 3 and len(lines) == 3 and json.loads(lines[0])["output"] == "blue"


def test_rejections_are_logged_with_their_reason(teacher_dir, tmp_path):
    out = tmp_path / "d.jsonl"
    # Twenty tokens never make 600 characters: every candidate is rejected, each one logged.
    cfg = DistillConfig(**{**CFG.__dict__, "n": 1, "min_instruction_chars": 600, "max_attempts_factor": 3})
    with pytest.raises(AthanorError, match="only 0 of 1 candidates passed the filters after 3 tries"):
        distill(make_teacher(str(teacher_dir)), out, ["Say hello."], cfg)
    rejected = [json.loads(line) for line in out.with_suffix(".rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == 3 and all(r["rejected"] == "instruction length" for r in rejected)
    assert all(len(r["instruction"]) < 600 and r["teacher"] == str(teacher_dir) for r in rejected)


@pytest.mark.skipif(sandbox.isolation_error() is not None, reason="no sandbox here")
def test_code_in_answers_is_verified_in_the_sandbox():
    assert _verify_code("```python\ndef f(x):\n    return x + 1\nassert f(1) == 2\n```") is None
    assert _verify_code("```python\ndef f(x):\n    return x + 1\nassert f(1) == 3\n```").startswith("code failed")
    assert _verify_code("```python\ndef f(x):\n    return x +\n```").startswith("code failed")
    assert _verify_code("Blue.") is None  # no code, nothing to verify


def test_cli_distill_unreachable_teacher(tmp_path, capsys):
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    address = port.getsockname()[1]
    port.close()  # nothing listens there now
    code = main(["synth", "distill", "--teacher", f"http://127.0.0.1:{address}/v1", "--out", str(tmp_path / "o.jsonl"),
                 "-n", "2", "--quiet"])
    assert code == 2 and "unreachable" in capsys.readouterr().err
