"""Does the model answer, or does it just continue the text? Held-out behavior of a chat model.

For each held-out task the prompt is one user turn, rendered by the model's chat template with the
assistant header, and the model decodes greedily (all tasks batched on the engine, `LocalLM`).
Two numbers per model:

- answer rate: the reply is non-empty and the model closes its turn with `<|end|>` before
  `max_new_tokens`, emitting no other special token first. A base model, never trained on the chat
  format, keeps writing (it continues the document) and scores near zero.
- pass rate: the reply solves the task (exact match, or the unit tests pass in the sandbox).

`sampled_pass_rates` measures pass@1 as Chen et al. (2021, "Evaluating Large Language Models Trained
on Code") define it for a sampling temperature: each task's share of n sampled replies that pass, the
unbiased estimate of the chance that one sample solves it. Greedy decoding shows only the mode of the
model's distribution; a preference method moves the whole distribution, which sampling sees.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from athanor.data.synth import Task, grade
from athanor.data.verifier_pairs import VerifierConfig, sample_answers
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
        "passed": passed,  # per task, in order: for paired comparisons of two models on the same tasks
        "by_kind": {k: {"tasks": len(v), "answer_rate": sum(a for a, _ in v) / len(v),
                        "pass_rate": sum(p for _, p in v) / len(v)} for k, v in sorted(by_kind.items())},
        "examples": [{"prompt": t.prompt, "reply": r, "passed": p}
                     for t, r, p in list(zip(tasks, replies, passed, strict=True))[:6]],
    }


def sampled_pass_rates(model: LlamaModel, tok: Tokenizer, tasks: list[Task], samples: int, temperature: float,
                       max_new_tokens: int = 64, seed: int = 0, batch_size: int = 64) -> list[float]:
    """Each task's share of `samples` replies (seeded per task and sample) that pass: its pass@1 at
    `temperature`."""
    was_training = model.training
    cfg = VerifierConfig(k=samples, temperature=temperature, max_tokens=max_new_tokens, seed=seed,
                         batch_tasks=max(1, batch_size // samples))
    answers = sample_answers(LocalLM(model, tok, max_batch=batch_size), tasks, cfg)
    model.train(was_training)
    passed = grade([t for t in tasks for _ in range(samples)], [a for group in answers for a in group])
    return [sum(passed[i * samples:(i + 1) * samples]) / samples for i in range(len(tasks))]
