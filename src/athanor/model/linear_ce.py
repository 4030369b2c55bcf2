"""Output head and cross-entropy in one pass, chunked over rows ("fused linear cross-entropy").

The plain way materializes the full (tokens x vocab) logits, runs log-softmax over them,
then a second full pass in backward. Here each chunk of rows computes its logits, its loss
and, in the same pass, the gradient of the summed loss (softmax - one-hot), then drops the
logits. The exponentials are taken once, no full-size logits or their gradient ever exist,
and the three matmuls per chunk are all that is left (the idea of Liger Kernel's
FusedLinearCrossEntropy, here in plain PyTorch).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # targets equal to this count for nothing (prompt tokens, padding)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                chunk: int) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # The matmuls run in the compute dtype (bf16 under autocast), the softmax and sums in fp32
        # (or fp64 when that is the compute dtype).
        dtype = torch.get_autocast_dtype(hidden.device.type) \
            if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype
        acc = torch.promote_types(dtype, torch.float32)
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=hidden.device) if need_w else None
        hidden_c, weight_c = hidden.to(dtype), weight.to(dtype)
        # One logits buffer for every chunk: a fresh multi-megabyte tensor per chunk costs page faults.
        buf = torch.empty(min(chunk, hidden.shape[0]), weight.shape[0], dtype=dtype, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            h, t = hidden_c[s:s + chunk], targets[s:s + chunk]
            logits = torch.mm(h, weight_c.t(), out=buf[:h.shape[0]]).to(acc)
            valid = t != IGNORE_INDEX
            tgt = t.clamp(min=0)[:, None]
            target_logit = logits.gather(1, tgt).squeeze(1)
            # log-sum-exp and softmax from one exp pass, in place: exp(l - max) / sum.
            top = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(top).exp_()
            total = probs.sum(dim=-1, keepdim=True)
            lse = (top + total.log()).squeeze(1)
            loss += ((lse - target_logit) * valid).sum()
            if need_h or need_w:
                # d(sum of losses)/d(logits) = softmax - one_hot(target), zero on ignored rows.
                probs.div_(total)
                probs.scatter_add_(1, tgt, -valid[:, None].to(probs.dtype))
                if not bool(valid.all()):
                    probs.mul_(valid[:, None])
                g = probs.to(dtype)
                if need_h:
                    torch.mm(g, weight_c, out=grad_h[s:s + chunk])
                if need_w:
                    grad_w.addmm_(g.t(), h) if g.dtype == grad_w.dtype else grad_w.add_(g.t() @ h)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else (grad_h * grad_loss.to(grad_h.dtype)).to(ctx.hidden_dtype),
                None if grad_w is None else (grad_w * grad_loss).to(ctx.weight_dtype), None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """Sum over rows of cross_entropy(hidden @ weight.T, targets), ignoring targets == -100.

    `hidden` is (N, d), `weight` (vocab, d), `targets` (N,). Returns a float32 scalar (float64 for
    float64 inputs).
    `chunk` rows at a time; by default about 4M logits on CPU (cache-sized, measured fastest
    here) and 128M on GPUs (where fewer, larger kernels win).
    """
    if chunk is None:
        budget = 2**22 if hidden.device.type == "cpu" else 2**27
        chunk = max(256, budget // weight.shape[0])
    if not torch.is_grad_enabled():
        # Inside forward grad mode is always off, and needs_input_grad still says True for
        # parameters: detach here so evaluation skips the two gradient matmuls per chunk.
        hidden, weight = hidden.detach(), weight.detach()
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk)
