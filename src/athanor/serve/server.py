"""`athanor serve RUN_DIR`: an OpenAI-compatible HTTP server over the engine, plus the demo page.

The engine runs on its own thread; each HTTP request submits engine requests whose events come
back to the event loop through an asyncio queue. A streaming client that goes away cancels its
requests, which frees their slots before the engine's next step.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from athanor.errors import AthanorError
from athanor.serve.engine import Engine, Event
from athanor.serve.engine import Request as EngineRequest
from athanor.serve.openai_api import (
    ChatRequest,
    CompletionRequest,
    Formatter,
    NextTokenRequest,
    assistant_message,
    envelope,
    error_body,
    finish_reason,
    usage,
)
from athanor.serve.sampling import SamplingParams, shape_logits
from athanor.tokenizer import Tokenizer


def _err(status: int, message: str, param: str | None = None, type_: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(error_body(message, type_, param), status_code=status)


class _Job:
    """Engine requests of one HTTP request, and the queue their events arrive on."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.loop = engine, asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.reqs: list[EngineRequest] = []

    def submit(self, prompts: list[list[int]], params: Callable[[int], SamplingParams], n: int) -> None:
        try:
            for ids in prompts:
                for j in range(n):
                    index = len(self.reqs)
                    self.reqs.append(self.engine.submit(ids, params(j), self._callback(index)))
        except AthanorError:
            self.cancel()
            raise

    def _callback(self, index: int) -> Callable[[Event], None]:
        return lambda ev: self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, ev))

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        left = len(self.reqs)
        while left:
            index, ev = await self.queue.get()
            left -= ev.finished
            yield index, ev

    def cancel(self) -> None:
        for r in self.reqs:
            if not r.done:
                self.engine.cancel(r)


