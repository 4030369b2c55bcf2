"""The inference fast path computes the model's own function: same logits, same cache, same tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model_config
from serve_helpers import one_thread  # noqa: F401 (autouse fixture)

from athanor.model.llama import KVCache, LlamaModel
from athanor.serve.engine import Engine
from athanor.serve.fast import FastForward, fast_forward
from athanor.serve.sampling import SamplingParams
from athanor.serve.speculative import speculative_generate


def model(**kw) -> LlamaModel:
    torch.manual_seed(0)
    return LlamaModel(tiny_model_config(initializer_range=0.25, **kw)).eval()


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


@pytest.mark.parametrize("kw", [{}, {"num_key_value_heads": 4}, {"model_type": "qwen2"},
                                {"attention_bias": True, "tie_word_embeddings": False},
                                {"model_type": "qwen3", "head_dim": 32}, {"rope_scaling": LLAMA3_ROPE}])
def test_logits_and_cache_match_the_model(kw: dict) -> None:
    m = model(**kw)
    with torch.no_grad():
        for p in m.parameters():  # biases start at zero; make them count
            p.add_(torch.randn_like(p) * 0.05)
    fast = FastForward(m)
    ids = torch.randint(0, 512, (2, 15))
    ref_cache, fast_cache = KVCache(m.config, 2, 32), KVCache(m.config, 2, 32)
    with torch.no_grad():
        # A prompt from position 0, a chunk after a cached prefix (the speculative verify), one decode step.
        for chunk, start in ((ids[:, :9], 0), (ids[:, 9:14], 9), (ids[:, 14:], 14)):
            ref = m(chunk, start, ref_cache)
            torch.testing.assert_close(fast(chunk, start, fast_cache), ref, atol=3e-5, rtol=1e-4)
        torch.testing.assert_close(fast_cache.k, ref_cache.k, atol=3e-5, rtol=1e-4)
        torch.testing.assert_close(fast_cache.v, ref_cache.v, atol=3e-5, rtol=1e-4)
        # The whole sequence in one causal forward agrees with the chunked one at the end.
        torch.testing.assert_close(fast(ids, 0, KVCache(m.config, 2, 32))[:, -1], ref[:, -1], atol=3e-5, rtol=1e-4)
        # Rows at their own positions (an engine's decode batch), two tokens each.
        starts, step = torch.tensor([9, 4]), ids[:, :2]
        for c, f in ((ref_cache, m), (fast_cache, fast)):
            f(ids[1:, :4], 0, c.select([1]))  # row 1 now holds 4 positions, row 0 holds 9 (and stale ones)
        torch.testing.assert_close(fast(step, starts, fast_cache), m(step, starts, ref_cache), atol=3e-5, rtol=1e-4)


def test_fast_engine_and_speculative_produce_the_eager_tokens() -> None:
    m = model()
    draft = model(hidden_size=32, num_hidden_layers=1, intermediate_size=64)
    prompts = [[5, 17, 33, 2, 9], [100, 3], [7] * 12 + [250, 251, 252]]
    params = SamplingParams(max_tokens=20, temperature=0)
    for max_batch in (1, 2):
        fast = Engine(m, max_batch=max_batch).generate(prompts, params)
        eager = Engine(m, max_batch=max_batch, fast=False).generate(prompts, params)
        assert [r.output_ids for r in fast] == [r.output_ids for r in eager]
    for p in prompts:
        assert speculative_generate(m, draft, p, 20, k=3).output_ids == \
            speculative_generate(m, draft, p, 20, k=3, fast=False).output_ids


def test_rebuilt_after_the_weights_change() -> None:
    m = model()
    first = fast_forward(m)
    assert fast_forward(m) is first
    with torch.no_grad():
        m.model.layers[0].self_attn.q_proj.weight.mul_(2)
    rebuilt = fast_forward(m)
    assert rebuilt is not first
    m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, assign=True)  # new tensors
    assert fast_forward(m) is not rebuilt
    rebuilt = fast_forward(m)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids, 0, KVCache(m.config, 1, 8)), m(ids), atol=3e-5, rtol=1e-4)
    compiled = fast_forward(m, compile=True)
    assert compiled.compiled and not fast_forward(m).compiled  # asking for compiled steps leaves others eager
    assert fast_forward(m, compile=True) is compiled
    assert fast_forward(m.to(torch.bfloat16)) is None  # the reference normalizes in fp32: no fast path


@pytest.mark.slow  # AOTInductor: ~10 s of export and C++ compilation per graph, about ten graphs
def test_compiled_decode_step_matches_the_eager_tokens() -> None:
    m = model()
    prompts = [[5, 17, 33, 2, 9], [100, 3], [7] * 12 + [250, 251, 252]]
    params = SamplingParams(max_tokens=30, temperature=0)
    engine = Engine(m, max_batch=1, compile=True)
    fast = engine.generate(prompts, params)
    assert engine.fast.compile_seconds is not None  # the compiled step did run
    # Greedy decoding ran mostly in pairs of tokens per compiled call.
    assert engine.stats.decode_tokens > 1.8 * engine.stats.decode_steps
    eager = Engine(m, max_batch=1, fast=False).generate(prompts, params)
    assert [r.output_ids for r in fast] == [r.output_ids for r in eager]
    # Requests that end inside a pair: an odd token budget, a stop id first met at an odd or even
    # step, a context that fills up; log-probs come from each pair's own logits.
    stop_odd, stop_even = eager[0].output_ids[4], eager[2].output_ids[7]
    for params in (SamplingParams(max_tokens=29, temperature=0, logprobs=2),
                   SamplingParams(max_tokens=30, temperature=0, stop_ids=[stop_odd]),
                   SamplingParams(max_tokens=30, temperature=0, stop_ids=[stop_even]),
                   SamplingParams(max_tokens=200, temperature=0)):
        got = engine.generate(prompts, params)
        want = Engine(m, max_batch=1, fast=False).generate(prompts, params)
        assert [(r.output_ids, r.finish_reason) for r in got] == [(r.output_ids, r.finish_reason) for r in want]
        for g, w in zip(got, want, strict=True):
            for a, b in zip(g.output_logprobs, w.output_logprobs, strict=True):
                assert a.top[0][0] == b.top[0][0] and abs(a.logprob - b.logprob) < 1e-4
    with torch.no_grad():  # logits and the stored keys/values, at one step
        ids = torch.tensor([prompts[2]])
        max_len = m.config.max_position_embeddings  # the engine's cache length: its graphs serve this cache
        ref_cache, fast_cache = KVCache(m.config, 1, max_len), KVCache(m.config, 1, max_len)
        m(ids, 0, ref_cache)
        engine.fast(ids, 0, fast_cache)
        step = torch.tensor([[9]])
        torch.testing.assert_close(engine.fast(step, ids.shape[1], fast_cache), m(step, ids.shape[1], ref_cache),
                                   atol=3e-5, rtol=1e-4)
        # Several new tokens (speculative verification): the dynamic-length graph, causal among them.
        chunk, at = torch.tensor([[3, 8, 21, 4]]), ids.shape[1] + 1
        torch.testing.assert_close(engine.fast(chunk, at, fast_cache), m(chunk, at, ref_cache), atol=3e-5, rtol=1e-4)
        torch.testing.assert_close(fast_cache.k, ref_cache.k, atol=3e-5, rtol=1e-4)
        torch.testing.assert_close(fast_cache.v, ref_cache.v, atol=3e-5, rtol=1e-4)
        # A shorter cache (other strides) gets a graph of its own; up to its last position.
        short_ref, short = KVCache(m.config, 1, 24), KVCache(m.config, 1, 24)
        m(ids, 0, short_ref)
        engine.fast(ids, 0, short)
        graphs = len(engine.fast._runners)
        for pos in range(ids.shape[1], 24):
            torch.testing.assert_close(engine.fast(step, pos, short), m(step, pos, short_ref), atol=3e-5, rtol=1e-4)
        assert len(engine.fast._runners) == graphs + 1
    # Several streams: one compiled step for all rows, each at its own position; a request that
    # ends early frees its slot and the others go on (fewer rows, the same graph) up to the end of
    # the context.
    batched = Engine(m, max_batch=3, compile=True)
    budgets = [SamplingParams(max_tokens=n, temperature=0) for n in (200, 9, 200)]
    got = batched.generate(prompts, budgets)
    assert any(key[0] == "rows" for key in batched.fast._runners)
    assert [r.output_ids for r in got] == [r.output_ids for r in Engine(m, max_batch=3, fast=False).generate(
        prompts, budgets)]
    with torch.no_grad():  # rows 0 and 2 step; row 1 (a finished request's prefix) stays as it was
        ref_cache, cache = KVCache(m.config, 3, max_len), KVCache(m.config, 3, max_len)
        for row, p in enumerate(prompts):
            m(torch.tensor([p]), 0, ref_cache.select([row]))
            m(torch.tensor([p]), 0, cache.select([row]))
        row1 = cache.k[:, 1].clone()
        logits = batched.fast.decode_rows([11, 12], [len(prompts[0]), len(prompts[2])], [0, 2], cache)
        for i, (row, tok) in enumerate(((0, 11), (2, 12))):
            want = m(torch.tensor([[tok]]), len(prompts[row]), ref_cache.select([row]))[0, -1]
            torch.testing.assert_close(logits[i], want, atol=3e-5, rtol=1e-4)
        torch.testing.assert_close(cache.k[:, [0, 2]], ref_cache.k[:, [0, 2]], atol=3e-5, rtol=1e-4)
        torch.testing.assert_close(cache.v[:, [0, 2]], ref_cache.v[:, [0, 2]], atol=3e-5, rtol=1e-4)
        assert torch.equal(cache.k[:, 1], row1)
    # Speculative rounds as one compiled call each, with a draft that agrees with the target part of
    # the time (the target's weights, perturbed): accepted runs, rejections, and the last rounds
    # with fewer than k tokens to go (step by step).
    draft = model()
    with torch.no_grad():
        for w in draft.parameters():
            w.add_(torch.randn_like(w) * 0.005)
    budgets = (30, 30, 200)  # the last one up to the end of the context
    results = [speculative_generate(m, draft, p, n, k=3, compile=True) for p, n in zip(prompts, budgets, strict=True)]
    target_ff = fast_forward(m, compile=True)
    assert any(key[0] == "round3" for key in target_ff._runners)
    assert 0.2 < sum(r.accepted for r in results) / sum(r.proposed for r in results) < 0.95
    for p, r, n in zip(prompts, results, budgets, strict=True):
        assert r.output_ids == speculative_generate(m, draft, p, n, k=3, fast=False).output_ids
    # A graph built later for another cache keeps the round graph: no compiling on the next round.
    with torch.no_grad():
        other = KVCache(m.config, 1, 20)
        target_ff(torch.tensor([prompts[0]]), 0, other)
        before = target_ff.compile_seconds
        target_ff(torch.tensor([[4]]), len(prompts[0]), other)
        assert target_ff.compile_seconds > before
    before = target_ff.compile_seconds
    speculative_generate(m, draft, prompts[0], 20, k=3, compile=True)
    assert target_ff.compile_seconds == before
