"""`LocalLM`: the `LM` interface on a model in this process, through the engine.

Every prompt of a call is submitted to one engine and decoded together (continuous batching), so
a batch of rollouts or an evaluation set costs about as many forwards as its longest member. The
engine's KV cache is sized for what a call needs (its longest prompt plus `max_tokens`, at most the
model's context) and kept for later calls that fit in it, which then reuse shared prompt prefixes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from athanor.lm import Completion, Message, per_prompt
from athanor.model.llama import LlamaModel, weights_version
from athanor.serve.engine import Engine, Request
from athanor.serve.sampling import SamplingParams
from athanor.tokenizer import Tokenizer


class LocalLM:
    def __init__(self, model: LlamaModel, tok: Tokenizer, max_batch: int = 32, name: str = "local",
                 keep_prompt_tail: bool = False, compile: bool = False) -> None:
        """`max_batch`: the most sequences decoded at once (a longer list of prompts queues).
        `keep_prompt_tail`: a prompt longer than the context is cut to its newest part rather than
        refused (for a small local teacher shown long prompts). `compile`: the engine's compiled steps."""
        self.model, self.tok, self.name = model, tok, name
        self.max_batch, self.keep_prompt_tail, self.compile = max_batch, keep_prompt_tail, compile
        self.context = model.config.max_position_embeddings
        self._engine: Engine | None = None
        self._weights: list[tuple[int, int]] = []

    @classmethod
    def load(cls, path: str | Path, device: str | None = None, **kw) -> LocalLM:
        """The model and tokenizer of a run directory (or a checkpoint in the Hugging Face layout)."""
        from athanor.model.hf import load_pretrained

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(load_pretrained(path, device=device), Tokenizer.load(path), name=str(path), **kw)

    def complete(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]:
        ids = [self.tok.encode_prompt(p) if isinstance(p, str) else list(p) for p in prompts]
        return self.generate(ids, params)

    def chat(self, conversations: Sequence[Sequence[Message]],
             params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]:
        ids = [self.tok.encode_chat(c, add_generation_prompt=True) for c in conversations]
        return self.generate(ids, params)

    def generate(self, prompt_ids: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]:
        """Continuations of token-id prompts; they stop at the tokenizer's stop ids (end of turn, eos,
        the model's generation_config list) and at any stop ids or strings `params` adds."""
        if not prompt_ids:
            return []
        plist = [dataclasses.replace(p, stop_ids=sorted({*self.tok.stop_ids, *p.stop_ids}))
                 for p in per_prompt(params, len(prompt_ids))]
        prompts = [list(p) for p in prompt_ids]
        if self.keep_prompt_tail:
            prompts = [p[-(self.context - 1):] for p in prompts]
        need = max(len(p) + max(sp.max_tokens, 1) for p, sp in zip(prompts, plist, strict=True))
        reqs = self._engine_for(min(need, self.context), len(prompts)).generate(prompts, plist)
        return [self._completion(r) for r in reqs]

    def _engine_for(self, max_len: int, batch: int) -> Engine:
        """The engine, rebuilt when this call needs a longer cache or more slots than it has, or when
        the model's weights changed since it was built (a training step between calls): its fast path
        copied the old weights and its slots hold keys and values they computed."""
        old, weights = self._engine, weights_version(self.model)
        if old is not None and old.max_len >= max_len and old.max_batch >= min(batch, self.max_batch) \
                and weights == self._weights:
            return old
        slots = max(min(batch, self.max_batch), old.max_batch if old else 1)
        length = max(max_len, old.max_len if old else 0)
        self._engine = old = None  # free the old cache before the new one is allocated
        self._engine = Engine(self.model, max_batch=slots, max_len=length, decode=self.tok.decode,
                              hold_ids=self.tok.stream_hold_ids,
                              compile=self.compile)
        self._weights = weights
        return self._engine

    def _completion(self, req: Request) -> Completion:
        strings = self.tok.token_strings
        asked = req.params.logprobs is not None
        return Completion(
            text=req.text, finish_reason=req.finish_reason or "length", stop_reason=req.stop_reason,
            token_ids=list(req.output_ids), tokens=strings(req.output_ids),
            logprobs=[lp.logprob for lp in req.output_logprobs] if asked else None,
            top_logprobs=[dict(zip(strings([i for i, _ in lp.top]), [v for _, v in lp.top], strict=True))
                          for lp in req.output_logprobs] if asked else None,
            prompt_tokens=len(req.prompt_ids))
