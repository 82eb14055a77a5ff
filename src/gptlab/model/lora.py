"""LoRA (Hu et al. 2021): fine-tune a low-rank update of each linear map instead of the map itself.

    y = x W^T + scale * (x A^T) B^T        W [out, in] frozen, A [r, in], B [out, r] trained, scale = alpha / r

B starts at zero, so the adapted model starts as the base model exactly; A starts as nn.Linear's default
(Kaiming-uniform), as in the paper and PEFT. Only A and B get gradients and optimizer state: the memory
that full fine-tuning spends on a gradient and two AdamW moments per weight is spent on r (in + out) numbers
per matrix instead.

`add_adapters` puts them on every linear map of the blocks (attention's Q/K/V and output, the MLP's) and
freezes the rest of the model except the token embedding (and an untied output head): the chat tokens' rows
are new and must be learnt, and a tied head is the same matrix. `merged_weights` folds each update into its
matrix, W + scale B A, giving the plain model's state dict under the plain names: what a checkpoint's
model.safetensors holds, so that sampling, evaluation and export never see an adapter.

What it saves (benchmarks/lora_memory.py, rank 8, batch 4 x 256, fp32 on a CPU): gradient + AdamW state
48 -> 13.5 MB at tiny-4m, 180 -> 22.5 MB at tiny-16m, 1,417 -> 455 MB at GPT-2 small's shape, whose
tied 50,257-row embedding, trained in full, is most of what is left (13.5 MB with it frozen). The peak
memory of a step moves far less (2% higher, 1% and 9% lower): activations dominate it, and the optimizer's moments
reuse memory the backward pass freed. At the sizes gptlab trains on a CPU LoRA is not worth it; it
pays where the weights' state is what does not fit (a 124M+ model on a small GPU), and more so with a
smaller batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

ADAPTER_KEYS = ("lora_A", "lora_B")


class LoRALinear(nn.Linear):
    """An nn.Linear with a frozen weight (and bias) and a trained low-rank update; it keeps the wrapped
    layer's own Parameters, so the weight's name in the state dict does not change."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.scale = rank, alpha / rank
        like = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def merged_weight(self) -> torch.Tensor:
        return (self.weight + (self.lora_B @ self.lora_A) * self.scale).detach()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale:g}"


def add_adapters(model: nn.Module, rank: int, alpha: float) -> nn.Module:
    """Replace every nn.Linear inside model.blocks by a LoRALinear and freeze all but the adapters and the
    token embedding (and an untied output head); returns the model, changed in place."""
    model.requires_grad_(False)
    for block in model.blocks:
        for parent in block.modules():
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, LoRALinear(child, rank, alpha))
    model.tok_emb.weight.requires_grad_(True)
    model.lm_head.weight.requires_grad_(True)  # the same matrix when tied
    return model


def adapters(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merged_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`weights` (the model's state dict, each tied tensor once) with every adapter folded into its matrix and
    the adapter tensors dropped: the plain model's weights."""
    out = {k: v for k, v in weights.items() if k.rsplit(".", 1)[-1] not in ADAPTER_KEYS}
    for name, m in adapters(model).items():
        out[f"{name}.weight"] = m.merged_weight().contiguous()
    return out


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What resuming needs beyond the merged weights: every adapted layer's frozen weight, A and B (the merged
    matrix cannot be split back into them exactly)."""
    return {f"{name}.{key}": getattr(m, key).detach().clone() for name, m in adapters(model).items()
            for key in ("weight", *ADAPTER_KEYS)}


@torch.no_grad()
def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    for name, m in adapters(model).items():
        for key in ("weight", *ADAPTER_KEYS):
            getattr(m, key).copy_(state[f"{name}.{key}"])


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
