"""Vocabulary-parallel token embedding and LM head: each rank holds a slice of the vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shardline.shards.layers.linear import frozen, linear
from shardline.shards.utils.dist import TPGroup
from shardline.shards.utils.fp8_weights import read_lm_head
from shardline.shards.utils.weights import Weights


class VocabParallelEmbedding(nn.Module):
    """Rank r holds rows [r * rows_per_rank, (r + 1) * rows_per_rank), zero-padded past the vocab."""

    def __init__(self, weights: Weights, name: str) -> None:
        super().__init__()
        self.tp = weights.tp
        self.weight = frozen(weights.get_sharded(name, dim=0, pad=True))
        self.vocab_start = self.tp.rank * self.weight.shape[0]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        return self.tp.all_reduce(out * mine.unsqueeze(-1).to(out.dtype))


class ParallelLMHead(nn.Module):
    """Logits for this rank's vocabulary slice, gathered into the full vocabulary on every rank;
    the weight in FP8 (with its row scales) where fp8_weights.read_lm_head says."""

    def __init__(self, weights: Weights, name: str, vocab_size: int) -> None:
        super().__init__()
        self.tp: TPGroup = weights.tp
        head = read_lm_head(weights, name)
        self.weight = frozen(head.weight)
        self.weight_scale = frozen(head.scale)
        self.vocab_size = vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in the model's dtype: the sampler reads them as they are, or in float32 where
        a processor changes them."""
        logits = linear(hidden, self.weight, weight_scale=self.weight_scale)
        return self.tp.all_gather(logits, dim=-1)[..., : self.vocab_size]
