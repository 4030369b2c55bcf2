"""Chat templates as models ship them: Jinja rendered the way transformers renders it, plus the loss mask.

transformers renders `chat_template` in a sandboxed Jinja environment with `trim_blocks` and
`lstrip_blocks`, a `tojson` filter that keeps non-ASCII text and takes `indent`/`separators`/`sort_keys`,
and the globals `raise_exception` and `strftime_now`; the special tokens (`bos_token`, `eos_token`, ...)
are passed by name next to `messages`, `tools`, `documents` and `add_generation_prompt`. Rendering the
same way here is what makes a fine-tuned model see at training time the text it sees when served.

Which characters carry loss: a template may mark the assistant's text with `{% generation %}` blocks
(transformers' `return_assistant_tokens_mask`); most do not, so the assistant turns are found by rendering
prefixes of the conversation, which only works when the template renders earlier turns the same whatever
follows them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from athanor.errors import AthanorError

Span = tuple[int, int]  # [start, end) in characters of the rendered text

# (pieces emitted so far, spans found) of the render in progress; a ContextVar so renders never share it.
_TRACKING: ContextVar[tuple[list[str], list[Span]] | None] = ContextVar("athanor_generation", default=None)
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # first: the name templates read
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class _GenerationBlocks(Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body and records where it landed."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_record"), [], [], body).set_lineno(lineno)

    def _record(self, caller: Any) -> str:
        text = caller()
        tracking = _TRACKING.get()
        if tracking is not None:
            emitted, spans = tracking
            start = sum(len(piece) for piece in emitted)
            spans.append((start, start + len(text)))
        return text


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters and sorts keys; chat templates expect plain json.dumps.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlocks, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env


_ENV = _environment()


class ChatTemplate:
    """One model's chat template with the special-token strings it is rendered with."""

    def __init__(self, source: str, special_tokens: Mapping[str, str]) -> None:
        try:
            self.template = _ENV.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise AthanorError(f"chat template line {e.lineno}: {e.message}", field="chat_template") from None
        self.source = source
        self.has_generation_blocks = bool(_GENERATION_TAG.search(source))
        self.special_tokens = dict(special_tokens)

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False,
               tools: Sequence[Mapping[str, Any]] | None = None,
               documents: Sequence[Mapping[str, Any]] | None = None, **kwargs: Any) -> tuple[str, list[Span]]:
        """The rendered text and the spans of its `{% generation %}` blocks (empty without them)."""
        emitted: list[str] = []
        spans: list[Span] = []
        token = _TRACKING.set((emitted, spans))
        try:
            chat = [_as_template_sees_it(i, m) for i, m in enumerate(messages)]
            context = {**self.special_tokens, **kwargs}
            emitted.extend(self.template.generate(messages=chat, tools=tools, documents=documents,
                                                  add_generation_prompt=add_generation_prompt, **context))
        except (jinja2.TemplateError, TypeError, ValueError, LookupError) as e:
            # The template's own raise_exception, or messages of a shape it cannot handle.
            raise AthanorError(f"chat template: {e}", field="chat_template") from None
        finally:
            _TRACKING.reset(token)
        return "".join(emitted), spans

    def assistant_spans(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False,
                        **kwargs: Any) -> tuple[str, list[Span]]:
        """The rendered conversation and the character spans that carry loss (the assistant turns)."""
        text, spans = self.render(messages, add_generation_prompt, **kwargs)
        if self.has_generation_blocks:
            return text, spans
        return text, list(self._prefix_spans(messages, text, **kwargs))

    def _prefix_spans(self, messages: Sequence[Mapping[str, Any]], text: str, **kwargs: Any) -> Iterator[Span]:
        # An assistant turn is what rendering it adds to the conversation before it plus the generation
        # prompt: exactly the text the model produces when served. Trailing whitespace after its end
        # marker is the template's separator, not something the model says.
        for k, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            before, _ = self.render(messages[:k], add_generation_prompt=True, **kwargs)
            through, _ = self.render(messages[:k + 1], add_generation_prompt=False, **kwargs)
            if not (through.startswith(before) and text.startswith(through)):
                raise AthanorError(
                    f"the chat template renders message {k} (assistant) differently once the conversation "
                    "goes on, so its loss mask cannot be found from prefixes; use a template with "
                    "{% generation %} blocks", field="chat_template")
            yield len(before), len(through.rstrip())


def _as_template_sees_it(index: int, message: Any) -> dict[str, Any]:
    """A message as transformers hands it to a template: keys whose value is None dropped (templates test
    `is defined`), and a reasoning given under any of its names also under `reasoning_content` (what
    most templates read) and `thinking` (what gpt-oss reads)."""
    if not isinstance(message, Mapping):
        raise AthanorError(f"message {index} is not an object", field="messages")
    plain = {k: v for k, v in message.items() if v is not None}
    reasoning = next((plain[k] for k in _REASONING_FIELDS if k in plain), None)
    if reasoning is not None:
        plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
    return plain


def mask_from_spans(offsets: Sequence[tuple[int, int]], spans: Sequence[Span]) -> list[int]:
    """1 for every token that overlaps a span (transformers' rule, so both give the same mask)."""
    mask, i = [0] * len(offsets), 0
    for t, (start, end) in enumerate(offsets):
        while i < len(spans) and start >= spans[i][1]:
            i += 1
        if i == len(spans):
            break
        if end > spans[i][0]:
            mask[t] = 1
    return mask
