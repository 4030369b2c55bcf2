"""What the RL stages (PPO, GRPO) share: sample the policy's replies to task prompts on the engine,
and turn prompts + sampled responses into the rows a training forward scores.

A *response* is the sampled tokens plus the stop token that ended them, if one did: emitting the
end of turn is an action the policy takes and learns, so it is scored like any other token. In a
multi-turn rollout (`sample_episodes`) it is all the replies with the tool turns between them, and
a mask per token says which the policy sampled (learned) and which it only read (tool output).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from athanor.data.synth import Task
from athanor.errors import AthanorError
from athanor.lm import Completion, Message
from athanor.lm.local import LocalLM
from athanor.rl.environment import TOOL_ROLE, Environment
from athanor.serve.sampling import SamplingParams
from athanor.tokenizer import Tokenizer


@dataclass
class Sampled:
    """One call's rollouts, in the order of the tasks given."""

    prompts: list[list[int]]  # each task's prompt: one user turn, rendered with the assistant header
    responses: list[list[int]]  # all that follows the prompt: the sampled tokens (+ the stop token that ended
    # them) and, in a multi-turn rollout, the tool turns between the replies (with their template tokens)
    masks: list[list[int]]  # per response token: 1 where the policy sampled it, 0 on the tool turns
    replies: list[str]  # the text of each (final) reply (the stop token not included)
    closed: torch.Tensor  # (B,) bool: the (final) reply ended its turn with the end-of-turn token
    truncated: torch.Tensor  # (B,) bool: cut off at the length limit rather than stopped
    transcripts: list[list[Message]] | None = None  # multi-turn: each whole conversation, prompt first

    @property
    def lengths(self) -> list[int]:
        """Tokens the policy sampled in each rollout, the stop tokens included."""
        return [sum(m) for m in self.masks]


def sample_replies(lm: LocalLM, tok: Tokenizer, tasks: Sequence[Task], max_new_tokens: int, temperature: float,
                   seeds: Sequence[int], field: str = "max_new_tokens") -> Sampled:
    """Each task's prompt answered by `lm`'s model (batched, KV cache) with its own seed. The model is
    put back in the mode (train/eval) it was in. `field` names the length setting in errors."""
    prompts = _chat_prompts(lm, tok, tasks, max_new_tokens, field)
    out = _generate(lm, prompts, [max_new_tokens] * len(prompts), temperature, seeds)
    responses = [_response(c) for c in out]
    return Sampled(prompts, responses, [[1] * len(r) for r in responses], [c.text for c in out],
                   torch.tensor([c.stop_reason == tok.end_id for c in out]),
                   torch.tensor([c.finish_reason == "length" for c in out]))


def sample_episodes(lm: LocalLM, tok: Tokenizer, tasks: Sequence[Task], env: Environment, max_turns: int,
                    max_new_tokens: int, temperature: float, seeds: Sequence[int],
                    field: str = "max_new_tokens") -> Sampled:
    """Multi-turn rollouts: each task's prompt answered by the policy, whose replies `env` (rl/environment.py)
    answers with a tool turn until it calls a reply final, the reply does not close its turn, or the
    rollout has `max_turns` replies. Every turn is one batched `generate` over the rollouts still going.

    `max_new_tokens` bounds the tokens the policy samples in a whole rollout (its replies together),
    so the length limit, the overlong reward and Dr. GRPO's constant mean what they do for one reply.
    The tool turns are appended as the chat template renders them (after the reply's end of turn: the
    tool turn and the next assistant header), to the tokens the policy sampled, never to a re-encoding
    of their text: the rows score exactly what was sampled. Turn k samples with seed + k, so the first
    turn draws what `sample_replies` draws."""
    prompts = _chat_prompts(lm, tok, tasks, max_new_tokens, field)
    context = lm.model.config.max_position_embeddings
    responses: list[list[int]] = [[] for _ in tasks]
    masks: list[list[int]] = [[] for _ in tasks]
    transcripts: list[list[Message]] = [[{"role": "user", "content": t.prompt}] for t in tasks]
    last: dict[int, Completion] = {}  # each rollout's latest reply

    def room(i: int, more: int = 0) -> int:
        """Tokens rollout i may still sample, once `more` tokens are appended to it."""
        return min(max_new_tokens - sum(masks[i]), context - len(prompts[i]) - len(responses[i]) - more)

    cut = [False] * len(tasks)  # the budget or the context ran out before a tool's answer could be read
    active = list(range(len(tasks)))
    for turn in range(max_turns):
        out = _generate(lm, [prompts[i] + responses[i] for i in active], [room(i) for i in active], temperature,
                        [seeds[i] + turn for i in active])
        for i, c in zip(active, out, strict=True):
            last[i] = c
            sampled = _response(c)
            responses[i] += sampled
            masks[i] += [1] * len(sampled)
            transcripts[i].append({"role": "assistant", "content": c.text})
        going = [i for i in active if last[i].stop_reason == tok.end_id] if turn + 1 < max_turns else []
        answers = env.step([tasks[i] for i in going], [transcripts[i] for i in going]) if going else []
        active = []
        for i, answer in zip(going, answers, strict=True):
            if answer is None:
                continue
            conversation = [*transcripts[i], {"role": TOOL_ROLE, "content": answer}]
            between = tool_turn_ids(tok, conversation)
            if room(i, len(between)) < 1:
                cut[i] = True
                continue
            responses[i] += between
            masks[i] += [0] * len(between)
            transcripts[i] = conversation
            active.append(i)
        if not active:
            break
    final = [last[i] for i in range(len(tasks))]
    return Sampled(prompts, responses, masks, [c.text for c in final],
                   torch.tensor([c.stop_reason == tok.end_id for c in final]),
                   torch.tensor([c.finish_reason == "length" or k for c, k in zip(final, cut, strict=True)]),
                   transcripts)


