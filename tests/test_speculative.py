"""Speculative decoding keeps the target's output: exactly when greedy, in distribution when sampling."""

from __future__ import annotations

import math

import torch
from conftest import tiny_model_config
from serve_helpers import naive_greedy, one_thread  # noqa: F401 (autouse fixture)

from athanor.model.llama import LlamaModel
from athanor.serve.speculative import speculative_generate, verify


def model(seed: int, **kw) -> LlamaModel:
    torch.manual_seed(seed)
    return LlamaModel(tiny_model_config(**kw)).eval()


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    """Pearson's statistic and a rejection threshold (mean + 5 sd of chi-square, ~p < 1e-4)."""
    n = counts.sum()
    keep = probs * n >= 5
    exp = probs[keep] * n
    stat = float(((counts[keep] - exp) ** 2 / exp).sum())
    df = int(keep.sum()) - 1
    return stat, df + 5 * math.sqrt(2 * df)


def test_speculative_greedy_equals_target_greedy() -> None:
    target = model(0, initializer_range=0.25)
    draft = model(1, initializer_range=0.25, hidden_size=32, num_hidden_layers=1, intermediate_size=64)
    for prompt in ([5, 17, 33], list(range(40, 60))):
        reference = naive_greedy(target, prompt, 20)
        for k in (1, 4):
            assert speculative_generate(target, draft, prompt, 20, k=k, temperature=0).output_ids == reference
    same = speculative_generate(target, target, [5, 17, 33], 20, k=4, temperature=0)
    assert same.acceptance == 1.0 and same.rounds == 4  # 4 rounds x (4 accepted + 1 bonus)


def test_rejection_sampling_keeps_the_target_distribution() -> None:
    g = torch.Generator().manual_seed(0)
    V, N = 6, 20000
    p = torch.softmax(torch.randn(2, V, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(1, V, generator=g) * 1.5, -1)
    first = torch.zeros(V)
    drafts = torch.zeros(V)
    for _ in range(N):
        d = int(torch.multinomial(q[0], 1, generator=g))
        n_ok, nxt = verify(p, q, [d], g)
        first[d if n_ok else nxt] += 1
        drafts[d] += 1
    stat, limit = chi2(first, p[0])
    assert stat < limit
    assert chi2(drafts, p[0])[0] > limit  # the test can tell the draft's distribution from the target's


def test_speculative_sampling_matches_the_target_end_to_end() -> None:
    V = 8
    target = model(0, vocab_size=V, initializer_range=0.3)
    draft = model(1, vocab_size=V, initializer_range=0.3, num_hidden_layers=1)
    prompt = [1, 2, 3]
    with torch.no_grad():
        p1 = target(torch.tensor([prompt]))[0, -1].softmax(-1)
        p2 = torch.stack([target(torch.tensor([prompt + [a]]))[0, -1].softmax(-1) for a in range(V)])
    joint = (p1[:, None] * p2).flatten()  # exact probability of each first-two-token pair
    counts = torch.zeros(V * V)
    for s in range(1500):
        a, b = speculative_generate(target, draft, prompt, 2, k=3, temperature=1.0, seed=s).output_ids
        counts[a * V + b] += 1
    stat, limit = chi2(counts, joint)
    assert stat < limit
