"""Elementwise parts of the Llama block with hand-derived backward passes.

Eager autograd runs every elementwise op as its own pass over memory, keeps the inputs of each
op for backward, and turns slicing and concatenation into zero-fill + copy passes in backward.
At the CPU speedrun's shape the step is bound by its matrix products, and these memory-bound
passes were most of the rest. Each function below computes the same values as the plain PyTorch
expression named in its docstring, but saves fewer tensors and makes fewer passes:

- `rms_norm`: torch's RMSNorm backward on CPU is a chain of ~10 autograd ops; here it is
  d_x = rstd * (g*w - x̂ * mean(g*w * x̂)) and d_w = sum(g * x̂), from the saved x̂ and rstd.
- `rotary_qkv`: splits the fused q|k|v projection output into heads and rotates q and k in one
  go; the backward is the inverse rotation, written straight into one q|k|v gradient buffer.
- `swiglu`: silu(gate) * up on the fused gate|up projection output; the backward writes both
  halves of one gradient buffer (no concatenation).

All are device- and dtype-generic (they use only tensor ops), so they run under CUDA autocast.
Under `torch.compile` each function returns its plain expression instead: the compiler fuses
that itself, and Dynamo cannot trace writes into strided `out=` views (a graph break).
The tests compare each with its plain autograd expression in float64 (tests/test_fused.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd import Function


class _RMSNorm(Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        # One reading pass for the norm (no squared temporary): mean(x^2) = |x|^2 / d.
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        rstd = torch.rsqrt(norm.square_().div_(x.shape[-1]).add_(eps))
        x_hat = x * rstd
        ctx.save_for_backward(x_hat, rstd, weight)
        return x_hat * weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x_hat, rstd, weight = ctx.saved_tensors
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad * x_hat).reshape(-1, x_hat.shape[-1]).sum(0)
        gw = grad * weight
        # d x = rstd * (g w - x_hat * mean(g w x_hat)): the projection removes the part of the
        # gradient that only rescales x, to which the normalized output is blind.
        c = torch.linalg.vecdot(gw, x_hat).unsqueeze_(-1).div_(x_hat.shape[-1])
        grad_x = gw.addcmul_(x_hat, c, value=-1).mul_(rstd)
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`F.rms_norm(x, (d,), weight, eps)` with a fused backward."""
    if torch.compiler.is_compiling():
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return _RMSNorm.apply(x, weight, eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, plainly: x * cos + rotate_half(x) * sin (transformers' convention)."""
    return x * cos + rotate_half(x) * sin


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor) -> None:
    """out = x * cos + roll(x, d/2) * sin: with `sin` = [-sin, sin] over the two halves this is
    "rotate half" (dims i and i + d/2 pair), `apply_rope` above; full-width ops on
    contiguous rows run faster than ops on strided half-rows, even with the rolled copy."""
    torch.mul(x, cos, out=out).addcmul_(x.roll(x.shape[-1] // 2, -1), sin)


class _RotaryQKV(Function):
    @staticmethod
    def forward(ctx, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,  # type: ignore[override]
                n_q: int, n_kv: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = qkv.shape[-1] // 2
        sin = torch.cat([-sin[..., :h], sin[..., h:]], dim=-1)
        ctx.save_for_backward(cos, sin)
        ctx.n_q, ctx.n_kv = n_q, n_kv
        out = torch.empty_like(qkv)
        _rotate(qkv[:, :, :n_q + n_kv], cos, sin, out[:, :, :n_q + n_kv])
        out[:, :, n_q + n_kv:] = qkv[:, :, n_q + n_kv:]
        return out[:, :, :n_q], out[:, :, n_q:n_q + n_kv], out[:, :, n_q + n_kv:]

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        n_q, n_kv = ctx.n_q, ctx.n_kv
        B, T, _, hd = grad_q.shape
        grad = grad_q.new_empty(B, T, n_q + 2 * n_kv, hd)
        # A rotation's transpose is the rotation by the opposite angle: the same with -sin.
        _rotate(grad_q, cos, -sin, grad[:, :, :n_q])
        _rotate(grad_k, cos, -sin, grad[:, :, n_q:n_q + n_kv])
        grad[:, :, n_q + n_kv:] = grad_v
        return grad, None, None, None, None


def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_q: int,
               n_kv: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of shape (B, T, heads, head_dim) from `qkv` (B, T, n_q + 2 n_kv, head_dim), with
    rotary embeddings applied to q and k: `apply_rope(q, cos, sin)` etc. of model/llama.py.
    `cos`/`sin` (..., T, 1, head_dim) broadcast over batch and heads."""
    if torch.compiler.is_compiling():
        q, k, v = qkv.split([n_q, n_kv, n_kv], dim=2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v
    return _RotaryQKV.apply(qkv, cos, sin, n_q, n_kv)


class _SwiGLU(Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(gate_up, act)
        return act * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        gate_up, act = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        grad_gate_up = torch.empty_like(gate_up)
        grad_gate, grad_up = grad_gate_up.chunk(2, dim=-1)
        torch.mul(grad, act, out=grad_up)
        torch.mul(grad, up, out=grad_gate)
        torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)  # *= silu'(gate)
        return grad_gate_up


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """`F.silu(gate) * up` where `gate, up = gate_up.chunk(2, -1)`."""
    if torch.compiler.is_compiling():
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    return _SwiGLU.apply(gate_up)