def tool_turn_ids(tok: Tokenizer, conversation: Sequence[Message]) -> list[int]:
    """The tokens that follow the last reply's end of turn in `conversation` (which ends with a reply and
    the tool's answer to it) up to the next assistant header: the tool turn as the chat template renders
    it. Found by SFT's loss mask (`render_chat`: 1 on the assistant turns), so it works wherever SFT on
    multi-turn chats does."""
    ids, mask = tok.render_chat(conversation, add_generation_prompt=True)
    return ids[max(j for j, m in enumerate(mask) if m) + 1:]


def _chat_prompts(lm: LocalLM, tok: Tokenizer, tasks: Sequence[Task], max_new_tokens: int, field: str
                  ) -> list[list[int]]:
    """Each task's prompt as one user turn with the assistant header; an error when one leaves no room
    for `max_new_tokens` in the model's context."""
    prompts = [tok.encode_chat([{"role": "user", "content": t.prompt}], add_generation_prompt=True) for t in tasks]
    context = lm.model.config.max_position_embeddings
    for t, p in zip(tasks, prompts, strict=True):
        if len(p) + max_new_tokens > context:
            raise AthanorError(f"task {t.id}: its prompt ({len(p)} tokens) + {max_new_tokens} new tokens leave the "
                               f"model's {context} positions", field=field)
    return prompts


def _generate(lm: LocalLM, prompts: Sequence[Sequence[int]], max_tokens: Sequence[int], temperature: float,
              seeds: Sequence[int]) -> list[Completion]:
    """One batched `generate`, each prompt with its own length limit and seed; the model is put back in
    the mode (train/eval) it was in."""
    params = [SamplingParams(max_tokens=m, temperature=temperature, seed=s)
              for m, s in zip(max_tokens, seeds, strict=True)]
    was_training = lm.model.training
    out = lm.generate(prompts, params)
    lm.model.train(was_training)
    return out


def _response(c: Completion) -> list[int]:
    """The sampled tokens, with the stop token that ended them when a stop id did (not a stop string)."""
    stopped = c.finish_reason == "stop" and isinstance(c.stop_reason, int)
    return c.token_ids + ([c.stop_reason] if stopped else [])


def response_rows(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
                  masks: Sequence[Sequence[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), both (B, T): prompt + response right-padded, the targets the response tokens
    at the positions that predict them and -100 elsewhere, and also where `masks` (per response token;
    None: all 1) is 0, so a tool's output is read but never learned."""
    T = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True)) - 1
    x = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    y = torch.full((len(prompts), T), -100, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        x[i, :len(p) + len(r) - 1] = torch.tensor([*p, *r][:-1])
        target = torch.tensor(r)
        if masks is not None:
            target = target.masked_fill(torch.tensor(masks[i]) == 0, -100)
        y[i, len(p) - 1:len(p) + len(r) - 1] = target
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
