"""Turns batch state into model inputs, runs the forward pass and samples the next tokens."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from shardline.shards.batch import ShardBatch
from shardline.shards.cuda_graphs import DecodeGraphs
from shardline.shards.kv_cache import BlockAllocator, KVCache
from shardline.shards.layers.attention.metadata import AttentionMetadata
from shardline.shards.utils.sampling import Sampler, SamplerOutput, SamplingState


@dataclass
class StepResult:
    """The tokens one forward pass chose, copied to the host."""

    next_tokens: torch.Tensor
    next_token_ids: list[int]
    logprobs: list[float]
    top_ids: list[list[int]] | None
    top_logprobs: list[list[float]] | None
    prompt_logprobs: dict[int, list[float]]
    forward_ns: int
    sample_ns: int


class ModelRunner:
    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.sampler = Sampler()
        self.kv_cache: KVCache | None = None
        self.graphs: DecodeGraphs | None = None

    def release_cache(self) -> None:
        self.graphs = None
        self.kv_cache = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def capture_graphs(self, buckets: tuple[int, ...], max_blocks_per_seq: int) -> None:
        self.graphs = DecodeGraphs(
            self.model, self._require_cache(), buckets, max_blocks_per_seq, self.device
        )
        self.graphs.capture()

    def allocate_cache(self, num_blocks: int, block_size: int) -> KVCache:
        self.kv_cache = KVCache.allocate(
            num_layers=self.model.num_layers,
            num_blocks=num_blocks,
            block_size=block_size,
            num_kv_heads=self.model.num_kv_heads_per_rank,
            head_dim=self.model.head_dim,
            dtype=self.model.dtype,
            device=self.device,
        )
        return self.kv_cache

    @torch.inference_mode()
    def prefill(
        self,
        prompts: list[list[int]],
        sampling: SamplingState,
        block_table: torch.Tensor,
        prompt_logprob_rows: list[int],
        sample_rows: torch.Tensor | None = None,
    ) -> StepResult:
        """`sample_rows[i]`: the prompt whose next-token logits sampling row i reads (default:
        row i), so several sequences of one prompt sample from one prefill."""
        started = time.perf_counter_ns()
        lengths = torch.tensor([len(prompt) for prompt in prompts], dtype=torch.long)
        positions = torch.cat([torch.arange(n) for n in lengths.tolist()])
        rows = torch.repeat_interleave(torch.arange(len(prompts)), lengths)
        cu_seqlens = torch.zeros(len(prompts) + 1, dtype=torch.int32)
        cu_seqlens[1:] = torch.cumsum(lengths, 0)
        meta = AttentionMetadata(
            is_prefill=True,
            slot_mapping=self._to_device(self._slots(block_table, rows, positions)),
            cu_seqlens=self._to_device(cu_seqlens),
            max_seqlen=int(lengths.max()),
        )
        input_ids = self._to_device(torch.tensor([t for p in prompts for t in p], dtype=torch.long))
        hidden = self.model(input_ids, self._to_device(positions), self._cache_layers(), meta)
        last = cu_seqlens[1:].long() - 1
        last = self._to_device(last if sample_rows is None else last[sample_rows])
        logits = self.model.compute_logits(hidden.index_select(0, last))
        prompt_logprobs = {
            row: self._prompt_logprobs(hidden, input_ids, cu_seqlens, row)
            for row in prompt_logprob_rows
        }
        forward_done = time.perf_counter_ns()
        return self._sample(logits, sampling, prompt_logprobs, started, forward_done)

    @torch.inference_mode()
    def decode(self, batch: ShardBatch) -> StepResult:
        started = time.perf_counter_ns()
        positions = torch.tensor([seq.num_cached for seq in batch.sequences], dtype=torch.long)
        slots = self._slots(batch.block_table, torch.arange(batch.size), positions)
        context_lens = (positions + 1).to(torch.int32)
        if self.graphs is not None and self.graphs.fits(batch.size, batch.block_table.shape[1]):
            logits = self.graphs.run(
                batch.last_tokens, positions, slots, batch.block_table, context_lens
            )
        else:
            meta = AttentionMetadata(
                is_prefill=False,
                slot_mapping=self._to_device(slots),
                block_tables=self._to_device(batch.block_table),
                context_lens=self._to_device(context_lens),
                max_context_len=int(context_lens.max()),
            )
            positions = self._to_device(positions)
            hidden = self.model(batch.last_tokens, positions, self._cache_layers(), meta)
            logits = self.model.compute_logits(hidden)
        forward_done = time.perf_counter_ns()
        return self._sample(logits, batch.sampling, {}, started, forward_done)

    def _sample(
        self,
        logits: torch.Tensor,
        sampling: SamplingState,
        prompt_logprobs: dict[int, list[float]],
        started: int,
        forward_done: int,
    ) -> StepResult:
        out: SamplerOutput = self.sampler(logits, sampling)
        sampling.append(out.next_token_ids)
        result = StepResult(
            next_tokens=out.next_token_ids,
            next_token_ids=out.next_token_ids.tolist(),
            logprobs=out.logprobs.tolist(),
            top_ids=None if out.top_ids is None else out.top_ids.tolist(),
            top_logprobs=None if out.top_logprobs is None else out.top_logprobs.tolist(),
            prompt_logprobs=prompt_logprobs,
            forward_ns=forward_done - started,
            sample_ns=0,
        )
        result.sample_ns = time.perf_counter_ns() - forward_done
        return result

    def _prompt_logprobs(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, row: int
    ) -> list[float]:
        """Logprob of each prompt token given the tokens before it; NaN for the first."""
        start, end = int(cu_seqlens[row]), int(cu_seqlens[row + 1])
        logits = self.model.compute_logits(hidden[start : end - 1]).float()
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = logprobs.gather(1, input_ids[start + 1 : end].unsqueeze(1)).squeeze(1)
        return [float("nan"), *chosen.tolist()]

    def _slots(
        self, block_table: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        block_size = self._require_cache().block_size
        blocks = block_table[rows, positions // block_size].long()
        return blocks * block_size + positions % block_size

    def _cache_layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self._require_cache().layers

    def _require_cache(self) -> KVCache:
        if self.kv_cache is None:
            raise RuntimeError("the KV cache is not allocated: call Warmup first")
        return self.kv_cache

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)


def grow_blocks(batch: ShardBatch, allocator: BlockAllocator, block_size: int) -> None:
    """Gives every sequence whose next token starts a new block that block, all or nothing."""
    needy = [
        row
        for row, seq in enumerate(batch.sequences)
        if seq.num_cached // block_size >= len(seq.blocks)
    ]
    if not needy:
        return
    for row in needy:
        seq = batch.sequences[row]
        if len(seq.blocks) >= batch.block_table.shape[1]:
            raise RuntimeError(f"request {seq.request_id} outgrew its block table")
    new_blocks = allocator.allocate(len(needy))
    for row, block in zip(needy, new_blocks, strict=True):
        seq = batch.sequences[row]
        batch.block_table[row, len(seq.blocks)] = block
        seq.blocks.append(block)
