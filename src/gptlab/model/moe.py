"""Mixture of Experts: a feed-forward part whose tokens each go through a few of many MLPs.

A router scores every token against moe_experts experts; each token goes through its moe_topk best, and
their outputs are summed weighted by the router's probabilities (Shazeer et al. 2017; Mixtral's rule:
softmax over all experts, keep the top k, renormalise those k weights to sum to 1). moe_shared experts
take every token and add their outputs unweighted (DeepSeekMoE). Shapes: N tokens, E experts, k per
token, D d_model, F an expert's hidden width.

Dispatch is dropless by default: the token-slots are sorted by expert and each expert runs on exactly its
tokens (a Python loop over experts; data-dependent sizes, so torch.compile runs it eagerly). With
moe_capacity set, training caps each expert at ceil(capacity * N * k / E) slots and the rest get nothing
from it (Switch Transformer); first choices are served before second ones, earlier tokens before later.
Which tokens overflow depends on the whole batch, so a capped pass is not causal: a later token can push
an earlier one out. Evaluation and generation are always dropless (and so causal, and a KV cache's
step-by-step pass equals the full one).

Training appends two losses to ctx.aux_losses, which GPT.forward adds to the loss:
- load balancing (Switch): E * sum_i f_i * P_i, f_i the share of slots routed to expert i, P_i its mean
  router probability; 1.0 when perfectly balanced, E when one expert takes everything. x moe_aux_weight.
- router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2, which keeps the logits small
  (bf16 softmax stays exact). x moe_z_weight.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class ExpertWeights(nn.Module):
    """n stacked [out, in] matrices as one [n, out, in] parameter: a slice is an nn.Linear weight (no bias,
    as in Mixtral and Switch). One parameter for all experts is also what makes DDP work: an expert no token
    chose still gets a gradient (zeros, from the slices of the ones that ran), so no weight is "unused".
    A module of its own so that its name ends in ".weight" like a Linear's: the inits treat it as one
    (gpt2's residual scaling of "proj.weight" included) and exporters find it."""

    def __init__(self, n: int, out_features: int, in_features: int):
        super().__init__()
        bound = 1 / math.sqrt(in_features)  # nn.Linear's default (init = "pytorch")
        self.weight = nn.Parameter(torch.empty(n, out_features, in_features).uniform_(-bound, bound))


class MoE(nn.Module):
    """[B, T, D] -> [B, T, D]: router, routed experts (model.mlp's kind, gated or plain), shared experts."""

    reads_context = True  # appends its losses to ctx.aux_losses

    def __init__(self, cfg, activation, gated: bool):
        super().__init__()
        self.n_experts, self.topk, self.capacity = cfg.moe_experts, cfg.moe_topk, cfg.moe_capacity
        self.aux_weight, self.z_weight = cfg.moe_aux_weight, cfg.moe_z_weight
        self.activation, self.gated = activation, gated
        hidden = cfg.moe_d_ff or cfg.ff_dim
        self.split = (hidden, hidden) if gated else (hidden,)  # rows of each expert's fc: [gate; up] or [up]
        self.router = nn.Linear(cfg.d_model, cfg.moe_experts, bias=False)
        self.fc = ExpertWeights(cfg.moe_experts, sum(self.split), cfg.d_model)
        self.proj = ExpertWeights(cfg.moe_experts, cfg.d_model, hidden)
        if cfg.moe_shared:
            self.shared_fc = ExpertWeights(cfg.moe_shared, sum(self.split), cfg.d_model)
            self.shared_proj = ExpertWeights(cfg.moe_shared, cfg.d_model, hidden)
        self.dropout = nn.Dropout(cfg.dropout)

    def mlp(self, x, fc, proj):
        """Tokens x [N, D] through one expert (fc [2F or F, D], proj [D, F]) -> [N, D]; or x [1, N, D] through a
        stack of S of them (fc [S, 2F or F, D], proj [S, D, F]) -> [S, N, D]."""
        h = x @ fc.mT
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.activation(gate) * up
        else:
            h = self.activation(h)
        return h @ proj.mT

    def forward(self, x, ctx):
        B, T, D = x.shape
        tokens = x.reshape(-1, D)  # [N, D]
        logits = self.router(tokens).float()  # [N, E]; fp32: the softmax and the z-loss need the range
        probs = logits.softmax(dim=-1)
        weights, experts = probs.topk(self.topk, dim=-1)  # [N, k]
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = self.dispatch(tokens, weights.to(x.dtype), experts)
        if hasattr(self, "shared_fc"):  # every token through every shared expert, summed
            out = out + self.mlp(tokens[None], self.shared_fc.weight, self.shared_proj.weight).sum(0)
        if self.training:
            ctx.aux_losses.extend(self.losses(logits, probs, experts))
        return self.dropout(out.view(B, T, D))

    @torch.compiler.disable  # sizes that depend on the routing: eager, not a recompile per batch
    def dispatch(self, tokens, weights, experts):
        """Each expert on the tokens routed to it, weighted: out [N, D] = sum over a token's k experts."""
        N, k = weights.shape
        # slot s = choice * N + token: sorting the slots by expert (stably) lists each expert's tokens
        # first choices first, in token order -- the order in which capacity serves them
        slot_expert = experts.T.reshape(-1)
        order = slot_expert.argsort(stable=True)
        counts = torch.bincount(slot_expert, minlength=self.n_experts).tolist()
        if self.capacity is not None and self.training:
            cap = math.ceil(self.capacity * N * k / self.n_experts)
        else:
            cap = N * k
        slot_weight = weights.T.reshape(-1)
        out = torch.zeros_like(tokens)
        start = 0
        for e, count in enumerate(counts):
            slots = order[start:start + min(count, cap)]
            start += count
            if not len(slots):  # no work; its weights still get a (zero) gradient through the stack's other slices
                continue
            token = slots % N
            y = self.mlp(tokens[token], self.fc.weight[e], self.proj.weight[e])
            out.index_add_(0, token, (y * slot_weight[slots, None]).to(out.dtype))
        return out

    def losses(self, logits, probs, experts):
        """[load-balancing loss, router z-loss], each times its weight (see the module's docstring)."""
        routed = torch.bincount(experts.reshape(-1), minlength=self.n_experts).float()
        share = routed / experts.numel()  # f_i: no gradient (a count), P_i carries it
        balance = self.n_experts * (share * probs.mean(dim=0)).sum()
        z = torch.logsumexp(logits, dim=-1).square().mean()
        return [self.aux_weight * balance, self.z_weight * z]
