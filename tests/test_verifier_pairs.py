"""Verifier pairs from real models: a tiny athanor model on the engine, and a rule behind a loopback server."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_base
from teacher_server import ChatServer

from athanor.cli import main
from athanor.data.preferences import load_pairs
from athanor.data.synth import grade, make_splits, normalize_answer, write_tasks
from athanor.data.verifier_pairs import (
    VerifierConfig,
    answer_seed,
    make_verifier_pairs,
    report_path,
    sample_answers,
    tasks_from_spec,
    write_pairs,
)
from athanor.errors import AthanorError
from athanor.lm.endpoint import EndpointError, EndpointLM
from athanor.lm.local import LocalLM

TASKS = make_splits(12, 1, seed=3)[0]  # every kind, python included (graded in the sandbox)
CFG = VerifierConfig(k=4, max_tokens=16, seed=5, batch_tasks=5)


def rule_student(req: dict) -> str:
    """Arithmetic: always right; string: always wrong; lists and functions: right when the sampling seed
    is even. So some tasks give pairs, some pass throughout, some fail throughout, fixed by the seeds."""
    task = next(t for t in TASKS if t.prompt == req["messages"][-1]["content"])
    right = {"arithmetic": True, "string": False}.get(task.kind, req["seed"] % 2 == 0)
    return task.completion if right else f"wrong {req['seed']}"


def expected_outcome(task, seed: int) -> tuple[int, bool]:
    """(answers the rule gets right, whether the task gives a pair), from the documented per-answer seeds."""
    right = [rule_student({"messages": [{"content": task.prompt}], "seed": answer_seed(seed, task.id, j)})
             == task.completion for j in range(CFG.k)]
    return sum(right), 0 < sum(right) < CFG.k


def test_pairs_from_a_rule_server_are_graded_right_and_regrade(tmp_path):
    with ChatServer(rule_student) as url:
        records, report = make_verifier_pairs(EndpointLM(url, "student"), TASKS, CFG)
    expected = [expected_outcome(t, CFG.seed) for t in TASKS]
    assert report["tasks"] == len(TASKS) and report["answers"] == CFG.k * len(TASKS)
    assert report["passed"] == sum(n for n, _ in expected)
    assert report["pairs"] == report["tasks_with_pairs"] == sum(p for _, p in expected) > 0
    assert report["tasks_all_passed"] == sum(n == CFG.k for n, _ in expected) >= 3  # the arithmetic tasks at least
    assert report["tasks_all_failed"] == sum(n == 0 for n, _ in expected) >= 3  # the string tasks at least
    out = tmp_path / "pairs.jsonl"
    write_pairs(out, records, report)
    pairs = load_pairs(out)  # TRL conversational records, as `athanor dpo` reads them
    assert len(pairs) == report["pairs"] and {p.format for p in pairs} == {"conversational"}
    by_prompt = {t.prompt: t for t in TASKS}
    tasks = [by_prompt[p.prompt[0]["content"]] for p in pairs]
    assert all(grade(tasks, [p.chosen[0]["content"] for p in pairs]))
    assert not any(grade(tasks, [p.rejected[0]["content"] for p in pairs]))
    assert json.loads(report_path(out).read_text())["pairs"] == len(pairs)


def test_a_tiny_model_on_the_engine_is_sampled_reproducibly_and_graded(tmp_path, tokenizer_dir):
    lm = LocalLM.load(tiny_base(tmp_path, tokenizer_dir), device="cpu")
    tasks = [t for t in TASKS if t.kind != "python"][:4]
    answers = sample_answers(lm, tasks, CFG)
    assert [len(a) for a in answers] == [CFG.k] * len(tasks)
    # Seeded per answer: the same answers again, and in batches of another size.
    again = sample_answers(lm, tasks, VerifierConfig(**{**CFG.__dict__, "batch_tasks": 1}))
    assert again == answers
    assert len({a for group in answers for a in group}) > len(tasks)  # temperature 1: the k answers differ
    other_seed = sample_answers(lm, tasks, VerifierConfig(**{**CFG.__dict__, "seed": CFG.seed + 1}))
    assert other_seed != answers
    _, report = make_verifier_pairs(lm, tasks, CFG)
    flat = [t for t in tasks for _ in range(CFG.k)]
    assert report["passed"] == sum(grade(flat, [a for g in answers for a in g]))
    assert report["tasks_all_failed"] == sum(not any(normalize_answer(a) == normalize_answer(t.completion)
                                                     for a in g) for t, g in zip(tasks, answers, strict=True))


def test_greedy_or_single_answer_sampling_is_refused():
    with pytest.raises(AthanorError, match="temperature"):
        sample_answers(None, TASKS, VerifierConfig(temperature=0))
    with pytest.raises(AthanorError, match="k must be at least 2"):
        sample_answers(None, TASKS, VerifierConfig(k=1))


def test_cli_writes_pairs_refuses_to_overwrite_and_leaves_nothing_half_written(tmp_path, capsys):
    tasks_file = tmp_path / "tasks.jsonl"
    write_tasks(TASKS, tasks_file)
    out = tmp_path / "pairs.jsonl"
    args = ["pairs", "verifier", "--tasks", str(tasks_file), "--k", "4", "--seed", "5", "--out", str(out), "--quiet"]
    with ChatServer(rule_student) as url:
        assert main([*args, "--model", url]) == 0
        first = out.read_text()
        assert main([*args, "--model", url]) == 2  # the pairs a user made are not replaced silently
        assert "file exists" in capsys.readouterr().err
        assert main([*args, "--model", url, "--force"]) == 0
    assert out.read_text() == first  # same seed, same pairs

    calls = []

    def breaks_midway(req: dict) -> str:
        calls.append(1)
        if len(calls) > 10:
            raise RuntimeError("the server fell over")
        return rule_student(req)

    with ChatServer(breaks_midway) as url:
        assert main([*args, "--model", url, "--force", "--max_tokens=16"]) == 2
    assert "HTTP 500" in capsys.readouterr().err
    assert out.read_text() == first  # the old file is whole, not a mix and not a fragment
    fresh = tmp_path / "fresh.jsonl"
    with ChatServer(breaks_midway) as url:
        assert main(["pairs", "verifier", "--tasks", str(tasks_file), "--model", url, "--out", str(fresh),
                     "--quiet"]) == 2
    assert not fresh.exists() and not report_path(fresh).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl", "pairs.report.json", "tasks.jsonl"]


def test_no_pairs_is_an_error_with_the_reason_and_no_file(tmp_path):
    with ChatServer(lambda req: "wrong") as url:
        records, report = make_verifier_pairs(EndpointLM(url, "student"), TASKS[:4], CFG)
    assert report["tasks_all_failed"] == 4 and report["pairs"] == 0
    with pytest.raises(AthanorError, match='no pairs were made.*"tasks_all_failed": 4'):
        write_pairs(tmp_path / "p.jsonl", records, report)
    assert not any(tmp_path.iterdir())


def test_an_unreachable_model_is_one_clear_error(tmp_path):
    with ChatServer(rule_student) as url:
        pass  # the server is gone
    with pytest.raises(EndpointError, match="unreachable"):
        make_verifier_pairs(EndpointLM(url, "student", retries=0), TASKS[:2], CFG)


def test_heldout_count_gives_the_sft_runs_heldout_tasks() -> None:
    train, heldout, _ = make_splits(60, 10, seed=2)
    tasks = tasks_from_spec("10", 2, 10, split="heldout")
    assert [t.prompt for t in tasks] == [t.prompt for t in heldout]
    assert not {t.key for t in tasks} & {t.key for t in tasks_from_spec("60", 2, 10)}
