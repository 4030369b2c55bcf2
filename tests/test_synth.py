"""Synthetic tasks: splits that provably share nothing, references that pass, graders that can fail."""

from __future__ import annotations

import json
import re

import pytest

from athanor.cli import main
from athanor.data.formats import load_examples
from athanor.data.synth import (
    FUNCTIONS,
    GRADERS,
    NEAR_DUP_JACCARD,
    Task,
    grade,
    make_splits,
    near_duplicates,
    read_tasks,
    verify_references,
)
from athanor.errors import AthanorError
from athanor.rl import sandbox


def _grams(text: str) -> set:
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    return {tuple(words[i:i + 3]) for i in range(max(1, len(words) - 2))}


def test_splits_share_no_exact_or_near_duplicate_item():
    train, heldout, report = make_splits(1500, 150, seed=3)
    assert len(heldout) == 150 and len(train) > 1400
    assert {t.kind for t in heldout} == {"arithmetic", "string", "list", "python"}
    assert not {t.key for t in train} & {t.key for t in heldout}
    assert not {t.prompt for t in train} & {t.prompt for t in heldout}
    # Brute force over every pair, independent of the indexed check the generator used.
    held = [_grams(f"{t.prompt} {t.completion}") for t in heldout]
    worst = 0.0
    for t in train:
        a = _grams(f"{t.prompt} {t.completion}")
        for b in held:
            worst = max(worst, len(a & b) / len(a | b))
    assert worst < NEAR_DUP_JACCARD
    assert report["exact_overlap"] == 0 and report["near_duplicate_pairs"] == 0


def test_near_duplicate_check_catches_a_reworded_copy():
    a = Task("a", "python", "Write a Python function `get_value(xs)` that returns a list of every item of xs "
             "multiplied by 7.", "def get_value(xs):\n    return [v * 7 for v in xs]", "k")
    b = Task("b", "python", "Write a Python function `get_value(xs)` that returns a list of each item of xs "
             "multiplied by 7.", "def get_value(xs):\n    return [v * 7 for v in xs]", "k2")
    c = Task("c", "arithmetic", "What is 3 + 4?", "7", "k3")
    hits = near_duplicates([b, c], [a])
    assert [(i, j) for i, j, _ in hits] == [(0, 0)] and hits[0][2] >= NEAR_DUP_JACCARD


def test_same_seed_same_tasks():
    assert make_splits(50, 10, seed=1)[:2] == make_splits(50, 10, seed=1)[:2]
    assert make_splits(50, 10, seed=1)[0] != make_splits(50, 10, seed=2)[0]


def test_exact_match_grading():
    t = Task("t", "arithmetic", "What is 3 + 4?", "7", "k")
    assert grade([t, t, t, t], ["7", " 7.\n", "8", "7 and more"]) == [True, True, False, False]


@pytest.mark.skipif(sandbox.isolation_error() is not None, reason="no sandbox here")
def test_every_function_template_grades_soundly_in_the_sandbox():
    train, _, _ = make_splits(150, 10, seed=0, kinds=["python"])
    sample = {t.key.split(":")[1]: t for t in train}  # one task per template
    assert len(sample) == len(FUNCTIONS)
    tasks = list(sample.values())
    assert verify_references(tasks) == []
    wrong = [t.completion.replace("return ", "return 1 + ", 1) for t in tasks]
    assert grade(tasks, wrong) == [False] * len(tasks)
    fenced = [f"Here you go:\n```python\n{t.completion}\n```" for t in tasks]
    assert all(grade(tasks, fenced))


