"""A real OpenAI-compatible chat endpoint on loopback, serving a real athanor model (for tests)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from athanor.lm.local import LocalLM
from athanor.serve.sampling import SamplingParams


class TeacherServer:
    """`with TeacherServer(run_dir) as url:` serves POST {url}/chat/completions until the block ends."""

    def __init__(self, run_dir: str | Path) -> None:
        teacher = LocalLM.load(run_dir, device="cpu", keep_prompt_tail=True)
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path != "/v1/chat/completions":
                    self.send_error(404)
                    return
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    params = SamplingParams(max_tokens=req.get("max_tokens", 64),
                                            temperature=req.get("temperature", 1.0), seed=req.get("seed"))
                    text = teacher.chat([req["messages"]], params)[0].text
                body = json.dumps({"object": "chat.completion", "model": req.get("model"),
                                   "choices": [{"index": 0, "finish_reason": "stop",
                                                "message": {"role": "assistant", "content": text}}]}).encode()
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
