"""Speculative decoding (Leviathan et al., 2023; Chen et al., 2023): a small draft model proposes
k tokens, the target scores all of them in one forward, and rejection sampling keeps exactly the
target's distribution.

For draft token x with draft probability q(x) and target probability p(x): accept with
probability min(1, p(x) / q(x)); at the first rejection draw instead from norm(max(0, p - q)).
If all k are accepted, one more token comes free from the target's last position. At
temperature 0 this reduces to "accept while the draft's token is the target's argmax".
Both distributions are shaped the same way (temperature, top-k, top-p) before the test, so the
output follows the *shaped* target distribution, as plain sampling would.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from athanor.errors import AthanorError
from athanor.model.llama import KVCache, LlamaModel
from athanor.serve.fast import FastForward, fast_forward
from athanor.serve.sampling import greedy_ids, shape_logits


@dataclass
class SpeculativeResult:
    output_ids: list[int]
    proposed: int  # draft tokens proposed
    accepted: int  # of which the target accepted
    rounds: int  # target forwards (one per round)
    seconds: float

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


def _probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    return shape_logits(logits, temperature, top_k, top_p).softmax(-1)


def verify(p: torch.Tensor, q: torch.Tensor, draft: Sequence[int], generator: torch.Generator | None = None
           ) -> tuple[int, int]:
    """Rejection sampling over one round: `p` (k+1, V) target probabilities at each draft position
    and one past it, `q` (k, V) the draft's, `draft` the k proposed ids.
    Returns (how many draft tokens are accepted, the token that follows them)."""
    for i, x in enumerate(draft):
        px, qx = float(p[i, x]), float(q[i, x])
        u = torch.rand((), generator=generator, device=p.device).item()
        if qx > 0 and u < px / qx:  # accept with probability min(1, p/q)
            continue
        residual = (p[i] - q[i]).clamp_min(0)
        total = residual.sum()
        # residual is all zero only when p == q, where a rejection cannot happen; guard rounding.
        dist = residual / total if total > 0 else p[i]
        return i, int(torch.multinomial(dist, 1, generator=generator))
    return len(draft), int(torch.multinomial(p[len(draft)], 1, generator=generator))


@torch.no_grad()
def speculative_generate(target: LlamaModel, draft: LlamaModel, prompt_ids: Sequence[int], max_tokens: int,
                         k: int = 4, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                         seed: int | None = None, stop_ids: Sequence[int] = (), fast: bool = True,
                         compile: bool = False) -> SpeculativeResult:
    """Generate after `prompt_ids` with the draft proposing `k` tokens per target forward.
    `fast` runs both models through `FastForward` (see fast.py) where it applies, `compile` with
    its compiled steps: at temperature 0 each round of k proposals (the draft's proposals and the
    target's verification) is one compiled call, once the sequence has 4 tokens; the last rounds,
    with fewer than k tokens to go, run step by step."""
    if draft.config.vocab_size != target.config.vocab_size:
        raise AthanorError("the draft and target models must share a vocabulary (the same tokenizer)")
    started = time.perf_counter()
    device = next(target.parameters()).device
    limit = min(target.config.max_position_embeddings, draft.config.max_position_embeddings)
    seq = list(prompt_ids)
    if not seq or len(seq) >= limit:
        raise AthanorError(f"the prompt must have 1 to {limit - 1} tokens", field="prompt")
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else torch.seed())
    # Indexed 0 / 1: the two may be one object (a self-draft).
    models = [(fast and fast_forward(m, compile)) or m for m in (target, draft)]
    caches = [KVCache(m.config, 1, limit, device, next(m.parameters()).dtype) for m in (target, draft)]
    done = [0, 0]  # leading tokens of `seq` whose keys/values each cache holds
    out: list[int] = []
    proposed = accepted = rounds = 0

    def run(m: int, tokens: list[int]) -> torch.Tensor:
        """Feed model m the tokens it has not seen yet, then `tokens`; logits for `tokens` (+1 before)."""
        new = seq[done[m]:] + tokens
        logits = models[m](torch.tensor([new], device=device), done[m], caches[m])[0]
        done[m] += len(new)
        return logits[-(len(tokens) + 1):]

    def greedy_round() -> tuple[list[int], list[int]] | None:
        """A whole greedy round in one compiled call (`FastForward.greedy_round`): the proposals and
        the target's argmax at each position; None where that does not apply."""
        if len(seq) < 4 or not all(isinstance(m, FastForward) and m.compiled for m in models):
            return None
        for m, cached in ((0, len(seq) - 1), (1, len(seq) - 2)):  # the prompt, on the first round
            if done[m] < cached:
                models[m](torch.tensor([seq[done[m]:cached]], device=device), done[m], caches[m])
                done[m] = cached
        fused = models[0].greedy_round(models[1], seq, caches[0], caches[1], k)
        if fused is not None:
            done[1] = len(seq) + k - 1  # the two tokens fed, and every proposal but the last
        return fused

    greedy = temperature <= 0
    while len(out) < max_tokens:
        n = min(k, max_tokens - len(out) - 1, limit - len(seq) - 1)
        before = len(seq)
        fused = greedy_round() if greedy and n == k else None
        if fused is not None:
            proposal, best = fused
        else:
            proposal, q = [], []
            for _ in range(n):
                logits = run(1, proposal[-1:])[-1]
                if greedy:
                    proposal.append(greedy_ids(logits))
                else:
                    q.append(_probs(logits[None], temperature, top_k, top_p)[0])
                    proposal.append(int(torch.multinomial(q[-1], 1, generator=gen)))
            logits = run(0, proposal)
        if greedy:
            # Rejection sampling with one-hot p and q accepts exactly while the draft token is the
            # target's argmax, and then emits that argmax: compare the ids, skip the distributions.
            best = best if fused is not None else greedy_ids(logits)
            n_ok = next((i for i, (x, b) in enumerate(zip(proposal, best, strict=False)) if x != b), n)
            nxt = best[n_ok]
        else:
            p = _probs(logits, temperature, top_k, top_p)
            n_ok, nxt = verify(p, torch.stack(q) if q else p[:0], proposal, gen)
        rounds, proposed, accepted = rounds + 1, proposed + n, accepted + n_ok
        # Keys/values past the accepted tokens are stale; later writes overwrite them.
        done[0] = before + n_ok
        done[1] = min(done[1], before + n_ok)
        for t in [*proposal[:n_ok], nxt]:
            if t in stop_ids:
                return SpeculativeResult(out, proposed, accepted, rounds, time.perf_counter() - started)
            out.append(t)
            seq.append(t)
        if len(seq) >= limit:
            break
    return SpeculativeResult(out[:max_tokens], proposed, accepted, rounds, time.perf_counter() - started)
