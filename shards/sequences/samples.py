"""A request's sequences after its prompt: one per sample (`num_sequences`), each seeded apart and
forked from the prompt's row, or one beam search over beams forked as it goes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import torch

from shardline.proto import generate_pb2 as pb
from shardline.shard_answers import Tokens
from shardline.shards.batch import ShardBatch
from shardline.shards.kv_cache import BlockAllocator, KVCache, KVCacheExhaustedError
from shardline.shards.sampling.grammar import GrammarLoader
from shardline.shards.sampling.sampling import SamplingState
from shardline.shards.sequences.beam_search import BeamSearch, candidates_per_step
from shardline.shards.sequences.stopping import StopRule


def samples(request: pb.Request) -> range:
    """The sampling rows of a request's prefill: one per sampled sequence, one for a beam
    search (its first step ranks the candidates of the prompt alone)."""
    if request.HasField("beam_search"):
        return range(1)
    return range(max(request.num_sequences, 1))


def sampling_rows(requests: list[pb.Request]) -> list[tuple[int, int]]:
    """For each sampling row of these requests' prefill: (its request's index, sample index)."""
    return [(r, index) for r, request in enumerate(requests) for index in samples(request)]


def _sample_seed(seed: int, index: int) -> int:
    return (seed + index) % (1 << 64)


def _sample_parameters(request: pb.Request, index: int) -> pb.NextTokenChooserParameters:
    params = pb.NextTokenChooserParameters()
    params.CopyFrom(request.parameters)
    params.seed = _sample_seed(params.seed, index)
    return params


def _top_n_tokens(request: pb.Request, model_eos_ids: Iterable[int]) -> int:
    """The sampler's top-n tokens a row needs: a beam search reads its candidates there."""
    if not request.HasField("beam_search"):
        return request.top_n_tokens
    stop_ids = StopRule.of(request, model_eos_ids).stop_ids
    return candidates_per_step(request.beam_search.beam_width, len(stop_ids))


def _fork_copies(request: pb.Request, block_size: int) -> int:
    """Partial-block copies the forks of this request need right after its prefill."""
    partial = len(request.input_ids) % block_size != 0
    forks = request.beam_search.beam_width if request.HasField("beam_search") else 0
    forks = forks or max(request.num_sequences, 1)
    return (forks - 1) * partial


def first_token_sampling(
    requests: list[pb.Request],
    *,
    model_eos_ids: Iterable[int],
    vocab_size: int,
    device: torch.device,
    grammars: GrammarLoader,
) -> SamplingState:
    """The sampling state of these requests' sampling rows, each seeded as its sample."""
    rows = [(requests[r], index) for r, index in sampling_rows(requests)]
    return SamplingState.from_requests(
        params=[_sample_parameters(request, index) for request, index in rows],
        stopping=[request.stopping_parameters for request, _ in rows],
        prompt_ids=[request.input_ids for request, _ in rows],
        eos_token_ids=sorted(model_eos_ids),
        top_n_tokens=[_top_n_tokens(request, model_eos_ids) for request, _ in rows],
        vocab_size=vocab_size,
        device=device,
        grammar=grammars.rows([request.parameters for request, _ in rows]),
    )


def check_fork_blocks(requests: list[pb.Request], allocator: BlockAllocator, batch_id: int) -> None:
    """Refuses a prefill whose samples' partial-block copies would not fit."""
    copies = sum(_fork_copies(request, allocator.block_size) for request in requests)
    if copies > allocator.num_free:
        raise KVCacheExhaustedError(
            f"the samples of batch {batch_id} need {copies} KV blocks, "
            f"{allocator.num_free} are free"
        )


def fork_samples(
    batch: ShardBatch | None,
    requests: list[pb.Request],
    allocator: BlockAllocator,
    cache: KVCache | None,
) -> ShardBatch | None:
    """Gives each sampled sequence of a request its own row, forked from the prompt's."""
    rows = sampling_rows(requests)
    if batch is None or len(rows) == batch.size:
        return batch
    parents = [r for r, _ in rows]
    forked = batch.regroup(
        parents, allocator, cache, last_tokens=batch.last_tokens, sampling=batch.sampling
    )
    for seq, (r, index) in zip(forked.sequences, rows, strict=True):
        seq.sequence_index = index
        seq.seed = _sample_seed(requests[r].parameters.seed, index)
    return forked


def start_beam_searches(
    batch: ShardBatch, requests: list[pb.Request], prompt_tokens: dict[int, Tokens]
) -> None:
    """The search of each beam-search request, on its (single) row; its prompt logprobs go
    with the search's answer."""
    first_rows: dict[int, int] = {}
    for row, seq in enumerate(batch.sequences):
        first_rows.setdefault(seq.request_id, row)
    for request in requests:
        if request.HasField("beam_search"):
            row = first_rows[request.id]
            batch.beams[request.id] = BeamSearch(
                width=request.beam_search.beam_width,
                length_penalty=request.beam_search.length_penalty,
                early_stopping=request.beam_search.early_stopping,
                num_return_sequences=request.beam_search.num_return_sequences,
                stop=replace(batch.sequences[row].stop, min_new_tokens=0),
                prompt_tokens=prompt_tokens.pop(row, None),
            )
