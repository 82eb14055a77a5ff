"""Mixture of Experts (placeholder until the MoE part lands)."""

import torch.nn as nn


class MoE(nn.Module):
    reads_context = True

    def __init__(self, cfg, activation, gated: bool):
        super().__init__()
        raise NotImplementedError("MoE")
