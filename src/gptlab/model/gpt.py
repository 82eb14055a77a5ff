"""A configurable decoder-only Transformer (GPT), readable top to bottom.

One ModelConfig picks the parts: each choice is a key into a small table of
classes or functions below (NORMS, POSITIONS, ATTENTION, MLPS, PARTS, INITS),
so adding a variant is adding a row, not a branch. A block is a string of
parts ("Norm->Attn->+->Norm->MLP->+", model/blocks.py parses it) that Block
runs on the residual stream. Shapes in comments:
B batch, T tokens, D d_model, H query heads, K key/value heads, C head size,
F MLP hidden size, V vocabulary.

The training path (no cache) is written for torch.compile: no .item(), no
Python branching on tensor values, attention through
F.scaled_dot_product_attention with is_causal=True. Generation adds a KVCache:
left-padded rows of different lengths share one batch, each with its own
positions and a mask that hides the padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.model.blocks import ADD, ends_normalised, name_parts
from gptlab.model.cache import KVCache
from gptlab.model.kan import KANMLP
from gptlab.model.loss import LOSSES, logits_cross_entropy, loss_for
from gptlab.model.masks import MaskRule, layer_rules, rule_mask
from gptlab.model.moe import MoE

# --------------------------------------------------------------------------- norms


class RMSNorm(nn.Module):
    """x / rms(x), times a learned gain (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x):
        weight = self.weight.to(x.dtype) if self.weight is not None else None  # bf16 q/k under autocast: fused kernel
        return F.rms_norm(x, (x.size(-1),), weight, self.eps)


class CosineNorm(nn.Module):
    """x / ||x||: every vector put on the unit sphere (Luo et al. 2017), times a learned gain (DefaultGPT)."""

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x):
        x = F.normalize(x, dim=-1, eps=self.eps)
        return x * self.weight if self.weight is not None else x


def _layernorm(dim: int, eps: float, affine: bool, bias: bool) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=eps, elementwise_affine=affine, bias=affine and bias)


NORMS = {
    "layernorm": _layernorm,
    "rmsnorm": lambda dim, eps, affine, bias: RMSNorm(dim, eps, affine),
    "cosinenorm": lambda dim, eps, affine, bias: CosineNorm(dim, eps, affine),
}


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    return NORMS[cfg.norm](dim or cfg.d_model, cfg.norm_eps, cfg.norm_affine, cfg.bias)


# --------------------------------------------------------------------------- positions
# Absolute positions (learned, sinusoidal) are added to the token embeddings;
# rotary positions rotate queries and keys inside attention. `pos` is [B or 1, T].


class NoPositions(nn.Module):
    """position = "none": only the causal mask tells tokens apart (NoPE); no length limit."""

    max_len: int | None = None

    def __init__(self, cfg: ModelConfig | None = None):
        super().__init__()

    def add(self, x, pos):
        return x

    def rotation(self, pos):
        return None


class LearnedPositions(NoPositions):
    """A learned vector per position, added to the token embedding (GPT-2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.max_len = cfg.context_length
        self.table = nn.Embedding(cfg.context_length, cfg.d_model)

    def add(self, x, pos):
        return x + self.table(pos)


def sinusoid_table(length: int, dim: int) -> torch.Tensor:
    """Vaswani et al.: sin on even features, cos on odd ones, wavelengths from 2*pi to 10000*2*pi."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)[:, : dim // 2]
    return table


class SinusoidalPositions(NoPositions):
    """Fixed sinusoids added to the token embedding (AureliusGPT-Torch): no parameters to learn."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.max_len = cfg.context_length
        self.register_buffer("table", sinusoid_table(cfg.context_length, cfg.d_model), persistent=False)

    def add(self, x, pos):
        return x + self.table[pos].to(x.dtype)


class RotaryPositions(NoPositions):
    """RoPE (Su et al. 2021): each pair of query/key features rotated by an angle proportional to the position."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.max_len = cfg.context_length
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
        angles = torch.outer(torch.arange(cfg.context_length, dtype=torch.float32), inv_freq)  # [T_max, C/2]
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def rotation(self, pos):
        return self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)  # [B, 1, T, C/2]: broadcast over heads


def apply_rotary(x, rotation):
    """Rotate the halves (x1, x2) of every head vector: the GPT-NeoX / Llama-HF layout."""
    cos, sin = (t.to(x.dtype) for t in rotation)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


