"""Real OpenAI-compatible chat endpoints on loopback (for tests): a real athanor model, or a rule.

`ChatServer(reply)` answers every POST {url}/chat/completions with `reply(request body)`, the request
as the client sent it (messages, temperature, seed, ...); `TeacherServer(run_dir)` is one whose reply is
a real athanor model's. A rule is a real program behind a real socket: the client under test talks
HTTP to it exactly as to vLLM or OpenAI.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from athanor.lm.local import LocalLM
from athanor.serve.sampling import SamplingParams


class ChatServer:
    """`with ChatServer(reply) as url:` serves POST {url}/chat/completions until the block ends. A reply
    function that raises makes the server answer HTTP 500 (a server that breaks mid-run). A reply is
    the assistant's text, or a whole assistant message (with `tool_calls`, for the agent's tests)."""

    def __init__(self, reply: Callable[[dict[str, Any]], str | dict[str, Any]]) -> None:
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path != "/v1/chat/completions":
                    self.send_error(404)
                    return
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                try:
                    with lock:
                        answer = reply(req)
                except Exception as e:  # noqa: BLE001 (any failure of the rule is the server's 500)
                    self.send_error(500, str(e))
                    return
                body = json.dumps({"object": "chat.completion", "model": req.get("model"),
                                   "choices": [{"index": 0, "finish_reason": "stop",
                                                "message": answer if isinstance(answer, dict) else
                                                {"role": "assistant", "content": answer}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> str:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


class TeacherServer(ChatServer):
    """A real athanor model (a run directory) behind the chat endpoint."""

    def __init__(self, run_dir: str | Path) -> None:
        teacher = LocalLM.load(run_dir, device="cpu", keep_prompt_tail=True)

        def reply(req: dict[str, Any]) -> str:
            params = SamplingParams(max_tokens=req.get("max_tokens", 64), temperature=req.get("temperature", 1.0),
                                    seed=req.get("seed"))
            return teacher.chat([req["messages"]], params)[0].text

        super().__init__(reply)
