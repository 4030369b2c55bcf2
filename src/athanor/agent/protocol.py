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

(any number of them); each result comes back as a user message `<tool_response>...</tool_response>`.
A small model, or a server that returns no `tool_calls` (`athanor serve`), works this way. A native
reply without `tool_calls` is read for text calls too, since many models write them either way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from athanor.agent.tools import Tool

ToolFormat = Literal["openai", "text"]
TEXT_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


@dataclass
class Call:
    """One tool call of a reply. `arguments` is None when the model's JSON did not parse (`error` says why)."""

    id: str
    name: str
    arguments: dict[str, Any] | None
    error: str = ""
    native: bool = True  # its result goes back as a "tool" message (else as a text <tool_response>)


def _arguments(raw: Any, name: str) -> tuple[dict[str, Any] | None, str]:
    if isinstance(raw, dict):
        return raw, ""
    try:
        value = json.loads(raw or "{}")
    except (json.JSONDecodeError, TypeError) as e:
        return None, f"the arguments of {name!r} are not valid JSON ({e}): {str(raw)[:200]!r}"
    if not isinstance(value, dict):
        return None, f"the arguments of {name!r} must be a JSON object, got {str(raw)[:200]!r}"
    return value, ""


def calls(message: dict[str, Any], step: int) -> list[Call]:
    """The tool calls of an assistant `message` (the `step`-th reply names text calls' ids)."""
    found = []
    for i, tc in enumerate(message.get("tool_calls") or []):
        fn = tc.get("function") or {}
        name = str(fn.get("name", ""))
        args, error = _arguments(fn.get("arguments"), name)
        found.append(Call(str(tc.get("id") or f"call-{step}-{i}"), name, args, error))
    if found:
        return found
    for i, m in enumerate(TEXT_CALL.finditer(message.get("content") or "")):
        try:
            block = json.loads(m.group(1))
        except json.JSONDecodeError as e:
            found.append(Call(f"text-{step}-{i}", "", None, f"a <tool_call> block that is not valid JSON ({e}): "
                              f"{m.group(1)[:200]!r}", native=False))
            continue
        if not isinstance(block, dict) or not isinstance(block.get("name"), str):
            found.append(Call(f"text-{step}-{i}", "", None, 'a <tool_call> block needs {"name": ..., '
                              f'"arguments": {{...}}}}, got {m.group(1)[:200]!r}', native=False))
            continue
        args, error = _arguments(block.get("arguments", {}), block["name"])
        found.append(Call(f"text-{step}-{i}", block["name"], args, error, native=False))
    return found


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
