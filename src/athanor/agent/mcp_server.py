"""athanor's tools as an MCP server (the official `mcp` SDK, v2's `MCPServer`), over stdio or
streamable HTTP: `athanor mcp serve [--http PORT] [--model RUN_DIR]`.

- `sandbox_run`: a Python program or a bash command in the sandbox (rl/sandbox.py), in a throwaway
  directory: the verdict, exit code, stdout and stderr;
- `next_token` (with --model): the likeliest next tokens after a prefix and their probabilities,
  the demo page's view, from a local model through the one inference layer (athanor.lm);
- `rag_search` (with --rag): passages of an index made by `athanor rag index`, with their files, lines
  and scores.
A stdio server owns stdout for the protocol: nothing here prints; uvicorn and the SDK log to stderr.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from mcp.server.mcpserver import MCPServer

from athanor.rl.sandbox import Limits, run_python
from athanor.serve.sampling import SamplingParams


def build_server(model: str | Path | None = None, limits: Limits | None = None,
                 rag_index: str | Path | None = None) -> MCPServer:
    """The MCP server with athanor's tools; `model`: a run directory for `next_token`; `rag_index`: an index
    directory for `rag_search`."""
    extras = [what for what, given in (("a language model's next-token distribution", model),
                                       ("search of indexed documents", rag_index)) if given]
    server = MCPServer("athanor", instructions="athanor's tools: sandboxed code execution"
                       + "".join(f", {e}" for e in extras) + ".")
    limits = limits or Limits()

    @server.tool(description="Run a Python program (language='python') or a bash command (language='bash') in "
                 "athanor's sandbox: no network, a read-only filesystem but for a throwaway directory, time and "
                 "memory limits. Returns the verdict (ok, failed, timeout, memory, ...), exit code, stdout, stderr.")
    def sandbox_run(code: str, language: Literal["python", "bash"] = "python", stdin: str = "") -> dict[str, Any]:
        program = code if language == "python" else f"import os\nos.execv('/bin/bash', ['bash', '-c', {code!r}])\n"
        r = run_python(program, limits, stdin=stdin)
        return {"verdict": r.verdict, "returncode": r.returncode, "stdout": r.stdout, "stderr": r.stderr,
                "detail": r.detail}

    if model is not None:
        from athanor.lm.local import LocalLM

        lm = LocalLM.load(model, device="cpu")

        @server.tool(description="The language model's likeliest next tokens after `prefix` (plain text, no chat "
                     "template), each with its probability: what the model 'thinks' comes next.")
        def next_token(prefix: str, top: int = 10) -> list[dict[str, Any]]:
            top = max(1, min(top, 100))
            # One greedy token with its top log-probs: the distribution at the end of the prefix.
            c = lm.complete([prefix], SamplingParams(max_tokens=1, temperature=0.0, logprobs=top))[0]
            dist = (c.top_logprobs or [{}])[0]
            return [{"token": t, "prob": math.exp(lp)} for t, lp in sorted(dist.items(), key=lambda kv: -kv[1])]

    if rag_index is not None:
        from athanor.rag.index import RagIndex

        index = RagIndex.load(rag_index)  # a missing or foreign index fails here, before serving
        mode = "hybrid" if index.embedder else "bm25"

        @server.tool(description=f"Search the indexed documents ({len(index.files)} files) for the passages most "
                     "relevant to `query`; each with its file, first and last line, score and text.")
        def rag_search(query: str, k: int = 5) -> list[dict[str, Any]]:
            return [{"source": h.chunk.source, "start": h.chunk.start, "end": h.chunk.end, "score": h.score,
                     "text": h.chunk.text} for h in index.search(query, max(1, min(k, 20)), mode)]

    return server


def serve(http_port: int | None = None, host: str = "127.0.0.1", model: str | Path | None = None,
          rag_index: str | Path | None = None) -> None:
    """Serve over stdio (the default: an MCP client starts this as its subprocess), or over streamable
    HTTP on `host`:`http_port` at /mcp."""
    server = build_server(model, rag_index=rag_index)
    if http_port is None:
        server.run("stdio")
    else:
        server.run("streamable-http", host=host, port=http_port)
