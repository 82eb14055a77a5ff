"""Kolmogorov-Arnold layers (placeholder until the KAN part lands)."""

import torch.nn as nn


class KANMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        raise NotImplementedError("KAN")
