"""The OpenAI API's request bodies and the conversion of engine results into its response shapes.

Field names and response layouts follow the OpenAI API reference (legacy completions and chat
completions) so that the official client and tools built on it work unchanged. Extensions that
vLLM also accepts (`top_k`, `min_p`, `repetition_penalty`) are allowed.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Collection
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from athanor.serve.engine import Request, TokenLogprob
from athanor.serve.sampling import OPENAI_FIELDS, SamplingParams
from athanor.tokenizer import Tokenizer
from athanor.tool_calls import parse_arguments, text_calls


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    # OPENAI_FIELDS, with SamplingParams' defaults (a test holds them equal). Types only: the bounds are
    # `SamplingParams.validate`'s, shared with every caller, checked when the request reaches the engine.
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _keys_are_token_ids(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        bad = [k for k in bias or {} if not k.strip().lstrip("-").isdigit()]
        if bad:
            raise ValueError(f"keys must be token ids (integers as strings), got {bad[0]!r}")
        return bias

    def sampling(self, max_tokens: int, stop_ids: list[int], logprobs: int | None,
                 prompt_logprobs: int | None, choice: int) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens, **{k: getattr(self, k) for k in OPENAI_FIELDS},
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            # n choices from one seed must differ from each other, and repeat across calls.
            seed=None if self.seed is None else self.seed + choice,
            stop=[s for s in stops if s], stop_ids=stop_ids, logprobs=logprobs, prompt_logprobs=prompt_logprobs)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None


class ToolCallFunction(BaseModel):
    name: str
    # OpenAI sends the arguments as JSON text; templates read them as a dict (Llama 3.x's and Mistral's
    # `| tojson` would write a string as a quoted string), so they are parsed here, as vLLM does before
    # rendering. transformers' apply_chat_template passes messages through and documents dicts.
    arguments: dict[str, Any]

    @field_validator("arguments", mode="before")
    @classmethod
    def _parsed(cls, raw: Any, info: ValidationInfo) -> dict[str, Any]:
        args, error = parse_arguments(raw, str(info.data.get("name", "")))
        if args is None:
            raise ValueError(error)
        return args


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    """A message as the OpenAI API sends it: text (or a list of text parts), an assistant's `tool_calls`
    (its content may then be null), or a tool's result (`role: "tool"` with the `tool_call_id` it answers)."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _joined_parts(cls, content: Any) -> Any:
        if not isinstance(content, list):
            return content
        texts = []
        for i, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f'part {i} is of type {kind!r}; only text parts ({{"type": "text", "text": ...}}) '
                                 "are supported")
            texts.append(part["text"])
        return "\n".join(texts)  # parts joined by newlines, as vLLM hands them to a template that takes text

    @model_validator(mode="after")
    def _complete(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"a {self.role} message cannot carry tool_calls; only assistant messages call tools")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id, the id of the tool call it answers")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content" + (" or tool_calls" if self.role == "assistant"
                                                                      else ""))
        return self

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it (transformers' layout): arguments as dicts, and a null
        content as "" (Qwen's templates concatenate it; vLLM renders a null content as "" too)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content or ""}
        if self.tool_calls:
            out["tool_calls"] = [tc.model_dump() for tc in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    # Function definitions, handed to the model's chat template as transformers does (`tools`).
    tools: list[dict[str, Any]] | None = None
    # "auto": a reply's well-formed calls of the given tools come back as `tool_calls`; "none": the reply is
    # text. "required" and a named function would need constrained decoding, which the engine has not.
    tool_choice: str | dict[str, Any] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    @field_validator("tools")
    @classmethod
    def _functions(cls, tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for i, t in enumerate(tools or []):
            fn = t.get("function")
            if t.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise ValueError(f'tool {i} must be {{"type": "function", "function": {{"name": ..., '
                                 f'"parameters": {{...}}}}}}, got {json.dumps(t)[:200]}')
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _supported_choice(cls, choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if choice not in (None, "auto", "none"):
            raise ValueError(f"{json.dumps(choice)[:200]} is not supported: athanor serve cannot force a tool call "
                             '(no constrained decoding); use "auto" or "none"')
        return choice

    def tool_names(self) -> frozenset[str]:
        """The tools whose calls a reply may make: none when the request has no tools or tool_choice is "none"."""
        if self.tool_choice == "none":
            return frozenset()
        return frozenset(t["function"]["name"] for t in self.tools or [])


class NextTokenRequest(BaseModel):
    prompt: str = ""
    temperature: float = Field(1.0, ge=0, le=5)
    top_k: int = Field(0, ge=0)
    top: int = Field(20, ge=1, le=200)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(reqs: list[Request], prompt_tokens: int) -> dict[str, int]:
    completion = sum(len(r.output_ids) for r in reqs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def finish_reason(req: Request) -> str | None:
    return {"stop": "stop", "length": "length"}.get(req.finish_reason or "")


class Formatter:
    """Token texts and the two log-prob layouts (legacy completions; chat)."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok

    def text(self, token_id: int) -> str:
        return self.tok.token_strings([token_id])[0]

    def completion_logprobs(self, lps: list[TokenLogprob | None], tokens: list[int], offset: int = 0
                            ) -> dict[str, list]:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, lp in zip(tokens, lps, strict=True):
            s = self.text(t)
            out["tokens"].append(s)
            out["token_logprobs"].append(None if lp is None else lp.logprob)
            out["top_logprobs"].append(None if lp is None else {self.text(i): v for i, v in lp.top})
            out["text_offset"].append(offset)
            offset += len(s)
        return out

    def chat_logprobs(self, lps: list[TokenLogprob]) -> dict[str, list]:
        def entry(t: int, v: float) -> dict[str, Any]:
            s = self.text(t)
            return {"token": s, "logprob": v, "bytes": list(s.encode())}

        return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}
                            for lp in lps]}


def assistant_message(text: str, tool_names: Collection[str]) -> dict[str, Any]:
    """The reply `text` as an assistant message: its well-formed `<tool_call>` blocks (athanor/tool_calls.py)
    that call one of `tool_names` become OpenAI `tool_calls` (arguments as JSON text, as OpenAI sends them)
    and the text around them the content (null when nothing is left). Malformed blocks and calls of tools
    the request did not offer stay in the content, as the model wrote them."""
    calls = [c for c in text_calls(text) if c.arguments is not None and c.name in tool_names]
    if not calls:
        return {"role": "assistant", "content": text}
    rest, at = [], 0
    for c in calls:
        rest.append(text[at:c.start])
        at = c.end
    rest.append(text[at:])
    content = "".join(rest).strip()
    return {"role": "assistant", "content": content or None, "tool_calls": [
        {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
         "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}} for c in calls]}


def envelope(kind: str, rid: str, model: str, choices: list[dict], **extra: Any) -> dict[str, Any]:
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices, **extra}
