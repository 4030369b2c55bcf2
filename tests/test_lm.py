"""The one generation path: `LocalLM` (the `LM` interface on the engine) against the model's own forward,
token by token; and the dependency rule that keeps the speedrun on top of its stages."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_config
from serve_helpers import one_thread  # noqa: F401 (autouse fixture)

import athanor
from athanor.errors import AthanorError
from athanor.lm.endpoint import EndpointLM
from athanor.lm.local import LocalLM
from athanor.model.llama import LlamaModel
from athanor.quant.linear import quantize_model
from athanor.serve.engine import Engine
from athanor.serve.sampling import OPENAI_FIELDS, SamplingParams
from athanor.tokenizer import Tokenizer

# Token-id prompts of different lengths (athanor's own special tokens are ids 0-6).
PROMPTS = [[1, 17, 33, 200, 9], [1, 100], [1] + [7] * 12 + [250, 251, 252], [1, 42], [1, *range(20, 40)]]


@torch.no_grad()
def naive(model: LlamaModel, prompt: list[int], n: int, stops: set[int]) -> tuple[list[int], int | None]:
    """The reference: recompute the whole sequence for every new token, take the argmax, stop at a stop id."""
    ids = list(prompt)
    for _ in range(n):
        token = int(model(torch.tensor([ids]))[0, -1].argmax())
        if token in stops:
            return ids[len(prompt):], token
        ids.append(token)
    return ids[len(prompt):], None


def tiny(dtype: torch.dtype = torch.float32) -> LlamaModel:
    torch.manual_seed(0)
    # A wide init makes distributions peaked, so greedy choices are far from ties (also in bf16).
    return LlamaModel(tiny_model_config(initializer_range=0.25, max_position_embeddings=64)).to(dtype).eval()


def check_against_naive(lm: LocalLM, model: LlamaModel, tok: Tokenizer, n: int = 10) -> None:
    # A stop id from one prompt's own continuation, so that prompt (at least) stops early on it.
    extra = naive(model, PROMPTS[0], n, set(tok.stop_ids))[0][3]
    stops = {*tok.stop_ids, extra}
    out = lm.complete(PROMPTS, SamplingParams(max_tokens=n, temperature=0, stop_ids=[extra]))
    stopped = 0
    for prompt, c in zip(PROMPTS, out, strict=True):
        ids, stop = naive(model, prompt, n, stops)
        assert c.token_ids == ids and c.stop_reason == stop
        assert c.finish_reason == ("length" if stop is None else "stop")
        assert c.text == tok.decode(ids) and c.prompt_tokens == len(prompt)
        stopped += stop is not None
    assert stopped >= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_greedy_equals_the_models_own_forward(tokenizer: Tokenizer, dtype: torch.dtype) -> None:
    """Prompts of different lengths decoded together (slots join and leave between steps: max_batch 2
    of 5 prompts) give what the model's forward gives token by token, stop ids included; fp32 runs the
    fast path, bf16 the model's own forward."""
    model = tiny(dtype)
    lm = LocalLM(model, tokenizer, max_batch=2)
    check_against_naive(lm, model, tokenizer)
    assert (lm._engine.fast is None) == (dtype != torch.float32)


def test_quantized_model_runs_its_own_modules(tokenizer: Tokenizer) -> None:
    """The fast path copies plain weights: a quantized model must decode through its quantized layers."""
    model = quantize_model(tiny(), "Q4_0")
    assert Engine(model).fast is None
    check_against_naive(LocalLM(model, tokenizer, max_batch=3), model, tokenizer)


def test_weights_changed_between_calls_are_used(tokenizer: Tokenizer) -> None:
    """A training step between two calls (as in RL rollouts): the second call decodes with the new
    weights, not the fast path's copies or cached keys of the old ones."""
    model = tiny()
    lm = LocalLM(model, tokenizer)
    lm.complete(PROMPTS, SamplingParams(max_tokens=10, temperature=0))  # the engine the next call needs
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.5)
    check_against_naive(lm, model, tokenizer)


