"""What a shard tells about itself: Info (the model and the engine's settings, TGI's InfoResponse)
and Stats (KV blocks, batches)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shardline.proto import generate_pb2 as pb
from shardline.shards.prefix_cache import cached_block_count

if TYPE_CHECKING:
    from shardline.shards.engine import ShardEngine


def engine_info(engine: ShardEngine) -> pb.InfoResponse:
    return pb.InfoResponse(
        requires_padding=False,
        dtype=str(engine.model.dtype).removeprefix("torch."),
        device_type=engine.device.type,
        window_size=engine.config.sliding_window,
        speculate=0,
        support_chunking=True,
        use_prefix_caching=engine.settings.prefix_caching,
        attention_impl=engine.settings.attention_impl,
        block_size=engine.settings.block_size,
        model_type=engine.config.model_type,
        world_size=engine.tp.stage.world_size,
        pipeline_parallel_size=engine.tp.stage.size,
        vocab_size=engine.config.vocab_size,
        max_position_embeddings=engine.max_positions,
        eos_token_ids=sorted(engine.config.eos_token_ids),
        quantize=engine.settings.quantization or "",
        kv_cache_dtype=str(engine.kv_cache_dtype).removeprefix("torch."),
    )


def engine_stats(engine: ShardEngine) -> pb.StatsResponse:
    allocator = engine.allocator
    return pb.StatsResponse(
        total_blocks=allocator.num_blocks if allocator else 0,
        free_blocks=allocator.num_free if allocator else 0,
        block_size=engine.settings.block_size,
        num_sequences=sum(batch.size for batch in engine.batches.values()),
        num_batches=len(engine.batches),
        cached_blocks=cached_block_count(allocator),
    )
