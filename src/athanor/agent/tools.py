"""The agent's own tools, on one work directory: bash and Python in the sandbox, read / write / edit a
file, search the files.

A `Tool` is a name, a description and a JSON schema for its arguments (what the model is shown, as
an OpenAI function definition or an MCP tool) and a function from the arguments to the text the model
reads back. Tools that fail raise; the loop turns any exception into an error message to the model
(agent/loop.py), so a tool never has to format its own failures.

Code runs only in the sandbox (rl/sandbox.py): the work directory is copied in as the program's
current directory and what the program leaves there is copied back, so the agent's commands see and
change its files, and nothing else. The file tools run in this process, confined to the work
directory: a path that leads out of it (`..`, an absolute path, a symbolic link) is refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from athanor.errors import AthanorError
from athanor.io import atomic_write_text
from athanor.rl.environment import PythonTool
from athanor.rl.sandbox import SHARE, Limits, SandboxResult, run_python


class ToolError(AthanorError):
    """A tool was called wrongly (a missing file, an edit that does not match): the model reads why."""


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object
    call: Callable[[dict[str, Any]], str]

    def openai_spec(self) -> dict[str, Any]:
        """The function definition of the OpenAI `tools` field."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


def schema(required: dict[str, str], optional: dict[str, tuple[str, str]] | None = None) -> dict[str, Any]:
    """A JSON schema object: `required` maps each argument to its description (a string); `optional`
    maps each to (JSON type, description)."""
    props: dict[str, Any] = {k: {"type": "string", "description": d} for k, d in required.items()}
    props.update({k: {"type": t, "description": d} for k, (t, d) in (optional or {}).items()})
    return {"type": "object", "properties": props, "required": list(required)}