POSITIONS = {"none": NoPositions, "learned": LearnedPositions, "sinusoidal": SinusoidalPositions, "rope": RotaryPositions}


# --------------------------------------------------------------------------- attention
# mask: None for plain causal attention (training), else a bool [B or 1, 1, T, T_keys], True = may attend.


@dataclass
class Context:
    """What a block's parts read besides their input, set once a forward pass."""

    positions: torch.Tensor  # [B or 1, T]: each token's position
    rotation: tuple | None  # RoPE's cos and sin at those positions; None without RoPE
    cache: KVCache | None = None  # generation: the keys and values so far (model/cache.py)
    memory: torch.Tensor | None = None  # [B, S, D]: the second sequence CrossAttn reads
    memory_rotation: tuple | None = None  # RoPE's cos and sin at the memory's positions
    aux_losses: list = field(default_factory=list)  # added to the training loss (MoE's balancing losses)
    masks: dict = field(default_factory=dict)  # a training mask per rule, built once a pass

    def mask_for(self, rule: MaskRule):
        """A training pass's mask for a rule: None (causal: the fused kernel's is_causal) or bool [1, 1, T, T]."""
        if rule.causal:
            return None
        if rule not in self.masks:
            pos = self.positions[0]
            self.masks[rule] = rule_mask(rule, pos, pos)[None, None]
        return self.masks[rule]


# Compiled for a CPU, bf16 attention over at most this many positions is written out (written_attention), causal
# in CAUSAL_BLOCKS slices, instead of calling the fused kernel, whose backward is slow there. Forward + backward,
# 4 heads of 64, bf16, 2 AVX-512-BF16 cores: 19 vs 41 ms at 128 positions, 29 vs 46 at 256, 42 vs 63 at 512,
# 78 vs 86 at 1,024 (where the scores' memory grows as T^2: the fused kernel keeps it). In fp32 the two are level.
WRITTEN_ATTENTION_MAX_T = 512
CAUSAL_BLOCKS = 4


def sdpa_attention(q, k, v, mask, dropout_p: float):
    """PyTorch's fused kernel: flash attention on CUDA and CPU, grouped key/value heads without copies.

    Attention dropout goes on the values, not on the probabilities: softmax(Q K^T) (dropout(V)) drops value
    features for every query at once, the same mean and a similar regularisation, at O(T C) a head instead
    of O(T^2). PyTorch's CPU kernels have no dropout: with dropout_p > 0 they fall back to the math path,
    which builds the T x T probabilities and a T x T random mask (5x slower a step at aurelius-845k).
    """
    v = F.dropout(v, dropout_p)
    if q.device.type == "cpu" and torch.compiler.is_compiling() and (
        q.size(2) == 1 or (q.dtype != torch.float32 and k.size(2) <= WRITTEN_ATTENTION_MAX_T)
    ):
        return written_attention(q, k, v, mask, CAUSAL_BLOCKS)
    grouped = k.size(1) != q.size(1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=grouped)


