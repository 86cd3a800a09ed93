"""This rank's slices of the weights that older checkpoint layouts store fused or transposed.

Every projection is returned as a Linear weight [out_features, in_features] (a bias [out]), and
a fused qkv projection with this rank's q rows first, then its k rows, then its v rows: the
order the attention layer splits.
"""

from __future__ import annotations

import torch

from shardline.shards.models.llama import kv_heads_per_rank
from shardline.shards.utils.weights import Weights


def checkpoint_prefix(weights: Weights, name: str, prefix: str) -> str:
    """`prefix` if the checkpoint names its tensors under it (`prefix` + `name` exists), else "":
    a base model's own checkpoint (GPT-2's, BLOOM's) omits the causal-LM wrapper's prefix."""
    return prefix if f"{prefix}{name}" in weights else ""


def grouped_qkv(
    weights: Weights, name: str, num_heads: int, num_kv_heads: int, head_dim: int
) -> torch.Tensor:
    """This rank's rows of a qkv projection stored per KV head as [its query heads, its key, its
    value] (rows [kv_heads, heads / kv_heads + 2, head_dim], then any input features): Falcon's
    layouts (multi-query: one KV head; the new decoder architecture: grouped KV) and BLOOM's
    [heads, 3, head_dim] (one query head per KV head). Only the KV groups this rank's query
    heads belong to are read; with more ranks than KV heads each rank reads its one group."""
    tp = weights.tp
    group = num_heads // num_kv_heads
    heads = num_heads // tp.world_size
    first_head = tp.rank * heads
    first_group = first_head // group
    num_groups = kv_heads_per_rank(num_kv_heads, tp.world_size)
    rows_per_group = (group + 2) * head_dim
    fused = weights.get_range(
        name, 0, first_group * rows_per_group, (first_group + num_groups) * rows_per_group
    )
    grouped = fused.view(num_groups, group + 2, head_dim, *fused.shape[1:])
    skip = first_head - first_group * group
    q = grouped[:, :group].flatten(0, 1)[skip : skip + heads]
    k, v = grouped[:, group], grouped[:, group + 1]
    return torch.cat([q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)]).contiguous()


def conv1d_qkv(weights: Weights, prefix: str, hidden_size: int) -> tuple[torch.Tensor, ...]:
    """GPT-2's c_attn, a Conv1D (weight [in, 3 * hidden], columns q | k | v): this rank's heads'
    q, k and v columns, as a Linear weight [rows, in] and a bias [rows]."""
    tp = weights.tp
    part = hidden_size // tp.world_size
    spans = [
        (i * hidden_size + tp.rank * part, i * hidden_size + (tp.rank + 1) * part) for i in range(3)
    ]
    weight = torch.cat([weights.get_range(f"{prefix}.weight", 1, *span) for span in spans], dim=1)
    bias = torch.cat([weights.get_range(f"{prefix}.bias", 0, *span) for span in spans])
    return weight.t().contiguous(), bias


def conv1d_column(weights: Weights, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A Conv1D (weight [in, out]) split by output features: Linear weight and bias slices."""
    weight = weights.get_sharded(f"{prefix}.weight", dim=1)
    return weight.t().contiguous(), weights.get_sharded(f"{prefix}.bias", dim=0)


def conv1d_row(weights: Weights, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A Conv1D split by input features: this rank's Linear weight slice and the whole bias
    (added once, after the partial outputs are summed)."""
    weight = weights.get_sharded(f"{prefix}.weight", dim=0)
    return weight.t().contiguous(), weights.get_tensor(f"{prefix}.bias")
