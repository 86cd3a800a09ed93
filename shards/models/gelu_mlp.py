"""The two-layer GELU MLP of GPT-2, BLOOM and Falcon: up (split by output features), GELU,
down (split by input features, summed over ranks)."""

from __future__ import annotations

import torch
from torch import nn

from shardline.shards.layers.activation import gelu
from shardline.shards.layers.linear import ColumnParallelLinear, RowParallelLinear
from shardline.shards.utils.weights import Weights


class GeluMLP(nn.Module):
    def __init__(self, up: ColumnParallelLinear, down: RowParallelLinear, activation: str) -> None:
        """`activation`: transformers' name of the GELU variant (activation.GELU_APPROXIMATIONS)."""
        super().__init__()
        self.up = up
        self.down = down
        self.activation = activation

    @classmethod
    def load(cls, weights: Weights, up: str, down: str, bias: bool, activation: str) -> GeluMLP:
        """From Linear weights named `up` and `down` (prefixes of .weight / .bias)."""
        return cls(
            ColumnParallelLinear.load(weights, [up], bias),
            RowParallelLinear.load(weights, down, bias),
            activation,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.activations(x))

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """GELU(up(x)), this rank's part of the hidden features: `down`'s input."""
        return gelu(self.up(x), self.activation)
