"""`EndpointLM`: the `LM` interface on any OpenAI-compatible HTTP endpoint (OpenAI, vLLM, llama.cpp's
server, `athanor serve`): `/completions` for `complete`, `/chat/completions` for `chat`.

A request carries the sampling settings under the OpenAI API's names; settings at their "off"
value are left out, so an endpoint that does not know vLLM's extensions (`top_k`, `min_p`,
`repetition_penalty`) is only sent them when they are asked for. The prompts of one call go out as
concurrent requests (the server batches them), and come back in order.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from athanor.errors import AthanorError
from athanor.lm import Completion, Message, per_prompt
from athanor.serve.sampling import OPENAI_FIELDS, SamplingParams

# Answers that say "not now" rather than "no": an overloaded or restarting server, a rate limit.
TRANSIENT_HTTP = {429, 500, 502, 503, 504}


class EndpointError(AthanorError):
    """The endpoint is unreachable, refused the request, or answered something that is not a completion."""


class EndpointLM:
    def __init__(self, base_url: str, model: str = "default", api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 120.0, retries: int = 2, concurrency: int = 8, backoff_s: float = 0.5) -> None:
        """`api_key_env` names the environment variable with the API key (unset: no key is sent);
        `retries`: tries again after a connection failure or a transient HTTP answer (429, 500,
        502-504), waiting `backoff_s`, then twice as long each time; any other HTTP error is final."""
        self.base_url, self.model = base_url.rstrip("/"), model
        self.timeout, self.retries, self.concurrency, self.backoff_s = timeout, retries, concurrency, backoff_s
        self.api_key = os.environ.get(api_key_env, "")
        self.name = f"{model} at {base_url}"

    def complete(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]:
        def one(prompt: str | Sequence[int], p: SamplingParams) -> Completion:
            body = self._body(p, prompt=prompt if isinstance(prompt, str) else list(prompt))
            if p.logprobs is not None:
                body["logprobs"] = p.logprobs
            choice, usage = self._post("/completions", body)
            text = _field(choice, "text", str, self.base_url)
            lp = choice.get("logprobs") or {}
            return _completion(choice, text, lp.get("tokens"), lp.get("token_logprobs"), lp.get("top_logprobs"),
                               usage, p)

        return self._map(one, prompts, params)

    def chat(self, conversations: Sequence[Sequence[Message]],
             params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]:
        def one(messages: Sequence[Message], p: SamplingParams) -> Completion:
            body = self._body(p, messages=[dict(m) for m in messages])
            if p.logprobs is not None:
                body.update(logprobs=True, top_logprobs=p.logprobs)
            choice, usage = self._post("/chat/completions", body)
            text = _field(choice.get("message") or {}, "content", str, self.base_url)
            content = (choice.get("logprobs") or {}).get("content")
            if content is None:
                return _completion(choice, text, None, None, None, usage, p)
            return _completion(choice, text, [c["token"] for c in content], [c["logprob"] for c in content],
                               [{t["token"]: t["logprob"] for t in c.get("top_logprobs", [])} for c in content],
                               usage, p)

        return self._map(one, conversations, params)

    def chat_turn(self, messages: Sequence[Message], params: SamplingParams,
                  tools: Sequence[dict[str, Any]] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """One assistant message as the endpoint sent it (OpenAI layout: `content`, and `tool_calls`
        when the model called `tools`, given as OpenAI function definitions), and the usage. For
        callers that keep the whole message, like the agent, rather than its text."""
        body = self._body(params, messages=[dict(m) for m in messages])
        if tools:
            body["tools"] = list(tools)
        choice, usage = self._post("/chat/completions", body)
        message = choice.get("message")
        if not isinstance(message, dict):
            raise EndpointError(f"{self.base_url} returned a choice without a message: {choice!r:.200}")
        return message, usage

    def _map(self, one: Any, items: Sequence[Any], params: SamplingParams | Sequence[SamplingParams]
             ) -> list[Completion]:
        plist = per_prompt(params, len(items))
        if len(items) <= 1:
            return [one(x, p) for x, p in zip(items, plist, strict=True)]
        with ThreadPoolExecutor(min(self.concurrency, len(items))) as pool:
            return list(pool.map(one, items, plist))

    def _body(self, p: SamplingParams, **prompt: Any) -> dict[str, Any]:
        if p.stop_ids:  # the OpenAI API has stop strings only; the endpoint stops at its model's own ids
            raise AthanorError("an OpenAI-compatible endpoint takes stop strings, not stop token ids",
                               field="stop_ids")
        if p.prompt_logprobs is not None:
            raise AthanorError("prompt log-probs are not part of the chat and completion calls here",
                               field="prompt_logprobs")
        off = SamplingParams()
        # temperature always: servers' defaults differ (llama.cpp's is 0.8)
        body = {"model": self.model, **prompt, "max_tokens": p.max_tokens}
        body.update({k: getattr(p, k) for k in OPENAI_FIELDS if k == "temperature" or getattr(p, k) != getattr(off, k)})
        if p.seed is not None:
            body["seed"] = p.seed
        if p.logit_bias:
            body["logit_bias"] = {str(k): v for k, v in p.logit_bias.items()}
        if p.stop:
            body["stop"] = list(p.stop)
        return body

    def _post(self, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The first choice and the usage of one request."""
        url = self.base_url + path
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                request = urllib.request.Request(url, json.dumps(body).encode(), headers)
                with urllib.request.urlopen(request, timeout=self.timeout) as r:
                    raw = r.read()
                break
            except urllib.error.HTTPError as e:
                detail = e.read()[:200].decode(errors="replace")
                failure = EndpointError(f"{url} answered HTTP {e.code}: {detail!r}")
                if e.code not in TRANSIENT_HTTP:  # the server said no: asking again will not help
                    raise failure from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                failure = EndpointError(f"{url} is unreachable: {getattr(e, 'reason', e)}")
        else:
            raise failure from None
        try:
            reply = json.loads(raw)
            return reply["choices"][0], reply.get("usage") or {}
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            raise EndpointError(f"{url} returned something that is not a completion: {raw[:200]!r}") from None


def _field(obj: dict[str, Any], key: str, kind: type, url: str) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind):
        raise EndpointError(f"{url} returned a completion whose {key} is not {kind.__name__}: {value!r:.200}")
    return value


def _completion(choice: dict[str, Any], text: str, tokens: list[str] | None, logprobs: list[float] | None,
                top: list[dict[str, float]] | None, usage: dict[str, Any], p: SamplingParams) -> Completion:
    return Completion(text=text, finish_reason=choice.get("finish_reason") or "length",
                      stop_reason=choice.get("stop_reason"), tokens=tokens,
                      logprobs=logprobs if p.logprobs is not None else None,
                      top_logprobs=top if p.logprobs is not None else None,
                      prompt_tokens=usage.get("prompt_tokens"))
