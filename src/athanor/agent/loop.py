"""The agent loop: ask the model, run the tools it calls, give it their results, until it answers
without a call or a limit is reached; every step appended to a trajectory file that a re-run resumes.

The trajectory (JSONL, one record per line, on disk before the next step):

    {"type": "start", "task", "model", "tools", "tool_format", "system"}
    {"type": "message", "message": {...}, "step", "usage", "t"}       the model's reply
    {"type": "message", "message": {...}, "tool", "call_id", "error", "seconds", "t"}   a tool's result
    {"type": "context", "dropped": [message indices], "tokens_before", "tokens_after", "t"}
    {"type": "error", "error", "t"}              the model's server failed past its retries
    {"type": "end", "reason", "answer", "t"}     reason: done, max_steps, max_seconds, max_tokens, context

`t` is the seconds the run has taken so far, summed over re-runs. A re-run with the same file
rebuilds the conversation from the records (a context record's drops included), runs any tool call
of the last reply whose result was not recorded, and goes on; the limits count the whole run, so a
run stopped by a limit goes on only when the limit is raised. A run that ended "done" is not redone.

Failures: the endpoint retries connection errors and 5xx answers with backoff (lm/endpoint.py); when
it gives up, the loop records the error and raises (a re-run continues from there). A tool that
raises, an unknown tool, and arguments that are not JSON are answered with an error message the
model reads, and the run goes on: the model can correct itself.

Context: the prompt's size is estimated (characters / CHARS_PER_TOKEN, rounded up: code and JSON
tokenize worse than prose). When it passes `context_fraction` of the window less the reply's room,
the outputs of the oldest tool results are replaced by a one-line note (the model knows it called
the tool and can call it again), newest results kept, and a context record says which.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from athanor.agent.protocol import Call, ToolFormat, calls, result_message, text_protocol_prompt
from athanor.agent.tools import Tool
from athanor.errors import AthanorError
from athanor.io import append_record, read_records
from athanor.lm.endpoint import EndpointError, EndpointLM
from athanor.serve.sampling import SamplingParams

CHARS_PER_TOKEN = 3
SYSTEM_PROMPT = ("You are a careful software agent working in a directory of files. Use the tools to look at "
                 "the files, change them and run commands; check your work by running it. When the task is "
                 "done, reply with a short summary of what you did and call no tool.")


@dataclass
class AgentLimits:
    max_steps: int = 30  # model replies
    max_seconds: float = 900.0  # wall-clock seconds of the whole run (re-runs included)
    max_tokens: int = 500_000  # prompt + completion tokens over the whole run
    context: int = 8192  # the model's context window, in tokens
    context_fraction: float = 0.8  # start dropping old tool outputs past this share of the window
    keep_recent: int = 2  # the newest tool results are never dropped
    reply_tokens: int = 1024  # max_tokens of each reply


@dataclass
class AgentResult:
    reason: str  # why it stopped: done, max_steps, max_seconds, max_tokens, context
    answer: str  # the last reply's text
    steps: int
    tokens: int
    seconds: float


def tokens_of(messages: Sequence[dict[str, Any]]) -> int:
    """The estimated prompt size of `messages`, in tokens."""
    chars = sum(len(str(m.get("content") or "")) + len(str(m.get("tool_calls") or "")) + 8 for m in messages)
    return math.ceil(chars / CHARS_PER_TOKEN)


class Agent:
    def __init__(self, lm: EndpointLM, tools: Sequence[Tool], trajectory: str | Path,
                 limits: AgentLimits | None = None, tool_format: ToolFormat = "openai",
                 system: str = SYSTEM_PROMPT, temperature: float = 0.0,
                 log: Callable[[str], None] = lambda line: None) -> None:
        self.lm, self.limits, self.tool_format, self.temperature = lm, limits or AgentLimits(), tool_format, temperature
        self.tools = {t.name: t for t in tools}
        if len(self.tools) != len(tools):
            raise AthanorError("two tools have the same name: " + ", ".join(t.name for t in tools))
        self.system = system + ("\n\n" + text_protocol_prompt(tools) if tool_format == "text" else "")
        self.path, self.log = Path(trajectory), log

    def run(self, task: str) -> AgentResult:
        records = read_records(self.path, "agent trajectory")
        if records and records[0].get("type") != "start":
            raise AthanorError("not an agent trajectory (its first record is not a start)", path=self.path, line=1)
        if records and records[0].get("task") != task:
            raise AthanorError("this trajectory is of another task; give a new --trajectory file, or the same "
                               "task to resume it", path=self.path, line=1)
        state = _State.replay(records)
        if state.ended == "done":
            return state.result("done")
        if not records:
            self._record(state, {"type": "start", "task": task, "model": self.lm.name, "tools": list(self.tools),
                                 "tool_format": self.tool_format, "system": self.system})
            state.messages = [{"role": "system", "content": self.system}, {"role": "user", "content": task}]
        started = time.monotonic() - state.seconds
        while True:
            state.seconds = time.monotonic() - started
            pending = state.pending()
            if pending:
                for call in pending:
                    self._call_tool(state, call, started)
                continue
            if state.messages[-1]["role"] == "assistant":  # a reply without calls: the answer
                return self._end(state, "done")
            reason = self._over_limit(state)
            if reason is None and not self._fit_context(state):
                reason = "context"
            if reason is not None:
                return self._end(state, reason)
            params = SamplingParams(max_tokens=self.limits.reply_tokens, temperature=self.temperature)
            tools = [t.openai_spec() for t in self.tools.values()] if self.tool_format == "openai" else None
            try:
                message, usage = self.lm.chat_turn(state.messages, params, tools)
            except EndpointError as e:
                self._record(state, {"type": "error", "error": str(e), "t": time.monotonic() - started})
                raise
            message = {k: v for k, v in message.items() if k in ("role", "content", "tool_calls") and v is not None}
            message["role"] = "assistant"
            message.setdefault("content", "")
            used = usage.get("total_tokens") or tokens_of(state.messages) + tokens_of([message])
            state.steps += 1
            state.tokens += used
            self._record(state, {"type": "message", "message": message, "step": state.steps, "usage": usage,
                                 "tokens": used, "t": time.monotonic() - started})
            state.messages.append(message)
            state.answered = set()
            self.log(f"step {state.steps}: " + (", ".join(c.name for c in state.pending()) or "answer"))

    def _call_tool(self, state: _State, call: Call, started: float) -> None:
        t0 = time.monotonic()
        error = True
        if call.arguments is None:
            text = f"error: {call.error}. Call the tool again with a JSON object of arguments."
        elif call.name not in self.tools:
            text = f"error: there is no tool {call.name!r}; the tools are: {', '.join(self.tools)}"
        else:
            try:
                text, error = self.tools[call.name].call(call.arguments), False
            except Exception as e:  # noqa: BLE001 (any failure of a tool is the model's to read, not a crash)
                text = f"error: {type(e).__name__}: {e}"
        message = result_message(call, text)
        self._record(state, {"type": "message", "message": message, "tool": call.name, "call_id": call.id,
                             "error": error, "seconds": round(time.monotonic() - t0, 3),
                             "t": time.monotonic() - started})
        state.messages.append(message)
        state.answered.add(call.id)

    def _over_limit(self, state: _State) -> str | None:
        lim = self.limits
        if state.steps >= lim.max_steps:
            return "max_steps"
        if state.seconds >= lim.max_seconds:
            return "max_seconds"
        if state.tokens >= lim.max_tokens:
            return "max_tokens"
        return None

    def _fit_context(self, state: _State) -> bool:
        """Drop old tool outputs until the prompt fits; False if it cannot."""
        budget = int(self.limits.context * self.limits.context_fraction) - self.limits.reply_tokens
        before = tokens_of(state.messages)
        if before <= budget:
            return True
        results = [i for i, m in enumerate(state.messages) if i in state.tool_results and i not in state.dropped]
        dropped = []
        for i in results[:max(len(results) - self.limits.keep_recent, 0)]:
            if tokens_of(state.messages) <= budget:
                break
            _drop(state, i)
            dropped.append(i)
        after = tokens_of(state.messages)
        if dropped:
            self._record(state, {"type": "context", "dropped": dropped, "tokens_before": before,
                                 "tokens_after": after, "t": state.seconds})
            self.log(f"context: dropped {len(dropped)} old tool outputs ({before} -> {after} tokens)")
        return after <= budget

    def _record(self, state: _State, record: dict[str, Any]) -> None:
        append_record(self.path, record)
        if record["type"] == "message" and "tool" in record:
            state.tool_results.add(len(state.messages))

    def _end(self, state: _State, reason: str) -> AgentResult:
        result = state.result(reason)
        self._record(state, {"type": "end", "reason": reason, "answer": result.answer, "steps": result.steps,
                             "tokens": result.tokens, "t": state.seconds})
        return result


def _drop(state: _State, index: int) -> None:
    m = state.messages[index]
    note = f"[tool output dropped to save context: {len(str(m['content']))} characters]"
    state.messages[index] = {**m, "content": note if m["role"] == "tool" else
                             f"<tool_response>\n{note}\n</tool_response>"}
    state.dropped.add(index)


@dataclass
class _State:
    """The conversation and counters, as the records so far leave them."""

    messages: list[dict[str, Any]]
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    ended: str = ""

    def __post_init__(self) -> None:
        self.tool_results: set[int] = set()  # indices of tool-result messages
        self.dropped: set[int] = set()
        self.answered: set[str] = set()  # call ids of the last reply that have their result

    @classmethod
    def replay(cls, records: list[dict[str, Any]]) -> _State:
        state = cls([])
        for r in records:
            kind = r.get("type")
            if kind == "start":
                state.messages = [{"role": "system", "content": r["system"]}, {"role": "user", "content": r["task"]}]
            elif kind == "message":
                if "tool" in r:
                    state.tool_results.add(len(state.messages))
                    state.answered.add(r["call_id"])
                else:
                    state.steps, state.answered = r["step"], set()
                    state.tokens += r.get("tokens", 0)
                state.messages.append(r["message"])
            elif kind == "context":
                for i in r["dropped"]:
                    _drop(state, i)
            state.seconds = r.get("t", state.seconds)
            state.ended = r["reason"] if kind == "end" else ""
        return state

    def pending(self) -> list[Call]:
        """The calls of the last reply that have no result yet."""
        last = next((m for m in reversed(self.messages) if m["role"] == "assistant"), None)
        if last is None:
            return []
        return [c for c in calls(last, self.steps) if c.id not in self.answered]

    def result(self, reason: str) -> AgentResult:
        last = next((m for m in reversed(self.messages) if m["role"] == "assistant"), {})
        return AgentResult(reason, str(last.get("content") or ""), self.steps, self.tokens, self.seconds)
