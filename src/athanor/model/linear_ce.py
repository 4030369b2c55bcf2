"""Output head and cross-entropy in one pass, chunked over rows ("fused linear cross-entropy").

The plain way materializes the full (tokens x vocab) logits, runs log-softmax over them,
then a second full pass in backward. Here each chunk of rows computes its logits, its loss
and, in the same pass, the gradient of the summed loss (softmax - one-hot), then drops the
logits. The exponentials are taken once, no full-size logits or their gradient ever exist,
and the three matmuls per chunk are all that is left (the idea of Liger Kernel's
FusedLinearCrossEntropy, here in plain PyTorch). The same for each row's log-prob of its
target (`linear_token_logprobs`, what DPO and its relatives sum per answer), whose gradient
from above differs per row.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # targets equal to this count for nothing (prompt tokens, padding)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                chunk: int) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype, acc = _compute_dtypes(hidden)
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


class _LinearLogProbs(torch.autograd.Function):
    """Each row's log-prob of its target. Unlike the summed loss, the gradient arriving from above
    differs per row (DPO weighs each sequence by its own sigmoid), so only what does not depend on
    it is done in forward: d log p / d hidden = (one_hot - softmax) @ weight, one row per token,
    scaled in backward. The weight's gradient sums over rows with those factors: when the head
    trains, forward keeps (one_hot - softmax) of every row if they fit in `keep_elements` (then
    backward is one product per chunk), else backward recomputes each chunk's softmax from the saved
    log-sum-exp (one more product per chunk, the cost of a head too large to keep, e.g. a 128k vocab)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                chunk: int, keep_elements: int) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype, acc = _compute_dtypes(hidden)
        hidden_c, weight_c = hidden.to(dtype), weight.to(dtype)
        logps = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        kept = torch.empty(hidden.shape[0], weight.shape[0], dtype=acc, device=hidden.device) \
            if need_w and hidden.shape[0] * weight.shape[0] <= keep_elements else None
        lse_all = torch.empty_like(logps) if need_w and kept is None else None
        dlogp_h = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if need_h else None
        buf = torch.empty(min(chunk, hidden.shape[0]), weight.shape[0], dtype=dtype, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            h, tgt = hidden_c[s:s + chunk], targets[s:s + chunk, None]
            logits = torch.mm(h, weight_c.t(), out=buf[:h.shape[0]]).to(acc)
            target_logit = logits.gather(1, tgt).squeeze(1)
            top = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(top).exp_()
            total = probs.sum(dim=-1, keepdim=True)
            lse = (top + total.log()).squeeze(1)
            logps[s:s + chunk] = target_logit - lse
            if lse_all is not None:
                lse_all[s:s + chunk] = lse
            if need_h or kept is not None:
                one_hot_minus_p = probs.div_(total).neg_().scatter_add_(1, tgt, torch.ones_like(tgt, dtype=acc))
                if kept is not None:
                    kept[s:s + chunk] = one_hot_minus_p
                if need_h:
                    torch.mm(one_hot_minus_p.to(dtype), weight_c, out=dlogp_h[s:s + chunk])
        recompute = need_w and kept is None
        ctx.save_for_backward(dlogp_h, hidden if need_w else None, weight if recompute else None,
                              targets if recompute else None, lse_all, kept)
        ctx.chunk, ctx.hidden_dtype, ctx.weight_dtype = chunk, hidden.dtype, weight.dtype
        return logps

    @staticmethod
    def backward(ctx, grad_logps: torch.Tensor):  # type: ignore[override]
        dlogp_h, hidden, weight, targets, lse_all, kept = ctx.saved_tensors
        grad_h = None if dlogp_h is None else (dlogp_h * grad_logps[:, None].to(dlogp_h.dtype)).to(ctx.hidden_dtype)
        grad_w = None
        if hidden is not None:
            dtype, acc = _compute_dtypes(hidden)
            hidden_c = hidden.to(dtype)
            if kept is not None:  # d(sum of g * log p)/d(logits) = g * (one_hot - softmax), kept from forward
                grad_w = (kept * grad_logps[:, None].to(acc)).to(dtype).t() @ hidden_c
                return grad_h, grad_w.to(ctx.weight_dtype), None, None, None
            weight_c = weight.to(dtype)
            grad_w = torch.zeros(weight.shape, dtype=acc, device=hidden.device)
            buf = torch.empty(min(ctx.chunk, hidden.shape[0]), weight.shape[0], dtype=dtype, device=hidden.device)
            for s in range(0, hidden.shape[0], ctx.chunk):
                rows = slice(s, s + ctx.chunk)
                h, tgt, g = hidden_c[rows], targets[rows, None], grad_logps[rows, None]
                probs = torch.mm(h, weight_c.t(), out=buf[:h.shape[0]]).to(acc).sub_(lse_all[rows, None]).exp_()
                scaled = probs.mul_(-g).scatter_add_(1, tgt, g.to(acc)).to(dtype)
                grad_w.addmm_(scaled.t(), h) if scaled.dtype == grad_w.dtype else grad_w.add_(scaled.t() @ h)
            grad_w = grad_w.to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None


def _compute_dtypes(hidden: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(matmul dtype, accumulation dtype): the matmuls run in the compute dtype (bf16 under
    autocast), the softmax and sums in fp32 (or fp64 when that is the compute dtype)."""
    dtype = torch.get_autocast_dtype(hidden.device.type) \
        if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype
    return dtype, torch.promote_types(dtype, torch.float32)


def _chunk_rows(hidden: torch.Tensor, weight: torch.Tensor, chunk: int | None) -> int:
    """Rows per chunk: by default about 4M logits on CPU (cache-sized, measured fastest here) and
    128M on GPUs (where fewer, larger kernels win)."""
    if chunk is not None:
        return chunk
    budget = 2**22 if hidden.device.type == "cpu" else 2**27
    return max(256, budget // weight.shape[0])


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """Sum over rows of cross_entropy(hidden @ weight.T, targets), ignoring targets == -100.

    `hidden` is (N, d), `weight` (vocab, d), `targets` (N,). Returns a float32 scalar (float64 for
    float64 inputs). `chunk` rows at a time (see _chunk_rows).
    """
    if not torch.is_grad_enabled():
        # Inside forward grad mode is always off, and needs_input_grad still says True for
        # parameters: detach here so evaluation skips the two gradient matmuls per chunk.
        hidden, weight = hidden.detach(), weight.detach()
    return _LinearCrossEntropy.apply(hidden, weight, targets, _chunk_rows(hidden, weight, chunk))


# (one_hot - softmax) of the scored rows is kept for the head's weight gradient up to this many
# elements (256 MB in fp32): a 4k-vocab preference batch fits, a 128k-vocab one recomputes instead.
KEEP_SOFTMAX_ELEMENTS = 2**26


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk: int | None = None, keep_elements: int = KEEP_SOFTMAX_ELEMENTS) -> torch.Tensor:
    """Each row's log_softmax(hidden @ weight.T)[target], 0 where the target is -100: shape (N,),
    float32 (float64 for float64 inputs), differentiable; the (N x vocab) logits never exist (when
    the head trains, their gradient factor is kept if it has at most `keep_elements` entries).

    Only the scored rows go through the head (a preference batch's prompts and padding are skipped).
    """
    scored = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    h, w = hidden[scored], weight
    if not torch.is_grad_enabled():
        h, w = h.detach(), w.detach()  # as in linear_cross_entropy: no gradient work in evaluation
    logps = _LinearLogProbs.apply(h, w, targets[scored], _chunk_rows(hidden, weight, chunk), keep_elements)
    return logps.new_zeros(hidden.shape[0]).index_put((scored,), logps)
