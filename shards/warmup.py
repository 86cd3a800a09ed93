"""A shard's warmup: the largest prefill the router may send, run once to measure the peak memory
beside which the KV cache is sized (the blocks agreed on by every tensor-parallel rank); the
CUDA graphs captured; the greedy and chunked-prefill kernels compiled before the first request."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from shardline.gc_pauses import freeze_long_lived_objects
from shardline.proto import generate_pb2 as pb
from shardline.shards.cuda_graphs import buckets_up_to
from shardline.shards.kv_cache import KVCacheExhaustedError, bytes_per_block
from shardline.shards.request_checks import InvalidRequestError
from shardline.shards.utils.dist import TPGroup

if TYPE_CHECKING:
    from shardline.shards.engine import ShardEngine

logger = logging.getLogger(__name__)

# On CPU the cache is sized by --kv-cache-bytes, so a short prefill only proves the forward pass
# works (a worst-case one would take a minute on a laptop for nothing).
_CPU_WARMUP_TOKENS = 64


def warm_up(engine: ShardEngine, request: pb.WarmupRequest) -> pb.WarmupResponse:
    max_prefill = request.max_prefill_tokens or 4096
    max_input = request.max_input_tokens if request.HasField("max_input_tokens") else None
    positions = engine.max_positions
    if request.HasField("max_total_tokens") and request.max_total_tokens > positions:
        raise InvalidRequestError(
            f"max_total_tokens {request.max_total_tokens} exceeds the model's {positions} positions"
        )
    engine.clear_cache(pb.ClearCacheRequest())
    engine.prefill_limit = None  # the passes below are sized as they come
    settings = engine.settings
    longest_prompt = min(max_input or max_prefill, positions - 1)
    max_batch = request.max_batch_size if request.HasField("max_batch_size") else None
    buckets = buckets_up_to(settings.cuda_graph_buckets, max_batch)
    # A prefill may carry the running batch's rows: as many as the router runs at once, or
    # (where it sets no limit) an estimate, the largest CUDA-graph batch.
    decode_rows = max_batch if max_batch is not None else max(buckets, default=0)
    peak_bytes = _run_largest_prefill(engine, max_prefill, longest_prompt, decode_rows)
    fit = blocks_that_fit(
        engine.model,
        engine.device,
        peak_bytes,
        block_size=settings.block_size,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        kv_cache_bytes=settings.kv_cache_bytes,
        kv_cache_dtype=engine.kv_cache_dtype,
    )
    num_blocks = agree_on_min(fit, engine.tp, engine.device)
    engine.allocate_cache(num_blocks)
    supported = num_blocks * settings.block_size
    max_total = request.max_total_tokens if request.HasField("max_total_tokens") else None
    max_total = max_total or min(supported, positions)
    if _graphs_wanted(engine):
        engine.runner.capture_graphs(buckets, -(-max_total // settings.block_size))
    _run_greedy_steps(engine)
    engine.prefill_limit = max_prefill
    freeze_long_lived_objects()
    logger.info(
        "kv cache ready: %d blocks of %d tokens (%d tokens, %s); prefix cache %s, %d blocks",
        num_blocks,
        settings.block_size,
        supported,
        str(engine.kv_cache_dtype).removeprefix("torch."),
        "on" if settings.prefix_caching else "off",
        engine.stats().cached_blocks,
    )
    return pb.WarmupResponse(
        max_supported_total_tokens=supported,
        max_input_tokens=max_input or max(max_total - 1, 1),
        max_total_tokens=max_total,
    )


def _run_largest_prefill(
    engine: ShardEngine, max_prefill_tokens: int, max_input_tokens: int, decode_rows: int
) -> int:
    """Runs the largest prefill the router may send (with the decode rows it may carry);
    returns the peak device bytes it used."""
    device = engine.device
    lengths = warmup_lengths(max_prefill_tokens, max_input_tokens, decode_rows, device)
    block_size = engine.settings.block_size
    engine.release_cache()
    engine.allocate_cache(sum(-(-n // block_size) for n in lengths) + len(lengths))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    vocab_size = engine.config.vocab_size
    batch = pb.Batch(
        id=0, requests=[warmup_request(i, n, vocab_size) for i, n in enumerate(lengths)]
    )
    engine.prefill(pb.PrefillRequest(batch=batch))
    engine.clear_cache(pb.ClearCacheRequest())
    peak = 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    engine.release_cache()
    return peak


def _run_greedy_steps(engine: ShardEngine) -> None:
    """A greedy request's prompt in two chunks and a decode step, so that the kernels of the
    greedy path and of chunked prefill compile now rather than on the first request."""
    request = warmup_request(0, 2, engine.config.vocab_size, max_new_tokens=3, sample=False)
    request.chunk_len = 1
    engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=0, requests=[request])))
    request.prefix_len = 1
    answer = engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=1, requests=[request])))
    engine.decode(pb.DecodeRequest(batches=[answer.batch]))
    engine.clear_cache(pb.ClearCacheRequest())


def _graphs_wanted(engine: ShardEngine) -> bool:
    settings = engine.settings
    return (
        engine.device.type == "cuda"
        and engine.tp.stage.size == 1  # a captured graph cannot hold the stage hand-offs
        and bool(settings.cuda_graph_buckets)
        and settings.attention_impl == "triton"
    )


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
    kv_cache_dtype: torch.dtype | None = None,
) -> int:
    """On GPU: the memory fraction of the card less the warmup's peak; on CPU: kv_cache_bytes.
    Blocks hold `kv_cache_dtype` (default: the model's dtype)."""
    per_block = bytes_per_block(
        num_layers=model.num_layers,
        block_size=block_size,
        num_kv_heads=model.num_kv_heads_per_rank,
        head_dim=model.head_dim,
        dtype=kv_cache_dtype or model.dtype,
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
    """The smallest value over every rank (of every pipeline stage, each sizing the cache of its
    own layers), so that every rank has the same blocks."""
    if tp.stage.world_size == 1:
        return value
    where = device if device.type == "cuda" else torch.device("cpu")
    tensor = torch.tensor([value], dtype=torch.long, device=where)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN, group=tp.stage.group)
    return int(tensor.item())
