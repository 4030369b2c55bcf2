"""An inference engine: slots over one preallocated KV cache, continuous batching, prefix reuse.

Each of `max_batch` slots owns one row of the KV cache. A request is *prefilled* into a free
slot (its whole prompt in one forward, timed as time-to-first-token), then joins the *decode*
batch, which advances every active slot by one token per forward, each row at its own position
(Orca's iteration-level scheduling, Yu et al., 2022: requests join and leave between steps).
A finished request leaves its tokens in the slot; a later prompt that starts the same way reuses
those keys and values and prefills only the rest (prefix caching, as in vLLM and SGLang).

`step()` does one scheduling iteration and can be driven directly (tests, benchmarks);
`start()` runs it on a background thread for the server, which submits and cancels requests
from other threads and gets `Event`s through each request's callback.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from athanor.errors import AthanorError
from athanor.model.llama import KVCache, LlamaModel
from athanor.serve.sampling import SamplingParams, apply_penalties, sample_next


@dataclass
class TokenLogprob:
    """A token's log-probability under the model (raw logits, before penalties and temperature)
    and the likeliest alternatives at that position, best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Event:
    """What one engine step produced for one request: new tokens, the text that became final."""

    request: Request
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    text: str
    finished: bool


@dataclass
class Request:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None] | None = None
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    text: str = ""  # the output decoded, cut at a stop string
    finish_reason: str | None = None  # "stop", "length" or "cancelled"
    cached_tokens: int = 0  # prompt tokens whose keys/values were reused from an earlier request
    t_submit: float = 0.0
    t_first: float | None = None
    t_done: float | None = None
    cancelled: bool = False
    _emitted: int = 0  # characters of `text` already delivered in events
    _slot: int | None = None
    _generator: torch.Generator | None = None
    _seen: torch.Tensor | None = None  # for repetition penalties
    _counts: torch.Tensor | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def ttft(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_submit


@dataclass
class EngineStats:
    """Counters since start: what /metrics exports and the benchmarks read."""

    requests: int = 0
    finished: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    ttft_seconds_sum: float = 0.0


class Engine:
    def __init__(self, model: LlamaModel, max_batch: int = 8, max_len: int | None = None,
                 decode: Callable[[list[int]], str] | None = None) -> None:
        """`decode` turns token ids into text (for stop strings); without it, text stays empty."""
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.vocab_size = model.config.vocab_size
        self.max_len = min(max_len or model.config.max_position_embeddings, model.config.max_position_embeddings)
        self.max_batch = max_batch
        self.cache = KVCache(model.config, max_batch, self.max_len, self.device, next(model.parameters()).dtype)
        self.decode_fn = decode
        self.slot_tokens: list[list[int]] = [[] for _ in range(max_batch)]  # tokens whose KV the slot holds
        self.slot_req: list[Request | None] = [None] * max_batch
        self.stats = EngineStats()
        self._waiting: deque[Request] = deque()
        self._ids = itertools.count()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False

    # -- requests ------------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams,
               on_event: Callable[[Event], None] | None = None) -> Request:
        """Queue a request; raises AthanorError for a prompt that cannot fit or bad parameters."""
        params.validate(self.vocab_size)
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise AthanorError("the prompt is empty", field="prompt")
        if any(not 0 <= t < self.vocab_size for t in prompt):
            raise AthanorError("prompt token ids must be in the vocabulary", field="prompt")
        if len(prompt) >= self.max_len:
            raise AthanorError(f"the prompt has {len(prompt)} tokens; this model's context is {self.max_len} "
                               f"(at least one position must remain to generate)", field="prompt")
        req = Request(next(self._ids), prompt, params, on_event, t_submit=time.perf_counter())
        if params.seed is not None:
            req._generator = torch.Generator(device=self.device)
            req._generator.manual_seed(params.seed)
        with self._cv:
            self._waiting.append(req)
            self.stats.requests += 1
            self._cv.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request (a client went away); its slot is freed before the next step."""
        with self._cv:
            req.cancelled = True
            self._cv.notify()

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
                 ) -> list[Request]:
        """Run prompts to completion on the calling thread (tests, benchmarks, the speedrun)."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        reqs = [self.submit(p, sp) for p, sp in zip(prompts, plist, strict=True)]
        while not all(r.done for r in reqs):
            self.step()
        return reqs

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.slot_req)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # -- the background loop (server) ----------------------------------------------------------
    def start(self) -> None:
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="athanor-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._waiting and not self.active:
                    self._cv.wait()
                if self._stop:
                    return
            self.step()

    # -- one scheduling iteration --------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        """Free cancelled requests, prefill waiting ones into free slots, then one decode step."""
        for req in self.slot_req:
            if req is not None and req.cancelled:
                self._finish(req, "cancelled")
        while True:
            with self._cv:
                while self._waiting and self._waiting[0].cancelled:
                    self._finish(self._waiting.popleft(), "cancelled")
                if not self._waiting or self.active == self.max_batch:
                    break
                req = self._waiting.popleft()
            self._prefill(req)
        rows = [s for s, r in enumerate(self.slot_req) if r is not None]
        if rows:
            self._decode(rows)

    def _choose_slot(self, req: Request) -> tuple[int, int]:
        """A free slot and how many leading prompt tokens' keys/values it can reuse."""
        free = [s for s, r in enumerate(self.slot_req) if r is None]
        limit = 0 if req.params.prompt_logprobs is not None else len(req.prompt_ids) - 1  # >= 1 token to run
        best, best_len = free[0], 0
        for s in range(self.max_batch):
            n = _common_prefix(self.slot_tokens[s], req.prompt_ids, limit)
            if n > best_len:
                best, best_len = s, n
        if best_len and self.slot_req[best] is not None:
            # The prefix lives in a busy slot: copy its keys/values into a free one.
            src, best = best, free[0]
            self.cache.k[:, best, :, :best_len] = self.cache.k[:, src, :, :best_len]
            self.cache.v[:, best, :, :best_len] = self.cache.v[:, src, :, :best_len]
        return best, best_len

    def _prefill(self, req: Request) -> None:
        t0 = time.perf_counter()
        slot, reuse = self._choose_slot(req)
        req._slot, req.cached_tokens = slot, reuse
        self.slot_req[slot] = req
        ids = torch.tensor([req.prompt_ids[reuse:]], device=self.device)
        logits = self.model(ids, reuse, self.cache.select([slot]))[0]  # (T, V)
        self.slot_tokens[slot] = list(req.prompt_ids)
        if req.params.prompt_logprobs is not None:
            lp = torch.log_softmax(logits[:-1].float(), -1)
            req.prompt_logprobs = [None] + _token_logprobs(lp, req.prompt_ids[1:], req.params.prompt_logprobs)
        if req.params.needs_counts:
            req._seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
            req._seen[torch.tensor(req.prompt_ids, device=self.device)] = True
            req._counts = torch.zeros(self.vocab_size, device=self.device)
        self.stats.prompt_tokens += len(req.prompt_ids)
        self.stats.cached_prompt_tokens += reuse
        if req.params.max_tokens == 0:
            self._finish(req, "length")
        else:
            self._accept(req, logits[-1])
        req.t_first = time.perf_counter()
        self.stats.ttft_seconds_sum += req.t_first - req.t_submit
        self.stats.prefill_seconds += req.t_first - t0

    def _decode(self, rows: list[int]) -> None:
        t0 = time.perf_counter()
        reqs = [self.slot_req[s] for s in rows]
        ids = torch.tensor([[r.output_ids[-1]] for r in reqs], device=self.device)
        start = torch.tensor([len(self.slot_tokens[s]) for s in rows], device=self.device)
        logits = self.model(ids, start, self.cache.select(rows))[:, -1]
        for s, req, row in zip(rows, reqs, logits, strict=True):
            self.slot_tokens[s].append(req.output_ids[-1])
            self._accept(req, row)
        self.stats.decode_seconds += time.perf_counter() - t0
        self.stats.decode_steps += 1

    # -- a sampled token ----------------------------------------------------------------------
    def _accept(self, req: Request, logits: torch.Tensor) -> None:
        """Sample the next token from one row of raw logits and update the request."""
        p = req.params
        shaped = apply_penalties(logits.float(), p, req._seen, req._counts) if p.needs_counts or p.logit_bias \
            else logits
        token = int(sample_next(shaped[None], p.temperature, p.top_k, p.top_p, req._generator, p.min_p)[0])
        if token in p.stop_ids:
            self._finish(req, "stop")
            return
        if p.logprobs is not None:
            req.output_logprobs += _token_logprobs(torch.log_softmax(logits.float(), -1)[None], [token], p.logprobs)
        req.output_ids.append(token)
        self.stats.generated_tokens += 1
        if req._counts is not None:
            req._counts[token] += 1
            req._seen[token] = True
        if self.decode_fn is not None:
            req.text = self.decode_fn(req.output_ids)
            cut = min((i for i in (req.text.find(s) for s in p.stop) if i >= 0), default=-1)
            if cut >= 0:
                req.text = req.text[:cut]
                self._finish(req, "stop", last_tokens=1)
                return
        if len(req.output_ids) >= p.max_tokens or len(self.slot_tokens[req._slot]) >= self.max_len:
            self._finish(req, "length", last_tokens=1)
            return
        self._emit(req, 1, finished=False)

    def _emit(self, req: Request, n_tokens: int, finished: bool) -> None:
        if req.on_event is None:
            req._emitted = len(req.text)
            return
        end = len(req.text) if finished else _safe_end(req.text, req.params.stop)
        text, req._emitted = req.text[req._emitted:end], max(req._emitted, end)
        req.on_event(Event(req, req.output_ids[len(req.output_ids) - n_tokens:] if n_tokens else [],
                           req.output_logprobs[len(req.output_logprobs) - n_tokens:] if n_tokens and
                           req.params.logprobs is not None else [], text, finished))

    def _finish(self, req: Request, reason: str, last_tokens: int = 0) -> None:
        req.finish_reason = reason
        req.t_done = time.perf_counter()
        if req._slot is not None:
            self.slot_req[req._slot] = None
        self.stats.finished += 1
        self._emit(req, last_tokens, finished=True)


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    for x, y in zip(a, b[:limit], strict=False):
        if x != y:
            break
        n += 1
    return n


def _token_logprobs(logprobs: torch.Tensor, tokens: Sequence[int], k: int) -> list[TokenLogprob]:
    """Each row's log-prob of its token and the row's k likeliest alternatives."""
    chosen = logprobs[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()
    if k:
        top_v, top_i = logprobs.topk(k, dim=-1)
        tops = [list(zip(i, v, strict=True)) for i, v in zip(top_i.tolist(), top_v.tolist(), strict=True)]
    else:
        tops = [[] for _ in tokens]
    return [TokenLogprob(t, c, top) for t, c, top in zip(tokens, chosen, tops, strict=True)]


def _safe_end(text: str, stops: Sequence[str]) -> int:
    """How much of `text` can be shown while streaming: hold back a tail that may still grow
    into a stop string, and an incomplete UTF-8 sequence (decoded as U+FFFD)."""
    end = len(text)
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                end = min(end, len(text) - k)
                break
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    return end
