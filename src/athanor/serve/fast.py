"""An inference-only forward pass over a `LlamaModel`'s weights with fewer operations per token.

Decoding a few-million-parameter model one token at a time on a CPU is bound by per-operation
overhead (dispatch, allocation, module calls), not arithmetic: an eager step runs ~35 PyTorch
operations per layer. This forward computes the same function with ~15:
- q, k and v come from one matrix product with the three weights stacked (built once here), and
  likewise SwiGLU's gate and up projections; every matrix is stored transposed, (in, out), which
  the CPU's matrix product runs faster for a few rows (see `_linear`);
- rotary embeddings rotate q and k together, and "rotate half" becomes a roll by half a head
  with the sign folded into the sine table: rotate_half(x) * sin == roll(x, hd/2) * [-sin1, sin2]
  (negation is exact, so the rotated term equals the reference's bit for bit);
- no `nn.Module` calls, no dtype round trips; RMSNorm is one `F.rms_norm`.

A compiled FastForward (`fast_forward(model, compile=True)`) adds compiled batch-1 steps for new
tokens after >= 2 cached ones (one token: a decode step; a few: speculative verification and the
draft catching up), which fuse the
elementwise work between the matrix products into generated C++ kernels. Two graphs serve every
position and length: one new token, and a dynamic number of them (2-16). Each reads the cache as a view of
dynamic length, returns the new keys and values and stores them outside the graph (a graph that
writes into the cache would copy the whole cache each step), and attends to the new keys by
themselves: softmax over [q.K_cache, q.K_new], causal within the new ones. The graphs are exported
(`torch.export`) and compiled ahead of time by AOTInductor, and called through its C++ runner: a
`torch.compile`d function pays dynamo's guard check and the AOT runtime wrappers in Python on every
call, which at ~1 ms per token was a quarter of the step (A/B in one process: 1.12 vs 0.83 ms;
BENCHMARKS.md). For greedy decoding a third graph runs two steps per call, the second fed the
first's argmax inside the graph (`greedy_pair`): half the calls and Python around them, 4-9 % per
token in two A/B runs; the engine keeps the second token only if it is the one it picked.
The price: ~10-15 s of export and C++ compilation per graph in every new process (AOTInductor's
output is not reused across processes here), and each graph holds its own copy of the weights as
constants.

The model keeps its own parameters (names, HF parity and training are untouched); the stacked,
transposed copies take as much memory again as the model's matrices and are built from the
weights as they are at construction: `fast_forward(model)` gives a cached one, rebuilt when a parameter changed.
"""

from __future__ import annotations

import math
import tempfile
import time
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F

from athanor.model.llama import KVCache, LlamaModel, stacked_weights

# The compiled step serves decoding and speculative verification: a few new tokens. Its attention
# (multiply-and-sum loops, see _decode_step) is not meant for long chunks; those run eagerly.
COMPILED_MAX_NEW = 16


