"""Tool calls written as text, the format Hermes and Qwen 2.5/3 models are trained on: a reply calls a tool by
holding a block

    <tool_call>
    {"name": "write_file", "arguments": {"path": "a.txt", "content": "hi"}}
    </tool_call>

(any number of them). One parser for everyone that reads such replies: the agent (agent/protocol.py), which
runs what a model asks for, and `athanor serve`, which turns the blocks into OpenAI `tool_calls`. It lives
outside both so that the server does not import the agent's tools and sandbox to read a reply.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

TEXT_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


@dataclass
class TextCall:
    """One `<tool_call>` block of a reply, at `text[start:end]`. `arguments` is None when the block is not a
    well-formed call (`error` says why; `name` is "" when the block has none)."""

    name: str
    arguments: dict[str, Any] | None
    error: str
    start: int
    end: int


def parse_arguments(raw: Any, name: str) -> tuple[dict[str, Any] | None, str]:
    """A call's arguments as a dict, from a dict or from JSON text (OpenAI sends them as text), and "" as the
    error; or None and why not. No arguments at all count as `{}`."""
    if isinstance(raw, dict):
        return raw, ""
    if raw is not None and not isinstance(raw, str):  # already decoded, but not an object (a list, a number)
        return None, f"the arguments of {name!r} must be a JSON object, got {json.dumps(raw)[:200]}"
    try:
        value = json.loads(raw or "{}")
    except (json.JSONDecodeError, TypeError) as e:
        return None, f"the arguments of {name!r} are not valid JSON ({e}): {str(raw)[:200]!r}"
    if not isinstance(value, dict):
        return None, f"the arguments of {name!r} must be a JSON object, got {str(raw)[:200]!r}"
    return value, ""


def text_calls(text: str) -> list[TextCall]:
    """Every `<tool_call>` block of `text`, in order, well-formed or not."""
    found = []
    for m in TEXT_CALL.finditer(text):
        try:
            block = json.loads(m.group(1))
        except json.JSONDecodeError as e:
            found.append(TextCall("", None, f"a <tool_call> block that is not valid JSON ({e}): {m.group(1)[:200]!r}",
                                  m.start(), m.end()))
            continue
        if not isinstance(block, dict) or not isinstance(block.get("name"), str):
            found.append(TextCall("", None, 'a <tool_call> block needs {"name": ..., "arguments": {...}}, got '
                                  f"{m.group(1)[:200]!r}", m.start(), m.end()))
            continue
        args, error = parse_arguments(block.get("arguments", {}), block["name"])
        found.append(TextCall(block["name"], args, error, m.start(), m.end()))
    return found
