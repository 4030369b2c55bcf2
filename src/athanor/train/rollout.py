"""What the RL stages (PPO, GRPO) share: sample the policy's replies to task prompts on the engine,
and turn prompts + sampled responses into the rows a training forward scores.

A *response* is the sampled tokens plus the stop token that ended them, if one did: emitting the
end of turn is an action the policy takes and learns, so it is scored like any other token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from athanor.data.synth import Task
from athanor.errors import AthanorError
from athanor.lm.local import LocalLM
from athanor.serve.sampling import SamplingParams
from athanor.tokenizer import Tokenizer


@dataclass
class Sampled:
    """One call's replies, in the order of the tasks given."""

    prompts: list[list[int]]  # each task's prompt: one user turn, rendered with the assistant header
    responses: list[list[int]]  # the sampled tokens (+ the stop token that ended them)
    replies: list[str]  # the text of each reply (the stop token not included)
    closed: torch.Tensor  # (B,) bool: the reply ended its turn with the end-of-turn token
    truncated: torch.Tensor  # (B,) bool: cut off at the length limit rather than stopped


def sample_replies(lm: LocalLM, tok: Tokenizer, tasks: Sequence[Task], max_new_tokens: int, temperature: float,
                   seeds: Sequence[int], field: str = "max_new_tokens") -> Sampled:
    """Each task's prompt answered by `lm`'s model (batched, KV cache) with its own seed. The model is
    put back in the mode (train/eval) it was in. `field` names the length setting in errors."""
    prompts = [tok.encode_chat([{"role": "user", "content": t.prompt}], add_generation_prompt=True) for t in tasks]
    context = lm.model.config.max_position_embeddings
    for t, p in zip(tasks, prompts, strict=True):
        if len(p) + max_new_tokens > context:
            raise AthanorError(f"task {t.id}: its prompt ({len(p)} tokens) + {max_new_tokens} new tokens leave the "
                               f"model's {context} positions", field=field)
    params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, seed=s) for s in seeds]
    was_training = lm.model.training
    out = lm.generate(prompts, params)
    lm.model.train(was_training)
    stopped = [c.finish_reason == "stop" and isinstance(c.stop_reason, int) for c in out]
    return Sampled(prompts, [c.token_ids + ([c.stop_reason] if s else []) for c, s in zip(out, stopped, strict=True)],
                   [c.text for c in out], torch.tensor([c.stop_reason == tok.end_id for c in out]),
                   torch.tensor([c.finish_reason == "length" for c in out]))


def response_rows(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), both (B, T): prompt + response right-padded, the targets the response tokens
    at the positions that predict them and -100 elsewhere."""
    T = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True)) - 1
    x = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    y = torch.full((len(prompts), T), -100, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        x[i, :len(p) + len(r) - 1] = torch.tensor([*p, *r][:-1])
        y[i, len(p) - 1:len(p) + len(r) - 1] = torch.tensor(r)
    return x, y


@torch.no_grad()
def entropy_sum(lm_head: torch.nn.Module, hidden: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
                chunk: int = 1024) -> torch.Tensor:
    """The entropy of the next-token distribution (logits / temperature) summed over the positions where
    `mask` is 1, from the trunk's output `hidden` (B, T, hidden), the (N x vocab) logits made `chunk` rows
    at a time."""
    rows = hidden[mask.bool()] / temperature
    total = rows.new_zeros((), dtype=torch.float32)
    for i in range(0, rows.shape[0], chunk):
        logp = torch.log_softmax(lm_head(rows[i:i + chunk]).float(), -1)
        total += -(logp.exp() * logp).sum()
    return total


def minibatches(data: dict[str, torch.Tensor], mask: torch.Tensor, epochs: int, batch_size: int,
                generator: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """`epochs` passes over a rollout's rows (tensors of `data`, first dimension B), each in a fresh
    random order cut into micro-batches of `batch_size` rows; the columns that are padding in every row
    of a micro-batch (`mask` (B, T) 0) are dropped from it."""
    out, n = [], mask.shape[0]
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            used = mask[idx].any(0).nonzero()
            width = int(used.max()) + 1 if used.numel() else 1
            out.append({k: v[idx, :width] if v.dim() > 1 else v[idx] for k, v in data.items()})
    return out
