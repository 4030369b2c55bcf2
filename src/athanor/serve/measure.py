"""Serving measurements shared by the speedrun report and benchmarks/decode.py: time to first
token, batch-1 decode rate, aggregate rate under concurrent streams, speculative vs plain."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from athanor.model.llama import LlamaModel
from athanor.serve.engine import Engine
from athanor.serve.sampling import SamplingParams
from athanor.serve.speculative import speculative_generate


@dataclass
class DecodeRun:
    ttft_s: float  # median over prompts
    decode_tok_s: float  # tokens after the first / time after the first token, all streams together
    tokens: int
    wall_s: float

    @property
    def aggregate_tok_s(self) -> float:
        return self.tokens / self.wall_s


def engine_run(engine: Engine, prompts: Sequence[Sequence[int]], max_tokens: int) -> DecodeRun:
    """Run `prompts` together (as many at once as the engine has slots), greedy, no early stop."""
    t0 = time.perf_counter()
    reqs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0))
    wall = time.perf_counter() - t0
    ttfts = sorted(r.ttft for r in reqs)
    first = min(r.t_first for r in reqs)
    last = max(r.t_done for r in reqs)
    later = sum(len(r.output_ids) - 1 for r in reqs)
    return DecodeRun(ttfts[len(ttfts) // 2], later / (last - first), sum(len(r.output_ids) for r in reqs), wall)


@dataclass
class SpeculativeRun:
    plain_tok_s: float
    speculative_tok_s: float
    acceptance: float
    tokens_per_round: float
    identical: bool  # speculative greedy output equal to plain greedy output

    @property
    def speedup(self) -> float:
        return self.speculative_tok_s / self.plain_tok_s


def speculative_vs_plain(target: LlamaModel, draft: LlamaModel, prompts: Sequence[Sequence[int]], max_tokens: int,
                         k: int = 4, compile: bool = False) -> SpeculativeRun:
    """Greedy generation of each prompt alone: the plain engine vs the draft/target pair, both with
    or both without compiled steps."""
    engine = Engine(target, max_batch=1, compile=compile)
    plain_tokens = spec_tokens = proposed = accepted = rounds = 0
    plain_s = spec_s = 0.0
    identical = True
    for p in prompts:
        t = time.perf_counter()
        plain = engine.generate([p], SamplingParams(max_tokens=max_tokens, temperature=0))[0].output_ids
        plain_s += time.perf_counter() - t
        res = speculative_generate(target, draft, p, max_tokens, k=k, temperature=0, compile=compile)
        spec_s += res.seconds
        plain_tokens, spec_tokens = plain_tokens + len(plain), spec_tokens + len(res.output_ids)
        proposed, accepted, rounds = proposed + res.proposed, accepted + res.accepted, rounds + res.rounds
        identical &= res.output_ids == plain
    return SpeculativeRun(plain_tokens / plain_s, spec_tokens / spec_s, accepted / max(proposed, 1),
                          spec_tokens / max(rounds, 1), identical)
