"""Scoring retrieval and answers against gold passages.

A question names its `source` file and a `gold` string: a passage is relevant when it comes from
that file and holds the string whole. Gold strings, not line numbers, so the set survives
re-chunking and small edits of the files. Retrieval: recall@k (a relevant passage in the top k)
and MRR@10 (mean reciprocal rank of the first relevant one, 0 past rank 10). Answers: exact match
and token F1 after SQuAD's normalization (Rajpurkar et al. 2016: lower case, no punctuation or
articles), beside two baselines in the same table: the model with no passages, and the model
given the gold passage itself (the oracle: the most retrieval could give it).

The shipped set (data/stdlib_questions.jsonl) asks developer questions in their own words about
the Python standard library, the project's embedded corpus, which is present offline everywhere.
"""

from __future__ import annotations

import re
import string
import sysconfig
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from athanor.errors import AthanorError
from athanor.io import jsonl_objects
from athanor.lm import LM
from athanor.rag.answer import answer_questions
from athanor.rag.chunking import Chunk
from athanor.rag.index import Hit, Mode, RagIndex
from athanor.stats import mean_interval, wilson_interval

SHIPPED_QUESTIONS = Path(__file__).parent / "data" / "stdlib_questions.jsonl"
MRR_DEPTH = 10


@dataclass(frozen=True)
class Question:
    question: str
    source: str  # the file that answers it: a path, matched by its trailing components
    gold: str  # a string the answering passage holds
    answer: str = ""  # a short reference answer ("" when the answer is code)


def read_questions(path: str | Path) -> list[Question]:
    questions = []
    for n, record in jsonl_objects(path, "question file"):
        for key in ("question", "source", "gold"):
            if not isinstance(record.get(key), str) or not record[key]:
                raise AthanorError("missing or not a non-empty string", path=path, line=n, field=key)
        questions.append(Question(record["question"], record["source"], record["gold"], str(record.get("answer", ""))))
    if not questions:
        raise AthanorError("no questions in the file", path=path)
    return questions


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def shipped_sources(questions: Sequence[Question]) -> list[Path]:
    """The standard-library files the shipped questions cite, in a stable order."""
    return sorted({stdlib_dir() / q.source for q in questions})


def is_relevant(chunk: Chunk, q: Question) -> bool:
    source = chunk.source.replace("\\", "/")
    return (source == q.source or source.endswith("/" + q.source)) and q.gold in chunk.text


def first_relevant(hits: Sequence[Hit], q: Question) -> int | None:
    """The rank of the first relevant passage, or None."""
    return next((h.rank for h in hits if is_relevant(h.chunk, q)), None)


def _rate(hits: int, n: int) -> str:
    low, high = wilson_interval(hits, n)
    return f"{hits / n:.2f} [{low:.2f}, {high:.2f}]"


def _mean(values: list[float]) -> str:
    if len(values) < 2:  # no spread to take an interval from
        return f"{sum(values) / max(len(values), 1):.2f}"
    mean, low, high = mean_interval(values)
    return f"{mean:.2f} [{low:.2f}, {high:.2f}]"


def retrieval_rows(index: RagIndex, questions: Sequence[Question], modes: Sequence[Mode],
                   ks: Sequence[int] = (1, 5, 10)) -> list[dict[str, Any]]:
    """One row per mode: recall@k for each k and MRR@10, with 95% intervals (Wilson for recall)."""
    depth = max(max(ks), MRR_DEPTH)
    rows = []
    for mode in modes:
        ranks = [first_relevant(hits, q) for hits, q in zip(index.search_many([q.question for q in questions],
                                                                              depth, mode), questions, strict=True)]
        row: dict[str, Any] = {"retrieval": mode, "questions": len(questions)}
        for k in ks:
            row[f"recall@{k}"] = _rate(sum(r is not None and r <= k for r in ranks), len(questions))
        row[f"MRR@{MRR_DEPTH}"] = _mean([1.0 / r if r is not None and r <= MRR_DEPTH else 0.0 for r in ranks])
        rows.append(row)
    return rows


def reachable(index: RagIndex, questions: Sequence[Question]) -> int:
    """How many questions have a relevant passage in the index at all (a gold string cut by a passage
    border, or a file not indexed, makes a question unanswerable by any retriever)."""
    return sum(any(is_relevant(c, q) for c in index.chunks) for q in questions)


def normalize(text: str) -> list[str]:
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction), normalize(reference)
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or not common:
        return float(pred == ref)
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def answer_rows(lm: LM, index: RagIndex, questions: Sequence[Question], k: int = 3, mode: Mode = "hybrid",
                max_tokens: int = 64) -> list[dict[str, Any]]:
    """Exact match and F1 of the model's answers with no passages, with the top-k retrieved, and with the
    oracle (the first relevant passage of the index), over the questions that have a reference answer."""
    questions = [q for q in questions if q.answer]
    if not questions:
        raise AthanorError("no question has a reference answer to score against", field="answer")
    retrieved = index.search_many([q.question for q in questions], k, mode)
    oracle = [[Hit(c, 1.0, 1) for c in index.chunks if is_relevant(c, q)][:1] for q in questions]
    rows = []
    for name, passages in (("no retrieval", [[] for _ in questions]), (f"{mode} top-{k}", retrieved),
                           ("oracle passage", oracle)):
        answers = answer_questions(lm, [q.question for q in questions], passages, max_tokens)
        # The first line is the answer; small models ramble on after it.
        firsts = [a.text.split("\n", 1)[0] if a.text else "" for a in answers]
        rows.append({"passages": name, "questions": len(questions),
                     "exact match": _rate(int(sum(exact_match(p, q.answer) for p, q in zip(firsts, questions,
                                                                                            strict=True))),
                                          len(questions)),
                     "F1": _mean([token_f1(p, q.answer) for p, q in zip(firsts, questions, strict=True)]),
                     "answer contains reference": _rate(sum(" ".join(normalize(q.answer)) in " ".join(normalize(a.text))
                                                            for a, q in zip(answers, questions, strict=True)),
                                                        len(questions))})
    return rows
