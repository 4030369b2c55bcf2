"""The RLAIF judge against real judges: rules behind a loopback chat server, and a tiny model on the engine."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import tiny_model_config
from teacher_server import ChatServer

from athanor.cli import main
from athanor.data.preferences import load_pairs
from athanor.data.synth import grade, make_splits, normalize_answer, write_tasks
from athanor.data.verifier_pairs import pair_record, report_path, write_pairs
from athanor.errors import AthanorError
from athanor.lm.endpoint import EndpointLM
from athanor.lm.local import LocalLM
from athanor.model.hf import save_pretrained
from athanor.model.llama import LlamaModel
from athanor.rl.judge import JudgeConfig, judge_pairs, parse_verdict, verifier_labels

TASKS = make_splits(8, 1, seed=4, kinds=["arithmetic", "string", "list"])[0]


@pytest.fixture
def pairs_file(tmp_path):
    """One pair per task, right answer against a wrong one; the file calls the wrong one chosen in half of them
    (as a user's file may), so agreeing with the file and agreeing with the verifier differ."""
    records = [pair_record(t.prompt, t.completion, f"{t.completion} or so") if i % 2 else
               pair_record(t.prompt, f"{t.completion} or so", t.completion) for i, t in enumerate(TASKS)]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_judge_prompt(req: dict) -> tuple[str, str, str]:
    """(request, answer A, answer B) out of the judge prompt, by its delimiters."""
    text = req["messages"][-1]["content"]
    part = lambda start, end: re.search(re.escape(start) + r"\n(.*)\n" + re.escape(end), text, re.S).group(1)  # noqa: E731
    return (part("[User Request]", "[End of User Request]"), part("[The Start of Answer A]", "[The End of Answer A]"),
            part("[The Start of Answer B]", "[The End of Answer B]"))


def correct_judge(req: dict) -> str:
    """Reads the request and both answers, and names the one equal to the task's reference."""
    prompt, a, _ = read_judge_prompt(req)
    task = next(t for t in TASKS if t.prompt == prompt)
    return "A" if normalize_answer(a) == normalize_answer(task.completion) else "B"


def test_verdicts_are_parsed_strictly():
    assert [parse_verdict(r) for r in ("A", " B\n", "[A]", "B.", "[B].")] == ["A", "B", "A", "B", "B"]
    for reply in ("a", "A because it is right", "Answer A", "Both", "A or B", "AB", "", "(A)", "A!"):
        assert parse_verdict(reply) is None, reply


def test_a_judge_that_always_answers_a_is_0_percent_consistent_and_makes_no_pairs(pairs_file, tmp_path, capsys):
    pairs = load_pairs(pairs_file)
    with ChatServer(lambda req: "A") as url:
        records, report = judge_pairs(EndpointLM(url, "judge"), pairs, JudgeConfig(),
                                      verifier_labels(pairs, TASKS))
    assert report["position_consistency"] == 0.0 and report["consistent"] == 0
    assert records == [] and report["pairs"] == 0
    assert report["first_position_rate"] == 1.0 and report["unparsed_verdicts"] == 0
    assert report["verifier_known"] == len(TASKS) and report["verifier_agreement"] is None
    # The command says so and writes nothing: no file of zero pairs to train on by mistake.
    out = tmp_path / "judged.jsonl"
    with ChatServer(lambda req: "A") as url:
        assert main(["pairs", "judge", "--judge", url, "--pairs", str(pairs_file), "--out", str(out), "--quiet"]) == 2
    captured = capsys.readouterr()
    assert "position consistency 0%" in captured.out and "no pairs were made" in captured.err
    assert not out.exists() and not report_path(out).exists()


def test_a_correct_judge_is_fully_consistent_and_agrees_with_the_verifier(pairs_file):
    pairs = load_pairs(pairs_file)
    labels = verifier_labels(pairs, TASKS)
    assert labels == [i % 2 == 1 for i in range(len(TASKS))]  # the file's chosen is right in odd pairs
    with ChatServer(correct_judge) as url:
        records, report = judge_pairs(EndpointLM(url, "judge"), pairs, JudgeConfig(batch_pairs=3), labels)
    assert report["position_consistency"] == 1.0 and report["pairs"] == len(TASKS)
    assert report["verifier_agreement"] == 1.0 and report["verifier_known_consistent"] == len(TASKS)
    assert report["first_position_rate"] == 0.5
    tasks = [next(t for t in TASKS if t.prompt == r["prompt"][0]["content"]) for r in records]
    assert all(grade(tasks, [r["chosen"][0]["content"] for r in records]))
    assert not any(grade(tasks, [r["rejected"][0]["content"] for r in records]))


def test_a_consistent_judge_that_prefers_wrong_answers_agrees_0_percent(pairs_file):
    pairs = load_pairs(pairs_file)
    contrarian = lambda req: {"A": "B", "B": "A"}[correct_judge(req)]  # noqa: E731
    with ChatServer(contrarian) as url:
        _, report = judge_pairs(EndpointLM(url, "judge"), pairs, JudgeConfig(), verifier_labels(pairs, TASKS))
    assert report["position_consistency"] == 1.0 and report["verifier_agreement"] == 0.0


def test_a_chatty_judge_gives_no_verdicts(pairs_file):
    with ChatServer(lambda req: f"Answer {correct_judge(req)} is better.") as url:
        records, report = judge_pairs(EndpointLM(url, "judge"), load_pairs(pairs_file), JudgeConfig())
    assert records == [] and report["unparsed_verdicts"] == 2 * len(TASKS)
    assert report["first_position_rate"] is None and "verifier_agreement" not in report


def test_cli_with_a_correct_judge_writes_the_judged_pairs(pairs_file, tmp_path, capsys):
    tasks_file = tmp_path / "tasks.jsonl"
    write_tasks(TASKS, tasks_file)
    out = tmp_path / "judged.jsonl"
    with ChatServer(correct_judge) as url:
        assert main(["pairs", "judge", "--judge", url, "--pairs", str(pairs_file), "--tasks", str(tasks_file),
                     "--out", str(out), "--quiet"]) == 0
    assert "position consistency 100%" in capsys.readouterr().out
    judged = load_pairs(out)
    assert len(judged) == len(TASKS)
    assert [p.chosen[0]["content"] for p in judged] == [t.completion for t in TASKS]
    report = json.loads(report_path(out).read_text())
    assert report["verifier_agreement"] == 1.0 and report["rubric"] == JudgeConfig().rubric


def test_a_local_run_directory_judges_on_the_engine(pairs_file, tmp_path, tokenizer_dir):
    # An untrained model is a real (poor) judge: whatever it says, every comparison is accounted for. Its
    # context must hold the judge prompt (rubric, request, both answers): 512 tokens here.
    torch.manual_seed(0)
    save_pretrained(LlamaModel(tiny_model_config(max_position_embeddings=512)), tmp_path / "judge")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "judge" / name).write_bytes((tokenizer_dir / name).read_bytes())
    judge = LocalLM.load(tmp_path / "judge", device="cpu")
    pairs = load_pairs(pairs_file)
    records, report = judge_pairs(judge, pairs, JudgeConfig(max_tokens=2))
    assert report["comparisons"] == len(pairs) and report["pairs"] == len(records) == report["consistent"]
    assert 0 <= report["unparsed_verdicts"] <= 2 * len(pairs)
    again, _ = judge_pairs(judge, pairs, JudgeConfig(max_tokens=2))
    assert again == records


def test_judging_nothing_and_writing_nothing_are_errors(tmp_path):
    with pytest.raises(AthanorError, match="no pairs to judge"):
        judge_pairs(None, [], JudgeConfig())
    with pytest.raises(AthanorError, match="no pairs were made"):
        write_pairs(tmp_path / "x.jsonl", [], {"pairs": 0})
