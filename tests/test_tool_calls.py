"""Tool calls written as text (<tool_call> blocks): the one parser the agent and the server share, the
server's reading of a reply into OpenAI `tool_calls`, and the request messages that carry calls and results."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from athanor.agent.protocol import calls
from athanor.serve.openai_api import ChatMessage, ChatRequest, assistant_message
from athanor.tool_calls import parse_arguments, text_calls

ADD = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'


def test_text_calls_finds_every_block_with_its_span() -> None:
    text = f'Sure.\n{ADD}\n<tool_call>{{"name": "ls", "arguments": "{{\\"path\\": \\".\\"}}"}}</tool_call> done'
    found = text_calls(text)
    assert [(c.name, c.arguments, c.error) for c in found] == [("add", {"a": 1, "b": 2}, ""),
                                                               ("ls", {"path": "."}, "")]
    assert text[found[0].start:found[0].end] == ADD
    assert text[found[1].end:] == " done"


@pytest.mark.parametrize(("block", "error"), [
    ('{"name": "add", "arguments": {"a": 1}', "not valid JSON"),
    ('["add"]', 'needs {"name"'),
    ('{"arguments": {}}', 'needs {"name"'),
    ('{"name": "add", "arguments": "not json"}', "arguments of 'add' are not valid JSON"),
    ('{"name": "add", "arguments": [1, 2]}', "must be a JSON object"),
])
def test_malformed_blocks_say_why(block: str, error: str) -> None:
    (call,) = text_calls(f"<tool_call>{block}</tool_call>")
    assert call.arguments is None and error in call.error


def test_parse_arguments_takes_dicts_json_text_and_nothing() -> None:
    assert parse_arguments({"x": 1}, "f") == ({"x": 1}, "")
    assert parse_arguments('{"x": 1}', "f") == ({"x": 1}, "")
    assert parse_arguments(None, "f") == ({}, "")
    assert parse_arguments("{x}", "f")[0] is None


def test_the_agent_reads_text_calls_with_the_shared_parser() -> None:
    found = calls({"role": "assistant", "content": f"{ADD}\n<tool_call>oops</tool_call>"}, step=3)
    assert [(c.id, c.name, c.arguments, c.native) for c in found] == [("text-3-0", "add", {"a": 1, "b": 2}, False),
                                                                      ("text-3-1", "", None, False)]


def test_a_reply_becomes_tool_calls_and_the_text_around_them() -> None:
    unknown = '<tool_call>\n{"name": "rm", "arguments": {}}\n</tool_call>'
    text = f"Let me add.\n{ADD}\n{unknown}\n<tool_call>oops</tool_call>"
    message = assistant_message(text, {"add", "ls"})
    # Calls of tools the request did not offer, and malformed blocks, stay as the model wrote them.
    assert message["content"] == f"Let me add.\n\n{unknown}\n<tool_call>oops</tool_call>"
    (tc,) = message["tool_calls"]
    assert tc["id"].startswith("call_") and tc["type"] == "function"
    assert tc["function"]["name"] == "add" and json.loads(tc["function"]["arguments"]) == {"a": 1, "b": 2}


def test_a_reply_of_calls_alone_has_null_content_and_each_call_its_own_id() -> None:
    message = assistant_message(f"{ADD}\n{ADD}\n", {"add"})
    assert message["content"] is None
    assert len({tc["id"] for tc in message["tool_calls"]}) == 2


def test_without_offered_tools_a_reply_is_text() -> None:
    assert assistant_message(ADD, set()) == {"role": "assistant", "content": ADD}
    assert assistant_message("no calls", {"add"}) == {"role": "assistant", "content": "no calls"}


def test_request_messages_with_calls_results_and_text_parts() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a":1}'}}
    assistant = ChatMessage.model_validate({"role": "assistant", "content": None, "tool_calls": [call]})
    # Templates read arguments as a dict; a null content is rendered as "".
    assert assistant.for_template() == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": {"a": 1}}}]}
    tool = ChatMessage.model_validate({"role": "tool", "tool_call_id": "call_1", "content": "1"})
    assert tool.for_template() == {"role": "tool", "content": "1", "tool_call_id": "call_1"}
    parts = ChatMessage.model_validate({"role": "user", "content": [{"type": "text", "text": "a"},
                                                                    {"type": "text", "text": "b"}]})
    assert parts.content == "a\nb"


@pytest.mark.parametrize(("message", "error"), [
    ({"role": "tool", "content": "1"}, "needs tool_call_id"),
    ({"role": "assistant", "content": None}, "needs content or tool_calls"),
    ({"role": "user"}, "needs content"),
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, "'image_url'"),
    ({"role": "user", "content": "x", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}}]},
     "only assistant messages"),
    ({"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{oops"}}]},
     "arguments of 'f' are not valid JSON"),
])
def test_bad_messages_are_refused_with_the_reason(message: dict, error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        ChatMessage.model_validate(message)


def test_tool_choice_and_tool_names() -> None:
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    hi = [{"role": "user", "content": "hi"}]
    assert ChatRequest(messages=hi, tools=tools).tool_names() == {"add"}
    assert ChatRequest(messages=hi, tools=tools, tool_choice="none").tool_names() == set()
    assert ChatRequest(messages=hi).tool_names() == set()
    for choice in ("required", {"type": "function", "function": {"name": "add"}}):
        with pytest.raises(ValidationError, match="cannot force a tool call"):
            ChatRequest(messages=hi, tools=tools, tool_choice=choice)
    with pytest.raises(ValidationError, match='tool 0 must be {"type": "function"'):
        ChatRequest(messages=hi, tools=[{"name": "add"}])
