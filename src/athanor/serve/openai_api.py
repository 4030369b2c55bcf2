"""The OpenAI API's request bodies and the conversion of engine results into its response shapes.

Field names and response layouts follow the OpenAI API reference (legacy completions and chat
completions) so that the official client and tools built on it work unchanged. Extensions that
vLLM also accepts (`top_k`, `min_p`, `repetition_penalty`) are allowed.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from athanor.serve.engine import Request, TokenLogprob
from athanor.serve.sampling import OPENAI_FIELDS, SamplingParams
from athanor.tokenizer import Tokenizer


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


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    # Function definitions, handed to the model's chat template as transformers does (`tools`).
    tools: list[dict[str, Any]] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


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


def envelope(kind: str, rid: str, model: str, choices: list[dict], **extra: Any) -> dict[str, Any]:
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices, **extra}
