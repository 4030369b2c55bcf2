"""Environments for multi-turn rollouts: what answers the policy between its turns.

A rollout is a conversation: the task's prompt as a user turn, then the policy's replies, each but
the last followed by the environment's answer (a tool's output), which the policy reads before it
goes on. After each reply the rollout (train/rollout.py `sample_episodes`) hands the environment the
conversations of a batch's still-active rollouts, all at once so tools run side by side; for each it
returns the text of the next turn, or None: the reply is the final answer, which the ordinary reward
functions (rl/rewards.py) then score against the task. The policy learns only from its own tokens:
the tool turns are context, never targets.

`PythonTool`, the one tool so far: a reply that holds a fenced block opened with ```run is a call,

    ```run
    print(17 * 23)
    ```

whose code runs in the sandbox (rl/sandbox.py); its stdout and stderr, cut to `max_output_chars`,
come back as the next turn. A reply without a ```run block is the final answer. ```run rather than
```python because a Python task's answer is itself a ```python block (synth.extract_code).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal, Protocol, get_args

from athanor.data.synth import Task
from athanor.lm import Message
from athanor.rl.sandbox import Limits, SandboxResult, run_many

EnvironmentName = Literal["single", "python_tool"]
ENVIRONMENTS: tuple[str, ...] = get_args(EnvironmentName)
CALL = re.compile(r"```run[ \t]*\n(.*?)```", re.S)
# The role a tool's output is rendered as. A user turn: the call is text in the reply, not a structured
# tool call, which chat templates' "tool" role answers (Llama 3's, Mistral's want call ids with it), and
# athanor's own format has no tool role (a new special token would change every saved tokenizer). Like
# every turn but the assistant's, it carries no loss.
TOOL_ROLE = "user"


class Environment(Protocol):
    def step(self, tasks: Sequence[Task], conversations: Sequence[Sequence[Message]]) -> list[str | None]:
        """For each rollout (its task, and its conversation so far, ending with the policy's latest
        reply): the next turn's text, or None when that reply is the final answer."""
        ...


class PythonTool:
    """Runs the ```run block of a reply in the sandbox and answers with what it printed."""

    def __init__(self, limits: Limits | None = None, max_output_chars: int = 512) -> None:
        self.limits = limits or Limits(wall_s=5, cpu_s=2, memory_mb=256)  # synth.grade's: a small program
        self.max_output_chars = max_output_chars

    def step(self, tasks: Sequence[Task], conversations: Sequence[Sequence[Message]]) -> list[str | None]:
        calls = [CALL.search(c[-1]["content"]) for c in conversations]
        code = [m.group(1) for m in calls if m is not None]
        runs = iter(run_many(code, self.limits) if code else [])
        return [None if m is None else self.output(next(runs)) for m in calls]

    def output(self, run: SandboxResult) -> str:
        """What the policy reads back: stdout, then stderr, then why the run stopped if it did not end
        by itself; when too long, its start and its end (a traceback's cause is at its end)."""
        text = run.stdout + run.stderr
        if run.verdict not in ("ok", "failed"):
            text += f"[{run.verdict}: {run.detail}]"
        if len(text) > self.max_output_chars:
            half = self.max_output_chars // 2
            text = f"{text[:half]}\n[... output truncated ...]\n{text[-half:]}"
        return text or "[no output]"


def make_environment(name: EnvironmentName) -> Environment | None:
    """The environment `name` (GRPOConfig.environment); None for "single": one reply, no tools."""
    return PythonTool() if name == "python_tool" else None

