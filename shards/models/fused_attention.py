"""Attention behind one fused qkv projection (GPT-2, BLOOM, Falcon): the projection's rows are
this rank's q heads, then its k heads, then its v heads (shards/models/layout.py puts them in
that order at load), followed by paged attention and the output projection."""

from __future__ import annotations

import torch
from torch import nn

from shardline.shards.layers.attention import AttentionMetadata
from shardline.shards.layers.attention.layer import KVCache, PagedAttention
from shardline.shards.layers.linear import ColumnParallelLinear, RowParallelLinear


class FusedQKVAttention(nn.Module):
    def __init__(
        self,
        qkv: ColumnParallelLinear,
        out: RowParallelLinear,
        attention: PagedAttention,
        num_kv_heads: int,
    ) -> None:
        """`num_kv_heads`: this rank's."""
        super().__init__()
        self.qkv = qkv
        self.out = out
        self.attention = attention
        self.split = [attention.num_heads, num_kv_heads, num_kv_heads]

    def forward(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        return self.out(self.attend(hidden, positions, kv_cache, meta))

    def attend(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """This rank's heads' attention output [T, heads * head_dim], before `out`."""
        heads = self.qkv(hidden).view(hidden.shape[0], -1, self.attention.head_dim)
        q, k, v = heads.split(self.split, dim=1)
        return self.attention(q, k, v, positions, kv_cache, meta)
