"""Asking a model with retrieved passages, and reading which of them its answer cites.

The passages go into the user message numbered [1], [2], ... under their file and lines, before the
question; the model is asked to cite the numbers it used. Citations are read back from the answer
text; a number that names no passage is ignored.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from athanor.lm import LM
from athanor.rag.index import Hit
from athanor.serve.sampling import SamplingParams

CITATION = re.compile(r"\[(\d+)\]")
INSTRUCTION = "Answer the question from the passages above, citing the passages you use as [n]."


def rag_prompt(question: str, hits: Sequence[Hit]) -> str:
    """The user message: numbered passages, then the question (just the question when there are none)."""
    if not hits:
        return question
    passages = "\n\n".join(f"[{n}] {h.chunk.id}\n{h.chunk.text}" for n, h in enumerate(hits, 1))
    return f"{passages}\n\n{INSTRUCTION}\nQuestion: {question}"


def format_hits(hits: Sequence[Hit]) -> str:
    """Passages as a reader sees them: rank, file and lines, score, then the text."""
    text = "\n\n".join(f"[{h.rank}] {h.chunk.id}  (score {h.score:.4f})\n{h.chunk.text}" for h in hits)
    return text or "[no passages]"


@dataclass
class Answer:
    question: str
    text: str
    passages: list[Hit]
    cited: list[int]  # 1-based numbers of the passages the answer cites, in order of first citation


def cited_passages(text: str, n_passages: int) -> list[int]:
    numbers = (int(m) for m in CITATION.findall(text))
    return list(dict.fromkeys(n for n in numbers if 1 <= n <= n_passages))


def answer_questions(lm: LM, questions: Sequence[str], passages: Sequence[Sequence[Hit]],
                     max_tokens: int = 128) -> list[Answer]:
    """Greedy answers, one per question, each given its passages (in one batch)."""
    conversations = [[{"role": "user", "content": rag_prompt(q, hits)}] for q, hits in zip(questions, passages,
                                                                                            strict=True)]
    completions = lm.chat(conversations, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    return [Answer(q, c.text.strip(), list(hits), cited_passages(c.text, len(hits)))
            for q, hits, c in zip(questions, passages, completions, strict=True)]