def test_chat_and_text_prompts_go_through_the_tokenizer(tokenizer: Tokenizer) -> None:
    model = tiny()
    lm = LocalLM(model, tokenizer)
    chat = [{"role": "user", "content": "What is 2 + 3?"}]
    greedy = SamplingParams(max_tokens=5, temperature=0)
    (c,) = lm.chat([chat], greedy)
    assert c.token_ids == naive(model, tokenizer.encode_chat(chat, add_generation_prompt=True), 5,
                                set(tokenizer.stop_ids))[0]
    (d,) = lm.complete(["def f():"], greedy)
    assert d.token_ids == naive(model, tokenizer.encode_prompt("def f():"), 5, set(tokenizer.stop_ids))[0]
    assert d.tokens == tokenizer.token_strings(d.token_ids)


def test_stop_strings_and_logprobs(tokenizer: Tokenizer) -> None:
    model = tiny()
    lm = LocalLM(model, tokenizer)
    ban = {i: -100.0 for i in range(7)}  # no special tokens: visible text to cut
    (full,) = lm.complete(["x = "], SamplingParams(max_tokens=12, temperature=0, logit_bias=ban, logprobs=2))
    assert full.finish_reason == "length" and len(full.logprobs) == len(full.top_logprobs) == 12
    assert all(len(t) == 2 and max(t.values()) == pytest.approx(lp) for t, lp in zip(full.top_logprobs,
                                                                                   full.logprobs, strict=True))
    stop = full.text[len(full.text) // 2:][:2]
    (cut,) = lm.complete(["x = "], SamplingParams(max_tokens=12, temperature=0, logit_bias=ban, stop=[stop]))
    assert cut.finish_reason == "stop" and cut.stop_reason == stop and cut.text == full.text[:full.text.find(stop)]


def test_a_bad_prompt_fails_the_call_and_leaves_nothing_queued(tokenizer: Tokenizer) -> None:
    model = tiny()
    engine = Engine(model, max_batch=2)
    with pytest.raises(AthanorError, match="context is 64"):
        engine.generate([PROMPTS[0], PROMPTS[1], [1] * 100], SamplingParams(max_tokens=4, temperature=0))
    (req,) = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=4, temperature=0))
    assert engine.waiting == 0 and engine.stats.finished == 3 and engine.stats.cancelled == 2
    assert req.output_ids == naive(model, PROMPTS[1], 4, set())[0]


def test_an_endpoint_is_sent_only_what_the_openai_api_has() -> None:
    lm = EndpointLM("http://127.0.0.1:9/v1", "m")
    body = lm._body(SamplingParams(max_tokens=5, temperature=0.5), prompt="x")
    assert body == {"model": "m", "prompt": "x", "max_tokens": 5, "temperature": 0.5}  # no vLLM extensions
    assert lm._body(SamplingParams(top_k=40, seed=3, stop=["\n"]), prompt="x").items() >= \
        {"top_k": 40, "seed": 3, "stop": ["\n"]}.items()
    with pytest.raises(AthanorError, match="stop token ids"):
        lm._body(SamplingParams(stop_ids=[5]), prompt="x")


def test_the_server_reads_the_sampling_fields_with_the_same_defaults() -> None:
    pytest.importorskip("pydantic")
    from athanor.serve.openai_api import CompletionRequest

    request, defaults = CompletionRequest(prompt="x"), SamplingParams()
    assert {k: getattr(request, k) for k in OPENAI_FIELDS} == {k: getattr(defaults, k) for k in OPENAI_FIELDS}


def test_no_module_but_the_cli_imports_the_speedrun() -> None:
    """The speedrun composes stages; a stage that imported it would close an import circle."""
    src = Path(athanor.__file__).parent
    offenders = []
    for path in sorted(src.rglob("*.py")):
        if path.relative_to(src).as_posix() in ("cli.py", "speedrun.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names] \
                if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            if any(n == "athanor.speedrun" or n.startswith("athanor.speedrun.") for n in names):
                offenders.append(f"{path.relative_to(src)}:{node.lineno}")
    assert offenders == []
