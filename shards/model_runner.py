"""Turns batch state into model inputs, runs the forward pass and samples the next tokens."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from shardline.shards.batch import SequenceState, ShardBatch
from shardline.shards.cuda_graphs import DecodeGraphs
from shardline.shards.kv_cache import BlockAllocator, KVCache
from shardline.shards.layers.attention.metadata import AttentionMetadata
from shardline.shards.sampling.sampling import Sampler, SamplingState
from shardline.shards.stage_outputs import share_prompt_logprobs, share_sampled, step_on_arrival
from shardline.shards.step_result import PendingStep, pending_step
from shardline.shards.utils.pipeline import SINGLE_STAGE, PipelineStage
from shardline.shards.utils.transfer import to_device


@dataclass
class PromptChunk:
    """Prompt tokens one prefill pass runs: `token_ids` at positions start, start + 1, ...
    (the tokens before `start` are cached). `logprob_targets`: the prompt token after each of
    them, whose logprob is wanted (decoder_input_details), or None."""

    token_ids: list[int]
    start: int = 0
    logprob_targets: list[int] | None = None


@dataclass
class PrefillOutput:
    """A prefill pass: the first tokens of the prompts it completed (None: it completed none),
    the running batch's decode step, each chunk's prompt logprobs by row."""

    step: PendingStep | None
    running_step: PendingStep | None
    prompt_logprobs: dict[int, list[float]]
    forward_ns: int


class ModelRunner:
    """Runs the model of this rank's pipeline stage; with several stages, the last one's logits
    are sampled there and its choices shared with every rank (stage_outputs.py)."""

    def __init__(
        self, model: torch.nn.Module, device: torch.device, stage: PipelineStage = SINGLE_STAGE
    ) -> None:
        self.model = model
        self.device = device
        self.stage = stage
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

    def allocate_cache(
        self, num_blocks: int, block_size: int, dtype: torch.dtype | None = None
    ) -> KVCache:
        """The paged cache, in `dtype` (default: the model's)."""
        self.kv_cache = KVCache.allocate(
            num_layers=self.model.num_layers,
            num_blocks=num_blocks,
            block_size=block_size,
            num_kv_heads=self.model.num_kv_heads_per_rank,
            head_dim=self.model.head_dim,
            dtype=dtype or self.model.dtype,
            device=self.device,
        )
        return self.kv_cache

    @torch.inference_mode()
    def prefill(
        self,
        chunks: list[PromptChunk],
        sampling: SamplingState | None,
        block_table: torch.Tensor,
        sample_rows: torch.Tensor | None = None,
        running: ShardBatch | None = None,
    ) -> PrefillOutput:
        """The prompt chunks' forward pass and the first tokens of the prompts it completes;
        with `running`, one decode step of that batch in the same pass (its tokens first: one
        weight read serves both). `sample_rows[i]`: the chunk whose last-token logits sampling
        row i reads (default: row i), so several sequences of one prompt sample from one
        prefill; without `sampling` no prompt samples (none ends in this pass)."""
        started = time.perf_counter_ns()
        sizes = [len(chunk.token_ids) for chunk in chunks]
        positions = _chunk_positions([chunk.start for chunk in chunks], sizes)
        lengths = torch.tensor(sizes, dtype=torch.long)
        rows = torch.repeat_interleave(torch.arange(len(chunks)), lengths)
        cu_seqlens = torch.zeros(len(chunks) + 1, dtype=torch.int32)
        cu_seqlens[1:] = torch.cumsum(lengths, 0)
        meta = AttentionMetadata(
            is_prefill=True,
            slot_mapping=self._slots(block_table, rows, positions),
            cu_seqlens=self._to_device(cu_seqlens),
            max_seqlen=int(lengths.max()),
        )
        if any(chunk.start for chunk in chunks):
            starts = torch.tensor([chunk.start for chunk in chunks], dtype=torch.int32)
            meta.prefix_lens = self._to_device(starts)
            meta.prefix_block_tables = self._to_device(block_table)
        input_ids = self._to_device(_concatenated_ids(chunks, int(cu_seqlens[-1])))
        if running is not None:
            input_ids, positions = self._add_decode_rows(running, input_ids, positions, meta)
        meta.slot_mapping = self._to_device(meta.slot_mapping)
        hidden = self.model(input_ids, self._to_device(positions), self._cache_layers(), meta)
        decoded = meta.num_decode_tokens
        last = cu_seqlens[1:].long() - 1 + decoded
        if sampling is None:
            last = last[:0]
        elif sample_rows is not None:
            last = last[sample_rows]
        logits = None
        if self.stage.is_last:
            logits = self.model.compute_logits(
                hidden.index_select(0, self._to_device(torch.cat([torch.arange(decoded), last])))
            )
        prompt_logprobs = self._all_prompt_logprobs(hidden[decoded:], cu_seqlens, chunks)
        forward_done = time.perf_counter_ns()
        step = None
        if sampling is not None:
            rows = None if logits is None else logits[decoded:]
            step = self._sample(rows, sampling, started, forward_done)
        decode = None
        if running is not None:
            rows = None if logits is None else logits[:decoded]
            decode = self._sample(rows, running.sampling, started, forward_done)
        return PrefillOutput(
            step=step,
            running_step=decode,
            prompt_logprobs=prompt_logprobs,
            forward_ns=forward_done - started,
        )

    def _add_decode_rows(
        self,
        batch: ShardBatch,
        prompt_ids: torch.Tensor,
        prompt_positions: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Puts one decode token per row of `batch` before the prompts' tokens: ids, positions,
        KV slots and the paged-attention inputs of those rows."""
        positions = torch.tensor([seq.num_cached for seq in batch.sequences], dtype=torch.long)
        slots = self._slots(batch.block_table, torch.arange(batch.size), positions)
        context_lens = (positions + 1).to(torch.int32)
        meta.slot_mapping = torch.cat([slots, meta.slot_mapping])
        meta.block_tables = self._to_device(batch.block_table)
        meta.context_lens = self._to_device(context_lens)
        meta.num_decode_tokens = batch.size
        input_ids = torch.cat([self._to_device(batch.last_tokens), prompt_ids])
        return input_ids, torch.cat([positions, prompt_positions])

    @torch.inference_mode()
    def decode(
        self, batch: ShardBatch, input_ids: torch.Tensor, positions: list[int]
    ) -> PendingStep:
        """Launches one decode step of `batch` on `input_ids` (device or host) at each row's
        position (`grow_blocks` gives them: a row `ahead` of its recorded tokens runs the step
        after the one in flight, whose tokens are `input_ids`, before the host has seen them)."""
        started = time.perf_counter_ns()
        positions = _int64(positions)
        slots = self._slots(batch.block_table, torch.arange(batch.size), positions)
        context_lens = (positions + 1).to(torch.int32)
        if self.graphs is not None and self.graphs.fits(batch.size, batch.block_table.shape[1]):
            logits = self.graphs.run(input_ids, positions, slots, batch.block_table, context_lens)
        else:
            meta = AttentionMetadata(
                is_prefill=False,
                slot_mapping=self._to_device(slots),
                block_tables=self._to_device(batch.block_table),
                context_lens=self._to_device(context_lens),
            )
            positions = self._to_device(positions)
            hidden = self.model(self._to_device(input_ids), positions, self._cache_layers(), meta)
            logits = self.model.compute_logits(hidden) if self.stage.is_last else None
        forward_done = time.perf_counter_ns()
        return self._sample(logits, batch.sampling, started, forward_done)

    def _sample(
        self,
        logits: torch.Tensor | None,
        sampling: SamplingState,
        started: int,
        forward_done: int,
    ) -> PendingStep:
        """Samples on the device and starts copying the choices to the host; the result waits
        for that copy alone. `logits` is None on a pipeline stage but the last."""
        out = None if logits is None else self.sampler(logits, sampling)
        if self.stage.size > 1:
            out, arrived = share_sampled(self.stage, out, sampling, self.device)
            if arrived is not None:
                return step_on_arrival(out, arrived, sampling, started, forward_done)
        assert out is not None
        sampling.append(out.next_token_ids)
        return pending_step(out, started, forward_done)

    def _all_prompt_logprobs(
        self, hidden: torch.Tensor, cu_seqlens: torch.Tensor, chunks: list[PromptChunk]
    ) -> dict[int, list[float]]:
        """Each chunk's prompt logprobs, by row, of the chunks that want them."""
        wanted = {
            row: chunk.logprob_targets
            for row, chunk in enumerate(chunks)
            if chunk.logprob_targets is not None
        }
        computed = None
        if self.stage.is_last:
            computed = {
                row: self._prompt_logprobs(hidden, cu_seqlens, row, targets)
                for row, targets in wanted.items()
            }
        if self.stage.size == 1:
            return computed
        lengths = {row: len(targets) for row, targets in wanted.items()}
        return share_prompt_logprobs(self.stage, computed, lengths, self.device)

    def _prompt_logprobs(
        self, hidden: torch.Tensor, cu_seqlens: torch.Tensor, row: int, targets: list[int]
    ) -> list[float]:
        """The logprob of each of `targets` given the chunk's tokens up to the one before it."""
        start = int(cu_seqlens[row])
        logits = self.model.compute_logits(hidden[start : start + len(targets)]).float()
        logprobs = torch.log_softmax(logits, dim=-1)
        index = self._to_device(torch.tensor(targets, dtype=torch.long)).unsqueeze(1)
        return logprobs.gather(1, index).squeeze(1).tolist()

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
        return to_device(tensor, self.device)


def _concatenated_ids(chunks: list[PromptChunk], total: int) -> torch.Tensor:
    """The chunks' token ids end to end."""
    return _int64(itertools.chain.from_iterable(chunk.token_ids for chunk in chunks), total)


def _chunk_positions(starts: list[int], sizes: list[int]) -> torch.Tensor:
    """Each chunk's positions start, start + 1, ... end to end (int64), in one vectorized pass
    (a torch.arange a chunk cost ~10 µs each on the host)."""
    counts = np.asarray(sizes, dtype=np.int64)
    first_slot = np.cumsum(counts) - counts  # where each chunk begins in the pass
    offsets = np.repeat(np.asarray(starts, dtype=np.int64) - first_slot, counts)
    return torch.from_numpy(np.arange(int(counts.sum()), dtype=np.int64) + offsets)


def _int64(values: Iterable[int], count: int = -1) -> torch.Tensor:
    """Python ints as an int64 tensor through numpy: `torch.tensor` of a list costs ~3-8x more
    (16 vs 5 µs for a 256-row step's positions, ~1 ms for an 8k-token prefill's ids)."""
    return torch.from_numpy(np.fromiter(values, dtype=np.int64, count=count))


# How far past its cached tokens each row's next input sits: one offset for the batch, or one
# per row (a prefill's joined step: 1 for rows decoding a step in flight, 0 for new prompts).
Ahead = int | list[int]


def step_positions(sequences: list[SequenceState], ahead: Ahead) -> list[int]:
    if isinstance(ahead, int):
        return [seq.num_cached + ahead for seq in sequences]
    return [seq.num_cached + offset for seq, offset in zip(sequences, ahead, strict=True)]


def grow_blocks(
    batch: ShardBatch, allocator: BlockAllocator, block_size: int, ahead: Ahead = 0
) -> list[int]:
    """Gives every sequence whose token at `num_cached + ahead` starts a new block that block,
    all or nothing; returns those positions, the decode step's (ModelRunner.decode)."""
    positions = step_positions(batch.sequences, ahead)
    needy = [
        row
        for row, (seq, position) in enumerate(zip(batch.sequences, positions, strict=True))
        if position // block_size >= len(seq.blocks)
    ]
    if not needy:
        return positions
    columns = [len(batch.sequences[row].blocks) for row in needy]
    for row, column in zip(needy, columns, strict=True):
        if column >= batch.block_table.shape[1]:
            raise RuntimeError(f"request {batch.sequences[row].request_id} outgrew its block table")
    new_blocks = allocator.allocate(len(needy))
    # one indexed write: an item assignment costs ~3 µs a row (256 rows on pages of 16: ~16 a step)
    batch.block_table[needy, columns] = torch.tensor(new_blocks, dtype=batch.block_table.dtype)
    for row, block in zip(needy, new_blocks, strict=True):
        batch.sequences[row].blocks.append(block)
    return positions
