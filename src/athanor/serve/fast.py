"""An inference-only forward pass over a `LlamaModel`'s weights with fewer operations per token.

Decoding a few-million-parameter model one token at a time on a CPU is bound by per-operation
overhead (dispatch, allocation, module calls), not arithmetic: an eager step runs ~35 PyTorch
operations per layer. This forward computes the same function with ~15. The layer's math is the
model's own, model/block.py's `decoder_layer`; what differs is what it is given here:
- q, k and v come from one matrix product with the three weights stacked (built once here), and
  likewise SwiGLU's gate and up projections; every matrix is stored transposed, (in, out), which
  the CPU's matrix product runs faster for a few rows (see `_linear`);
- rotary embeddings rotate q and k together, and "rotate half" becomes a roll by half a head
  with the sign folded into the sine table: rotate_half(x) * sin == roll(x, hd/2) * [-sin1, sin2]
  (negation is exact, so the rotated term equals the reference's bit for bit);
- no `nn.Module` calls, no dtype round trips; RMSNorm is one `F.rms_norm` (`FAST_KERNELS`).

A compiled FastForward (`fast_forward(model, compile=True)`) adds compiled steps for new tokens
after >= 2 cached ones, which fuse the elementwise work between the matrix products into generated
C++ kernels:
- batch 1: one new token (a decode step) and a dynamic number of them (2-16: speculative
  verification, a prompt's short tail after a reused prefix), one graph each for every position;
- greedy chains (`greedy_chain`): several decode steps in one call, each fed the previous one's
  argmax inside the graph; greedy decoding runs two per call (half the calls and the Python
  around them, 4-9 % per token in two A/B runs; the engine keeps the second token only if it is
  the one it picked);
- all rows of an engine's cache at once, each at its own position (`decode_rows`: continuous
  batching);
- a whole greedy speculative round (`greedy_round`): a draft's k proposals and this model's
  verification of them, one call instead of k + 1.
Each reads the cache as a view of dynamic length, returns the new keys and values and stores them
outside the graph (a graph that writes into the cache would copy the whole cache each step), and
attends to the new keys by themselves: softmax over [q.K_cache, q.K_new], causal within the new
ones. The graphs are exported (`torch.export`) and compiled ahead of time by AOTInductor, and
called through its C++ runner: a `torch.compile`d function pays dynamo's guard check and the AOT
runtime wrappers in Python on every call, which at ~1 ms per token was a quarter of the step (A/B
in one process: 1.12 vs 0.83 ms; BENCHMARKS.md).
The price: ~10-25 s of export and C++ compilation per graph, on its first use in every new process
(AOTInductor's output is not reused across processes here), and each graph holds its own copy of
the weights as constants.

The model keeps its own parameters (names, HF parity and training are untouched); the stacked,
transposed copies take as much memory again as the model's matrices and are built from the
weights as they are at construction: `fast_forward(model)` gives a cached one, rebuilt when a parameter changed.
"""

from __future__ import annotations

import functools
import math
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from athanor.model.block import Attend, Kernels, decoder_layer, sdpa_layers
from athanor.model.llama import (
    DecoderLayer,
    KVCache,
    LlamaModel,
    ModelConfig,
    RMSNorm,
    stacked_weights,
    weights_version,
)

# The compiled step serves decoding and speculative verification: a few new tokens. Its attention
# (multiply-and-sum loops, see _decode_step) is not meant for long chunks; those run eagerly.
COMPILED_MAX_NEW = 16


