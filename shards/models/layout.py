"""This rank's slices of the weights that older checkpoint layouts store fused or transposed.

Every projection is returned as a Linear weight [out_features, in_features] (a bias [out]), and
a fused qkv projection with this rank's q rows first, then its k rows, then its v rows: the
order the attention layer splits. The grouped qkv layout (BLOOM, Falcon) reads its rows through
fp8_weights.read_linear, so that it is FP8 where the model's linear layers are.
"""

from __future__ import annotations

import torch

from shardline.shards.layers.linear import ColumnParallelLinear
from shardline.shards.models.heads import kv_heads_per_rank
from shardline.shards.utils.fp8_weights import read_linear
from shardline.shards.utils.weights import Weights


def checkpoint_prefix(weights: Weights, name: str, prefix: str) -> str:
    """`prefix` if the checkpoint names its tensors under it (`prefix` + `name` exists), else "":
    a base model's own checkpoint (GPT-2's, BLOOM's) omits the causal-LM wrapper's prefix."""
    return prefix if f"{prefix}{name}" in weights else ""


def grouped_qkv(
    weights: Weights, prefix: str, heads: tuple[int, int, int], bias: bool
) -> ColumnParallelLinear:
    """This rank's rows of a qkv projection stored per KV head as [its query heads, its key, its
    value] (rows [kv_heads, heads / kv_heads + 2, head_dim]), `heads` being (num_heads,
    num_kv_heads, head_dim): Falcon's layouts (multi-query: one KV head; the new decoder
    architecture: grouped KV) and BLOOM's [heads, 3, head_dim] (one query head per KV head).
    Only the KV groups this rank's query heads belong to are read; with more ranks than KV
    heads each rank reads its one group."""
    num_heads, num_kv_heads, head_dim = heads
    tp = weights.tp
    group = num_heads // num_kv_heads
    rank_heads = num_heads // tp.world_size
    first_head = tp.rank * rank_heads
    first_group = first_head // group
    num_groups = kv_heads_per_rank(num_kv_heads, tp.world_size)
    rows_per_group = (group + 2) * head_dim
    bounds = (first_group * rows_per_group, (first_group + num_groups) * rows_per_group)
    grouped = torch.arange(bounds[1] - bounds[0]).view(num_groups, group + 2, head_dim)
    skip = first_head - first_group * group
    q = grouped[:, :group].flatten(0, 1)[skip : skip + rank_heads]
    order = torch.cat([q.flatten(), grouped[:, group].flatten(), grouped[:, group + 1].flatten()])
    weight = read_linear(weights, prefix, 0, bounds)
    scale = None if weight.scale is None else weight.scale[order.to(weight.scale.device)]
    b = weights.get_range(f"{prefix}.bias", 0, *bounds)[order.to(weights.device)] if bias else None
    return ColumnParallelLinear(_rows(weight.weight, order), b, scale)


def _rows(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """t's rows in `order` (FP8 rows taken as bytes: float8 tensors index on no device)."""
    order = order.to(t.device)
    if t.element_size() == 1 and t.is_floating_point():
        return t.view(torch.uint8)[order].view(t.dtype)
    return t[order]


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
