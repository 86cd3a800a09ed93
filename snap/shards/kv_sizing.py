"""How big the KV cache can be: the warmup prefill that measures peak memory, and the blocks
that fit beside it (agreed on by every tensor-parallel rank)."""

from __future__ import annotations

import torch

from shardline.proto import generate_pb2 as pb
from shardline.shards.kv_cache import KVCacheExhaustedError, bytes_per_block
from shardline.shards.utils.dist import TPGroup

# On CPU the cache is sized by --kv-cache-bytes, so a short prefill only proves the forward pass
# works (a worst-case one would take a minute on a laptop for nothing).
_CPU_WARMUP_TOKENS = 64


def warmup_lengths(
    max_prefill_tokens: int, max_input_tokens: int, decode_rows: int, device: torch.device
) -> list[int]:
    """Prompt lengths of the largest prefill batch the router may send, plus one one-token
    prompt per decode row it may carry: a row adds one token and one row of logits, as such a
    prompt does."""
    if device.type == "cpu":
        max_prefill_tokens, decode_rows = min(max_prefill_tokens, _CPU_WARMUP_TOKENS), 0
    per_sequence = max(1, min(max_input_tokens, max_prefill_tokens))
    full, rest = divmod(max_prefill_tokens, per_sequence)
    return [per_sequence] * full + ([rest] if rest else []) + [1] * decode_rows


def warmup_request(
    request_id: int, length: int, vocab_size: int, max_new_tokens: int = 1, sample: bool = True
) -> pb.Request:
    """A sampled request that exercises every processor, or a greedy one (a batch of greedy
    rows alone takes its own sampler path)."""
    sampled = pb.NextTokenChooserParameters(
        temperature=0.9,
        top_k=20,
        top_p=0.9,
        typical_p=1.0,
        do_sample=True,
        seed=request_id,
        repetition_penalty=1.1,
        frequency_penalty=0.1,
        presence_penalty=0.1,
        min_p=0.0,
    )
    return pb.Request(
        id=request_id,
        input_ids=[(7 * i + 3) % vocab_size for i in range(length)],
        parameters=sampled if sample else pb.NextTokenChooserParameters(),
        stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=max_new_tokens),
    )


def blocks_that_fit(
    model: torch.nn.Module,
    device: torch.device,
    peak_bytes: int,
    *,
    block_size: int,
    gpu_memory_utilization: float,
    kv_cache_bytes: int | None,
) -> int:
    """On GPU: the memory fraction of the card less the warmup's peak; on CPU: kv_cache_bytes."""
    per_block = bytes_per_block(
        num_layers=model.num_layers,
        block_size=block_size,
        num_kv_heads=model.num_kv_heads_per_rank,
        head_dim=model.head_dim,
        dtype=model.dtype,
    )
    if device.type == "cuda":
        _, total = torch.cuda.mem_get_info(device)
        budget = int(total * gpu_memory_utilization) - peak_bytes
    else:
        budget = kv_cache_bytes or 1 << 30
    num_blocks = budget // per_block
    if num_blocks < 1:
        raise KVCacheExhaustedError(
            f"no memory left for the KV cache ({budget} bytes for blocks of {per_block} bytes); "
            "lower --max-batch-prefill-tokens or raise the memory fraction"
        )
    return int(num_blocks)


def agree_on_min(value: int, tp: TPGroup, device: torch.device) -> int:
    """The smallest value over the tensor-parallel ranks, so every rank sizes the same cache."""
    if tp.world_size == 1:
        return value
    where = device if device.type == "cuda" else torch.device("cpu")
    tensor = torch.tensor([value], dtype=torch.long, device=where)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN, group=tp.group)
    return int(tensor.item())
