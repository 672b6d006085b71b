"""Layers provided by pyro-cpa."""
import torch
from torch import nn


class Abs(nn.Module):
    """Element-wise absolute value, a continuous piecewise affine activation (|x| = LeakyReLU slope -1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs()