def _sse(chunks: AsyncIterator[dict[str, Any]], job: _Job) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # normal end, or the client went away (the task is cancelled or the send fails)
            job.cancel()

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def create_app(engine: Engine, tok: Tokenizer, model_name: str, api_key: str | None = None,
               frame_ancestors: str = "*") -> FastAPI:
    """The ASGI app. `frame_ancestors` is the CSP list of sites that may embed the demo page."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="athanor", lifespan=lifespan)
    fmt = Formatter(tok)
    context = engine.max_len
    http_counts: dict[str, int] = {}

    @app.middleware("http")
    async def auth_and_count(request: Request, call_next):  # noqa: ANN202
        if api_key and request.url.path.startswith("/v1/") and \
                request.headers.get("authorization", "") != f"Bearer {api_key}":
            response = _err(401, "invalid or missing API key (Authorization: Bearer ...)", type_="authentication_error")
        else:
            response = await call_next(request)
        key = f'{request.url.path if response.status_code != 404 else "other"}",code="{response.status_code}'
        http_counts[key] = http_counts.get(key, 0) + 1
        return response

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        return _err(400, f"{'.'.join(loc) or 'body'}: {first.get('msg')}", ".".join(loc) or None)

    @app.exception_handler(AthanorError)
    async def athanor_error(request: Request, exc: AthanorError) -> JSONResponse:
        return _err(400, str(exc), exc.field)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _err(exc.status_code, str(exc.detail), type_="not_found_error" if exc.status_code == 404 else
                    "invalid_request_error")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "active_slots": engine.active, "waiting": engine.waiting,
                "slots": engine.max_batch}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "athanor", "max_model_len": context}]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        s = engine.stats
        lines = [
            ("athanor_requests_total", "counter", "engine requests submitted", s.requests),
            ("athanor_requests_finished_total", "counter", "engine requests finished (any reason)", s.finished),
            ("athanor_requests_cancelled_total", "counter", "engine requests cancelled (client went away)",
             s.cancelled),
            ("athanor_prompt_tokens_total", "counter", "prompt tokens", s.prompt_tokens),
            ("athanor_prompt_tokens_cached_total", "counter", "prompt tokens reused from the prefix cache",
             s.cached_prompt_tokens),
            ("athanor_generation_tokens_total", "counter", "generated tokens", s.generated_tokens),
            ("athanor_prefill_seconds_total", "counter", "time spent in prefill", s.prefill_seconds),
            ("athanor_decode_seconds_total", "counter", "time spent in decode steps", s.decode_seconds),
            ("athanor_decode_steps_total", "counter", "batched decode steps", s.decode_steps),
            ("athanor_time_to_first_token_seconds_sum", "counter", "sum of time to first token", s.ttft_seconds_sum),
            ("athanor_time_to_first_token_seconds_count", "counter", "requests with a first token",
             s.first_tokens),
            ("athanor_decode_tokens_per_second", "gauge", "decode tokens per second of decode time",
             s.decode_tokens / s.decode_seconds if s.decode_seconds else 0.0),
            ("athanor_active_slots", "gauge", "slots decoding now", engine.active),
            ("athanor_slots", "gauge", "slots (the most concurrent requests)", engine.max_batch),
            ("athanor_waiting_requests", "gauge", "requests waiting for a slot", engine.waiting),
        ]
        out = []
        for name, kind, help_, value in lines:
            out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
        out += ["# HELP athanor_http_requests_total HTTP responses by path and status",
                "# TYPE athanor_http_requests_total counter"]
        out += [f'athanor_http_requests_total{{path="{k}"}} {v}' for k, v in sorted(http_counts.items())]
        return PlainTextResponse("\n".join(out) + "\n", media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest) -> JSONResponse | StreamingResponse:
        p = body.prompt
        if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], str)):
            texts = [p] if isinstance(p, str) else list(p)
            prompts = [tok.encode_prompt(t) for t in texts]
            skip = int(tok.add_bos)  # a BOS the tokenizer added is not part of the echoed text
        else:
            prompts = [list(p)] if not p or isinstance(p[0], int) else [list(x) for x in p]
            texts, skip = [tok.decode(x) for x in prompts], 0
        prompt_lp = body.logprobs if body.echo and body.logprobs is not None else None
        job = _Job(engine)
        job.submit(prompts, lambda j: body.sampling(context if body.max_tokens is None else body.max_tokens,
                                                    tok.stop_ids, body.logprobs, prompt_lp, j), body.n)
        rid, n = f"cmpl-{uuid.uuid4().hex[:24]}", body.n

        def echo_part(i: int) -> tuple[str, dict[str, list] | None]:
            req, text = job.reqs[i], texts[i // n] if body.echo else ""
            if prompt_lp is None:
                return text, None
            ids = req.prompt_ids[skip:]
            return text, fmt.completion_logprobs(req.prompt_logprobs[skip:], ids)

        def merge(a: dict | None, b: dict | None) -> dict | None:
            return b if a is None else {k: a[k] + b[k] for k in a} if b is not None else a

        if body.stream:
            async def chunks() -> AsyncIterator[dict[str, Any]]:
                offsets = [0] * len(job.reqs)
                if body.echo:
                    for i in range(len(job.reqs)):
                        text, lps = echo_part(i)
                        offsets[i] = len(text)
                        yield envelope("text_completion", rid, model_name,
                                       [{"index": i, "text": text, "logprobs": lps, "finish_reason": None}])
                async for i, ev in job.events():
                    lps = None
                    if body.logprobs is not None:
                        lps = fmt.completion_logprobs(ev.logprobs, ev.token_ids, offsets[i])
                    offsets[i] += len(ev.text)
                    yield envelope("text_completion", rid, model_name, [{
                        "index": i, "text": ev.text, "logprobs": lps,
                        "finish_reason": finish_reason(ev.request) if ev.finished else None}])

            return _sse(chunks(), job)

        async for _ in job.events():
            pass
        choices = []
        for i, req in enumerate(job.reqs):
            text, lps = echo_part(i)
            if body.logprobs is not None:
                lps = merge(lps, fmt.completion_logprobs(req.output_logprobs, req.output_ids, len(text)))
            choices.append({"index": i, "text": text + req.text, "logprobs": lps,
                            "finish_reason": finish_reason(req)})
        return JSONResponse(envelope("text_completion", rid, model_name, choices,
                                     usage=usage(job.reqs, sum(map(len, prompts)))))

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest) -> JSONResponse | StreamingResponse:
        """Chat with the model's own template. With `tools` (and tool_choice not "none"), each reply is read
        for `<tool_call>` blocks (`assistant_message`). A stream with tools holds each reply until it ends,
        since a block is only known to be a call once it closes: its role chunk comes first, then one chunk
        with the content left around the calls and every call whole in `tool_calls` (with `index`, `id`,
        `type` and the full `arguments`, the layout OpenAI's streamed deltas accumulate into), then an empty
        delta with the finish reason, "tool_calls" when there are calls. Without tools the text streams."""
        # The model's own chat template; a reply ends at any of its stop ids (every eos it ships).
        ids = tok.encode_chat([m.for_template() for m in body.messages], add_generation_prompt=True,
                              tools=body.tools)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        top = (body.top_logprobs or 0) if body.logprobs else None
        names = body.tool_names()
        job = _Job(engine)
        job.submit([ids], lambda j: body.sampling(context if max_tokens is None else max_tokens,
                                                  tok.stop_ids, top, None, j), body.n)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"

        def reply(req: EngineRequest) -> tuple[dict[str, Any], str | None]:
            message = assistant_message(req.text, names)
            return message, "tool_calls" if "tool_calls" in message else finish_reason(req)

        if body.stream:
            async def chunks() -> AsyncIterator[dict[str, Any]]:
                for i in range(len(job.reqs)):
                    yield envelope("chat.completion.chunk", rid, model_name, [{
                        "index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None}])
                async for i, ev in job.events():
                    if names:  # held until the reply ends (see above)
                        if not ev.finished:
                            continue
                        message, reason = reply(ev.request)
                        delta = {k: v for k, v in message.items() if k != "role" and v is not None}
                        for k, tc in enumerate(delta.get("tool_calls", [])):
                            tc["index"] = k
                        lps = ev.request.output_logprobs
                        yield envelope("chat.completion.chunk", rid, model_name, [{
                            "index": i, "delta": delta,
                            "logprobs": fmt.chat_logprobs(lps) if top is not None and lps else None,
                            "finish_reason": None}])
                        yield envelope("chat.completion.chunk", rid, model_name, [{
                            "index": i, "delta": {}, "logprobs": None, "finish_reason": reason}])
                    elif ev.text or ev.finished or ev.token_ids:
                        yield envelope("chat.completion.chunk", rid, model_name, [{
                            "index": i, "delta": {"content": ev.text} if ev.text else {},
                            "logprobs": fmt.chat_logprobs(ev.logprobs) if top is not None and ev.logprobs else None,
                            "finish_reason": finish_reason(ev.request) if ev.finished else None}])

            return _sse(chunks(), job)
        async for _ in job.events():
            pass
        choices = []
        for i, r in enumerate(job.reqs):
            message, reason = reply(r)
            choices.append({"index": i, "message": message,
                            "logprobs": fmt.chat_logprobs(r.output_logprobs) if top is not None else None,
                            "finish_reason": reason})
        return JSONResponse(envelope("chat.completion", rid, model_name, choices, usage=usage(job.reqs, len(ids))))

    @app.post("/v1/next_token")
    def next_token(body: NextTokenRequest) -> dict[str, Any]:
        """The demo's view: how the prefix tokenizes and the next-token distribution after
        temperature and top-k, as a sampler would draw from it."""
        ids = tok.encode_prompt(body.prompt)
        text_ids = ids[int(tok.add_bos):]
        if len(ids) > context:
            raise AthanorError(f"the prefix has {len(ids)} tokens; the context is {context}", field="prompt")
        with torch.no_grad():
            logits = engine.model(torch.tensor([ids], device=engine.device))[0, -1].float()
        raw = torch.log_softmax(logits, -1)
        if body.temperature == 0:  # greedy: all mass on the argmax
            probs = torch.zeros_like(logits).scatter_(0, logits.argmax()[None], 1.0)
        else:
            probs = shape_logits(logits[None], body.temperature, body.top_k)[0].softmax(-1)
        top = probs.topk(min(body.top, int((probs > 0).sum()), probs.numel()))
        return {
            "prompt_tokens": [{"id": i, "text": s} for i, s in zip(text_ids, tok.token_strings(text_ids), strict=True)],
            "tokens": [{"id": i, "text": fmt.text(i), "prob": p, "logprob": float(raw[i])}
                       for i, p in zip(top.indices.tolist(), top.values.tolist(), strict=True)],
        }

    @app.get("/", response_class=HTMLResponse)
    async def demo() -> HTMLResponse:
        page = resources.files("athanor.serve.web").joinpath("index.html").read_text(encoding="utf-8")
        # Self-contained: everything from this origin; embeddable where frame_ancestors allows.
        csp = (f"default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
               f"img-src 'self' data:; frame-ancestors {frame_ancestors}")
        return HTMLResponse(page.replace("__MODEL__", model_name), headers={"Content-Security-Policy": csp})

    return app


def build(run_dir: str | Path, max_batch: int = 8, api_key: str | None = None, frame_ancestors: str = "*",
          device: str | None = None, compile: bool = False) -> FastAPI:
    """Load a run directory into an engine and wrap it in the app."""
    from athanor.model.hf import load_pretrained

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_pretrained(run_dir, device=device)
    tok = Tokenizer.load(run_dir)
    engine = Engine(model, max_batch=max_batch, decode=tok.decode, hold_ids=tok.stream_hold_ids,
                    compile=compile)
    return create_app(engine, tok, Path(run_dir).resolve().name, api_key, frame_ancestors)


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, **kw: Any) -> None:
    app = build(run_dir, **kw)
    print(f"athanor: serving {run_dir} on http://{host}:{port} (demo at /, OpenAI API at /v1)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
