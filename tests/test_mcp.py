"""MCP with the official SDK: its client lists and calls athanor's tools over stdio and streamable HTTP
(real subprocesses, real sockets on loopback); athanor's agent uses a tool of a server written only
with the SDK; a malformed config is one clear error."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("mcp")

from conftest import tiny_base  # noqa: E402
from mcp import Client, StdioServerParameters  # noqa: E402
from teacher_server import ChatServer  # noqa: E402

from athanor.agent.loop import Agent  # noqa: E402
from athanor.agent.mcp_client import MCPTools, load_config, parse_cli_spec  # noqa: E402
from athanor.agent.mcp_server import build_server  # noqa: E402
from athanor.errors import AthanorError  # noqa: E402
from athanor.lm.endpoint import EndpointLM  # noqa: E402

SRC = str(Path(__file__).parents[1] / "src")
SHOUT = str(Path(__file__).with_name("mcp_shout_server.py"))
ENV = {**os.environ, "PYTHONPATH": SRC}


async def _list_and_run(target) -> tuple[set[str], dict]:
    async with Client(target) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        result = await client.call_tool("sandbox_run", {"code": "print(6 * 7)"})
        return names, result.structured_content


def test_sdk_client_uses_athanors_tools_over_stdio():
    server = StdioServerParameters(command=sys.executable, args=["-m", "athanor", "mcp", "serve"], env=ENV)
    names, out = asyncio.run(_list_and_run(server))
    assert "sandbox_run" in names and out["verdict"] == "ok" and out["stdout"] == "42\n"


def test_sdk_client_uses_athanors_tools_over_http(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "athanor", "mcp", "serve", "--http", str(port)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        names, out = asyncio.run(_list_and_run(f"http://127.0.0.1:{port}/mcp"))
    finally:
        proc.terminate()
        proc.wait(10)
    assert "sandbox_run" in names and out["stdout"] == "42\n"


def test_next_token_tool(tmp_path, tokenizer_dir):
    async def ask() -> list[dict]:
        async with Client(build_server(tiny_base(tmp_path, tokenizer_dir))) as client:
            return (await client.call_tool("next_token", {"prefix": "def ", "top": 5})).structured_content["result"]

    top = asyncio.run(ask())
    assert len(top) == 5 and all(0 < t["prob"] <= 1 for t in top)
    assert [t["prob"] for t in top] == sorted((t["prob"] for t in top), reverse=True)


def test_agent_calls_a_tool_of_an_sdk_only_server(tmp_path):
    def tc(name: str, args: dict) -> dict:
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]}

    seen = []

    def reply(req: dict):
        seen.append(req)
        k = sum(m["role"] == "assistant" for m in req["messages"])
        return [tc("shout__shout", {"text": "hello"}), tc("shout__broken", {}), "done"][k]

    work = tmp_path / "work"
    work.mkdir()
    with MCPTools({"shout": {"command": sys.executable, "args": [SHOUT]}}) as mcp, ChatServer(reply) as url:
        assert {t.name for t in mcp.tools} == {"shout__shout", "shout__broken"}
        result = Agent(EndpointLM(url), mcp.tools, tmp_path / "t.jsonl").run("shout hello")
    assert result.reason == "done"
    assert "shout__shout" in {t["function"]["name"] for t in seen[0]["tools"]}
    answers = [m["content"] for m in seen[-1]["messages"] if m["role"] == "tool"]
    # The SDK hides an unexpected exception's message from clients; the call still comes back as an error.
    assert answers[0] == "HELLO!" and answers[1] == "error: ToolError: Error executing tool broken"


@pytest.mark.parametrize("text, message", [
    ('{"mcpServers": {"a": {"command": "x",}}}', r"mcp\.json:1: not valid JSON"),
    ('{"servers": {}}', "field 'mcpServers'"),
    ('{"mcpServers": {"a": {"args": ["x"]}}}', "field 'mcpServers.a'"),
    ('{"mcpServers": {"a": {"command": "x", "args": "--flag"}}}', "field 'mcpServers.a.args'"),
    ('{"mcpServers": {"a": {"url": "ftp://host"}}}', "field 'mcpServers.a.url'"),
])
def test_a_malformed_config_is_one_clear_error(tmp_path, text, message):
    (tmp_path / "mcp.json").write_text(text)
    with pytest.raises(AthanorError, match=message):
        load_config(tmp_path / "mcp.json")


def test_config_and_cli_specs(tmp_path):
    (tmp_path / "mcp.json").write_text('{"mcpServers": {"s": {"command": "python", "args": ["s.py"]},'
                                       ' "r": {"url": "http://127.0.0.1:1/mcp"}}}')
    assert set(load_config(tmp_path / "mcp.json")) == {"s", "r"}
    assert parse_cli_spec("web=http://h/mcp", 1) == ("web", {"url": "http://h/mcp"})
    assert parse_cli_spec("python 'my server.py'", 2) == ("mcp2", {"command": "python", "args": ["my server.py"]})


def test_a_server_that_does_not_start_is_a_clear_error():
    with pytest.raises(AthanorError, match="MCP server 'gone'"):
        MCPTools({"gone": {"command": sys.executable, "args": ["-c", "import sys; sys.exit(3)"]}}, timeout_s=20)


def test_rag_search_tool_over_mcp_and_in_the_agent(tmp_path):
    from athanor.agent.tools import rag_tool
    from athanor.rag.index import RagIndex

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "trains.md").write_text("The night train to Vienna leaves platform 4 at 22:10.")
    (docs / "tea.md").write_text("Green tea is steeped at 80 degrees.")
    index = RagIndex(None)
    index.update_paths([docs])
    index.save(tmp_path / "idx")

    async def ask() -> list[dict]:
        async with Client(build_server(rag_index=tmp_path / "idx")) as client:
            assert "rag_search" in {t.name for t in (await client.list_tools()).tools}
            return (await client.call_tool("rag_search", {"query": "Vienna train", "k": 1})).structured_content[
                "result"]

    (hit,) = asyncio.run(ask())
    assert hit["source"].endswith("trains.md") and hit["start"] == 1 and "platform 4" in hit["text"]
    text = rag_tool(tmp_path / "idx").call({"query": "green tea temperature", "k": 1})
    assert text.startswith("[1] ") and "tea.md:1-1" in text and "80 degrees" in text
    with pytest.raises(AthanorError, match="no index here"):
        build_server(rag_index=tmp_path / "missing")
