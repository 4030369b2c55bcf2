"""How tool calls travel between the agent and a model: the OpenAI `tools`/`tool_calls` format, and a
text protocol for models and servers without it.

Native: the request carries the tools as OpenAI function definitions; the reply's message has
`tool_calls` (`{"id", "type": "function", "function": {"name", "arguments": JSON text}}`), and each
result goes back as a `{"role": "tool", "tool_call_id", "content"}` message.

Text (the format Hermes and Qwen 2.5 models are trained on): the system prompt lists the tools, and a
reply calls one by holding a block

    <tool_call>
    {"name": "write_file", "arguments": {"path": "a.txt", "content": "hi"}}
    </tool_call>

(any number of them; athanor/tool_calls.py reads them); each result comes back as a user message
`<tool_response>...</tool_response>`. A small model, or a server that returns no `tool_calls`, works this
way. `athanor serve` returns `tool_calls` (it reads these blocks out of the reply when the request has
`tools`), so the native format works against it with a model whose chat template renders tools. A native
reply without `tool_calls` is read for text calls too, since many models write them either way.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from athanor.agent.tools import Tool
from athanor.tool_calls import parse_arguments, text_calls

ToolFormat = Literal["openai", "text"]


@dataclass
class Call:
    """One tool call of a reply. `arguments` is None when the model's JSON did not parse (`error` says why)."""

    id: str
    name: str
    arguments: dict[str, Any] | None
    error: str = ""
    native: bool = True  # its result goes back as a "tool" message (else as a text <tool_response>)


def calls(message: dict[str, Any], step: int) -> list[Call]:
    """The tool calls of an assistant `message` (the `step`-th reply names text calls' ids)."""
    found = []
    for i, tc in enumerate(message.get("tool_calls") or []):
        fn = tc.get("function") or {}
        name = str(fn.get("name", ""))
        args, error = parse_arguments(fn.get("arguments"), name)
        found.append(Call(str(tc.get("id") or f"call-{step}-{i}"), name, args, error))
    if found:
        return found
    return [Call(f"text-{step}-{i}", c.name, c.arguments, c.error, native=False)
            for i, c in enumerate(text_calls(message.get("content") or ""))]


def result_message(call: Call, text: str) -> dict[str, Any]:
    """The message that brings `text`, the result of `call`, back to the model."""
    if call.native:
        return {"role": "tool", "tool_call_id": call.id, "content": text}
    return {"role": "user", "content": f"<tool_response>\n{text}\n</tool_response>"}


def text_protocol_prompt(tools: Sequence[Tool]) -> str:
    """The part of the system prompt that teaches the text protocol."""
    specs = "\n".join(json.dumps(t.openai_spec()["function"]) for t in tools)
    return ("You may call these tools:\n<tools>\n" + specs + "\n</tools>\n"
            "To call one, write a block like this (any number per reply), then stop and wait for its result:\n"
            '<tool_call>\n{"name": "TOOL_NAME", "arguments": {"ARG": "VALUE"}}\n</tool_call>\n'
            "Each result comes back as <tool_response>...</tool_response>.")
