"""CUDA graphs for decode: one captured forward per padded batch-size bucket.

A decode step copies its inputs into static buffers, replays the smallest graph whose bucket
holds the batch and reads the logits of the real rows. Padding rows write no KV (slot -1) and
attend to nothing (context length 0). Python launch overhead, which dominates a decode step on
a fast GPU, is paid once at capture instead of on every step.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass

import torch

from shardline.progress import logged_progress
from shardline.shards.kv_cache import KVCache
from shardline.shards.layers.attention.metadata import AttentionMetadata

logger = logging.getLogger(__name__)

# A step runs the graph of the smallest bucket holding its rows, padded: between 128 and 384
# rows its GEMMs sit near the H100's ridge, where a padded row costs nearly what a real one
# does. Buckets every 8 rows (not 32) took the 8B offline run from 10,855 / 10,882 to 11,236 /
# 11,222 output tok/s in bf16 and 15,108 / 15,092 to 15,402 in FP8 (one H100, alternating;
# benchmarks/RESULTS.md, session 14), for ~1.5 s more capture at warmup.
DEFAULT_BUCKETS = (1, 2, 4, *range(8, 385, 8), 416, 448, 480, 512)


@dataclass
class _StaticInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor

    @classmethod
    def allocate(cls, max_batch: int, max_blocks: int, device: torch.device) -> _StaticInputs:
        return cls(
            input_ids=torch.zeros(max_batch, dtype=torch.long, device=device),
            positions=torch.zeros(max_batch, dtype=torch.long, device=device),
            slot_mapping=torch.full((max_batch,), -1, dtype=torch.long, device=device),
            block_tables=torch.zeros((max_batch, max_blocks), dtype=torch.int32, device=device),
            context_lens=torch.zeros(max_batch, dtype=torch.int32, device=device),
        )

    def metadata(self, batch: int) -> AttentionMetadata:
        return AttentionMetadata(
            is_prefill=False,
            slot_mapping=self.slot_mapping[:batch],
            block_tables=self.block_tables[:batch],
            context_lens=self.context_lens[:batch],
        )


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: KVCache,
        buckets: tuple[int, ...],
        max_blocks_per_seq: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.buckets = tuple(sorted(set(buckets)))
        self.device = device
        self.inputs = _StaticInputs.allocate(self.buckets[-1], max_blocks_per_seq, device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    @property
    def max_batch_size(self) -> int:
        return self.buckets[-1]

    @property
    def max_blocks_per_seq(self) -> int:
        return int(self.inputs.block_tables.shape[1])

    def fits(self, batch_size: int, block_table_width: int) -> bool:
        return batch_size <= self.max_batch_size and block_table_width <= self.max_blocks_per_seq

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        buckets = reversed(self.buckets)
        for bucket in logged_progress(buckets, len(self.buckets), "capturing CUDA graphs", logger):
            self._graphs[bucket] = self._capture_one(bucket, pool)

    def _capture_one(self, bucket: int, pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        meta = self.inputs.metadata(bucket)
        args = (
            self.inputs.input_ids[:bucket],
            self.inputs.positions[:bucket],
            self.kv_cache.layers,
            meta,
        )
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up autotuning and lazy initialisation outside the graph
                self.model.compute_logits(self.model(*args))
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            logits = self.model.compute_logits(self.model(*args))
        return graph, logits

    @torch.inference_mode()
    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
    ) -> torch.Tensor:
        """Logits [batch, vocab] for one decode step; the inputs may live on the host (they are
        staged through pinned memory, so no copy waits for the device's queued work)."""
        batch = int(input_ids.shape[0])
        bucket = self.buckets[bisect.bisect_left(self.buckets, batch)]
        static = self.inputs
        static.input_ids[:batch].copy_(_staged(input_ids), non_blocking=True)
        static.positions[:batch].copy_(_staged(positions), non_blocking=True)
        static.slot_mapping[:batch].copy_(_staged(slot_mapping), non_blocking=True)
        width = block_tables.shape[1]
        static.block_tables[:batch, :width].copy_(_staged(block_tables), non_blocking=True)
        static.context_lens[:batch].copy_(_staged(context_lens), non_blocking=True)
        static.slot_mapping[batch:bucket].fill_(-1)
        static.context_lens[batch:bucket].fill_(0)
        graph, logits = self._graphs[bucket]
        graph.replay()
        return logits[:batch]


def _staged(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.is_cuda else tensor.pin_memory()


def buckets_up_to(buckets: tuple[int, ...], max_batch_size: int | None) -> tuple[int, ...]:
    """The buckets a batch of at most `max_batch_size` rows can use: those below it, and it
    when a larger bucket would hold it (no graph is captured for batches that never come)."""
    if max_batch_size is None or not buckets or max_batch_size >= max(buckets):
        return buckets
    return tuple(sorted({b for b in buckets if b < max_batch_size} | {max_batch_size}))


def parse_buckets(spec: str | None, default: tuple[int, ...] = DEFAULT_BUCKETS) -> tuple[int, ...]:
    """TGI's --cuda-graphs: comma-separated batch sizes; "0" (or empty) turns graphs off."""
    if spec is None:
        return default
    sizes = tuple(int(part) for part in spec.split(",") if part.strip())
    if any(size < 0 for size in sizes):
        raise ValueError(f"--cuda-graphs takes non-negative batch sizes (got {spec!r})")
    return tuple(size for size in sizes if size > 0)
