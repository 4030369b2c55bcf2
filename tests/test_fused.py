"""The hand-written backward passes of model/fused.py and linear_ce.py against plain autograd.

float64 on odd shapes (nothing a multiple of a vector width): values and gradients must equal
those of the plain PyTorch expression each function replaces, and pass torch's gradcheck.
Under CUDA (when present) the same comparisons run in bf16 autocast with a loose tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model_config
from torch import nn
from torch.autograd import gradcheck

from athanor.model.fused import rms_norm, rotary_qkv, swiglu
from athanor.model.linear_ce import linear_cross_entropy, linear_token_logprobs
from athanor.model.llama import LlamaModel, apply_rope, stacked_linear

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _grads(fn, inputs: list[torch.Tensor], out_grads: list[torch.Tensor]) -> list[torch.Tensor]:
    outs = fn(*inputs)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    grads = torch.autograd.grad(outs, [x for x in inputs if x.requires_grad], out_grads)
    return [o.detach() for o in outs] + list(grads)


def _same(fused, plain, inputs: list[torch.Tensor], out_grads: list[torch.Tensor]) -> None:
    for a, b in zip(_grads(fused, inputs, out_grads), _grads(plain, inputs, out_grads), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_rms_norm_matches_torch_and_gradcheck() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 5, 37, dtype=torch.float64, requires_grad=True)
    w = torch.randn(37, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 5, 37, dtype=torch.float64)
    _same(lambda x, w: rms_norm(x, w, 1e-5), lambda x, w: F.rms_norm(x, (37,), w, 1e-5), [x, w], [g])
    assert gradcheck(lambda x, w: rms_norm(x, w, 1e-5), (x, w))
    # A frozen weight (LoRA) gets no gradient computed, the input's is unchanged.
    frozen = w.detach()
    (gx,) = torch.autograd.grad(rms_norm(x, frozen, 1e-5), x, g)
    torch.testing.assert_close(gx, torch.autograd.grad(F.rms_norm(x, (37,), frozen, 1e-5), x, g)[0])


@pytest.mark.parametrize("per_row", [False, True])
def test_rotary_qkv_matches_apply_rope_and_gradcheck(per_row: bool) -> None:
    torch.manual_seed(0)
    B, T, n_q, n_kv, hd = 2, 7, 6, 2, 10
    angles = torch.rand(B if per_row else 1, T, 1, hd // 2, dtype=torch.float64) * 6
    angles = torch.cat([angles, angles], -1)  # the tables' layout: d/2 angles, repeated
    cos, sin = (angles.cos(), angles.sin()) if per_row else (angles[0].cos(), angles[0].sin())
    qkv = torch.randn(B, T, n_q + 2 * n_kv, hd, dtype=torch.float64, requires_grad=True)

    def plain(qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v = qkv.split([n_q, n_kv, n_kv], dim=2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def fused(qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return rotary_qkv(qkv, cos, sin, n_q, n_kv)

    # Output gradients as attention hands them back: (B, heads, T, hd) memory, transposed.
    grads = [torch.randn(B, n, T, hd, dtype=torch.float64).transpose(1, 2) for n in (n_q, n_kv, n_kv)]
    _same(fused, plain, [qkv], grads)
    assert gradcheck(fused, (qkv,))


def test_swiglu_matches_silu_times_up_and_gradcheck() -> None:
    torch.manual_seed(0)
    gate_up = torch.randn(3, 5, 2 * 13, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 5, 13, dtype=torch.float64)

    def plain(gu: torch.Tensor) -> torch.Tensor:
        gate, up = gu.chunk(2, -1)
        return F.silu(gate) * up

    _same(swiglu, plain, [gate_up], [g])
    assert gradcheck(swiglu, (gate_up,))


def test_linear_cross_entropy_gradcheck_with_ignored_rows_and_ragged_chunks() -> None:
    torch.manual_seed(0)
    h = torch.randn(23, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (23,))
    t[::4] = -100
    _same(lambda h, w: linear_cross_entropy(h, w, t, chunk=7),
          lambda h, w: F.cross_entropy(h @ w.t(), t, reduction="sum"), [h, w], [torch.tensor(0.7, dtype=h.dtype)])
    assert gradcheck(lambda h, w: linear_cross_entropy(h, w, t, chunk=7), (h, w))


def _plain_token_logprobs(logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What sequence_logps computed before the fused head: log-softmax of the full logits, picked."""
    picked = logits.log_softmax(-1).gather(-1, t.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(t != -100, picked, 0.0)


# full fine-tuning (the head's gradient factor kept from forward, or recomputed in backward); LoRA (head frozen)
@pytest.mark.parametrize(("train_weight", "keep_elements"), [(True, 2**26), (True, 0), (False, 2**26)])
def test_linear_token_logprobs_equal_log_softmax_with_per_row_gradients(train_weight: bool,
                                                                         keep_elements: int) -> None:
    torch.manual_seed(0)
    h = torch.randn(23, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, requires_grad=train_weight)
    t = torch.randint(0, 11, (23,))
    t[::4] = -100
    t[:3] = -100  # ignored rows in a run, and chunks that hold different numbers of scored rows
    # A different gradient on every row, as DPO gives each sequence its own weight.
    _same(lambda h, *w_: linear_token_logprobs(h, w_[0] if w_ else w, t, chunk=7, keep_elements=keep_elements),
          lambda h, *w_: _plain_token_logprobs(h @ (w_[0] if w_ else w).t(), t),
          [h, w] if train_weight else [h], [torch.randn(23, dtype=h.dtype)])
    assert gradcheck(lambda h, w: linear_token_logprobs(h, w, t, chunk=7, keep_elements=keep_elements), (h, w))
    with torch.no_grad():  # evaluation: the same numbers
        torch.testing.assert_close(linear_token_logprobs(h, w, t), _plain_token_logprobs(h @ w.t(), t))


def test_linear_token_logprobs_by_hand() -> None:
    # logits (0, 0, ln 2) give probabilities 1/4, 1/4, 1/2 for every row.
    h, w = torch.ones(3, 1), torch.tensor([[0.0], [0.0], [math.log(2)]])
    got = linear_token_logprobs(h, w, torch.tensor([2, -100, 0]))
    torch.testing.assert_close(got, torch.tensor([math.log(1 / 2), 0.0, math.log(1 / 4)]))


def test_model_token_logprobs_match_the_logits_path_in_fp32() -> None:
    """model(x, targets=y, token_logprobs=True) against the full logits' log-softmax, values and every
    parameter's gradient under a per-row weighted sum (a DPO-like loss), fp32 at the model's shapes."""
    torch.manual_seed(0)
    model = LlamaModel(tiny_model_config())
    x = torch.randint(0, 512, (4, 17))
    y = torch.randint(0, 512, (4, 17))
    y[:, :5] = -100
    y[3, 12:] = -100
    weights = torch.randn(4, 1)

    def run(fused: bool) -> list[torch.Tensor]:
        model.zero_grad()
        lp = model(x, targets=y, token_logprobs=True) if fused else _plain_token_logprobs(model(x).float(), y)
        (lp * weights).sum().backward()
        return [lp.detach()] + [p.grad.clone() for p in model.parameters()]

    for a, b in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class _Doubled(nn.Module):  # not an nn.Linear: stacked_linear must call it, not read its weight
    def __init__(self, inner: nn.Linear) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * self.inner(x)


def test_stacked_linear_equals_each_layer_and_respects_wrappers_and_hooks() -> None:
    torch.manual_seed(0)
    a, b, c = nn.Linear(6, 4), nn.Linear(6, 3), nn.Linear(6, 5)
    x = torch.randn(2, 3, 6)
    torch.testing.assert_close(stacked_linear(x, (a, b, c)), torch.cat([a(x), b(x), c(x)], -1))
    with torch.no_grad():  # the per-layer path of inference
        torch.testing.assert_close(stacked_linear(x, (a, b, c)), torch.cat([a(x), b(x), c(x)], -1))
    wrapped = _Doubled(b)
    torch.testing.assert_close(stacked_linear(x, (a, wrapped)), torch.cat([a(x), 2 * b(x)], -1))
    seen = []
    handle = c.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    stacked_linear(x, (a, b, c))
    handle.remove()
    assert len(seen) == 1 and seen[0] is x
    # Gradients land on each layer's own parameters, as if each had run on its own.
    stacked_linear(x, (a, b)).square().sum().backward()
    ga = a.weight.grad.clone()
    a.weight.grad = None
    torch.cat([a(x), b(x)], -1).square().sum().backward()
    torch.testing.assert_close(ga, a.weight.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_training_step_under_bf16_autocast_follows_fp32(device: str) -> None:
    """The fused functions run inside autocast (CPU here; CUDA where there is one): the loss and
    the gradients of a bf16-autocast step stay close to those of the fp32 step."""
    torch.manual_seed(0)
    model = LlamaModel(tiny_model_config(model_type="qwen2")).to(device)
    x = torch.randint(0, 512, (2, 33), device=device)

    def step(amp: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            loss = model(x[:, :-1], targets=x[:, 1:]) / 32
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters()]

    loss32, grads32 = step(False)
    loss16, grads16 = step(True)
    assert loss16.dtype == torch.float32 and abs(loss16 - loss32) < 0.02 * loss32
    for g16, g32 in zip(grads16, grads32, strict=True):
        assert g16.dtype == torch.float32
        cos = F.cosine_similarity(g16.flatten(), g32.flatten(), dim=0)
        assert cos > 0.98, cos


@pytest.mark.slow
def test_compiled_step_traces_the_plain_expressions_and_matches_eager() -> None:
    """Under torch.compile the fused functions hand the compiler their plain expressions: no
    graph break from them, and the compiled loss and gradients equal the eager ones."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    model = LlamaModel(tiny_model_config())
    x = torch.randint(0, 512, (2, 17))
    eager = model(x[:, :-1], targets=x[:, 1:])
    eager.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model)(x[:, :-1], targets=x[:, 1:])
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-4)
    for p, g in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)
    breaks = [reason for reason in torch._dynamo.utils.counters["graph_break"] if "fused.py" in reason
              or "out=" in reason]
    assert not breaks, breaks
