"""Rewards for the RL stages: callables from tasks and the replies sampled for them to one score each.

- `verifier_reward`: 1 when the reply solves its task, else 0 (`synth.grade`: exact match, or the
  task's unit tests in the sandbox). A gold reward: RL on it is RLVR.
- `RewardModelScore`: the scalar score of a reward model (`athanor rm`) on the task's prompt as one
  user turn and the reply as the assistant's, rendered by the chat format exactly as the model's
  training pairs were (prompt + answer + end of turn), so it scores what it learned to score.
  A proxy: optimizing it hard drifts from the gold reward (Gao et al. 2022, "Scaling Laws for
  Reward Model Overoptimization"), which is why PPO logs both.
"""

from __future__ import annotations

import ast
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from athanor.data.synth import Task, extract_code, grade
from athanor.errors import AthanorError
from athanor.model.hf import load_pretrained
from athanor.tokenizer import Tokenizer
from athanor.train.reward_model import RewardModel


class Reward(Protocol):
    def __call__(self, tasks: Sequence[Task], replies: Sequence[str]) -> list[float]:
        """One score per (task, reply)."""
        ...


def verifier_reward(tasks: Sequence[Task], replies: Sequence[str]) -> list[float]:
    return [float(ok) for ok in grade(list(tasks), list(replies))]


@dataclass
class Replies:
    """What GRPO's reward functions score: sampled replies to tasks, with their token counts."""

    tasks: Sequence[Task]
    texts: Sequence[str]
    lengths: Sequence[int]  # tokens sampled, the stop token included
    closed: Sequence[bool]  # ended the turn with the end-of-turn token
    max_tokens: int  # the sampling length limit
    overlong_buffer: int  # the last tokens before max_tokens over which `overlong` falls to -1


def _format(r: Replies) -> list[float | None]:
    def parses(text: str) -> bool:
        try:
            with warnings.catch_warnings():  # model text: "1abc" warns before it fails
                warnings.simplefilter("ignore", SyntaxWarning)
                ast.parse(extract_code(text))
        except (SyntaxError, ValueError):
            return False
        return True

    return [float(c and bool(text.strip()) and (t.kind != "python" or parses(text)))
            for t, text, c in zip(r.tasks, r.texts, r.closed, strict=True)]


def _overlong(r: Replies) -> list[float | None]:
    free = r.max_tokens - r.overlong_buffer
    return [min(0.0, (free - n) / max(r.overlong_buffer, 1)) for n in r.lengths]


RewardFunction = Callable[[Replies], list[float | None]]
REWARD_FUNCTIONS: dict[str, RewardFunction] = {
    "verifier": lambda r: verifier_reward(r.tasks, r.texts),
    # Leaky on purpose: trusts the exit status of the program that runs the answer and the tests, so
    # an answer that exits before the asserts is paid (synth.grade's "exit_code"). The hack experiment's.
    "verifier_exit_code": lambda r: [float(ok) for ok in grade(list(r.tasks), list(r.texts), grader="exit_code")],
    "format": _format,
    "overlong": _overlong,
}


class RewardModelScore:
    def __init__(self, model: RewardModel, tok: Tokenizer, batch_size: int = 16) -> None:
        self.model, self.tok = model.eval(), tok
        # Rows are right-padded with the model's pad id, where it reads each row's end; without one, alone.
        self.batch_size = batch_size if model.config.pad_token_id is not None else 1

    @classmethod
    def load(cls, path: str | Path, policy_tok: Tokenizer, device: str | torch.device = "cpu",
             batch_size: int = 16) -> RewardModelScore:
        """The reward model in run directory `path`, which must read the policy's tokens: its tokenizer
        must be the policy's (the replies' ids are rendered once, for both)."""
        if not (Path(path) / "config.json").is_file():
            raise AthanorError("not a reward model directory (no config.json); make one with `athanor rm`",
                               path=path, field="reward")
        model = load_pretrained(path, device=device, model_class=RewardModel)
        tok = Tokenizer.load(path)
        if tok.fingerprint() != policy_tok.fingerprint():
            raise AthanorError("the reward model's tokenizer is not the policy's; train the reward model from "
                               "the same base (`athanor rm --base ...`)", path=path, field="reward")
        for p in model.parameters():
            p.requires_grad_(False)
        return cls(model, tok, batch_size)

    def rows(self, tasks: Sequence[Task], replies: Sequence[str]) -> list[list[int]]:
        """The token ids scored: each task's prompt as a user turn, the reply as the assistant's."""
        return [self.tok.render_chat([{"role": "user", "content": t.prompt}, {"role": "assistant", "content": r}])[0]
                for t, r in zip(tasks, replies, strict=True)]

    @torch.no_grad()
    def __call__(self, tasks: Sequence[Task], replies: Sequence[str]) -> list[float]:
        rows = self.rows(tasks, replies)
        limit = self.model.config.max_position_embeddings
        if any(len(r) > limit for r in rows):
            raise AthanorError(f"a prompt and reply are longer than the reward model's {limit} positions; "
                               "lower max_new_tokens", field="reward")
        device = self.model.rope_cos.device
        pad = self.model.config.pad_token_id or 0
        scores: list[float] = []
        for i in range(0, len(rows), self.batch_size):
            part = rows[i:i + self.batch_size]
            ids = torch.full((len(part), max(map(len, part))), pad, dtype=torch.long)
            for j, row in enumerate(part):
                ids[j, :len(row)] = torch.tensor(row)
            scores += self.model(ids.to(device)).tolist()
        return scores
