"""The engine against naive generation: full recompute, one prompt at a time, no cache."""

from __future__ import annotations

import pytest
import torch
from conftest import successor_model, tiny_model_config
from serve_helpers import naive_greedy, one_thread  # noqa: F401 (autouse fixture)

from athanor.errors import AthanorError
from athanor.model.llama import KVCache, LlamaModel
from athanor.serve.engine import Engine
from athanor.serve.sampling import SamplingParams, apply_penalties, greedy_ids, shape_logits

PROMPTS = [[5, 17, 33, 2, 9], [100, 3], [7] * 12 + [250, 251, 252], [42], [11, 12, 13, 14, 15, 16, 17, 18]]


@pytest.fixture(scope="module")
def model() -> LlamaModel:
    torch.manual_seed(0)
    # A wide init makes distributions peaked, so greedy choices are far from ties.
    return LlamaModel(tiny_model_config(initializer_range=0.25, max_position_embeddings=64)).eval()


def test_per_row_positions_match_separate_forwards(model: LlamaModel) -> None:
    a, b = torch.randint(0, 512, (1, 9)), torch.randint(0, 512, (1, 4))
    cache = KVCache(model.config, 2, 32)
    model(a, 0, cache.select([0]))
    model(b, 0, cache.select([1]))
    step = torch.tensor([[3], [4]])
    out = model(step, torch.tensor([9, 4]), cache)[:, -1]
    torch.testing.assert_close(out[0], model(torch.cat([a, step[:1]], 1))[0, -1], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out[1], model(torch.cat([b, step[1:]], 1))[0, -1], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("max_batch", [1, 2, 8])
def test_greedy_equals_naive_recompute(model: LlamaModel, max_batch: int) -> None:
    # max_batch 2 with 5 prompts: requests join and leave the running batch between steps.
    params = [SamplingParams(max_tokens=6 + i * 3, temperature=0) for i in range(len(PROMPTS))]
    reqs = Engine(model, max_batch=max_batch).generate(PROMPTS, params)
    for prompt, p, req in zip(PROMPTS, params, reqs, strict=True):
        assert req.output_ids == naive_greedy(model, prompt, p.max_tokens)
        assert req.finish_reason == "length"


def test_prefix_reuse_keeps_outputs(model: LlamaModel) -> None:
    engine = Engine(model, max_batch=2)
    base = PROMPTS[2]
    engine.generate([base], SamplingParams(max_tokens=4, temperature=0))
    longer = base + [300, 301]
    req = engine.generate([longer], SamplingParams(max_tokens=8, temperature=0))[0]
    assert req.cached_tokens == len(base)
    assert req.output_ids == naive_greedy(model, longer, 8)
    assert engine.stats.cached_prompt_tokens == len(base)


def test_seeded_sampling_is_repeatable_and_batch_independent(model: LlamaModel) -> None:
    params = [SamplingParams(max_tokens=10, temperature=1.0, top_k=40, top_p=0.9, seed=i) for i in range(3)]
    batched = [r.output_ids for r in Engine(model, max_batch=3).generate(PROMPTS[:3], params)]
    single = [r.output_ids for r in Engine(model, max_batch=1).generate(PROMPTS[:3], params)]
    assert batched == single
    other = Engine(model, max_batch=3).generate(PROMPTS[:3], [SamplingParams(max_tokens=10, seed=99)] * 3)
    assert [r.output_ids for r in other] != batched


def test_prompt_and_output_logprobs(model: LlamaModel) -> None:
    prompt = PROMPTS[0]
    req = Engine(model).generate([prompt], SamplingParams(max_tokens=3, temperature=0, logprobs=5,
                                                          prompt_logprobs=2))[0]
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([prompt + req.output_ids]))[0], -1)
    assert req.prompt_logprobs[0] is None
    for i, lp in enumerate(req.prompt_logprobs[1:], start=1):
        assert lp.token_id == prompt[i] and abs(lp.logprob - float(full[i - 1, prompt[i]])) < 1e-4
        assert [t for t, _ in lp.top] == full[i - 1].topk(2).indices.tolist()
    for j, lp in enumerate(req.output_logprobs):
        pos = len(prompt) - 1 + j
        assert abs(lp.logprob - float(full[pos, lp.token_id])) < 1e-4
        assert lp.top[0][0] == lp.token_id  # greedy picks the likeliest
        assert len(lp.top) == 5


def test_stop_ids_and_logit_bias(model: LlamaModel) -> None:
    greedy = naive_greedy(model, PROMPTS[1], 6)
    stop = greedy[3]
    req = Engine(model).generate([PROMPTS[1]], SamplingParams(max_tokens=6, temperature=0, stop_ids=[stop]))[0]
    assert req.output_ids == greedy[:greedy.index(stop)] and req.finish_reason == "stop"
    biased = Engine(model).generate([PROMPTS[1]], SamplingParams(max_tokens=5, temperature=0.7, seed=1,
                                                                 logit_bias={77: 100.0}))[0]
    assert biased.output_ids == [77] * 5


