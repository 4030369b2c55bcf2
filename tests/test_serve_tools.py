"""`athanor serve` with OpenAI tools, end to end: a real server on loopback, driven by the `openai` client
(its pydantic types check every response's shape) and by the agent.

The model is steered, not trained: a tiny model whose greedy reply after any chat prompt is a fixed text
holding <tool_call> blocks. Qwen's tokenizer layout (with Qwen3's real chat template) gets the reply's
pieces as added tokens, as Qwen ships `<tool_call>` itself; the model's layers add nothing to the residual
stream, so each token's embedding alone picks the next through the output head (as in test_engine.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from conftest import successor_model  # noqa: E402
from serve_helpers import running_server  # noqa: E402
from shipped_tokenizers import build  # noqa: E402
from tokenizers import AddedToken  # noqa: E402

from athanor.agent.loop import Agent, AgentLimits  # noqa: E402
from athanor.agent.tools import Tool  # noqa: E402
from athanor.io import read_records  # noqa: E402
from athanor.lm.endpoint import EndpointLM  # noqa: E402
from athanor.model.hf import save_pretrained  # noqa: E402
from athanor.tokenizer import Tokenizer  # noqa: E402

ADD = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
UNOFFERED = '\n<tool_call>\n{"name": "rm", "arguments": {"path": "/"}}\n</tool_call>'
MALFORMED = "\n<tool_call>\n{oops}\n</tool_call>"
REPLY = ["Let me add.\n", ADD, UNOFFERED, MALFORMED]  # the steered reply, one added token per piece
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": {
    "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}}]
# A finished round of the tool protocol, as an OpenAI client sends it back: a call (arguments as compact JSON
# text, content null), its result, and the next question as text parts.
HISTORY = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a":2,"b":3}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    {"role": "user", "content": [{"type": "text", "text": "And"}, {"type": "text", "text": "1 + 2?"}]},
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tools-run")
    build("qwen2", ["def add(a, b):\n    return a + b  # the cat sat on the mat"] * 50, out, vocab_size=300)
    tok = Tokenizer.load(out)
    tok.hf.add_tokens([AddedToken(p, normalized=False, special=False) for p in REPLY])
    tok.hf.save(str(out / "tokenizer.json"))
    tok = Tokenizer.load(out)
    prompt_end = tok.encode_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)[-1]
    chain = [prompt_end, *(tok.hf.token_to_id(p) for p in REPLY), tok.hf.token_to_id("<|im_end|>")]
    assert len(set(chain)) == len(chain) and tok.hf.token_to_id("<|im_end|>") in tok.stop_ids
    torch.manual_seed(0)
    save_pretrained(successor_model(chain, vocab_size=tok.vocab_size, max_position_embeddings=1024), out)
    return out


@pytest.fixture(scope="module")
def server(run_dir: Path):
    with running_server(run_dir, "--max-batch", "2") as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)


def test_calls_in_the_reply_come_back_as_tool_calls(client: openai.OpenAI, run_dir: Path) -> None:
    r = client.chat.completions.create(model="m", messages=HISTORY, tools=TOOLS, temperature=0, max_tokens=10)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (tc,) = choice.message.tool_calls
    assert tc.id.startswith("call_") and tc.type == "function" and tc.function.name == "add"
    assert json.loads(tc.function.arguments) == {"a": 1, "b": 2}
    # A call of a tool the request did not offer, and a malformed block, stay as text.
    assert choice.message.content == ("Let me add.\n" + UNOFFERED + MALFORMED).strip()
    # The template saw the earlier call's arguments as a dict (Qwen3's writes a string verbatim, a dict as
    # `tojson` does), the null content as "", and the text parts joined.
    tok = Tokenizer.load(run_dir)
    as_template_sees_it = [*HISTORY[:2], {**HISTORY[2], "content": "", "tool_calls": [
        {**HISTORY[2]["tool_calls"][0], "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
        HISTORY[3], {"role": "user", "content": "And\n1 + 2?"}]
    expected = tok.encode_chat(as_template_sees_it, add_generation_prompt=True, tools=TOOLS)
    as_text = [*as_template_sees_it[:2], {**as_template_sees_it[2], "tool_calls": HISTORY[2]["tool_calls"]},
               *as_template_sees_it[3:]]
    assert expected != tok.encode_chat(as_text, add_generation_prompt=True, tools=TOOLS)
    assert r.usage.prompt_tokens == len(expected)
    assert r.usage.completion_tokens == len(REPLY)  # its pieces; the end of turn stopped it (max_tokens is 10)


def test_no_tools_or_tool_choice_none_leave_the_reply_as_text(client: openai.OpenAI) -> None:
    text = "".join(REPLY)
    for extra in ({"tools": TOOLS, "tool_choice": "none"}, {}):
        r = client.chat.completions.create(model="m", messages=HISTORY[:2], temperature=0, max_tokens=10, **extra)
        choice = r.choices[0]
        assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == (text, None, "stop")


def test_a_stream_with_tools_sends_the_calls_whole_then_the_finish(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="m", messages=HISTORY, tools=TOOLS, temperature=0,
                                                 max_tokens=10, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    assert deltas[0].role == "assistant"
    (tc,) = [t for d in deltas for t in d.tool_calls or []]
    assert (tc.index, tc.type, tc.function.name) == (0, "function", "add") and tc.id.startswith("call_")
    assert json.loads(tc.function.arguments) == {"a": 1, "b": 2}
    assert "".join(d.content or "" for d in deltas) == ("Let me add.\n" + UNOFFERED + MALFORMED).strip()
    assert [c.choices[0].finish_reason for c in chunks][-1] == "tool_calls"
    # The client's own accumulator turns the deltas into one message.
    with client.chat.completions.stream(model="m", messages=HISTORY, tools=TOOLS, temperature=0,
                                        max_tokens=10) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.tool_calls[0].function.name == "add"
    assert final.choices[0].finish_reason == "tool_calls"


def test_a_stream_without_tools_streams_text(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="m", messages=HISTORY[:2], temperature=0, max_tokens=10,
                                                 stream=True))
    contents = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(contents) == len(REPLY) and "".join(contents) == "".join(REPLY)
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize(("change", "error"), [
    (lambda m: m[3].pop("tool_call_id"), "messages.3: Value error, a tool message needs tool_call_id"),
    (lambda m: m[2]["tool_calls"][0]["function"].update(arguments="{a: 2"),
     "messages.2.tool_calls.0.function.arguments: Value error, the arguments of 'add' are not valid JSON"),
    (lambda m: m[4].update(content=[{"type": "image_url", "image_url": {"url": "x"}}]),
     "only text parts"),
])
def test_bad_tool_messages_get_a_400_that_says_why(client: openai.OpenAI, change, error: str) -> None:
    messages = json.loads(json.dumps(HISTORY))
    change(messages)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=messages, tools=TOOLS, max_tokens=2)
    assert e.value.status_code == 400 and error in e.value.body["message"]


def test_tool_choice_that_forces_a_call_gets_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="cannot force a tool call"):
        client.chat.completions.create(model="m", messages=HISTORY, tools=TOOLS, tool_choice="required",
                                       max_tokens=2)


def test_the_agent_uses_the_native_format_against_athanor_serve(server: str, tmp_path: Path) -> None:
    added = []

    def add(args: dict) -> str:
        added.append(args)
        return str(args["a"] + args["b"])

    tool = Tool("add", "Add two numbers", TOOLS[0]["function"]["parameters"], add)
    agent = Agent(EndpointLM(server + "/v1", "m", retries=0), [tool], tmp_path / "trajectory.jsonl",
                  AgentLimits(max_steps=2, context=1024, reply_tokens=16))
    result = agent.run("What is 1 + 2?")
    # The steered model calls add on every turn; the second turn's request carried the first call and its
    # result in the native layout, and the server took it.
    assert result.reason == "max_steps" and added == [{"a": 1, "b": 2}] * 2
    messages = [r["message"] for r in read_records(tmp_path / "trajectory.jsonl", "t") if r["type"] == "message"]
    assert [m["role"] for m in messages] == ["assistant", "tool", "assistant", "tool"]
    assert messages[1] == {"role": "tool", "tool_call_id": messages[0]["tool_calls"][0]["id"], "content": "3"}
