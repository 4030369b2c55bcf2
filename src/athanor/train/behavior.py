"""Does the model answer, or does it just continue the text? Held-out behavior of a chat model.

For each held-out task the prompt is one user turn, rendered by the model's chat template with the
assistant header, and the model decodes greedily (all tasks batched on the engine, `LocalLM`).
Two numbers per model:

- answer rate: the reply is non-empty and the model closes its turn with `<|end|>` before
  `max_new_tokens`, emitting no other special token first. A base model, never trained on the chat
  format, keeps writing (it continues the document) and scores near zero.
- pass rate: the reply solves the task (exact match, or the unit tests pass in the sandbox).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from athanor.data.synth import Task, grade
from athanor.lm.local import LocalLM
from athanor.model.llama import LlamaModel
from athanor.serve.sampling import SamplingParams
from athanor.tokenizer import Tokenizer


def evaluate_behavior(model: LlamaModel, tok: Tokenizer, tasks: list[Task], max_new_tokens: int = 64,
                      batch_size: int = 32) -> dict[str, Any]:
    """Answer rate and pass rate on `tasks`, overall and per kind, plus a few example replies."""
    was_training = model.training
    # Replies end at the tokenizer's stop ids: the end of the turn, or (athanor's format) a token that
    # shows the model left the reply (a new turn, a new document). Only the first counts as answering.
    out = LocalLM(model, tok, max_batch=batch_size).chat(
        [[{"role": "user", "content": t.prompt}] for t in tasks], SamplingParams(max_tokens=max_new_tokens,
                                                                                temperature=0))
    model.train(was_training)
    replies = [c.text for c in out]
    answered = [c.stop_reason == tok.end_id and bool(c.text.strip()) for c in out]
    passed = grade(tasks, replies)
    by_kind: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    for t, a, p in zip(tasks, answered, passed, strict=True):
        by_kind[t.kind].append((a, p))
    return {
        "tasks": len(tasks),
        "answer_rate": sum(answered) / len(tasks),
        "pass_rate": sum(passed) / len(tasks),
        "by_kind": {k: {"tasks": len(v), "answer_rate": sum(a for a, _ in v) / len(v),
                        "pass_rate": sum(p for _, p in v) / len(v)} for k, v in sorted(by_kind.items())},
        "examples": [{"prompt": t.prompt, "reply": r, "passed": p}
                     for t, r, p in list(zip(tasks, replies, passed, strict=True))[:6]],
    }