def written_attention(q, k, v, mask, blocks: int = 1, dropout_p: float = 0.0):
    """softmax(Q K^T / sqrt(C)) V written out in a few operators, for inductor to fuse into a compiled CPU step.

    Two cases pay (sdpa_attention picks them): a decode step (one query a row, a KV cache's keys), where the
    fused kernel spends tens of microseconds a call setting up for one query (a compiled step of the 1M
    quickstart model: 1.05 ms this way against 1.6 ms, batch 1, one thread), and bf16 training over short
    contexts, where the fused kernel's backward is slow (see WRITTEN_ATTENTION_MAX_T).

    mask None: causal, the queries taken in `blocks` slices, each against only the keys up to its last
    position, which skips most of the scores above the diagonal that the mask would throw away (4 blocks:
    10/16 of the work) and keeps each slice's scores small enough to stay in cache (one block of 256
    positions took 39 ms forward + backward, four 19 ms). `dropout_p`: on the probabilities (plain_attention).
    """
    B, H, T, C = q.shape
    K = k.size(1)
    q = q.view(B, K, H // K, T, C)  # query head h reads key/value head h // (H / K), as enable_gqa does
    if mask is not None:  # True = may attend -> 0, else -inf, added to the scores
        bias = torch.zeros(mask.shape, device=q.device).masked_fill(~mask, float("-inf"))
        return _attend(q, k, v, bias.unsqueeze(2) if mask.dim() == 4 else bias, dropout_p).reshape(B, H, T, C)
    size, ys = -(-T // blocks), []  # rows a slice, rounded up
    for start in range(0, T, size):
        stop = min(start + size, T)
        # -inf above the diagonal of [rows, keys so far], added to the scores: compiled, the softmax reads it as
        # floats, twice as fast as the same kernel reading a bool mask (one 4m layer's attention, forward + backward,
        # bf16: 12 vs 14 ms with the copies below)
        causal = torch.full((stop - start, stop), float("-inf"), device=q.device).triu(start + 1)
        # dense copies: bmm on a CPU copies any operand not contiguous (a slice along T), slower than inductor does
        q_rows, k_seen, v_seen = (t.contiguous() for t in (q[..., start:stop, :], k[..., :stop, :], v[..., :stop, :]))
        ys.append(_attend(q_rows, k_seen, v_seen, causal, dropout_p))
    return torch.cat(ys, dim=-2).reshape(B, H, T, C)


class QueryKeyScores(torch.autograd.Function):
    """Q K^T of grouped heads, q [B, K, G, T, C] and k [B, K, S, C] -> [B, K, G, T, S], with the keys' gradient
    made as dS^T Q, [S, C] like the keys. Autograd's own makes it as Q^T dS, [C, S], and each compiled step then
    transposes it back, tile by tile, in the kernel that sums the causal slices' key gradients and undoes RoPE
    (4m shape, bf16, 2 AVX-512-BF16 cores: that kernel 12.6 -> 3.5 ms a step; one layer's attention, forward +
    backward, 34.1 -> 32.4 ms, median)."""

    @staticmethod
    def forward(ctx, q, k):
        ctx.save_for_backward(q, k)
        return torch.einsum("bkgtc,bksc->bkgts", q, k)

    @staticmethod
    def backward(ctx, grad):
        q, k = ctx.saved_tensors
        return torch.einsum("bkgts,bksc->bkgtc", grad, k), torch.einsum("bkgts,bkgtc->bksc", grad, q)


def _attend(q, k, v, bias, dropout_p: float):
    """q [B, K, G, T, C] against k, v [B, K, S, C], bias [.., T, S] added to the scores (-inf: may not attend)."""
    scores = QueryKeyScores.apply(q, k) / math.sqrt(q.size(-1))
    probs = F.softmax(scores.float() + bias, dim=-1).to(v.dtype)
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return torch.einsum("bkgts,bksc->bkgtc", probs, v)


def plain_attention(q, k, v, mask, dropout_p: float):
    """softmax(Q K^T / sqrt(C) + causal mask) V, written out in one piece: the reference the fused kernel must
    match. Dropout here is on the probabilities, as in the Transformer paper and nanoGPT."""
    return written_attention(q, k, v, mask, 1, dropout_p)


ATTENTION = {"sdpa": sdpa_attention, "plain": plain_attention}


class Attention(nn.Module):
    """Causal self-attention with H query heads and K key/value heads: MHA (K = H), GQA (1 < K < H), MQA (K = 1),
    under its layer's mask rule (model/masks.py: causal, a sliding window, ...)."""

    reads_context = True  # a Block passes it the Context

    def __init__(self, cfg: ModelConfig, layer: int, name: str = "attn"):
        super().__init__()
        self.cache_key = (layer, name)  # its keys and values in a KV cache
        self.rule = layer_rules(cfg.mask, cfg.window, cfg.n_layer)[layer]
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        self.split = (q_dim, kv_dim, kv_dim)
        self.qkv = nn.Linear(cfg.d_model, q_dim + 2 * kv_dim, bias=cfg.bias)  # one matmul for Q, K and V
        self.proj = nn.Linear(q_dim, cfg.d_model, bias=cfg.bias)
        # QK-norm: RMSNorm on each head's query and key keeps attention logits bounded (OLMo 2, modded-nanogpt)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.attend = ATTENTION[cfg.attention]
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, ctx: Context):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(self.split, dim=-1)
        q, k, v = self.heads(q, T, self.n_head), self.heads(k, T, self.n_kv_head), self.heads(v, T, self.n_kv_head)
        q, k = self.q_norm(q), self.k_norm(k)  # [B, H, T, C], [B, K, T, C]
        if ctx.rotation is not None:
            q, k = apply_rotary(q, ctx.rotation), apply_rotary(k, ctx.rotation)
        if ctx.cache is None:
            mask = ctx.mask_for(self.rule)
        else:  # every position so far (or the rule's span of them): [B, K, T_keys, C], and who sees whom
            k, v, mask = ctx.cache.update(self.cache_key, k, v, self.rule)
        return self.output(self.attend(q, k, v, mask, self.dropout if self.training else 0.0))

    def heads(self, x, T: int, n: int):
        return x.view(x.size(0), T, n, self.head_dim).transpose(1, 2)  # [B, n, T, C]

    def output(self, y):  # [B, H, T, C] -> [B, T, D]
        y = y.transpose(1, 2).flatten(2)
        return self.resid_dropout(self.proj(y))


class CrossAttention(Attention):
    """Attention from the sequence (queries) to a second one (keys and values): ctx.memory, [B, S, D], such
    as an encoder's output or a prompt's embeddings (Vaswani et al.'s decoder). Every query sees every memory
    position, so it stays causal in the sequence itself; with RoPE, queries and memory are rotated by their
    own positions. Generation recomputes the memory's keys: it is not in the KV cache."""

    def __init__(self, cfg: ModelConfig, layer: int, name: str = "cross_attn"):
        super().__init__(cfg, layer, name)
        del self.qkv  # self-attention's fused map becomes a query map on x and a key/value map on the memory
        q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        self.split = (kv_dim, kv_dim)
        self.q = nn.Linear(cfg.d_model, q_dim, bias=cfg.bias)
        self.kv = nn.Linear(cfg.d_model, 2 * kv_dim, bias=cfg.bias)

    def forward(self, x, ctx: Context):
        if ctx.memory is None:
            raise GptlabError(
                "the model has a CrossAttn part but was given no second sequence to attend to",
                "call model(idx, memory=...) with a [batch, length, d_model] tensor (training and sampling "
                "from the command line give none)",
            )
        T, S = x.size(1), ctx.memory.size(1)
        k, v = self.kv(ctx.memory).split(self.split, dim=-1)
        q, k, v = self.heads(self.q(x), T, self.n_head), self.heads(k, S, self.n_kv_head), self.heads(v, S, self.n_kv_head)
        q, k = self.q_norm(q), self.k_norm(k)
        if ctx.rotation is not None:
            q, k = apply_rotary(q, ctx.rotation), apply_rotary(k, ctx.memory_rotation)
        everything = torch.ones(1, 1, T, S, dtype=torch.bool, device=x.device)
        return self.output(self.attend(q, k, v, everything, self.dropout if self.training else 0.0))


# --------------------------------------------------------------------------- MLP


def relu_squared(x):
    """ReLU(x)^2 (So et al. 2021, "Primer"; modded-nanogpt)."""
    return F.relu(x).square()


def gelu(x):
    """GELU, x Phi(x) with the exact normal CDF (as F.gelu); compiled for a CPU, written out (WrittenGelu)."""
    if x.device.type == "cpu" and torch.compiler.is_compiling():
        return WrittenGelu.apply(x)
    return F.gelu(x)


# erf(x) ~ x P(x^2) / Q(x^2) on [-4, 4], +-1 beyond (as fp32 rounds it): Eigen's generic_fast_erf_float, within
# 3e-7 of torch.erf. Multiply-adds and a division, where the vectorised erf a compiled CPU kernel calls costs
# twice an exp: forward + backward of a [4,096 x 1,024] bf16 GELU, 6.1 -> 5.2 ms (2 AVX-512-BF16 cores).
ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
         -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
         -1.42647390514189e-02)


