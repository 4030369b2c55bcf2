"""Tools of MCP servers for the agent, through the official `mcp` SDK's client.

Servers come from a config file in the format MCP clients share,

    {"mcpServers": {"files": {"command": "python", "args": ["server.py"], "env": {"KEY": "v"}},
                    "remote": {"url": "http://127.0.0.1:8000/mcp"}}}

(a `command` is started as a subprocess and spoken to over stdio; a `url` over streamable HTTP), or
from the command line (`--mcp "NAME=COMMAND ARGS"` or `--mcp URL`). Each server's tools join the
agent's own as `SERVER__TOOL` (OpenAI function names allow letters, digits, _ and -).

The SDK is asynchronous and the agent is not: `MCPTools` runs the clients on an event loop in a
thread of their own, which enters their connections, lists their tools, and stays until `close`;
a tool call is a coroutine handed to that loop, waited for with a timeout.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import threading
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from athanor.agent.tools import Tool, ToolError
from athanor.errors import AthanorError

ServerSpec = dict[str, Any]  # {"command": str, "args": [str], "env": {str: str}} or {"url": str}


def load_config(path: str | Path) -> dict[str, ServerSpec]:
    """The servers of an MCP config file, checked: a malformed one is an error naming the file and field."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise AthanorError("no such MCP config file", path=path) from None
    except json.JSONDecodeError as e:
        raise AthanorError(f"not valid JSON: {e.msg}", path=path, line=e.lineno) from None
    servers = raw.get("mcpServers") if isinstance(raw, dict) else None
    if not isinstance(servers, dict):
        raise AthanorError('an MCP config is an object {"mcpServers": {NAME: {...}}}', path=path, field="mcpServers")
    for name, spec in servers.items():
        check_spec(name, spec, path)
    return servers


def check_spec(name: str, spec: Any, path: str | Path | None = None) -> None:
    where = f"mcpServers.{name}"
    if not isinstance(spec, dict) or ("command" in spec) == ("url" in spec):
        raise AthanorError('a server is {"command": ..., "args": [...]} or {"url": ...}', path=path, field=where)
    if "url" in spec and not (isinstance(spec["url"], str) and spec["url"].startswith(("http://", "https://"))):
        raise AthanorError("must be an http(s) URL", path=path, field=f"{where}.url")
    if "command" in spec and not (isinstance(spec["command"], str) and spec["command"]):
        raise AthanorError("must be a program to run (a string)", path=path, field=f"{where}.command")
    args = spec.get("args", [])
    if not (isinstance(args, list) and all(isinstance(a, str) for a in args)):
        raise AthanorError("must be a list of strings", path=path, field=f"{where}.args")
    env = spec.get("env", {})
    if not (isinstance(env, dict) and all(isinstance(v, str) for v in env.values())):
        raise AthanorError("must map names to strings", path=path, field=f"{where}.env")


def parse_cli_spec(text: str, index: int) -> tuple[str, ServerSpec]:
    """`--mcp` on the command line: `URL`, `COMMAND ARGS`, or either after `NAME=`."""
    m = re.match(r"([A-Za-z0-9_-]+)=(.*)", text, re.S)
    name, rest = (m.group(1), m.group(2)) if m else (f"mcp{index}", text)
    if rest.startswith(("http://", "https://")):
        return name, {"url": rest}
    argv = shlex.split(rest)
    if not argv:
        raise AthanorError(f"--mcp {text!r}: give a command to run or a URL")
    return name, {"command": argv[0], "args": argv[1:]}


def _text(result: Any) -> str:
    parts = [getattr(b, "text", None) or f"[{getattr(b, 'type', 'content')} content]" for b in result.content]
    if not parts and result.structured_content is not None:
        parts = [json.dumps(result.structured_content)]
    return "\n".join(parts) or "[no output]"


class MCPTools:
    """Connections to MCP servers; `tools` are theirs, ready for the agent. Use as a context manager."""

    def __init__(self, servers: dict[str, ServerSpec], timeout_s: float = 120.0) -> None:
        self.timeout_s = timeout_s
        self.tools: list[Tool] = []
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._main(servers),),
                                        name="mcp-clients", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise AthanorError(f"the MCP servers did not answer within {timeout_s:.0f} s")
        if self._error is not None:
            self._thread.join()
            raise AthanorError(f"could not start the MCP servers: {self._error}") from self._error

    async def _main(self, servers: dict[str, ServerSpec]) -> None:
        from mcp import Client, StdioServerParameters

        self._stop = asyncio.Event()
        try:
            async with AsyncExitStack() as stack:
                for name, spec in servers.items():
                    target: Any = spec["url"] if "url" in spec else StdioServerParameters(
                        command=spec["command"], args=spec.get("args", []), env=spec.get("env"), cwd=spec.get("cwd"))
                    try:
                        client = await stack.enter_async_context(Client(target))
                        listed = await client.list_tools()
                    except Exception as e:  # noqa: BLE001 (any failure to connect is the user's to read)
                        raise AthanorError(f"MCP server {name!r} ({spec.get('url') or spec['command']}): "
                                           f"{type(e).__name__}: {e}") from e
                    self.tools += [self._tool(client, name, t) for t in listed.tools]
                self._ready.set()
                await self._stop.wait()
        except BaseException as e:  # noqa: BLE001 (handed to the caller's thread, which raises it)
            self._error = e
            self._ready.set()

    def _tool(self, client: Any, server: str, tool: Any) -> Tool:
        def call(args: dict[str, Any]) -> str:
            future = asyncio.run_coroutine_threadsafe(client.call_tool(tool.name, args), self._loop)
            result = future.result(self.timeout_s)
            if result.is_error:
                raise ToolError(_text(result))
            return _text(result)

        name = re.sub(r"[^A-Za-z0-9_-]", "_", f"{server}__{tool.name}")[:64]
        return Tool(name, tool.description or "", tool.input_schema or {"type": "object"}, call)

    def close(self) -> None:
        if self._thread.is_alive() and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(self.timeout_s)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> MCPTools:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
