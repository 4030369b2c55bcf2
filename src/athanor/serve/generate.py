"""Plain autoregressive generation with a KV cache: prefill the prompt once, then one token per step."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from athanor.model.llama import KVCache, LlamaModel
from athanor.serve.rules import check_request
from athanor.serve.sampling import SamplingParams, sample_next


@torch.no_grad()
def generate(model: LlamaModel, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float = 0.8,
             top_k: int = 50, top_p: float = 1.0, seed: int | None = None,
             stop_ids: Sequence[int] = ()) -> list[int]:
    """Token ids generated after `prompt_ids` (the prompt not included), stopping at a stop id or
    where the context is full. Prompt and settings follow the server's rules (`check_request`)."""
    device = next(model.parameters()).device
    limit = model.config.max_position_embeddings
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    prompt = check_request(prompt_ids, params, model.config.vocab_size, limit)
    max_new_tokens = min(max_new_tokens, limit - len(prompt))
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else torch.seed())
    cache = KVCache(model.config, 1, len(prompt) + max_new_tokens, device=device,
                    dtype=next(model.parameters()).dtype)
    logits = model(torch.tensor([prompt], device=device), 0, cache)[:, -1]
    pos, out = len(prompt), []
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, gen)
        token = int(nxt.item())
        if token in stop_ids:
            break
        out.append(token)
        if len(out) == max_new_tokens:
            break
        logits = model(nxt.view(1, 1), pos, cache)[:, -1]
        pos += 1
    return out
