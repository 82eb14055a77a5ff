"""The output head's loss: mean cross-entropy of x @ W^T against the next tokens, plain or fused.

Both map features x [N, D], the head's matrix W [V, D] and targets [N] (-1 = ignored) to the mean
cross-entropy over the targets kept. "plain" builds the [N, V] logits (what a GPU and torch.compile do
best); "fused" never holds them whole (LinearCrossEntropy: faster and smaller on a CPU). A model picks
one at set-up from LOSSES (GPT(cfg, loss=...); build_model picks LOSS_FOR_DEVICE's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows a chunk. Width 128, vocab 4,096, 2 threads (head + loss, forward and backward): 126 ms at 256 rows,
# 108-118 at 512, 117-119 at 1,024, 130-135 at 2,048; 64 is slower still (small matmuls).
FUSED_CHUNK = 512


def logits_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [..., V] against targets [...] (-1 ignored), in fp32."""
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=-1)


def plain_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logits_cross_entropy(F.linear(x, weight), targets)


def fused_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss FUSED_CHUNK rows at a time; the gradients too, in the same pass, only when autograd wants them.

    The choice is made here, from grad mode, because inside an autograd.Function ctx.needs_input_grad
    stays True under torch.no_grad(): evaluation would pay for the gradients' matmuls (3x the head's).
    """
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(x, weight, targets, FUSED_CHUNK)
    loss = sum(_chunk_loss(x[i : i + FUSED_CHUNK], weight, targets[i : i + FUSED_CHUNK])[0]
               for i in range(0, x.shape[0], FUSED_CHUNK))
    return loss / (targets != -1).sum().clamp(min=1)


LOSSES = {"plain": plain_cross_entropy, "fused": fused_cross_entropy}
# Measured on CPUs (2 AVX2 cores, fp32, batch 16 x ctx 256, width 256; head + loss, forward and backward):
# plain 546 ms, fused 385 ms at vocab 4,096; 2.2 s vs 1.8 s at 16,384; peak memory 450 -> 310 MB and
# 1.8 GB -> 0.4 GB at 32,768. On a GPU, compile's own cross-entropy kernels are left to do the work.
LOSS_FOR_DEVICE = {"cpu": "fused"}


def loss_for(device: torch.device | str | None) -> str:
    """The name in LOSSES that pays on this device (None: the CPU, where a model is built)."""
    return LOSS_FOR_DEVICE.get(torch.device(device or "cpu").type, "plain")


def _chunk_loss(xs, weight, targets):
    """A chunk's summed loss, and what its gradient needs: exp(logits - max) (in place of the logits), the
    rows' sums of it, which rows count, and the targets as row indices."""
    keep = (targets != -1)[:, None].float()
    target = targets.clamp(min=0)
    logits = (xs @ weight.t()).float()  # [chunk, V]; autocast picks the matmul's precision
    top = logits.amax(dim=-1, keepdim=True)
    target_logit = logits.gather(1, target[:, None])
    e = logits.sub_(top).exp_()
    total = e.sum(dim=-1, keepdim=True)
    return ((total.log() + top - target_logit) * keep).sum(), e, total, keep, target


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of x @ weight.T against targets (-1 ignored), `chunk` rows at a time.

    The gradient of cross-entropy with respect to the logits is softmax - one-hot, known as soon as a chunk's
    logits are. So the forward pass computes each chunk's logits, its loss and both input gradients, then
    drops the logits; backward only scales the stored gradients. The whole [N, V] logits never exist, and
    there are fewer passes over them than in lm_head + F.cross_entropy (no stored logits, log-softmax and
    its gradient): faster on a CPU as well as smaller (the Liger kernel / Cut Cross-Entropy idea, in torch).
    """

    @staticmethod
    def forward(ctx, x, weight, targets, chunk: int):
        count = (targets != -1).sum().clamp(min=1)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        loss = torch.zeros((), device=x.device, dtype=torch.float32)
        for i in range(0, x.shape[0], chunk):
            xs = x[i : i + chunk]
            chunk_loss, e, total, keep, target = _chunk_loss(xs, weight, targets[i : i + chunk])
            loss += chunk_loss
            # softmax - one-hot, with no more passes over the [chunk, V] block: the rows' 1 / total goes on the
            # small [chunk, D] side of each product, and the one-hot part is a row lookup.
            scale = (keep / total).to(x.dtype)
            e = e.to(x.dtype)
            if grad_x is not None:
                grad_x[i : i + chunk] = (e @ weight) * scale - weight[target] * keep.to(weight.dtype)
            if grad_w is not None:
                grad_w += e.t() @ (xs * scale)
                grad_w.index_add_(0, target, (xs * keep.to(xs.dtype)).to(grad_w.dtype), alpha=-1)
        ctx.save_for_backward(grad_x, grad_w, count)
        return loss / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w, count = ctx.saved_tensors
        scale = grad_loss / count
        return (None if grad_x is None else grad_x * scale), (None if grad_w is None else grad_w * scale), None, None
