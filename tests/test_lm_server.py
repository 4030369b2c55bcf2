"""The two `LM` implementations agree: `EndpointLM` against the real `athanor serve` on loopback, and
`LocalLM` on the same run directory in this process, give the same greedy text, tokens and log-probs."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_helpers import make_run_dir, running_server  # noqa: E402

from athanor.lm import open_lm  # noqa: E402
from athanor.lm.endpoint import EndpointError, EndpointLM  # noqa: E402
from athanor.lm.local import LocalLM  # noqa: E402
from athanor.serve.sampling import SamplingParams  # noqa: E402

# An untrained model emits special tokens (which decode to nothing) as readily as text; ban them so
# there is text to compare. Ids 0-6 are athanor's special tokens.
NO_SPECIAL = {i: -100.0 for i in range(7)}
CHATS = [[{"role": "user", "content": "What is 2 + 3?"}],
         [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Reverse 'abc'."},
          {"role": "assistant", "content": "cba"}, {"role": "user", "content": "And 'xyz'?"}]]
PROMPTS = ["def add(a, b):\n    return", "import os\n", "x"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return make_run_dir(tmp_path_factory.mktemp("lm-run"), tokenizer_dir)


@pytest.fixture(scope="module")
def both(run_dir: Path):
    with running_server(run_dir, "--max-batch", "4") as url:
        yield open_lm(url + "/v1", model="tiny"), open_lm(run_dir)


def assert_same(remote: list, local: list) -> None:
    for r, lo in zip(remote, local, strict=True):
        assert r.text == lo.text and r.tokens == lo.tokens and r.finish_reason == lo.finish_reason
        assert r.logprobs == pytest.approx(lo.logprobs, abs=1e-4)
        assert [sorted(t) for t in r.top_logprobs] == [sorted(t) for t in lo.top_logprobs]
        assert r.prompt_tokens == lo.prompt_tokens


def test_endpoint_and_local_give_the_same_greedy_chat_and_completions(both) -> None:
    remote, local = both
    assert isinstance(remote, EndpointLM) and isinstance(local, LocalLM)
    greedy = SamplingParams(max_tokens=12, temperature=0, logit_bias=NO_SPECIAL, logprobs=2)
    chats, texts = local.chat(CHATS, greedy), local.complete(PROMPTS, greedy)
    assert all(c.text and c.finish_reason == "length" for c in chats + texts)
    assert_same(remote.chat(CHATS, greedy), chats)
    assert_same(remote.complete(PROMPTS, greedy), texts)
    # A stop string cuts both alike.
    stop = texts[0].text[len(texts[0].text) // 2:][:2]
    cut = SamplingParams(max_tokens=12, temperature=0, logit_bias=NO_SPECIAL, logprobs=0, stop=[stop])
    (mine,), (theirs,) = local.complete(PROMPTS[:1], cut), remote.complete(PROMPTS[:1], cut)
    assert mine.finish_reason == theirs.finish_reason == "stop" and mine.text == theirs.text == \
        texts[0].text[:texts[0].text.find(stop)]


def test_endpoint_errors_are_one_line(both) -> None:
    remote, _ = both
    with pytest.raises(EndpointError, match="answered HTTP 400.*temperature"):
        remote.complete(["x"], SamplingParams(max_tokens=2, temperature=3.0))