class FastForward:
    def __init__(self, model: LlamaModel, compiled: bool = False) -> None:
        c = self.config = model.config
        self.n_heads, self.n_kv, self.hd = c.num_attention_heads, c.num_key_value_heads, c.dim_per_head
        self.eps = c.rms_norm_eps
        self.max_pos = c.max_position_embeddings
        half = self.hd // 2
        # (positions, head_dim); the sine's sign for "rotate half" folded in (see `_rope`).
        self.cos = model.rope_cos.clone()
        self.sin = torch.cat([-model.rope_sin[:, :half], model.rope_sin[:, half:]], -1)
        with torch.no_grad():
            self.layers = [_Layer(layer) for layer in model.model.layers]
            self.head = _t(model.lm_head.weight)
        self.embed, self.norm = model.model.embed_tokens.weight, model.model.norm.weight
        self.compiled = compiled
        # AOTInductor runners by (graph, see `_Step`; the cache views' strides, which depend on the
        # cache's shape and the generated code takes as fixed; the draft of a round graph).
        self._runners: dict[tuple, torch._C._aoti.AOTIModelPackageLoader] = {}
        self.compile_seconds: float | None = None  # exporting and compiling the graphs, all together

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, start_pos: int | torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, T, V) for `input_ids` at positions [start_pos, start_pos + T); `cache` receives the
        keys/values. As in the model, `start_pos` is one int or a (B,) tensor of per-row starts."""
        B, T = input_ids.shape
        per_row = isinstance(start_pos, torch.Tensor)
        end = int(start_pos.max()) + T if per_row else start_pos + T
        if end > self.max_pos:
            raise ValueError(f"positions up to {end} exceed max_position_embeddings = {self.max_pos}")
        # Dynamic sizes of 0 or 1 would be specialized (a recompile): short prefixes run eagerly.
        if self.compiled and B == 1 and T <= COMPILED_MAX_NEW and not per_row and start_pos >= 2 \
                and isinstance(cache.rows, slice):
            return self._compiled_step("one" if T == 1 else "few", [input_ids], start_pos, cache)[0]
        x = sdpa_layers(F.embedding(input_ids, self.embed), self.layers, self.config, FAST_KERNELS,
                        self.cos, self.sin, start_pos, cache, None)
        return _linear(F.rms_norm(x, (x.shape[-1],), self.norm, self.eps), self.head)

    @torch.no_grad()
    def greedy_chain(self, token: int, start_pos: int, cache: KVCache, steps: int
                     ) -> tuple[torch.Tensor, list[int]] | None:
        """`steps` greedy decode steps in one compiled call: the first for `token` at `start_pos`,
        each later one fed the previous step's argmax inside the graph. Returns each step's logits
        (1, steps, V) and the argmaxes; `cache` (one row) receives the keys/values of the `steps`
        positions fed. None where no compiled graph applies. Greedy decoding takes two tokens per
        call: half the calls and the Python around them."""
        if not self.compiled or not 2 <= start_pos <= min(self.max_pos, cache.max_len) - steps \
                or not isinstance(cache.rows, slice) or len(range(cache.k.shape[1])[cache.rows]) != 1:
            return None
        ids = torch.tensor([[token]], device=cache.k.device)
        logits, picks = self._compiled_step(f"chain{steps}", [ids], start_pos, cache)
        return logits, picks.tolist()

    @torch.no_grad()
    def greedy_round(self, draft: FastForward, seq: list[int], cache: KVCache, draft_cache: KVCache, k: int
                     ) -> tuple[list[int], list[int]] | None:
        """A greedy speculative round (see speculative.py) in one compiled call: `draft` proposes k
        tokens, fed the last two of `seq` (`_greedy_chain`), and this model scores the last token of
        `seq` and the k proposals in one step. This model's cache must hold seq[:-1] and the
        draft's at least seq[:-2]; both receive the keys/values of the positions fed. Returns the
        proposals and this model's argmax at each of the k + 1 positions; None where no compiled
        graph applies. One call instead of k + 1 and the Python between them: 0.2-0.3 ms of a
        ~2.2 ms round of the speedrun's pair."""
        S = len(seq)
        if not (self.compiled and draft.compiled) or S < 4 or S + k > min(self.max_pos, cache.max_len) \
                or S + k > min(draft.max_pos, draft_cache.max_len) \
                or not isinstance(cache.rows, slice) or not isinstance(draft_cache.rows, slice):
            return None
        device = cache.k.device
        args = [torch.tensor([seq[-2:]], device=device), torch.tensor([seq[-1:]], device=device),
                *_views(draft_cache, S - 2), *_views(cache, S - 1)]

        def dims() -> tuple:
            return {}, {}, *draft._cache_dims("draft_cached", draft_cache.max_len), \
                *self._cache_dims("cached", cache.max_len)

        picks, best, dk, dv, k_new, v_new = self._runner(f"round{k}", args, dims, draft).run(args)
        _store(draft_cache, S - 2, dk, dv)
        _store(cache, S - 1, k_new, v_new)
        return picks.tolist(), best.tolist()

    @torch.no_grad()
    def decode_rows(self, tokens: list[int], positions: list[int], rows: list[int], cache: KVCache
                    ) -> torch.Tensor | None:
        """One decode step for the requests in cache rows `rows` (of a whole cache, not a view), each
        feeding its token in `tokens` at its own position: logits (len(rows), V), and the cache rows
        receive the keys/values. The compiled graph runs every row of the cache (rows not asked for
        feed token 0 at position 0, and their results are dropped, their cache left as it is): one
        graph with static shapes serves any set of active rows, and a decode step of this size
        costs about the same for 8 rows as for 2. None where no compiled graph applies."""
        B = cache.k.shape[1]
        L = max(positions)
        if not self.compiled or len(rows) < 2 or cache.rows != slice(None) or not 2 <= L < cache.max_len \
                or L >= self.max_pos:
            return None
        ids, lengths = [0] * B, [0] * B
        for r, t, n in zip(rows, tokens, positions, strict=True):
            ids[r], lengths[r] = t, n
        device = cache.k.device
        args = [torch.tensor(ids, device=device)[:, None], torch.tensor(lengths, device=device), *_views(cache, L)]

        def dims() -> tuple:
            return {}, {}, *self._cache_dims("cached", cache.max_len)

        logits, k, v = self._runner("rows", args, dims).run(args)
        r, n = torch.tensor(rows, device=device), args[1][rows]
        # Advanced indices on the batch and time axes put the rows first: (rows, layers, kv_heads, head_dim).
        cache.k[:, r, :, n] = k[:, r, :, 0].transpose(0, 1)
        cache.v[:, r, :, n] = v[:, r, :, 0].transpose(0, 1)
        return logits[r, 0]

    def _compiled_step(self, graph: str, inputs: list[torch.Tensor], start_pos: int, cache: KVCache
                       ) -> list[torch.Tensor]:
        """Run a batch-1 graph on `inputs` after the cached positions [0, start_pos) of `cache`'s
        row, and store the new keys/values it returns; its other outputs."""
        args = [*inputs, *_views(cache, start_pos)]  # the graph reads its position off the views' length

        def dims() -> tuple:
            new = {1: torch.export.Dim("new", min=2, max=COMPILED_MAX_NEW)} if graph == "few" else {}
            return new, *self._cache_dims("cached", cache.max_len)

        *out, k, v = self._runner(graph, args, dims).run(args)
        _store(cache, start_pos, k, v)
        return out

    def _cache_dims(self, name: str, max_len: int) -> tuple[dict[int, torch.export.Dim], ...]:
        """The dynamic length of a cache's key and value views: below the cache's `max_len` (a view
        of all of it would be contiguous, a case the graph would otherwise branch on)."""
        length = torch.export.Dim(name, min=2, max=min(self.max_pos, max_len) - 1)
        return {3: length}, {3: length}

    def _runner(self, graph: str, args: list[torch.Tensor], dynamic: Callable[[], tuple],
                draft: FastForward | None = None) -> torch._C._aoti.AOTIModelPackageLoader:
        """The compiled graph for `args`, built on first use (`dynamic()` gives the export's dynamic
        shapes, made only then); keyed by the graph, the strides of the
        cache views (the generated code takes them as fixed) and the draft it runs, if any. Callers
        use the loader's own `run`: AOTICompiledModel.__call__ would re-parse its pytree specs on
        every call (~60 us of a ~0.9 ms step)."""
        key = (graph, tuple(a.stride() for a in args if a.dim() == 5), draft)
        if key not in self._runners:
            if draft is not None:  # round graphs hold a draft's weights: keep those of the newest draft only
                self._runners = {k: r for k, r in self._runners.items() if k[2] is None or k[2] is draft}
            t = time.perf_counter()
            with torch.no_grad():  # forward(*args): its dynamic shapes are one tuple
                program = torch.export.export(_Step(self, graph, draft), tuple(args), dynamic_shapes=(dynamic(),))
            with tempfile.TemporaryDirectory() as tmp:
                path = torch._inductor.aoti_compile_and_package(program, package_path=str(Path(tmp) / "step.pt2"))
                self._runners[key] = torch._inductor.aoti_load_package(path).loader
            self.compile_seconds = (self.compile_seconds or 0.0) + time.perf_counter() - t
        return self._runners[key]

    def _greedy_chain(self, ids: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, steps: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`_decode_step` for `ids`, then `steps - 1` times for the previous step's argmax, each
        attending to the keys/values of the steps before it. Returns each step's last logits
        (1, steps, V), the argmaxes (steps,) and the keys/values of all positions fed."""
        logits, k, v = self._decode_step(ids, kc, vc)
        last, picks = [logits[:, -1]], [logits[0, -1].argmax()]
        for _ in range(steps - 1):
            logits, k2, v2 = self._decode_step(picks[-1].view(1, 1), kc, vc, earlier=(k, v))
            k, v = torch.cat([k, k2], 3), torch.cat([v, v2], 3)
            last.append(logits[:, -1])
            picks.append(logits[0, -1].argmax())
        return torch.stack(last, 1), torch.stack(picks), k, v

    def _decode_step(self, ids: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, lengths: torch.Tensor | None = None,
                     earlier: tuple[torch.Tensor, torch.Tensor] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """T new tokens per row (ids (B, T)) after cached keys/values kc, vc (layers, B, kv_heads, L,
        head_dim), read only, and the keys/values `earlier` of positions right after them that are
        not in the cache yet (the same layout): the new tokens sit at positions L + E .. L + E + T - 1,
        or, given per-row `lengths` (B,), row b's at lengths[b] .. and it sees only its first
        lengths[b] cached keys. Returns the logits (B, T, V) and the new keys/values
        (layers, B, kv_heads, T, head_dim)."""
        H, Hkv, hd = self.n_heads, self.n_kv, self.hd
        (B, T), G = ids.shape, H // Hkv
        keys, values = ([kc], [vc]) if earlier is None else ([kc, earlier[0]], [vc, earlier[1]])
        L = sum(k.shape[3] for k in keys)
        # Gathered rather than sliced: a slice would end at min(L + T, max_pos), a bound that export
        # would have to prove for every L and T.
        positions = torch.arange(T, device=ids.device) + (L if lengths is None else lengths[:, None])
        cos, sin = self.cos[positions][..., None, :], self.sin[positions][..., None, :]  # (T, 1, hd) or (B, T, 1, hd)
        # New token i sees the cached keys (a row's first lengths[b]) and new tokens j <= i.
        future = torch.ones(T, T, dtype=torch.bool, device=ids.device).triu(1) if T > 1 else None
        unwritten = None if lengths is None else \
            (torch.arange(kc.shape[3], device=ids.device) >= lengths[:, None])[:, None, None, None]
        ks, vs = [], []

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # Grouped-query attention: the G query heads of a group share one k/v head.
            q = q.view(B, T, Hkv, G, hd).permute(0, 2, 3, 1, 4) * (1 / math.sqrt(hd))  # (B, Hkv, G, T, hd)
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, Hkv, T, hd)
            # Products as multiply-and-sum, which inductor fuses into its own loops: a few query rows
            # against <= 512 keys is too small for a matrix-product call (~30 us each, 8 per step).
            new = _dot(q, k[:, :, None])
            if future is not None:
                new = new.masked_fill(future, float("-inf"))
            old = [_dot(q, kk[i][:, :, None]) for kk in keys]
            if unwritten is not None:
                old[0] = old[0].masked_fill(unwritten, float("-inf"))
            p = torch.cat([*old, new], -1).softmax(-1)
            y, at = _mix(p[..., L:], v[:, :, None]), 0  # (B, Hkv, G, T, hd)
            for kk, vv in zip(keys, values, strict=True):
                y, at = y + _mix(p[..., at:at + kk.shape[3]], vv[i][:, :, None]), at + kk.shape[3]
            ks.append(k)
            vs.append(v)
            return y.permute(0, 3, 1, 2, 4).reshape(B, T, H * hd)

        x = F.embedding(ids, self.embed)  # (B, T, d)
        for i, layer in enumerate(self.layers):
            x = layer(x, self.config, FAST_KERNELS, cos, sin, functools.partial(attend, i))
        logits = _linear(F.rms_norm(x, (x.shape[-1],), self.norm, self.eps), self.head)
        return logits, torch.stack(ks), torch.stack(vs)


class _Layer:
    """A layer's weights as model/block.py's `LayerParts`, copied once: q|k|v and gate|up stacked
    into one matrix each, every matrix stored transposed (see `_linear`)."""

    def __init__(self, layer: DecoderLayer) -> None:
        a, m = layer.self_attn, layer.mlp
        w_qkv, self.b_qkv = stacked_weights((a.q_proj, a.k_proj, a.v_proj))
        self.w_qkv, self.w_o, self.b_o = _t(w_qkv), _t(a.o_proj.weight), a.o_proj.bias
        self.w_gate_up, self.w_down = _t(stacked_weights((m.gate_proj, m.up_proj))[0]), _t(m.down_proj.weight)
        self.input_norm, self.post_norm, self.q_norm, self.k_norm = \
            layer.input_norm, layer.post_norm, layer.q_norm, layer.k_norm

    def __call__(self, x: torch.Tensor, config: ModelConfig, kernels: Kernels, cos: torch.Tensor,
                 sin: torch.Tensor, attend: Attend) -> torch.Tensor:
        return decoder_layer(x, self, config, kernels, cos, sin, attend)

    def qkv(self, h: torch.Tensor) -> torch.Tensor:
        return _linear(h, self.w_qkv, self.b_qkv)

    def o(self, y: torch.Tensor) -> torch.Tensor:
        return _linear(y, self.w_o, self.b_o)

    def gate_up(self, h: torch.Tensor) -> torch.Tensor:
        return _linear(h, self.w_gate_up)

    def down(self, h: torch.Tensor) -> torch.Tensor:
        return _linear(h, self.w_down)


def _rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_q: int, n_kv: int
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q and k rotated together; "rotate half" as a roll by half a head with the sine's sign folded
    into the table: rotate_half(x) * sin == roll(x, hd/2) * [-sin1, sin2]."""
    qk = qkv[..., :n_q + n_kv, :]
    qk = torch.addcmul(qk * cos, qk.roll(qkv.shape[-1] // 2, -1), sin)
    return qk[..., :n_q, :], qk[..., n_q:, :], qkv[..., n_q + n_kv:, :]


def _swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, -1)
    return F.silu(gate) * up


# The inference kernels (see model/block.py): plain ops, the fewest dispatches, fp32 only.
FAST_KERNELS = Kernels(norm=F.rms_norm, rope=_rope, swiglu=_swiglu)


class _Step(torch.nn.Module):
    """A compiled graph as a module, for `torch.export` (its weights become the program's
    constants): "one" or "few" new tokens (`_decode_step`), "chain{steps}" (`_greedy_chain`),
    "rows" (`_decode_step` with per-row positions, whose lengths come before the cache), or
    "round{k}" (`greedy_round`: the draft's chain, then this model's step over its proposals)."""

    def __init__(self, fast: FastForward, graph: str, draft: FastForward | None = None) -> None:
        super().__init__()
        self.fast, self.graph, self.draft = fast, graph, draft

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.graph.startswith("chain"):
            return self.fast._greedy_chain(*args, steps=int(self.graph[len("chain"):]))
        if self.graph == "rows":
            ids, lengths, kc, vc = args
            return self.fast._decode_step(ids, kc, vc, lengths)
        if self.graph.startswith("round"):
            draft_ids, last, dkc, dvc, kc, vc = args
            k = int(self.graph[len("round"):])
            _, picks, dk, dv = self.draft._greedy_chain(draft_ids, dkc, dvc, k)
            logits, k_new, v_new = self.fast._decode_step(torch.cat([last, picks.view(1, k)], 1), kc, vc)
            return picks, logits[0].argmax(-1), dk, dv, k_new, v_new
        return self.fast._decode_step(*args)


def _views(cache: KVCache, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values of `cache`'s rows at positions [0, length): views, no copies."""
    return cache.k[:, cache.rows, :, :length], cache.v[:, cache.rows, :, :length]


def _store(cache: KVCache, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write a graph's new keys/values (layers, rows, kv_heads, T, head_dim) at positions start.. of
    `cache`'s rows: outside the graph, which would otherwise copy the whole cache each step."""
    cache.k[:, cache.rows, :, start:start + k.shape[3]] = k
    cache.v[:, cache.rows, :, start:start + k.shape[3]] = v


def _dot(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q @ k^T for q (..., T, hd), k (..., L, hd): (..., T, L)."""
    return (q[..., :, None, :] * k[..., None, :, :]).sum(-1)


def _mix(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """p @ v for p (..., T, L), v (..., L, hd): (..., T, hd)."""
    return (p[..., :, :, None] * v[..., None, :, :]).sum(-2)


def _t(w: torch.Tensor) -> torch.Tensor:
    """A weight (out, in) stored as (in, out), contiguous: see `_linear`."""
    return w.detach().t().contiguous()


def _linear(x: torch.Tensor, w_t: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ b) for a weight stored transposed. Measured on this CPU (1 thread, weights read
    from L3 as in a decode step), the vocabulary head (4096 x 256) for 4 rows: 290 us through
    `F.linear`, 205 us as x @ W^T-stored-(in, out); for 8 rows 415 vs 191 us; the same for 1 row
    and for long prompts. The few-row products are what speculative verification and a batch of
    decode streams run."""
    y = x @ w_t
    return y if b is None else y + b


# Per model, per mode (eager, compiled): (parameter versions it was built from, the FastForward).
_built: weakref.WeakKeyDictionary[LlamaModel, dict[bool, tuple[list[tuple[int, int]], FastForward]]] = \
    weakref.WeakKeyDictionary()


def fast_forward(model: LlamaModel, compile: bool = False) -> FastForward | None:
    """`model`'s FastForward, built on first use and again once any parameter was replaced (its
    storage moved) or modified in place (its version counter: an optimizer step or `load_state_dict`
    bumps it); None for a model that is not fp32, whose reference forward normalizes in fp32 and
    casts back, and for one whose layers are more than their weights (quantized, LoRA): the copies
    made here would run the dequantized or base weights instead of the model's own modules.
    `compile` gives the one with compiled steps after a cached prefix (one request, all rows of an
    engine's cache, greedy chains and speculative rounds; each compiled on first use: ~10-25 s per
    graph on this CPU, in every new process); the eager one stays eager for other callers."""
    if next(model.parameters()).dtype != torch.float32 or not _plain_layers(model):
        return None
    versions = weights_version(model)
    modes = _built.setdefault(model, {})
    if compile not in modes or modes[compile][0] != versions:
        modes[compile] = (versions, FastForward(model, compiled=compile))
    return modes[compile][1]


def _plain_layers(model: LlamaModel) -> bool:
    """Whether every layer FastForward copies weights from is a plain `nn.Embedding` / `nn.Linear`."""
    linears = [model.lm_head] + [m for layer in model.model.layers
                                 for m in (*layer.self_attn.children(), *layer.mlp.children())
                                 if not isinstance(m, RMSNorm)]
    return type(model.model.embed_tokens) is nn.Embedding and all(type(m) is nn.Linear for m in linears)