@pytest.mark.skipif(sandbox.isolation_error() is not None, reason="no sandbox here")
def test_leaving_before_the_tests_run_is_not_a_pass():
    # Solution and tests run as one program: an exit with status 0 before the asserts used to pass.
    train, _, _ = make_splits(40, 4, seed=1, kinds=["python"])
    task = train[0]
    name = task.prompt.split("`")[1].split("(")[0]
    exits = ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit",
             "import atexit, os\natexit.register(os._exit, 0)"]
    hacks = [f"def {name}(x):\n    return None\n\n{e}\n" for e in exits]
    assert grade([task] * len(hacks), hacks) == [False] * len(hacks)
    # The leaky grader of the hack experiment trusts the exit status: every early exit pays there,
    # a wrong answer that runs the asserts still does not.
    assert grade([task] * len(hacks), hacks, grader="exit_code") == [True] * len(hacks)
    wrong = task.completion.replace("return ", "return 1 + ", 1)
    assert grade([task], [wrong], grader="exit_code") == [False]
    noisy = task.completion + "\nprint('hello')\n"  # a solution that prints still passes
    for grader in GRADERS:
        assert grade([task, task], [task.completion, noisy], grader=grader) == [True, True]
    with pytest.raises(AthanorError, match="unknown grader 'loose'"):
        grade([task], [noisy], grader="loose")


def test_cli_writes_splits_that_sft_data_loading_reads(tmp_path, capsys):
    assert main(["synth", "tasks", "--out", str(tmp_path), "--train", "200", "--heldout", "20",
                 "--kinds", "arithmetic,list"]) == 0
    assert "exact overlap 0" in capsys.readouterr().out
    report = json.loads((tmp_path / "overlap.json").read_text())
    assert report["heldout"] == 20 and report["near_duplicate_pairs"] == 0
    assert len(read_tasks(tmp_path / "heldout.jsonl")) == 20
    examples = load_examples(tmp_path / "train.jsonl")
    assert examples[0].format == "prompt_completion" and examples[0].messages[1]["role"] == "assistant"


def test_seed_hack_plants_the_early_exit_in_train_answers_only(tmp_path, capsys):
    from athanor.data.synth import EARLY_EXIT_HACK, seed_hack
    from athanor.rl.audit import audit_solution

    train, heldout, _ = make_splits(200, 20, seed=3, kinds=["python", "list"])
    python = [t for t in train if t.kind == "python"]
    hacked, n = seed_hack(train, 0.25, seed=3)
    changed = [(a, b) for a, b in zip(train, hacked, strict=True) if a != b]
    assert n == len(changed) == round(0.25 * len(python)) and n > 0
    for old, new in changed:
        assert old.kind == "python" and new.completion.endswith(EARLY_EXIT_HACK)
        assert new.completion.splitlines()[0] == old.completion.splitlines()[0]  # the task's own signature
        assert [f.rule for f in audit_solution(new.completion, prompt=new.prompt)] == ["early_exit"]
    # The hack fails the sealed grader and pays under the leaky one.
    sample = [new for _, new in changed[:4]]
    assert grade(sample, [t.completion for t in sample]) == [False] * len(sample)
    assert grade(sample, [t.completion for t in sample], grader="exit_code") == [True] * len(sample)
    assert seed_hack(train, 0.0)[1] == 0
    with pytest.raises(AthanorError, match="between 0 and 1"):
        seed_hack(train, 1.5)
    assert main(["synth", "tasks", "--out", str(tmp_path), "--train", "200", "--heldout", "20", "--seed", "3",
                 "--kinds", "python,list", "--seed-hack", "0.25"]) == 0
    assert f"{n} train answers replaced" in capsys.readouterr().out
    assert json.loads((tmp_path / "overlap.json").read_text())["hacked_train_answers"] == n
    assert read_tasks(tmp_path / "heldout.jsonl") == heldout  # held-out tasks never touched


def test_a_missing_or_broken_task_file_is_one_clear_error(tmp_path):
    with pytest.raises(AthanorError, match=r"missing\.jsonl: cannot read the task file \(No such file"):
        read_tasks(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"id": "a"}\n')
    with pytest.raises(AthanorError, match=r"bad\.jsonl:1: not a task record"):
        read_tasks(tmp_path / "bad.jsonl")
