"""How attention heads split over tensor-parallel ranks: query heads evenly; KV heads evenly, or,
with more ranks than KV heads, each rank holding the one KV head its query heads share."""

from __future__ import annotations

from shardline.shards.models.config import ModelConfig


def kv_heads_per_rank(num_kv_heads: int, world_size: int) -> int:
    if world_size <= num_kv_heads:
        if num_kv_heads % world_size:
            raise ValueError(f"{num_kv_heads} KV heads cannot be split over {world_size} ranks")
        return num_kv_heads // world_size
    if world_size % num_kv_heads:
        raise ValueError(f"{num_kv_heads} KV heads cannot be replicated over {world_size} ranks")
    return 1


def check_heads(config: ModelConfig, world_size: int) -> None:
    if config.num_heads % world_size:
        raise ValueError(
            f"{config.num_heads} attention heads cannot be split over {world_size} ranks"
        )
    if config.num_heads % config.num_kv_heads:
        raise ValueError(
            f"{config.num_heads} attention heads are not a multiple of "
            f"{config.num_kv_heads} KV heads"
        )
