"""Instruction data formats: each normalizes to messages; each kind of bad record is named by place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from athanor.cli import main
from athanor.data.formats import check_file, load_examples
from athanor.errors import AthanorError


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_every_format_normalizes_to_messages(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"instruction": "Add.", "input": "2 3", "output": "5"},
        {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}]},
        {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
        {"prompt": "Capital of France?", "completion": "Paris"},
        {"prompt": [{"role": "user", "content": "x?"}], "completion": [{"role": "assistant", "content": "y"}]},
    ])
    exs = load_examples(path)
    assert [e.format for e in exs] == ["alpaca", "messages", "sharegpt", "prompt_completion", "prompt_completion"]
    assert exs[0].messages == [{"role": "user", "content": "Add.\n\n2 3"}, {"role": "assistant", "content": "5"}]
    assert exs[2].messages[1] == {"role": "assistant", "content": "4"}
    assert exs[3].messages[0] == {"role": "user", "content": "Capital of France?"}
    assert [e.line for e in exs] == [1, 2, 3, 4, 5]


def test_alpaca_json_array(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "hi", "system": "S"}]))
    (ex,) = load_examples(path)
    assert ex.messages == [{"role": "system", "content": "S"}, {"role": "user", "content": "Say hi"},
                           {"role": "assistant", "content": "hi"}]


@pytest.mark.parametrize("record, where", [
    ('{"instruction": "x", "output": 5}', "bad.jsonl:2: field 'output'"),
    ('{"instruction": "x"}', "bad.jsonl:2: field 'output': missing"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "bad.jsonl:2: field 'messages[0].role'"),
    ('{"conversations": [{"from": "human", "value": "x"}]}', "bad.jsonl:2: no assistant turn"),
    ('{"prompt": "q", "completion": "  "}', "bad.jsonl:2: field 'assistant': every assistant turn is empty"),
    ('{"messages": "hi"}', "bad.jsonl:2: field 'messages': must be a non-empty list"),
    ('{"text": "raw"}', "bad.jsonl:2: unrecognized record"),
    ('{"instruction": "x", "output": "y"', "bad.jsonl:2: not valid JSON"),
    ('[1, 2]', "bad.jsonl:2: a record must be a JSON object"),
])
def test_bad_records_name_file_line_and_field(tmp_path, record, where):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "completion": "fine"}, record])
    with pytest.raises(AthanorError) as e:
        load_examples(path)
    assert str(e.value).startswith(f"{tmp_path}/{where}")


def test_check_reports_counts_lengths_and_all_errors(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "Add.", "input": "2 3", "output": "5"},
        {"instruction": "x"},
        {"prompt": "Capital?", "completion": "Paris"},
        {"messages": []},
    ])
    r = check_file(path, tokenizer)
    assert r["examples"] == 2 and r["formats"] == {"alpaca": 1, "prompt_completion": 1}
    assert r["errors"] == 2 and f"{path}:2:" in r["error_list"][0] and f"{path}:4:" in r["error_list"][1]
    ids, _ = tokenizer.render_chat([{"role": "user", "content": "Capital?"}, {"role": "assistant", "content": "Paris"}])
    tokens, loss = r["lengths"]["tokens"], r["lengths"]["loss_tokens"]
    assert tokens["min"] <= len(ids) <= tokens["max"] and loss["min"] >= 2


def test_check_goes_on_past_lines_that_do_not_parse(tmp_path):
    path = tmp_path / "d.jsonl"
    ok = json.dumps({"prompt": "a", "completion": "b"}).encode()
    path.write_bytes(b"\n".join([ok, b'{"prompt": "a", "compl', ok, b'{"prompt": "caf\xe9"}', b'{"text": "x"}', ok]))
    r = check_file(path)
    assert r["examples"] == 3 and r["errors"] == 3
    assert [e.split(": ", 1)[0] for e in r["error_list"]] == [f"{path}:2", f"{path}:4", f"{path}:5"]
    assert "not valid JSON" in r["error_list"][0] and "not UTF-8" in r["error_list"][1]
    with pytest.raises(AthanorError, match=f"{path}:2: not valid JSON"):
        load_examples(path)


def test_parquet_rows_are_records(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{"instruction": "Add.", "input": "2 3", "output": "5"},
            {"instruction": "Say hi", "input": None, "output": "hi"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    exs = load_examples(tmp_path / "d.parquet")
    assert [e.line for e in exs] == [1, 2]  # a null cell is a field that is not there
    assert exs[1].messages == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
    pq.write_table(pa.Table.from_pylist([*rows, {"instruction": "x", "input": None, "output": None}]),
                   tmp_path / "bad.parquet")
    with pytest.raises(AthanorError, match=f"^{tmp_path}/bad.parquet:3: field 'output': missing"):
        load_examples(tmp_path / "bad.parquet")


def test_cli_data_check(tmp_path, tokenizer_dir, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "a", "completion": "b"}] * 3)
    assert main(["data", "check", str(good), "--tokenizer", str(tokenizer_dir)]) == 0
    out = capsys.readouterr().out
    assert "3 examples" in out and "loss_tokens" in out
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a"}])
    assert main(["data", "check", str(bad)]) == 2
    assert f"{bad}:1: field 'completion': missing" in capsys.readouterr().out