def argument(args: dict[str, Any], name: str, kind: type = str, default: Any = ...) -> Any:
    """`args[name]`, checked: the model reads a clear message for a missing or mistyped argument."""
    if name not in args:
        if default is ...:
            raise ToolError(f"missing argument {name!r}")
        return default
    value = args[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ToolError(f"argument {name!r} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def rag_tool(index_dir: str | Path, k: int = 5) -> Tool:
    """`rag_search` over an index made by `athanor rag index`: the passages most relevant to a query."""
    from athanor.rag.answer import format_hits
    from athanor.rag.index import RagIndex

    index = RagIndex.load(index_dir)
    mode = "hybrid" if index.embedder else "bm25"

    def search(args: dict[str, Any]) -> str:
        return format_hits(index.search(argument(args, "query"), max(1, min(argument(args, "k", int, k), 20)),
                                        mode))

    return Tool("rag_search", f"Search the indexed documents ({len(index.files)} files) for passages relevant to a "
                "question or keywords; returns each passage with its file and line numbers.",
                schema({"query": "what to look for, in words or names"},
                       {"k": ("integer", f"how many passages (default {k}, at most 20)")}), search)


class Workspace:
    """The agent's work directory and the tools that act on it."""

    def __init__(self, root: str | Path, limits: Limits | None = None, max_output_chars: int = 4000) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise AthanorError("the work directory does not exist", path=root)
        # An agent's command may install, build or test: more room than a reward's one small function.
        self.limits = limits or Limits(wall_s=30, cpu_s=20, memory_mb=1024, max_procs=64, file_mb=64)
        self.max_output_chars = max_output_chars

    def path(self, name: str) -> Path:
        """`name` (relative to the work directory) as a path inside it; refused if it leads out."""
        target = (self.root / name).resolve()  # resolve() follows links: a link out is caught too
        if target != self.root and self.root not in target.parents:
            raise ToolError(f"{name!r} is outside the work directory")
        return target

    def tools(self) -> list[Tool]:
        return [
            Tool("bash", "Run a bash command in the work directory (sandboxed: no network, time and memory "
                 "limits). Returns its stdout and stderr and, if not 0, its exit code.",
                 schema({"command": "the bash command line"}), self.bash),
            Tool("python", "Run a Python program in the work directory (sandboxed like bash). Returns what it "
                 "printed.", schema({"code": "the program's source"}), self.python),
            Tool("read_file", "Read a text file of the work directory, with line numbers.",
                 schema({"path": "file path relative to the work directory"},
                        {"start": ("integer", "first line to show (1-based, default 1)"),
                         "lines": ("integer", "how many lines (default 400)")}), self.read_file),
            Tool("write_file", "Create or replace a file of the work directory with the given content.",
                 schema({"path": "file path relative to the work directory", "content": "the whole new content"}),
                 self.write_file),
            Tool("edit_file", "Replace one exact occurrence of `old` by `new` in a file of the work directory. "
                 "`old` must occur exactly once (include surrounding lines to make it unique).",
                 schema({"path": "file path relative to the work directory", "old": "the exact text to replace",
                         "new": "the replacement"}), self.edit_file),
            Tool("search", "Search the work directory's text files for a regular expression; returns "
                 "path:line: text for each match (at most 100). An empty pattern lists the files.",
                 schema({"pattern": "a Python regular expression"}), self.search),
        ]

    def _run(self, program: str, files: dict[str, str] | None = None) -> str:
        run = run_python(program, self.limits, files=files, share=self.root)
        return self._output(run)

    def _output(self, run: SandboxResult) -> str:
        text = PythonTool(self.limits, self.max_output_chars).output(run)
        return text if run.returncode in (0, None) else f"{text}\n[exit code {run.returncode}]"

    def bash(self, args: dict[str, Any]) -> str:
        command = argument(args, "command")
        # The sandbox runs a Python program; this one becomes bash, in the shared copy of the work dir.
        return self._run(f"import os\nos.chdir({SHARE!r})\nos.execv('/bin/bash', ['bash', '-c', {command!r}])\n")

    def python(self, args: dict[str, Any]) -> str:
        code = argument(args, "code")
        # The program's file lies beside the shared dir, not in it: it is not one of the agent's files.
        return self._run(f"import os, sys\nos.chdir({SHARE!r})\n"
                         "os.execv(sys.executable, [sys.executable, '-E', '-s', '../program.py'])\n",
                         files={"program.py": code})

    def read_file(self, args: dict[str, Any]) -> str:
        path = self.path(argument(args, "path"))
        start, count = argument(args, "start", int, 1), argument(args, "lines", int, 400)
        if not path.is_file():
            raise ToolError(f"no file {args['path']!r}")
        lines = path.read_text(errors="replace").splitlines()
        shown = lines[max(start, 1) - 1:max(start, 1) - 1 + max(count, 1)]
        text = "\n".join(f"{i:5d}  {line}" for i, line in enumerate(shown, max(start, 1)))
        more = len(lines) - (max(start, 1) - 1 + len(shown))
        return (text or "[empty]") + (f"\n[{more} more lines]" if more > 0 else "")

    def write_file(self, args: dict[str, Any]) -> str:
        path, content = self.path(argument(args, "path")), argument(args, "content")
        if path.is_dir():
            raise ToolError(f"{args['path']!r} is a directory")
        atomic_write_text(path, content)
        return f"wrote {len(content)} characters to {args['path']}"

    def edit_file(self, args: dict[str, Any]) -> str:
        path, old, new = self.path(argument(args, "path")), argument(args, "old"), argument(args, "new")
        if not path.is_file():
            raise ToolError(f"no file {args['path']!r}")
        text = path.read_text()
        n = text.count(old) if old else 0
        if n != 1:
            raise ToolError(f"`old` occurs {n} times in {args['path']}; it must occur exactly once")
        atomic_write_text(path, text.replace(old, new, 1))
        return f"edited {args['path']}"

    def search(self, args: dict[str, Any]) -> str:
        try:
            pattern = re.compile(argument(args, "pattern"))
        except re.error as e:
            raise ToolError(f"not a regular expression: {e}") from None
        hits: list[str] = []
        for file in sorted(p for p in self.root.rglob("*") if p.is_file() and not p.is_symlink()):
            rel = file.relative_to(self.root).as_posix()
            if not pattern.pattern:
                hits.append(rel)
                continue
            try:
                lines = file.read_text().splitlines()
            except (UnicodeDecodeError, OSError):
                continue  # binary or unreadable: not a text file to search
            hits += [f"{rel}:{i}: {line[:200]}" for i, line in enumerate(lines, 1) if pattern.search(line)]
            if len(hits) >= 100:
                break
        return "\n".join(hits[:100]) or "[no matches]"