def rational_erf(x):
    x = x.clamp(-4.0, 4.0)
    x2 = x * x
    p, q = ERF_P[0] * x2, ERF_Q[0] * x2  # Horner's rule in x^2
    for a in ERF_P[1:-1]:
        p = (p + a) * x2
    for b in ERF_Q[1:-1]:
        q = (q + b) * x2
    return x * (p + ERF_P[-1]) / (q + ERF_Q[-1])


def normal_cdf(x):
    return 0.5 + 0.5 * rational_erf(x * (1 / math.sqrt(2)))


class WrittenGelu(torch.autograd.Function):
    """GELU in fp32 from rational_erf, and its derivative Phi(x) + x phi(x) recomputed in backward from x."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        x32 = x.float()
        return (x32 * normal_cdf(x32)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        x32 = x.float()
        slope = normal_cdf(x32) + x32 * torch.exp(-0.5 * x32 * x32) * (1 / math.sqrt(2 * math.pi))
        return (grad.float() * slope).to(grad.dtype)


class MLP(nn.Module):
    """D -> F -> activation -> D."""

    def __init__(self, cfg: ModelConfig, activation):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.ff_dim, bias=cfg.bias)
        self.activation = activation
        self.proj = nn.Linear(cfg.ff_dim, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.proj(self.activation(self.fc(x))))


class GatedMLP(nn.Module):
    """activation(x W_gate) * (x W_up), then down to D: SwiGLU / GeGLU (Shazeer 2020). Gate and up in one matmul."""

    def __init__(self, cfg: ModelConfig, activation):
        super().__init__()
        self.split = (cfg.ff_dim, cfg.ff_dim)
        self.fc = nn.Linear(cfg.d_model, 2 * cfg.ff_dim, bias=cfg.bias)
        self.activation = activation
        self.proj = nn.Linear(cfg.ff_dim, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        gate, up = self.fc(x).split(self.split, dim=-1)
        return self.dropout(self.proj(self.activation(gate) * up))


MLPS = {
    "relu": (MLP, F.relu),
    "gelu": (MLP, gelu),
    "silu": (MLP, F.silu),
    "relu2": (MLP, relu_squared),
    "swiglu": (GatedMLP, F.silu),
    "geglu": (GatedMLP, gelu),
}


# --------------------------------------------------------------------------- parts and blocks


def mlp_part(cfg: ModelConfig, layer: int, name: str) -> nn.Module:
    mlp_class, activation = MLPS[cfg.mlp]
    return mlp_class(cfg, activation)


# What each name in a block string builds (the names and their meanings: model/blocks.py PARTS). A part
# maps [B, T, D] to [B, T, D]; those that take a Context (attention, MoE) say so with `reads_context`.
PARTS = {
    "Norm": lambda cfg, layer, name: make_norm(cfg),
    "Attn": Attention,
    "MLP": mlp_part,
    "MoE": lambda cfg, layer, name: MoE(cfg, MLPS[cfg.mlp][1], gated=MLPS[cfg.mlp][0] is GatedMLP),
    "CrossAttn": CrossAttention,
    "KAN": lambda cfg, layer, name: KANMLP(cfg),
}


class Block(nn.Module):
    """One transformer block, as model.block writes it: each part applied to the branch value h, `+` adding
    it to the residual stream x, `=` replacing x with it; parallel branches each start from the block's
    input and add their changes up (model/blocks.py)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.branches = name_parts(cfg.layout)  # [[(token, attribute name or None), ...], ...]
        parts = [(token, name) for branch in self.branches for token, name in branch if name]
        # norms first: the order the named layouts' modules had before block strings (old optimizer states)
        for token, name in sorted(parts, key=lambda part: part[0] != "Norm"):
            self.add_module(name, PARTS[token](cfg, layer, name))

    def forward(self, x, ctx: Context):
        if len(self.branches) == 1:
            return self.run(self.branches[0], x, ctx)
        return x + sum(self.run(branch, x, ctx) - x for branch in self.branches)

    def run(self, branch, x, ctx: Context):
        h = x
        for token, name in branch:
            if name is not None:
                part = getattr(self, name)
                h = part(h, ctx) if getattr(part, "reads_context", False) else part(h)
            else:
                x = h = x + h if token == ADD else h  # "+": add the branch to the stream; "=": replace the stream
        return x


