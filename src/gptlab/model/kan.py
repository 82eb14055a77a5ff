"""Kolmogorov-Arnold layers: the "KAN" part of a block string. Experimental.

A linear layer computes y_o = sum_i w_oi x_i: a learned number on every edge, a fixed activation after the
sum. A Kolmogorov-Arnold layer (Liu et al. 2024, "KAN: Kolmogorov-Arnold Networks") puts a learned function
on every edge instead: y_o = sum_i phi_oi(x_i), each phi a B-spline plus a SiLU "base" term. Written as in
Blealtan's efficient-kan, every phi shares the same basis functions, so the layer is one matmul over
expanded features:

    y = base_weight @ silu(x) + spline_weight @ B(x)        B(x): the G + k B-spline bases of each x_i

Here both weights are one matrix over [silu(x_i), B_1(x_i), ..., B_{G+k}(x_i)] for every input i, so a
layer costs in * out * (G + k + 1) weights (G = model.kan_grid intervals, k = model.kan_order).

Choices, and why:
- The grid is fixed on [-2, 2] (no grid updates, which would change shapes' meaning during training). The
  splines only act where the grid is, so each layer first puts its input there: RMS normalisation without a
  gain, which maps every token's features to unit RMS (~N(0, 1): 95% inside [-2, 2]; the order-k bases reach
  k intervals further, to +-4.4 at the defaults; beyond that only the SiLU term acts). In a pre-norm block
  this repeats the Norm before it (keeping the Norm's per-feature gains); it is what lets the hidden layer,
  a cosinenorm before it (features ~1/sqrt(d_model)) or no norm at all put their values on the grid.
- Hidden width: the one at which the KAN MLP has as many weights as the MLP it stands in for (model.mlp's,
  gated or not), d_model -> hidden -> d_model with 2 * d_model * hidden * (G + k + 1) weights: for a plain
  MLP hidden = d_ff / (G + k + 1), 4 * d_model / 9 at the defaults. Raise model.d_ff to widen it.
- No biases: inside the grid the bases sum to 1, so each spline already has a constant term.
- Init: the weight matrices are named `fc.weight` and `proj.weight`, so the model's init treats them as an
  MLP's: normal(0, init_std), the output one scaled by 1/sqrt(2 n_layer) with init = gpt2. With unit-RMS
  inputs the expanded features have a mean square of ~0.83 an input (SiLU's 0.35 + the bases' 0.48),
  so a layer's output has the scale a linear layer's would. With init = pytorch the layer keeps its own
  init, efficient-kan's: the SiLU weights as nn.Linear's, the spline weights near zero (a SiLU MLP at first).
- The bases are computed in fp32 (under bf16 autocast the matmul still runs in bf16), per token: a KV cache
  needs nothing from it, and torch.compile sees a fixed loop over the order.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.config import ModelConfig

GRID_RANGE = (-2.0, 2.0)  # where unit-RMS features lie (see the module docstring)


def uniform_knots(grid: int, order: int, lo: float = GRID_RANGE[0], hi: float = GRID_RANGE[1]) -> torch.Tensor:
    """The G + 2k + 1 knots of G equal intervals on [lo, hi], extended by k intervals on each side."""
    h = (hi - lo) / grid
    return torch.arange(-order, grid + order + 1, dtype=torch.float32) * h + lo


def b_spline_bases(x: torch.Tensor, knots: torch.Tensor, order: int) -> torch.Tensor:
    """x [...] -> [..., G + k]: every B-spline basis of `order` on `knots` at x, by the Cox-de Boor recursion.

    Order 0 is the indicator of each knot interval; order p mixes neighbouring order-(p-1) bases with weights
    that rise and fall linearly across their support. The result is non-negative, each x has at most k + 1
    non-zero bases, and they sum to 1 between the k-th knot and the k-th from last.
    """
    x = x.unsqueeze(-1)
    bases = ((x >= knots[:-1]) & (x < knots[1:])).to(x.dtype)  # [..., G + 2k]
    for p in range(1, order + 1):
        left = (x - knots[: -(p + 1)]) / (knots[p:-1] - knots[: -(p + 1)])
        right = (knots[p + 1 :] - x) / (knots[p + 1 :] - knots[1:-p])
        bases = left * bases[..., :-1] + right * bases[..., 1:]  # one basis fewer each order
    return bases


class KANLayer(nn.Module):
    """in -> out: a learned function (SiLU + a B-spline) on every edge, summed at each output (efficient-kan)."""

    def __init__(self, in_features: int, out_features: int, grid: int, order: int, eps: float = 1e-5):
        super().__init__()
        self.in_features, self.out_features, self.order, self.eps = in_features, out_features, order, eps
        self.n_features = 1 + grid + order  # SiLU, then the G + k bases, for each input
        self.register_buffer("knots", uniform_knots(grid, order), persistent=False)
        # [out, in * (1 + G + k)]: for input i, column i * (1 + G + k) is its SiLU weight, the next G + k its spline
        self.weight = nn.Parameter(torch.empty(out_features, in_features * self.n_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """efficient-kan's init: SiLU weights as nn.Linear(in, out)'s, spline weights 10x smaller (noise)."""
        bound = 1 / math.sqrt(self.in_features)
        with torch.no_grad():
            w = self.weight.view(self.out_features, self.in_features, self.n_features)
            w[..., 0].uniform_(-bound, bound)
            w[..., 1:].uniform_(-0.1 * bound, 0.1 * bound)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., in * (1 + G + k)]: each input's SiLU and spline bases, at unit RMS, in fp32."""
        x = F.rms_norm(x.float(), (x.size(-1),), eps=self.eps)
        expanded = torch.cat((F.silu(x).unsqueeze(-1), b_spline_bases(x, self.knots, self.order)), dim=-1)
        return expanded.flatten(-2)

    def forward(self, x):
        return F.linear(self.features(x).to(self.weight.dtype), self.weight)  # autocast runs it in bf16

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.n_features - 1 - self.order} intervals, order {self.order}"


def kan_hidden(cfg: ModelConfig) -> int:
    """The KAN MLP's hidden width: as many weights as model.mlp's MLP (2 or 3 d_model x d_ff matrices)."""
    from gptlab.model.gpt import MLPS, GatedMLP

    matrices = 3 if MLPS[cfg.mlp][0] is GatedMLP else 2
    return max(1, round(matrices * cfg.ff_dim / (2 * (cfg.kan_grid + cfg.kan_order + 1))))


class KANMLP(nn.Module):
    """d_model -> hidden -> d_model through two KAN layers: an MLP whose activations are learned (experimental)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.hidden = kan_hidden(cfg)
        self.fc = KANLayer(cfg.d_model, self.hidden, cfg.kan_grid, cfg.kan_order, cfg.norm_eps)
        self.proj = KANLayer(self.hidden, cfg.d_model, cfg.kan_grid, cfg.kan_order, cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.proj(self.fc(x)))
