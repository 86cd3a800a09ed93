"""The Generation messages a step answers: one token per sequence, or a finished beam search."""

from __future__ import annotations

import torch

from shardline.proto import generate_pb2 as pb
from shardline.shards.batch import SequenceState, ShardBatch
from shardline.shards.beam_search import BeamSearch
from shardline.shards.model_runner import StepResult


def prompt_tokens_by_row(
    requests: list[pb.Request], logprobs: dict[int, list[float]], sampled_from: list[int]
) -> dict[int, pb.Tokens]:
    """Prompt logprobs (by request) by the row of each request's first sequence."""
    first_rows: dict[int, int] = {}
    for row, request_row in enumerate(sampled_from):
        first_rows.setdefault(request_row, row)
    return {
        first_rows[r]: pb.Tokens(ids=requests[r].input_ids, logprobs=values)
        for r, values in logprobs.items()
    }


def rows_by_request(batch: ShardBatch, request_ids: set[int]) -> dict[int, list[int]]:
    if not request_ids:  # the common step: no beam search in the batch, no pass over the rows
        return {}
    rows: dict[int, list[int]] = {}
    for row, seq in enumerate(batch.sequences):
        if seq.request_id in request_ids:
            rows.setdefault(seq.request_id, []).append(row)
    return rows


def token_generation(
    seq: SequenceState, row: int, step: StepResult, prompt_tokens: pb.Tokens | None
) -> pb.Generation:
    token = step.next_token_ids[row]
    reason = seq.record(token)
    generation = pb.Generation(
        request_id=seq.request_id,
        sequence_index=seq.sequence_index,
        tokens=pb.Tokens(ids=[token], logprobs=[step.logprobs[row]]),
        finish_reason=reason,
        generated_tokens=seq.generated,
        seed=seq.seed,
    )
    if seq.top_n_tokens and step.top_ids is not None:
        n = seq.top_n_tokens
        generation.top_tokens.append(
            pb.Tokens(ids=step.top_ids[row][:n], logprobs=step.top_logprobs[row][:n])
        )
    if prompt_tokens is not None:
        generation.prefill_tokens.CopyFrom(prompt_tokens)
    return generation


def beam_candidates(step: StepResult, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-n token ids [R, n] and logprobs [R, n] of the rows of one beam search."""
    ids = torch.tensor([step.top_ids[row] for row in rows], dtype=torch.long)
    logprobs = torch.tensor([step.top_logprobs[row] for row in rows], dtype=torch.float32)
    return ids, logprobs


def beam_generation(seq: SequenceState, search: BeamSearch) -> pb.Generation:
    beams = [
        pb.Beam(
            tokens=pb.Tokens(ids=beam.hypothesis.token_ids, logprobs=beam.hypothesis.logprobs),
            finish_reason=beam.finish_reason,
            score=beam.score,
        )
        for beam in search.results()
    ]
    generation = pb.Generation(
        request_id=seq.request_id,
        finish_reason=beams[0].finish_reason,
        generated_tokens=len(beams[0].tokens.ids),
        beams=beams,
    )
    if search.prompt_tokens is not None:
        generation.prefill_tokens.CopyFrom(search.prompt_tokens)
    return generation
