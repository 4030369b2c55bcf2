"""The real server on a loopback port, driven by the official `openai` client."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_helpers import get_json, get_text, make_run_dir, metric, running_server  # noqa: E402

from athanor.model.hf import load_pretrained  # noqa: E402
from athanor.tokenizer import Tokenizer  # noqa: E402

KEY = "sk-test"
# An untrained model emits special tokens (which decode to nothing) as readily as text; ban them
# where a test needs visible text. Ids 0-6 are athanor's special tokens.
NO_SPECIAL = {str(i): -100 for i in range(7)}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    # A long context so a stream can be dropped while it still has far to go.
    return make_run_dir(tmp_path_factory.mktemp("serve-run"), tokenizer_dir, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def server(run_dir: Path):
    with running_server(run_dir, "--api-key", KEY, "--max-batch", "4") as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


def test_models_health_metrics_and_page(server: str, client: openai.OpenAI, run_dir: Path) -> None:
    assert [m.id for m in client.models.list().data] == [run_dir.name]
    assert get_json(server + "/health")["status"] == "ok"
    page, headers = get_text(server + "/")
    assert "frame-ancestors *" in headers["content-security-policy"]
    assert "x-frame-options" not in {k.lower() for k in headers}
    assert "<script src" not in page and "https://" not in page  # self-contained
    text, _ = get_text(server + "/metrics")
    assert "# TYPE athanor_requests_total counter" in text and metric(text, "athanor_slots") == 4


def test_completion_echo_logprobs_match_the_model(client: openai.OpenAI, run_dir: Path) -> None:
    prompt = "def add(a, b):\n    return"
    r = client.completions.create(model="x", prompt=prompt, max_tokens=6, temperature=0, echo=True, logprobs=3)
    choice = r.choices[0]
    assert choice.text.startswith(prompt) and choice.finish_reason in ("length", "stop")
    tok = Tokenizer.load(run_dir)
    model = load_pretrained(run_dir)
    prompt_ids = [tok.bos_id, *tok.encode(prompt)]
    assert r.usage.prompt_tokens == len(prompt_ids)
    n_prompt = len(prompt_ids) - 1
    lp = choice.logprobs
    assert len(lp.tokens) == n_prompt + r.usage.completion_tokens
    assert "".join(lp.tokens) == choice.text
    ids = prompt_ids + tok.encode(choice.text[len(prompt):])
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids]))[0], -1)
    expected = [float(ref[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert lp.token_logprobs == pytest.approx(expected[:len(lp.token_logprobs)], abs=1e-3)
    assert all(len(t) <= 3 for t in lp.top_logprobs)
    greedy = [max(t.values()) for t in lp.top_logprobs[n_prompt:]]
    assert lp.token_logprobs[n_prompt:] == pytest.approx(greedy, abs=1e-5)  # temperature 0 takes the top token


def test_next_token_view_is_the_models_distribution(server: str, run_dir: Path) -> None:
    prompt = "import os\nimport"
    body = json.dumps({"prompt": prompt, "temperature": 0.7, "top_k": 0, "top": 5}).encode()
    req = urllib.request.Request(server + "/v1/next_token", data=body,
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        view = json.loads(r.read())
    tok = Tokenizer.load(run_dir)
    ids = [tok.bos_id, *tok.encode(prompt)]
    with torch.no_grad():
        logits = load_pretrained(run_dir)(torch.tensor([ids]))[0, -1]
    probs, logprobs = (logits / 0.7).softmax(-1), logits.log_softmax(-1)
    top = probs.topk(5)
    assert [t["id"] for t in view["tokens"]] == top.indices.tolist()
    assert [t["prob"] for t in view["tokens"]] == pytest.approx(top.values.tolist(), rel=1e-4)
    assert [t["logprob"] for t in view["tokens"]] == pytest.approx(logprobs[top.indices].tolist(), abs=1e-4)
    assert [t["id"] for t in view["prompt_tokens"]] == ids[1:]


def test_list_prompts_n_and_seed(client: openai.OpenAI) -> None:
    kw = dict(model="x", prompt=["import os\n", "class "], max_tokens=8, n=2, seed=7, temperature=1.0)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2, 3]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.choices[0].text != a.choices[1].text or a.choices[2].text != a.choices[3].text


def test_streaming_equals_non_streaming(client: openai.OpenAI) -> None:
    kw = dict(model="x", prompt="for i in range(", max_tokens=12, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
    assert streamed == full
    msgs = [{"role": "user", "content": "Write a loop."}]
    chat = client.chat.completions.create(model="x", messages=msgs, max_tokens=10, temperature=0, logprobs=True,
                                          top_logprobs=2)
    content = chat.choices[0].message.content
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in chat.choices[0].logprobs.content)
    chunks = list(client.chat.completions.create(model="x", messages=msgs, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == content
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_chat_stop_and_n(client: openai.OpenAI) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    kw = dict(model="x", messages=msgs, max_tokens=16, temperature=0, logit_bias=NO_SPECIAL)
    base = client.chat.completions.create(**kw).choices[0]
    assert len(base.message.content) >= 6
    stop = base.message.content[4:6]
    cut = client.chat.completions.create(stop=[stop], **kw)
    assert cut.choices[0].message.content == base.message.content[:base.message.content.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    many = client.chat.completions.create(model="x", messages=msgs, max_tokens=5, n=3, seed=1)
    assert len(many.choices) == 3


def test_errors_are_openai_shaped(server: str, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="x", prompt="x " * 3000, max_tokens=4)
    assert e.value.status_code == 400 and "context" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "a"}], temperature=9)
    assert e.value.body["param"] == "temperature"
    for bias, param in [({"the": 5}, "logit_bias"), ({"999999": 5}, "logit_bias")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="x", prompt="a", max_tokens=2, logit_bias=bias)
        assert e.value.body["param"] == param
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    req = urllib.request.Request(server + "/v1/completions", data=b"{not json", method="POST",
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 400 and "error" in json.loads(e.value.read())
    assert get_json(server + "/health")["status"] == "ok"



def test_generate_and_the_server_refuse_bad_settings_in_the_same_words(client: openai.OpenAI, run_dir: Path) -> None:
    """`athanor generate` and the server share one set of rules, so both refuse each of these alike."""
    long = "x " * 3000
    for cli_args, fields in [(["--prompt", long], {"prompt": long}), (["--temperature", "-1"], {"temperature": -1}),
                             (["--temperature", "9"], {"temperature": 9}), (["--max-new-tokens", "-3"],
                                                                            {"max_tokens": -3})]:
        r = subprocess.run([sys.executable, "-m", "athanor", "generate", str(run_dir), *cli_args],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="x", **{"prompt": "a", "max_tokens": 4, **fields})
        assert e.value.status_code == 400
        assert r.stderr.strip().splitlines()[-1] == f"athanor: error: {e.value.body['message']}"

def test_dropped_stream_frees_its_slot(server: str, client: openai.OpenAI) -> None:
    before = metric(get_text(server + "/metrics")[0], "athanor_requests_cancelled_total")
    stream = client.completions.create(model="x", prompt="def ", max_tokens=1000, temperature=1.0, stream=True,
                                       logit_bias=NO_SPECIAL)  # no early stop at BOS/EOS
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.time() + 20
    while time.time() < deadline:
        m = get_text(server + "/metrics")[0]
        if metric(m, "athanor_requests_cancelled_total") > before and metric(m, "athanor_active_slots") == 0:
            break
        time.sleep(0.1)
    assert metric(m, "athanor_requests_cancelled_total") > before
    assert get_json(server + "/health")["active_slots"] == 0


@pytest.mark.slow
def test_load_with_dropped_streams(server: str) -> None:
    """72 concurrent requests on 4 slots; every third stream is dropped after a few chunks."""

    async def one(client: openai.AsyncOpenAI, i: int) -> str:
        if i % 3 == 0:
            stream = await client.completions.create(model="x", prompt=f"x{i} = ", max_tokens=200, stream=True,
                                                     logit_bias=NO_SPECIAL)
            n = 0
            async for _ in stream:
                n += 1
                if n == 2:
                    break
            await stream.close()
            return "dropped"
        if i % 3 == 1:
            chunks = [c async for c in await client.chat.completions.create(
                model="x", messages=[{"role": "user", "content": f"q{i}"}], max_tokens=20, stream=True)]
            assert chunks[-1].choices[0].finish_reason in ("stop", "length")
            return "stream"
        r = await client.completions.create(model="x", prompt=f"def f{i}(", max_tokens=20, logprobs=1)
        c = r.choices[0]
        assert c.finish_reason in ("stop", "length") and len(c.logprobs.tokens) == r.usage.completion_tokens
        return "full"

    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(72)))

    before = metric(get_text(server + "/metrics")[0], "athanor_requests_cancelled_total")
    kinds = asyncio.run(main())
    assert kinds.count("dropped") == 24 and kinds.count("full") == 24
    deadline = time.time() + 30
    while get_json(server + "/health")["active_slots"] or get_json(server + "/health")["waiting"]:
        assert time.time() < deadline, "slots leaked"
        time.sleep(0.2)
    m = get_text(server + "/metrics")[0]
    assert metric(m, "athanor_requests_finished_total") == metric(m, "athanor_requests_total")
    assert metric(m, "athanor_requests_cancelled_total") > before  # the dropped streams were noticed


def test_terminal_chat_streams_answers(run_dir: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "athanor", "chat", str(run_dir), "--max-tokens", "8", "--seed", "1",
                        "--system", "Be brief."], input="hello\n/reset\nagain\n/quit\n", capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("assistant> ") == 2 and "/reset" in r.stdout  # the help line


def test_tools_are_never_silently_dropped(client: openai.OpenAI) -> None:
    """`tools` goes to the chat template; athanor's own format has no place for them, so it says so."""
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}]
    with pytest.raises(openai.BadRequestError, match="no tools"):
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], tools=tools,
                                       max_tokens=1)
