"""One interface for "a model that completes and chats", shared by every stage that needs one.

Teachers (data/distill.py), the SFT behaviour evaluation, samples in reports, and the stages to
come (preference pairs, GRPO rollouts, judges, RAG answers, the agent and eval harnesses) call
`complete` or `chat` on an `LM` and never write a decode loop of their own. Two implementations:

- `LocalLM` (athanor/lm/local.py): a model in this process, on the engine (continuous batching,
  KV cache, prefix reuse, the fast path), prompts rendered and stopped by the model's own
  tokenizer (`encode_prompt`, `encode_chat`, `stop_ids`);
- `EndpointLM` (athanor/lm/endpoint.py): any OpenAI-compatible HTTP endpoint (OpenAI, vLLM,
  llama.cpp's server, `athanor serve`), the way TRL swaps in vLLM behind one flag.

Sampling is described once, by `athanor.serve.sampling.SamplingParams` (its field names follow the
OpenAI API), for both. Calls are batched: a list of prompts in, a list of `Completion`s out, in order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from athanor.errors import AthanorError
from athanor.serve.sampling import SamplingParams

Message = Mapping[str, Any]  # {"role": ..., "content": ...}, as the OpenAI chat API has it


@dataclass
class Completion:
    """One generated continuation. Token-level fields are None where the source does not report them
    (an endpoint reports token texts and log-probs only when asked: `params.logprobs`)."""

    text: str
    finish_reason: str  # "stop" (a stop token or string) or "length" (max_tokens, or the context is full)
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it, where known
    token_ids: list[int] | None = None  # the generated ids (local only: the OpenAI API reports texts)
    tokens: list[str] | None = None  # each generated token's text, as the OpenAI API's logprobs name it
    logprobs: list[float] | None = None  # each generated token's log-probability (when params.logprobs)
    top_logprobs: list[dict[str, float]] | None = None  # the params.logprobs likeliest tokens at each step
    prompt_tokens: int | None = None


class LM(Protocol):
    """A chat/completion model. `params` is one setting for every prompt, or one per prompt."""

    name: str

    def complete(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]:
        """Continue each prompt (text, or token ids the model's tokenizer made)."""
        ...

    def chat(self, conversations: Sequence[Sequence[Message]],
             params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]:
        """The assistant's next message in each conversation, through the model's chat template."""
        ...


def per_prompt(params: SamplingParams | Sequence[SamplingParams], n: int) -> list[SamplingParams]:
    """`params` as one setting for each of `n` prompts."""
    plist = [params] * n if isinstance(params, SamplingParams) else list(params)
    if len(plist) != n:
        raise AthanorError(f"got {len(plist)} sampling settings for {n} prompts", field="params")
    return plist


def open_lm(spec: str | Path, model: str = "", api_key_env: str = "OPENAI_API_KEY", **local: Any) -> LM:
    """An http(s) URL is an OpenAI-compatible endpoint (`model` names the model to ask for); anything
    else must be a model directory (a run directory, or a checkpoint in the Hugging Face layout),
    loaded with `LocalLM.load(spec, **local)`."""
    if str(spec).startswith(("http://", "https://")):
        from athanor.lm.endpoint import EndpointLM

        return EndpointLM(str(spec), model or "default", api_key_env)
    if not (Path(spec) / "config.json").is_file():
        raise AthanorError("neither an http(s) URL nor a model directory (no config.json)", path=spec)
    from athanor.lm.local import LocalLM

    return LocalLM.load(spec, **local)
