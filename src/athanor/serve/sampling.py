"""Turning logits into the next token: penalties, logit bias, temperature, top-k, top-p, min-p.

The order follows common practice (transformers' logits processors, vLLM): penalties and bias
act on the raw logits, then temperature, then the truncations (top-k, top-p, min-p), then a draw.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from athanor.errors import AthanorError

# The settings an OpenAI-style request carries under SamplingParams' own names (`top_k`, `min_p`
# and `repetition_penalty` are vLLM's extensions): the server reads them into SamplingParams
# (serve/openai_api.py), the endpoint client writes them from it (lm/endpoint.py).
OPENAI_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty")


@dataclass
class SamplingParams:
    """How one request is decoded; field names and meanings follow the OpenAI API where it has them."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # drop tokens less likely than min_p * p(top token) (Nguyen et al., 2024); 0 = off
    repetition_penalty: float = 1.0  # CTRL (Keskar et al., 2019) on prompt and output tokens; 1 = off
    presence_penalty: float = 0.0  # OpenAI: minus this once for every token already generated
    frequency_penalty: float = 0.0  # OpenAI: minus this times how often the token was generated
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings, not part of the output
    stop_ids: list[int] = field(default_factory=list)  # stop token ids, not part of the output
    logprobs: int | None = None  # None: none; k: the sampled token's log-prob and the k likeliest
    prompt_logprobs: int | None = None  # the same for every prompt token (OpenAI's echo + logprobs)

    def validate(self, vocab_size: int) -> None:
        """The bounds of the OpenAI API (temperature in [0, 2], ...), for every caller alike."""
        checks = [
            ("max_tokens", self.max_tokens >= 0, "must be >= 0"),
            ("temperature", 0 <= self.temperature <= 2, "must be in [0, 2] (0 = greedy)"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 = off)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1] (1 = off)"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be in [0, 20]"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "must be in [0, 20]"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise AthanorError(f"{why}, got {getattr(self, name)!r}", field=name)
        bad = [t for t in self.logit_bias if not 0 <= t < vocab_size]
        if bad:
            raise AthanorError(f"token ids must be in the vocabulary [0, {vocab_size}), got {bad[0]}",
                               field="logit_bias")

    @property
    def needs_counts(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def apply_penalties(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None,
                    generated_counts: torch.Tensor | None) -> torch.Tensor:
    """Penalties and logit bias on one row of raw logits (vocab,).

    `seen` (bool, vocab) marks tokens of the prompt or the output (for the repetition penalty);
    `generated_counts` (vocab) counts output tokens only (for presence / frequency, as OpenAI defines them).
    Both may be None when `params` sets no penalty.
    """
    if params.repetition_penalty != 1.0:
        # CTRL: a seen token's logit is divided by the penalty when positive, multiplied when negative.
        pen = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, pen, logits)
    if params.presence_penalty or params.frequency_penalty:
        logits = logits - params.frequency_penalty * generated_counts - params.presence_penalty * (generated_counts > 0)
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), device=logits.device)
        logits = logits.index_add(0, ids, torch.tensor(list(params.logit_bias.values()), device=logits.device,
                                                        dtype=logits.dtype))
    return logits


def shape_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 min_p: float = 0.0) -> torch.Tensor:
    """Temperature, then top-k, nucleus (top-p) and min-p truncation; dropped tokens get -inf.

    The softmax of the result is the distribution a token is drawn from (temperature must be > 0).
    """
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # Nucleus sampling (Holtzman et al., 2020): keep the smallest set of tokens whose
        # probability reaches top_p; the most likely token always stays.
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    return logits


def greedy_ids(logits: torch.Tensor) -> int | list[int]:
    """The argmax over the last axis: an int for one row of logits (vocab,), a list for (rows, vocab).
    The first of equal maxima, a NaN counting as the maximum, as `torch.argmax` (and numpy's argmax)
    define it. CPU fp32 logits go through numpy: torch's reduction costs ~8 us of dispatch for a
    4,096-entry row, numpy's ~0.5 us, against a decode step of ~1 ms."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and not logits.requires_grad:
        return logits.numpy().argmax(-1).tolist()
    return logits.argmax(-1).tolist()


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None, min_p: float = 0.0) -> torch.Tensor:
    """One token id per row of `logits` (batch, vocab). Temperature 0 is greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = shape_logits(logits, temperature, top_k, top_p, min_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
