"""What a step's tokens make: the Generations it answers (one token per sequence, or a
finished beam search) and the batch that goes on (finished rows dropped, kept beams forked)."""

from __future__ import annotations

import torch

from shardline.proto import generate_pb2 as pb
from shardline.shard_answers import Beam, GenerationColumns, Tokens
from shardline.shards.batch import SequenceState, ShardBatch
from shardline.shards.kv_cache import BlockAllocator, KVCache
from shardline.shards.sampling.sampling import reported_top_count
from shardline.shards.sequences.beam_search import BeamSearch
from shardline.shards.step_result import StepResult


def prompt_tokens_by_row(
    requests: list[pb.Request], logprobs: dict[int, list[float]], sampled_from: list[int]
) -> dict[int, Tokens]:
    """Prompt logprobs (by request) by the row of each request's first sequence."""
    first_rows: dict[int, int] = {}
    for row, request_row in enumerate(sampled_from):
        first_rows.setdefault(request_row, row)
    return {
        first_rows[r]: Tokens(list(requests[r].input_ids), values) for r, values in logprobs.items()
    }


def rows_by_request(batch: ShardBatch, request_ids: set[int]) -> dict[int, list[int]]:
    if not request_ids:  # the common step: no beam search in the batch, no pass over the rows
        return {}
    rows: dict[int, list[int]] = {}
    for row, seq in enumerate(batch.sequences):
        if seq.request_id in request_ids:
            rows.setdefault(seq.request_id, []).append(row)
    return rows


def add_token_generation(
    generations: GenerationColumns,
    seq: SequenceState,
    row: int,
    step: StepResult,
    prompt_tokens: Tokens | None,
) -> int:
    """Adds the row's Generation; returns why its sequence stops (NONE: it goes on)."""
    token = step.next_token_ids[row]
    reason = seq.record(token)
    at = generations.add_token(
        seq.request_id,
        seq.sequence_index,
        token,
        step.logprobs[row],
        reason,
        seq.generated,
        seq.seed,
    )
    if seq.top_n_tokens and step.top_ids is not None:
        n = reported_top_count(step.top_logprobs[row], seq.top_n_tokens)
        generations.top_tokens[at] = Tokens(step.top_ids[row][:n], step.top_logprobs[row][:n])
    if prompt_tokens is not None:
        generations.prefill_tokens[at] = prompt_tokens
    return reason


def beam_candidates(step: StepResult, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-n token ids [R, n] and logprobs [R, n] of the rows of one beam search."""
    ids = torch.tensor([step.top_ids[row] for row in rows], dtype=torch.long)
    logprobs = torch.tensor([step.top_logprobs[row] for row in rows], dtype=torch.float32)
    return ids, logprobs


def add_beam_generation(
    generations: GenerationColumns, seq: SequenceState, search: BeamSearch
) -> None:
    beams = [
        Beam(
            Tokens(list(beam.hypothesis.token_ids), list(beam.hypothesis.logprobs)),
            beam.finish_reason,
            beam.score,
        )
        for beam in search.results()
    ]
    row = generations.add_beams(seq.request_id, beams)
    if search.prompt_tokens is not None:
        generations.prefill_tokens[row] = search.prompt_tokens


def advance(
    batch: ShardBatch,
    step: StepResult,
    allocator: BlockAllocator,
    cache: KVCache | None,
    generations: GenerationColumns,
    prompt_tokens: dict[int, Tokens] | None = None,
) -> ShardBatch | None:
    """Records each row's new token and adds its Generation to `generations`; drops finished
    rows; moves each beam search a step on, forking the beams it keeps and answering when it
    ends. Returns the batch that goes on."""
    parents: list[int] = []
    beam_tokens: dict[int, int] = {}
    beam_rows = rows_by_request(batch, set(batch.beams))
    prompt_tokens = prompt_tokens or {}
    for row, seq in enumerate(batch.sequences):
        rows = beam_rows.get(seq.request_id)
        if rows is None:
            reason = add_token_generation(generations, seq, row, step, prompt_tokens.get(row))
            if reason == pb.FINISH_REASON_NONE:
                parents.append(row)
            continue
        seq.generated += 1  # the beam's token is chosen below, with its whole search
        if row == rows[-1]:
            outcome = batch.beams[seq.request_id].step(*beam_candidates(step, rows))
            if outcome.done:
                add_beam_generation(generations, seq, batch.beams[seq.request_id])
            for parent, token in zip(outcome.parents, outcome.token_ids, strict=True):
                beam_tokens[len(parents)] = token
                parents.append(rows[parent])
    return _regroup(batch, parents, beam_tokens, allocator, cache)


def _regroup(
    batch: ShardBatch,
    parents: list[int],
    beam_tokens: dict[int, int],
    allocator: BlockAllocator,
    cache: KVCache | None,
) -> ShardBatch | None:
    """The rows that go on, the kept beams forked and given the tokens their search chose."""
    if not beam_tokens:
        return batch.keep(parents, allocator)
    index = torch.tensor(parents, dtype=torch.long, device=batch.last_tokens.device)
    last_tokens = batch.last_tokens.index_select(0, index)
    rows = torch.tensor(list(beam_tokens), dtype=torch.long, device=last_tokens.device)
    tokens = torch.tensor(list(beam_tokens.values()), dtype=last_tokens.dtype)
    last_tokens[rows] = tokens.to(last_tokens.device)
    return batch.regroup(parents, allocator, cache, last_tokens=last_tokens)