class FastForward:
    def __init__(self, model: LlamaModel, compiled: bool = False) -> None:
        c = model.config
        self.n_heads, self.n_kv, self.hd = c.num_attention_heads, c.num_key_value_heads, c.dim_per_head
        self.eps = c.rms_norm_eps
        self.max_pos = c.max_position_embeddings
        half = self.hd // 2
        # (positions, 1, head_dim): broadcasts over (batch, time, heads, head_dim).
        self.cos = model.rope_cos[:, None].clone()
        self.sin = torch.cat([-model.rope_sin[:, :half], model.rope_sin[:, half:]], -1)[:, None]
        self.layers = []
        with torch.no_grad():
            for layer in model.model.layers:
                a, m = layer.self_attn, layer.mlp
                w_qkv, b_qkv = stacked_weights((a.q_proj, a.k_proj, a.v_proj))
                w_gu, _ = stacked_weights((m.gate_proj, m.up_proj))
                self.layers.append((
                    layer.input_layernorm.weight, _t(w_qkv), b_qkv, _t(a.o_proj.weight), a.o_proj.bias,
                    layer.post_attention_layernorm.weight, _t(w_gu), _t(m.down_proj.weight),
                ))
            self.head = _t(model.lm_head.weight)
        self.embed, self.norm = model.model.embed_tokens.weight, model.model.norm.weight
        self.compiled = compiled
        # AOTInductor runners by (graph: "one" new token, a "few", a greedy "pair"; the cache views'
        # strides): the strides depend on the cache's max_len, which the generated code takes as fixed.
        self._runners: dict[tuple[str, tuple[int, ...]], torch._C._aoti.AOTIModelPackageLoader] = {}
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
            return self._compiled_step("one" if T == 1 else "few", input_ids, start_pos, cache)[0]
        H, Hkv, hd = self.n_heads, self.n_kv, self.hd
        d = self.embed.shape[1]
        mask = None
        if per_row:  # row b's query i sits at start_b + i and sees keys up to there
            pos = start_pos[:, None] + torch.arange(T, device=input_ids.device)  # (B, T)
            cos, sin = self.cos[pos], self.sin[pos]  # (B, T, 1, head_dim)
            mask = (torch.arange(end, device=input_ids.device) <= pos[..., None])[:, None]
        else:
            cos, sin = self.cos[start_pos:end], self.sin[start_pos:end]
            if start_pos > 0 and T > 1:  # new tokens see the cached prefix and, causally, each other
                pos = torch.arange(end, device=input_ids.device)
                mask = pos[None, :] <= pos[start_pos:, None]  # key j <= query position
        causal = mask is None and start_pos == 0 and T > 1
        gqa = H != Hkv
        x = F.embedding(input_ids, self.embed)
        for i, (ln1, w_qkv, b_qkv, w_o, b_o, ln2, w_gu, w_down) in enumerate(self.layers):
            qk, v = self._rotated_qkv(x, ln1, w_qkv, b_qkv, cos, sin)
            k, v = cache.update(i, qk[:, :, H:].transpose(1, 2), v.transpose(1, 2), start_pos)
            y = F.scaled_dot_product_attention(qk[:, :, :H].transpose(1, 2), k, v, attn_mask=mask, is_causal=causal,
                                               enable_gqa=gqa)
            x = x + _linear(y.transpose(1, 2).reshape(B, T, H * hd), w_o, b_o)
            x = self._mlp(x, ln2, w_gu, w_down)
        return _linear(F.rms_norm(x, (d,), self.norm, self.eps), self.head)

    def _rotated_qkv(self, x: torch.Tensor, ln1: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor | None,
                     cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention's inputs from the residual stream x (..., T, d): q|k with RoPE applied,
        (..., T, heads + kv_heads, head_dim), and v, (..., T, kv_heads, head_dim). Shared by the
        eager step and the compiled one."""
        H, Hkv, hd = self.n_heads, self.n_kv, self.hd
        qkv = _linear(F.rms_norm(x, (x.shape[-1],), ln1, self.eps), w_qkv, b_qkv).view(*x.shape[:-1], H + 2 * Hkv, hd)
        qk = qkv[..., :H + Hkv, :]
        return torch.addcmul(qk * cos, qk.roll(hd // 2, -1), sin), qkv[..., H + Hkv:, :]

    def _mlp(self, x: torch.Tensor, ln2: torch.Tensor, w_gu: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
        """The residual stream after the layer's SwiGLU block."""
        gate, up = _linear(F.rms_norm(x, (x.shape[-1],), ln2, self.eps), w_gu).chunk(2, -1)
        return x + _linear(F.silu(gate) * up, w_down)

    @torch.no_grad()
    def greedy_pair(self, token: torch.Tensor, start_pos: int, cache: KVCache) -> tuple[torch.Tensor, int] | None:
        """Two decode steps in one compiled call, the second fed the first's argmax: logits (1, 2, V)
        for `token` (1, 1) at `start_pos` and for that argmax after it, and the argmax; `cache` receives
        both positions. None where no compiled graph applies (then decode one step at a time).
        For greedy decoding: half the calls, and half the Python around them."""
        if not self.compiled or not 2 <= start_pos <= min(self.max_pos, cache.max_len) - 2 \
                or not isinstance(cache.rows, slice) or token.shape != (1, 1):
            return None
        logits, first = self._compiled_step("pair", token, start_pos, cache)
        return logits, int(first)

    def _compiled_step(self, graph: str, input_ids: torch.Tensor, start_pos: int, cache: KVCache
                       ) -> list[torch.Tensor]:
        kc, vc = cache.k[:, cache.rows, :, :start_pos], cache.v[:, cache.rows, :, :start_pos]
        args = [input_ids, kc, vc]  # the graph reads its position off the cache views' length
        key = (graph, kc.stride())
        runner = self._runners.get(key) or self._build(key, args, cache.max_len)
        # The loader's own entry point: AOTICompiledModel.__call__ would re-parse its pytree specs
        # on every call (~60 us of a ~0.9 ms step).
        *out, k, v = runner.run(args)
        end = start_pos + k.shape[3]
        cache.k[:, cache.rows, :, start_pos:end] = k
        cache.v[:, cache.rows, :, start_pos:end] = v
        return out

    def _build(self, key: tuple[str, tuple[int, ...]], args: list[torch.Tensor], max_len: int
               ) -> torch._C._aoti.AOTIModelPackageLoader:
        """Export `_decode_step` for one new token (static shapes), 2..COMPILED_MAX_NEW of them, or
        `_greedy_pair`, with the cache length dynamic (below the cache's `max_len`: a view of all of
        it would be contiguous, a case the graph would otherwise branch on), and compile it with
        AOTInductor."""
        t = time.perf_counter()
        cached = torch.export.Dim("cached", min=2, max=min(self.max_pos, max_len) - 1)
        new = {1: torch.export.Dim("new", min=2, max=COMPILED_MAX_NEW)} if key[0] == "few" else {}
        with torch.no_grad():
            program = torch.export.export(_Step(self, key[0] == "pair"), tuple(args),
                                          dynamic_shapes=(new, {3: cached}, {3: cached}))
        with tempfile.TemporaryDirectory() as tmp:
            path = torch._inductor.aoti_compile_and_package(program, package_path=str(Path(tmp) / "step.pt2"))
            runner = torch._inductor.aoti_load_package(path).loader
        self._runners[key] = runner
        self.compile_seconds = (self.compile_seconds or 0.0) + time.perf_counter() - t
        return runner

    def _greedy_pair(self, ids: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`_decode_step` for one token, then again for its logits' argmax, whose step attends to the
        first step's keys/values as well. Returns the logits (1, 2, V), the argmax (1,) and the keys
        and values of both positions."""
        logits, k, v = self._decode_step(ids, kc, vc)
        first = logits[0, 0].argmax()
        logits2, k2, v2 = self._decode_step(first.view(1, 1), kc, vc, (k, v))
        return torch.cat([logits, logits2], 1), first.view(1), torch.cat([k, k2], 3), torch.cat([v, v2], 3)

    def _decode_step(self, ids: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                     earlier: tuple[torch.Tensor, torch.Tensor] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """T new tokens (ids (1, T)) after cached keys/values kc, vc (layers, 1, kv_heads, L, head_dim),
        read only, and the keys/values `earlier` of positions right after them that are not in the
        cache yet (the same layout): the new tokens sit at positions L + E .. L + E + T - 1.
        Returns the logits (1, T, V) and the new keys/values (layers, 1, kv_heads, T, head_dim)."""
        H, Hkv, hd = self.n_heads, self.n_kv, self.hd
        G, T, d = H // Hkv, ids.shape[1], self.embed.shape[1]
        keys, values = ([kc], [vc]) if earlier is None else ([kc, earlier[0]], [vc, earlier[1]])
        L = sum(k.shape[3] for k in keys)
        # Gathered rather than sliced: a slice would end at min(L + T, max_pos), a bound that export
        # would have to prove for every L and T.
        positions = torch.arange(T, device=ids.device) + L
        cos, sin = self.cos.index_select(0, positions), self.sin.index_select(0, positions)  # (T, 1, hd)
        # New token i sees the cache and new tokens j <= i.
        future = torch.ones(T, T, dtype=torch.bool, device=ids.device).triu(1) if T > 1 else None
        x = F.embedding(ids[0], self.embed)  # (T, d)
        ks, vs = [], []
        for i, (ln1, w_qkv, b_qkv, w_o, b_o, ln2, w_gu, w_down) in enumerate(self.layers):
            qk, v = self._rotated_qkv(x, ln1, w_qkv, b_qkv, cos, sin)
            # Grouped-query attention: the G query heads of a group share one k/v head.
            q = qk[:, :H].view(T, Hkv, G, hd).permute(1, 2, 0, 3) * (1 / math.sqrt(hd))  # (Hkv, G, T, hd)
            k, v = qk[:, H:].transpose(0, 1)[:, None], v.transpose(0, 1)[:, None]  # (Hkv, 1, T, hd)
            # Products as multiply-and-sum, which inductor fuses into its own loops: a few query rows
            # against <= 512 keys is too small for a matrix-product call (~30 us each, 8 per step).
            new = _dot(q, k)
            if future is not None:
                new = new.masked_fill(future, float("-inf"))
            p = torch.cat([*(_dot(q, kk[i, 0, :, None]) for kk in keys), new], -1).softmax(-1)
            y, at = _mix(p[..., L:], v), 0  # (Hkv, G, T, hd)
            for kk, vv in zip(keys, values, strict=True):
                y, at = y + _mix(p[..., at:at + kk.shape[3]], vv[i, 0, :, None]), at + kk.shape[3]
            ks.append(k[:, 0])
            vs.append(v[:, 0])
            x = x + _linear(y.permute(2, 0, 1, 3).reshape(T, H * hd), w_o, b_o)
            x = self._mlp(x, ln2, w_gu, w_down)
        logits = _linear(F.rms_norm(x, (d,), self.norm, self.eps), self.head)
        return logits[None], torch.stack(ks)[:, None], torch.stack(vs)[:, None]


class _Step(torch.nn.Module):
    """`FastForward._decode_step` (or `_greedy_pair`) as a module, for `torch.export` (its weights
    become the program's constants)."""

    def __init__(self, fast: FastForward, pair: bool = False) -> None:
        super().__init__()
        self.fast, self.pair = fast, pair

    def forward(self, ids: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.fast._greedy_pair(ids, kc, vc) if self.pair else self.fast._decode_step(ids, kc, vc)


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
    casts back.
    `compile` gives the one whose batch-1 steps after a cached prefix run through compiled graphs
    (each compiled on first use: ~10-15 s per graph on this CPU, in every new process); the eager
    one stays eager for other callers."""
    if next(model.parameters()).dtype != torch.float32:
        return None
    versions = [(p.data_ptr(), p._version) for p in model.parameters()]
    modes = _built.setdefault(model, {})
    if compile not in modes or modes[compile][0] != versions:
        modes[compile] = (versions, FastForward(model, compiled=compile))
    return modes[compile][1]
