"""Does the model answer, or does it just continue the text? Held-out behavior of a chat model.

For each held-out task the prompt is rendered as one user turn plus the assistant header, and the
model decodes greedily. Two numbers per model:

- answer rate: the reply is non-empty and the model closes its turn with `<|end|>` before
  `max_new_tokens`, emitting no other special token first. A base model, never trained on the chat
  format, keeps writing (it continues the document) and scores near zero.
- pass rate: the reply solves the task (exact match, or the unit tests pass in the sandbox).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from athanor.data.synth import Task, grade
from athanor.model.llama import KVCache, LlamaModel
from athanor.tokenizer import Tokenizer


@torch.no_grad()
def batch_greedy(model: LlamaModel, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int],
                 pad_id: int) -> list[tuple[list[int], int | None]]:
    """Greedy continuations of many prompts at once: (new ids, the stop id that ended it or None).

    Prompts are left-padded to one length; padded keys are masked out. RoPE scores depend only on
    the distance between positions, so the shift a row's padding causes changes nothing.
    """
    device = next(model.parameters()).device
    B, P = len(prompts), max(len(p) for p in prompts)
    max_new_tokens = min(max_new_tokens, model.config.max_position_embeddings - P)
    ids = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros(B, P + max_new_tokens, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(p, device=device)
        valid[b, P - len(p):] = True
    causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
    # A pad row attends to itself only, so no softmax row is empty (an all-masked row gives NaN).
    mask = (causal & valid[:, None, :P]) | torch.eye(P, dtype=torch.bool, device=device)
    cache = KVCache(model.config, B, P + max_new_tokens, device, next(model.parameters()).dtype)
    logits = model(ids, 0, cache, attention_mask=mask[:, None])[:, -1]
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stopped: list[int | None] = [None] * B
    stops = torch.tensor(sorted(stop_ids), device=device)
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1)
        for b in torch.nonzero(~done).flatten().tolist():
            token = int(nxt[b])
            if token in stop_ids:
                stopped[b] = token
            else:
                out[b].append(token)
        done |= torch.isin(nxt, stops)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = model(nxt[:, None], P + step, cache, attention_mask=valid[:, None, None, :P + step + 1])[:, -1]
    return list(zip(out, stopped, strict=True))


def evaluate_behavior(model: LlamaModel, tok: Tokenizer, tasks: list[Task], max_new_tokens: int = 64,
                      batch_size: int = 32) -> dict[str, Any]:
    """Answer rate and pass rate on `tasks`, overall and per kind, plus a few example replies."""
    was_training = model.training
    model.eval()
    role_ids = set(tok.role_ids.values()) | {tok.bos_id}
    replies, answered = [], []
    for i in range(0, len(tasks), batch_size):
        chunk = tasks[i:i + batch_size]
        prompts = [tok.render_chat([{"role": "user", "content": t.prompt}], add_generation_prompt=True)[0]
                   for t in chunk]
        # Stop at the end of the turn, or at any special token that shows the model left the reply.
        stops = {tok.end_id, tok.eos_id, *role_ids}
        for new, stop in batch_greedy(model, prompts, max_new_tokens, stops, tok.pad_id):
            replies.append(tok.decode(new))
            answered.append(stop == tok.end_id and bool(tok.decode(new).strip()))
    model.train(was_training)
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