# --------------------------------------------------------------------------- init


def init_gpt2(model: GPT, cfg: ModelConfig) -> None:
    """normal(0, init_std) for matrices and embeddings, zero biases; the two residual projections of each
    block scaled by 1/sqrt(2 n_layer) so the residual stream's variance does not grow with depth (GPT-2)."""
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            nn.init.zeros_(p)
        elif p.dim() >= 2:
            std = cfg.init_std / math.sqrt(2 * cfg.n_layer) if name.endswith("proj.weight") else cfg.init_std
            nn.init.normal_(p, 0.0, std)


def init_trunc_normal(model: GPT, cfg: ModelConfig) -> None:
    """normal(0, init_std) cut at 3 std, no residual scaling, zero biases (GPT 2.5)."""
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            nn.init.zeros_(p)
        elif p.dim() >= 2:
            nn.init.trunc_normal_(p, 0.0, cfg.init_std, -3 * cfg.init_std, 3 * cfg.init_std)


INITS = {"gpt2": init_gpt2, "trunc_normal": init_trunc_normal, "pytorch": lambda model, cfg: None}


# --------------------------------------------------------------------------- the model


class GPT(nn.Module):
    """Token embedding (+ positions) -> n_layer blocks -> final norm -> output head, as ModelConfig says."""

    def __init__(self, cfg: ModelConfig, loss: str = "plain"):
        super().__init__()
        if cfg.vocab_size is None:
            raise GptlabError("model.vocab_size is not set", "set it to the tokenizer's vocabulary size")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.positions = POSITIONS[cfg.position](cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layer))
        # the stream leaves the last block un-normalised unless the block string ends with "Norm->="
        self.norm_f = nn.Identity() if ends_normalised(cfg.layout) else make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # one matrix reads tokens in and writes them out
        INITS[cfg.init](self, cfg)
        self.loss = LOSSES[loss]  # the head's cross-entropy: plain (through the logits) or fused (model/loss.py)
        # activation checkpointing (train.checkpointing): a block keeps only its input for backward and runs
        # again there, trading a third more compute for the activations of all but one block
        self.checkpointing = False

    def forward(self, idx, targets=None, cache: KVCache | None = None, valid=None, return_logits: bool = False,
                memory=None):
        """idx [B, T] token ids -> (logits [B, T, V], None) without targets, (None, loss) with them.

        The loss is the mean cross-entropy over targets != -1, computed by the loss function chosen at set-up,
        which need not build the logits (the fused one does not); return_logits=True asks for them as well:
        (logits, loss). In training mode the parts' auxiliary losses (MoE's balancing) are added to it and
        kept, detached, in `self.aux_loss`. With a cache (generation), idx continues the cached sequence,
        `valid` ([B, T] bool) marks its real tokens (default: all), and only the last position's logits come
        back: [B, 1, V]. `memory` ([B, S, D]) is the second sequence CrossAttn parts attend to.
        """
        B, T = idx.shape
        if cache is None:
            self.check_length(T)
            pos = torch.arange(T, device=idx.device)[None]  # [1, T]
        else:
            pos = cache.append(valid if valid is not None else torch.ones_like(idx, dtype=torch.bool))
        ctx = Context(pos, self.positions.rotation(pos), cache, memory)
        if memory is not None:
            self.check_memory(memory, B)
            ctx.memory_rotation = self.positions.rotation(torch.arange(memory.size(1), device=idx.device)[None])
        x = self.drop(self.positions.add(self.tok_emb(idx), pos))  # [B, T, D]
        recompute = self.checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, ctx, use_reentrant=False) if recompute else block(x, ctx)
        x = self.norm_f(x)
        if cache is not None:
            x = x[:, -1:]  # the next token is all generation needs
        if targets is None or return_logits:
            logits = self.lm_head(x)  # [B, T, V]
            loss = None if targets is None else logits_cross_entropy(logits, targets)
        else:
            logits, loss = None, self.loss(x.flatten(0, 1), self.lm_head.weight, targets.flatten())
        if loss is not None and self.training and ctx.aux_losses:
            aux = sum(ctx.aux_losses)
            self.aux_loss = aux.detach()
            loss = loss + aux
        return logits, loss

    def check_length(self, T: int) -> None:
        limit = self.positions.max_len
        if limit is not None and T > limit:
            raise GptlabError(
                f"sequence of {T} tokens is longer than model.context_length={limit} "
                f"(position={self.cfg.position} has no positions beyond it)",
                f"use sequences of at most {limit} tokens or raise model.context_length",
            )

    def check_memory(self, memory, B: int) -> None:
        """CrossAttn's memory is [B (or 1, shared by every row), S, d_model]; with RoPE, S is within the
        positions' table (memory positions are rotated too)."""
        D = self.cfg.d_model
        if memory.dim() != 3 or memory.size(0) not in (1, B) or memory.size(2) != D:
            raise GptlabError(
                f"memory has shape {list(memory.shape)}; CrossAttn reads [batch, length, d_model] = [{B}, S, {D}]",
                "pass memory=tensor of that shape (batch 1 is shared by every row)",
            )
        limit = self.positions.max_len
        if self.cfg.position == "rope" and memory.size(1) > limit:
            raise GptlabError(
                f"memory of {memory.size(1)} positions is longer than model.context_length={limit} "
                "(RoPE rotates the memory by its positions too)",
                f"pass at most {limit} memory positions or raise model.context_length",
            )

    # ----------------------------------------------------------------- accounting

    def embedding_parameters(self) -> list[nn.Parameter]:
        """Token (and learned position) tables, and the output matrix when it is not tied to the input one."""
        params = [self.tok_emb.weight, *self.positions.parameters()]
        if not self.cfg.tie_embeddings:
            params.append(self.lm_head.weight)
        return params

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # a tied matrix counts once
        if non_embedding:
            n -= sum(p.numel() for p in self.embedding_parameters())
        return n

    def fused_matrices(self) -> dict[nn.Parameter, tuple[int, ...]]:
        """Weights that stack several matrices by rows -> their row counts: Q, K and V of every attention, gate
        and up of every gated MLP and of each expert of a gated MoE (Muon orthogonalises them one by one)."""
        stacked = {Attention: "qkv", CrossAttention: "kv", GatedMLP: "fc", MoE: "fc"}  # the weight that holds the matrices
        matrices = {getattr(m, stacked[type(m)]).weight: m.split for m in self.modules() if type(m) in stacked}
        matrices |= {m.shared_fc.weight: m.split for m in self.modules() if isinstance(m, MoE) and hasattr(m, "shared_fc")}
        return matrices

    def idle_parameters(self) -> int:
        """Weights a token does not go through: the routed experts of each MoE part beyond its moe_topk."""
        return round(sum((1 - m.topk / m.n_experts) * (m.fc.weight.numel() + m.proj.weight.numel())
                         for m in self.modules() if isinstance(m, MoE)))

    def flops_per_token(self) -> float:
        """Training FLOPs per token, forward + backward (PaLM appendix B; nanoGPT's estimate_mfu):
        6 per weight of every matmul a token goes through (the output head included, tied or not; of a MoE
        part, its router, shared experts and moe_topk routed ones) + 12 * H * C * the keys each self-attention
        reads (the full context, or a window's span) for attention scores and their weighted sum."""
        cfg = self.cfg
        matmul_weights = self.num_params(non_embedding=True) - self.idle_parameters() + cfg.vocab_size * cfg.d_model
        keys = sum(min(m.rule.span or cfg.context_length, cfg.context_length) for m in self.modules() if type(m) is Attention)
        return float(6 * matmul_weights + 12 * cfg.n_head * cfg.head_dim * keys)

    def load_weights(self, state_dict: dict, source: str = "checkpoint") -> None:
        """load_state_dict, but a checkpoint of another architecture is one GptlabError line, not a traceback."""
        state_dict = dict(state_dict)
        if self.cfg.tie_embeddings:  # files may store a tied matrix once, under either name (safetensors does)
            tied = state_dict.get("tok_emb.weight", state_dict.get("lm_head.weight"))
            if tied is not None:
                state_dict.setdefault("tok_emb.weight", tied)
                state_dict.setdefault("lm_head.weight", tied)
        try:
            self.load_state_dict(state_dict)
        except RuntimeError as e:  # torch lists every missing key / unexpected key / size mismatch on its own line
            problems = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
            first = problems[0] if problems else str(e)
            raise GptlabError(
                f"{source} does not fit this model: {first[:300]}",
                "it was trained with another [model] config; use the config saved with it",
            ) from None


def build_model(cfg: ModelConfig, device: torch.device | str | None = None) -> GPT:
    """The model on `device` (default: the CPU), with the loss function that pays there (model/loss.py)."""
    return GPT(cfg, loss=loss_for(device)).to(device)


def check_vocab(cfg: ModelConfig, tokenizer) -> ModelConfig:
    """The model config with vocab_size taken from the tokenizer; GptlabError if it was set to another size."""
    if cfg.vocab_size is None:
        return cfg.model_copy(update={"vocab_size": tokenizer.vocab_size})
    if cfg.vocab_size != tokenizer.vocab_size:
        raise GptlabError(
            f"model.vocab_size={cfg.vocab_size} but the tokenizer has {tokenizer.vocab_size} tokens",
            f"set model.vocab_size={tokenizer.vocab_size} (or leave it out to take the tokenizer's)",
        )
    return cfg