def test_frequency_and_repetition_penalties(model: LlamaModel) -> None:
    plain = Engine(model).generate([[7] * 6], SamplingParams(max_tokens=20, temperature=0))[0].output_ids
    assert len(set(plain)) < len(plain)  # this model repeats itself
    pen = Engine(model).generate([[7] * 6], SamplingParams(max_tokens=20, temperature=0,
                                                          frequency_penalty=2.0, presence_penalty=2.0))[0]
    assert len(set(pen.output_ids)) > len(set(plain))
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    seen = torch.tensor([True, True, False, False])
    counts = torch.tensor([0.0, 0.0, 0.0, 3.0])
    out = apply_penalties(logits, SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5,
                                                 presence_penalty=0.25, logit_bias={2: -1.0}), seen, counts)
    torch.testing.assert_close(out, torch.tensor([1.0, -4.0, 0.0, 0.5 - 1.5 - 0.25]))


def test_stop_strings_cut_text(model: LlamaModel, tokenizer) -> None:
    engine = Engine(model, decode=tokenizer.decode)
    full = engine.generate([PROMPTS[3]], SamplingParams(max_tokens=12, temperature=0))[0]
    assert len(full.text) > 4
    stop = full.text[3:5]
    cut = Engine(model, decode=tokenizer.decode).generate(
        [PROMPTS[3]], SamplingParams(max_tokens=12, temperature=0, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.find(stop)]


def test_streamed_events_add_up_to_the_text(model: LlamaModel, tokenizer) -> None:
    events = []
    engine = Engine(model, max_batch=2, decode=tokenizer.decode)
    req = engine.submit(PROMPTS[0], SamplingParams(max_tokens=15, temperature=0.8, seed=3, stop=["zz"]),
                        on_event=events.append)
    while not req.done:
        engine.step()
    assert "".join(e.text for e in events) == req.text
    assert sum(len(e.token_ids) for e in events) == len(req.output_ids)
    assert events[-1].finished and not any(e.finished for e in events[:-1])


def test_cancel_frees_the_slot_and_context_limits(model: LlamaModel) -> None:
    engine = Engine(model, max_batch=1)
    a = engine.submit(PROMPTS[0], SamplingParams(max_tokens=50))
    b = engine.submit(PROMPTS[1], SamplingParams(max_tokens=3, temperature=0))
    engine.step()
    engine.cancel(a)
    while not b.done:
        engine.step()
    assert a.finish_reason == "cancelled" and b.output_ids == naive_greedy(model, PROMPTS[1], 3)
    assert engine.active == 0
    with pytest.raises(AthanorError, match="context"):
        engine.submit([1] * 64, SamplingParams())
    long = engine.generate([[1] * 60], SamplingParams(max_tokens=100, temperature=0))[0]
    assert long.finish_reason == "length" and len(long.output_ids) == 64 - 60 + 1


def test_shape_logits_truncations() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    keep = lambda **kw: torch.isfinite(shape_logits(logits, **kw))[0].tolist()  # noqa: E731
    assert keep(top_k=2) == [True, True, False, False]
    assert keep(top_p=0.7) == [True, True, False, False]
    assert keep(top_p=0.5) == [True, False, False, False]
    assert keep(min_p=0.3) == [True, True, True, False]
    torch.testing.assert_close(shape_logits(logits, temperature=2.0).softmax(-1),
                               (logits / 2).softmax(-1))


def test_greedy_ids_are_torch_argmax() -> None:
    """The greedy pick of the engine and speculative decoding (numpy's argmax on CPU) agrees with
    torch.argmax: first of equal maxima, a NaN counting as the maximum, infinities; for one row and
    for a batch; and on logits that take the torch path."""
    nan, inf = float("nan"), float("inf")
    rows = [[1.0, 3.0, 3.0, 2.0], [1.0, nan, 5.0, nan], [-inf, -inf, -inf], [inf, 2.0, inf], [0.5]]
    rows += torch.randn(20, 4096).tolist()
    for row in rows:
        t = torch.tensor(row)
        assert greedy_ids(t) == int(t.argmax())
        assert greedy_ids(t.to(torch.bfloat16)) == int(t.to(torch.bfloat16).argmax())
    batch = torch.randn(6, 4096)
    batch[2, 7] = batch[2, 9] = 1e3
    assert greedy_ids(batch) == batch.argmax(-1).tolist()
    assert greedy_ids(torch.tensor([1.0, 2.0], requires_grad=True)) == 1


def test_byte_fallback_runs_stream_the_final_text(tmp_path) -> None:
    """Llama 2's decoder turns a whole run of <0xNN> pieces into U+FFFD when the run is not UTF-8, so
    "u" (0x75) decodes as "u" alone and as U+FFFD once 0xE2 follows: the stream must not show it early."""
    from shipped_tokenizers import build

    from athanor.tokenizer import Tokenizer

    tok = Tokenizer.load(build("llama2", ["the cat sat on the mat, yes sir"] * 20, tmp_path, vocab_size=300))
    byte = [tok.hf.token_to_id(f"<0x{b:02X}>") for b in (0x75, 0xE2, 0x28)]
    first, last = tok.encode("yes")[0], tok.encode(" mat")[-1]
    chain = [tok.encode("the")[0], first, *byte, last]
    model = successor_model(chain, vocab_size=tok.vocab_size)
    events = []
    engine = Engine(model, decode=tok.decode, hold_ids=tok.stream_hold_ids)
    req = engine.submit(chain[:1], SamplingParams(max_tokens=len(chain) - 1, temperature=0), on_event=events.append)
    while not req.done:
        engine.step()
    assert req.output_ids == chain[1:]
    assert "\ufffd" * 3 in req.text and "u" not in req.text
    assert "".join(e.text for e in events) == req.text
