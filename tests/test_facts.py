"""The fact set (generated, unseen, paraphrases held out of every training text) and the retrieval-versus-
fine-tuning experiment end to end on a tiny model: the table's rows, counts and intervals, and what
each arm trained on."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_base

from athanor.data.facts import ATTRIBUTES, make_fact_sets
from athanor.rag.index import RagIndex
from athanor.speedrun import SpeedrunRecipe
from athanor.stage import Context
from athanor.stats import wilson_interval
from athanor.train.facts_stage import (
    TITLE,
    SpeedrunFacts,
    build_index,
    finetune_records,
    reading_records,
    speedrun_stage,
)


def _texts(records: list[dict]) -> list[str]:
    return [m["content"] for r in records for m in r["messages"]]


def test_fact_sets_are_deterministic_and_disjoint() -> None:
    facts, reading = make_fact_sets(6, 5, seed=3)
    assert (facts, reading) == make_fact_sets(6, 5, seed=3)
    assert facts != make_fact_sets(6, 5, seed=4)[0]
    assert len(facts) == 6 * len(ATTRIBUTES) and len(reading) == 5 * len(ATTRIBUTES)
    assert not {f.entity for f in facts} & {f.entity for f in reading}
    assert len({f.id for f in facts + reading}) == len(facts) + len(reading)
    # The evaluated set does not depend on how many reading packages are drawn after it.
    assert make_fact_sets(6, 9, seed=3)[0] == facts
    for f in facts:
        assert f.entity in f.statement and f.answer in f.statement and f.entity in f.question
        assert f.answer not in f.question
        assert len(f.paraphrases) == 2 and len(set(f.paraphrases)) == 2
        for p in f.paraphrases:
            assert f.entity in p and p != f.question and f.answer not in p


def test_no_paraphrase_in_any_training_text() -> None:
    facts, reading = make_fact_sets(5, 5, seed=0)
    index = build_index(reading, None)
    reading_recs, missed = reading_records(reading, index, k=3, mode="bm25", seed=0)
    assert len(reading_recs) + missed == len(reading)
    texts = _texts(finetune_records(facts)) + _texts(reading_recs)
    paraphrases = {p for f in facts + reading for p in f.paraphrases}
    assert not [p for p in paraphrases if any(p in t for t in texts)]
    # The paraphrase templates are absent too: no training text of another package uses their wording.
    stems = {re.sub(r"\{e\}", "", p).strip(" ?.") for spec in ATTRIBUTES.values() for p in spec["paraphrases"]}
    assert not [s for s in stems if any(s in t for t in texts)]
    # Fine-tuning sees every evaluated fact, in its original phrasing and as a statement.
    ft = " ".join(_texts(finetune_records(facts)))
    assert all(f.question in ft and f.statement in ft for f in facts)


def test_reading_examples_hold_the_right_passage(tmp_path: Path) -> None:
    """A reading example is taught only when its passages contain the answer; a missed one is counted."""
    _, reading = make_fact_sets(1, 6, seed=0)
    index = RagIndex(None)
    index.add_documents((f"p{i}", f.statement) for i, f in enumerate(reading[:-1]))  # the last fact: no passage
    records, missed = reading_records(reading, index, k=2, mode="bm25", seed=0)
    assert missed == 1 and len(records) == len(reading) - 1
    for f, r in zip(reading, records, strict=False):
        user, answer = r["messages"][0]["content"], r["messages"][1]["content"]
        assert f.statement in user and answer == f.answer and user.rstrip().endswith(f.question)


def test_facts_stage_end_to_end(tmp_path: Path, tokenizer_dir: Path) -> None:
    # Retrieved passages make long prompts: the tiny model gets a context that holds them.
    base = tiny_base(tmp_path, tokenizer_dir, max_position_embeddings=512)
    knobs = SpeedrunFacts(entities=2, reading_entities=3, fact_repeats=2, reading_repeats=1, k=2)
    recipe = SpeedrunRecipe(out_dir=str(tmp_path / "run"), facts=knobs)
    ctx = Context(recipe, tmp_path / "run", {}, show_progress=False, results={"sft": {"run_dir": str(base)}})
    section = speedrun_stage(ctx)
    out = tmp_path / "run" / "facts"
    result = json.loads((out / "result.json").read_text())
    n_facts = 2 * len(ATTRIBUTES)
    assert result["facts"] == n_facts and result["reading_facts"] == 3 * len(ATTRIBUTES)

    # The table: one row per arm, each cell its count, rate and Wilson interval.
    assert section.title == TITLE
    rows = [line for line in section.markdown.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| arm | model | passages in the prompt | paraphrased questions")
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| 0", "| 0r", "| a", "| b", "| c", "| c0"]
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 6 * (2 * n_facts + n_facts)
    for arm, row in zip(result["arms"], rows[1:], strict=True):
        for phrasing, n in (("paraphrased", 2 * n_facts), ("original", n_facts)):
            right = sum(a["correct"] for a in answers if a["arm"] == arm["key"] and a["phrasing"] == phrasing)
            low, high = wilson_interval(right, n)
            assert (arm[phrasing]["correct"], arm[phrasing]["n"]) == (right, n)
            assert f"{right}/{n} = {right / n:.0%} [{low:.0%}, {high:.0%}]" in row
    # A paraphrase is never the original question of any fact.
    asked = {a["question"] for a in answers if a["phrasing"] == "paraphrased"}
    assert asked.isdisjoint({a["question"] for a in answers if a["phrasing"] == "original"})

    # Each model trained one pass over its packed rows; (c) on exactly (a)'s and (b)'s examples.
    tr = result["training"]
    assert tr["finetuned"]["examples"] == knobs.fact_repeats * (n_facts + 2)
    assert tr["reader"]["examples"] == knobs.reading_repeats * result["reading_examples"]
    assert tr["both"]["examples"] == tr["finetuned"]["examples"] + tr["reader"]["examples"]
    for t in tr.values():
        assert t["steps"] == math.ceil(t["packed_rows"] / 8)
    # The text reads the numbers it was given, and the headline numbers reach the speedrun.
    assert f"for {result['recall']['paraphrased']['correct']}/{2 * n_facts}" in section.markdown
    assert ctx.results["facts"]["n"] == 2 * n_facts
    assert ctx.results["facts"]["paraphrased"]["a"] == result["arms"][2]["paraphrased"]["rate"]


def test_cli_refuses_an_unknown_retriever(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "athanor", "facts", "--out", str(tmp_path / "f"), "--retrieval=tfidf"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "retrieval" in r.stderr and "one of" in r.stderr
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize("field", ["entities", "reading_entities"])
def test_cli_refuses_an_empty_fact_set(tmp_path: Path, field: str) -> None:
    r = subprocess.run([sys.executable, "-m", "athanor", "facts", "--out", str(tmp_path / "f"), f"--{field}=0"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "at least one evaluated and one reading package" in r.stderr
