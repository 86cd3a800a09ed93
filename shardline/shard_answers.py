"""A Prefill's or Decode's answer as plain Python data, the one form the router reads.

The in-process shard (`shardline/in_process.py`) hands it over as it is; over gRPC the shard
server encodes it into generate.proto's `PrefillResponse` / `DecodeResponse`
(`prefill_response`, `decode_response`) and the router's client decodes those back
(`step_result`). A step's Generations are columns (`GenerationColumns`), one row per
Generation: building and reading a protobuf message per row cost ~1.8 µs per row and step in
one process, on the router's critical path at a few hundred rows per step.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from shardline.proto import generate_pb2 as pb


class Tokens(NamedTuple):
    """Token ids with their logprobs (a prompt's, a row's alternatives, a beam's)."""

    ids: list[int]
    logprobs: list[float]


class Beam(NamedTuple):
    tokens: Tokens
    finish_reason: int  # a pb.FinishReason
    score: float


@dataclass(slots=True)
class GenerationColumns:
    """One step's Generations, row by row in the order the shard made them. A row is one token
    of one sequence, or (a row in `beams`) a finished beam search, whose token and logprob
    columns hold 0 and NaN. `finish_reasons` holds pb.FinishReason values (0: it goes on); the
    dicts hold the rarer extras by row."""

    request_ids: list[int] = field(default_factory=list)
    sequence_indexes: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reasons: list[int] = field(default_factory=list)
    generated_tokens: list[int] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    top_tokens: dict[int, Tokens] = field(default_factory=dict)
    prefill_tokens: dict[int, Tokens] = field(default_factory=dict)
    beams: dict[int, list[Beam]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.request_ids)

    def add_token(
        self,
        request_id: int,
        sequence_index: int,
        token_id: int,
        logprob: float,
        finish_reason: int,
        generated_tokens: int,
        seed: int,
    ) -> int:
        """Adds one sequence's token; returns its row."""
        self.request_ids.append(request_id)
        self.sequence_indexes.append(sequence_index)
        self.token_ids.append(token_id)
        self.logprobs.append(logprob)
        self.finish_reasons.append(finish_reason)
        self.generated_tokens.append(generated_tokens)
        self.seeds.append(seed)
        return len(self.request_ids) - 1

    def add_beams(self, request_id: int, beams: list[Beam]) -> int:
        """Adds a finished beam search's returned beams, best first; returns its row."""
        best = beams[0]
        row = self.add_token(
            request_id, 0, 0, float("nan"), best.finish_reason, len(best.tokens.ids), 0
        )
        self.beams[row] = beams
        return row

    def extend(self, other: GenerationColumns) -> None:
        """Appends `other`'s rows after these."""
        offset = len(self)
        for name in _COLUMNS:
            getattr(self, name).extend(getattr(other, name))
        for name in _EXTRAS:
            getattr(self, name).update({offset + row: v for row, v in getattr(other, name).items()})


_COLUMNS = (
    "request_ids",
    "sequence_indexes",
    "token_ids",
    "logprobs",
    "finish_reasons",
    "generated_tokens",
    "seeds",
)
_EXTRAS = ("top_tokens", "prefill_tokens", "beams")


@dataclass(frozen=True)
class Timings:
    """Nanoseconds spent on the shard; `concat_ns` only for decode."""

    forward_ns: int
    decode_ns: int
    total_ns: int
    concat_ns: int = 0


@dataclass(frozen=True)
class StepResult:
    generations: GenerationColumns
    batch: pb.CachedBatch | None
    timings: Timings
    refused: dict[int, str] = field(default_factory=dict)
    """A Prefill's requests the shards would not run, with the reason: they alone fail."""
    cached_tokens: dict[int, int] = field(default_factory=dict)
    """A Prefill's new prompts looked up in the prefix cache: the tokens found there."""


# ---- over gRPC -------------------------------------------------------------------------------


def prefill_response(result: StepResult) -> pb.PrefillResponse:
    timings = result.timings
    answer = pb.PrefillResponse(
        batch=result.batch,
        forward_ns=timings.forward_ns,
        decode_ns=timings.decode_ns,
        total_ns=timings.total_ns,
        refused=[pb.RefusedRequest(request_id=i, reason=r) for i, r in result.refused.items()],
        cached_tokens=result.cached_tokens,
    )
    add_generations(result.generations, answer.generations)
    return answer


def decode_response(result: StepResult) -> pb.DecodeResponse:
    timings = result.timings
    answer = pb.DecodeResponse(
        batch=result.batch,
        concat_ns=timings.concat_ns,
        forward_ns=timings.forward_ns,
        decode_ns=timings.decode_ns,
        total_ns=timings.total_ns,
    )
    add_generations(result.generations, answer.generations)
    return answer


def add_generations(
    columns: GenerationColumns, generations: RepeatedCompositeFieldContainer[pb.Generation]
) -> None:
    """Adds each row's Generation to a response's `generations`, in place (a Generation built
    apart and then put in would be copied)."""
    for row, request_id in enumerate(columns.request_ids):
        beams = columns.beams.get(row)
        if beams is not None:
            generation = generations.add(
                request_id=request_id,
                finish_reason=columns.finish_reasons[row],
                generated_tokens=columns.generated_tokens[row],
                beams=[_beam_proto(beam) for beam in beams],
            )
        else:
            generation = generations.add()
            _set_token(generation, columns, row)
        prefill = columns.prefill_tokens.get(row)
        if prefill is not None:
            generation.prefill_tokens.CopyFrom(
                pb.Tokens(ids=prefill.ids, logprobs=prefill.logprobs)
            )


def _set_token(generation: pb.Generation, columns: GenerationColumns, row: int) -> None:
    # Field by field, zeros not at all: a proto3 zero is not sent either way.
    generation.request_id = columns.request_ids[row]
    generation.generated_tokens = columns.generated_tokens[row]
    if index := columns.sequence_indexes[row]:
        generation.sequence_index = index
    if reason := columns.finish_reasons[row]:
        generation.finish_reason = reason
    if seed := columns.seeds[row]:
        generation.seed = seed
    tokens = generation.tokens
    tokens.ids.append(columns.token_ids[row])
    tokens.logprobs.append(columns.logprobs[row])
    top = columns.top_tokens.get(row)
    if top is not None:
        generation.top_tokens.add(ids=top.ids, logprobs=top.logprobs)


def _beam_proto(beam: Beam) -> pb.Beam:
    tokens = pb.Tokens(ids=beam.tokens.ids, logprobs=beam.tokens.logprobs)
    return pb.Beam(tokens=tokens, finish_reason=beam.finish_reason, score=beam.score)


def step_result(answer: pb.PrefillResponse | pb.DecodeResponse) -> StepResult:
    """A Prefill or Decode answer received over gRPC, as the router reads it."""
    timings = Timings(
        forward_ns=answer.forward_ns,
        decode_ns=answer.decode_ns,
        total_ns=answer.total_ns,
        concat_ns=getattr(answer, "concat_ns", 0),
    )
    batch = answer.batch if answer.HasField("batch") else None
    refused = {r.request_id: r.reason for r in getattr(answer, "refused", ())}
    cached = dict(getattr(answer, "cached_tokens", {}))
    return StepResult(generation_columns(answer.generations), batch, timings, refused, cached)


def generation_columns(generations: Iterable[pb.Generation]) -> GenerationColumns:
    """One row per Generation; each field read once (a upb read costs ~0.1 µs)."""
    columns = GenerationColumns()
    add_token = columns.add_token
    for generation in generations:
        tokens = generation.tokens
        ids = tokens.ids
        if len(ids) == 1:
            row = add_token(
                generation.request_id,
                generation.sequence_index,
                ids[0],
                tokens.logprobs[0],
                generation.finish_reason,
                generation.generated_tokens,
                generation.seed,
            )
            if generation.top_tokens:
                columns.top_tokens[row] = _alternatives(generation.top_tokens)
        elif not ids and generation.beams:
            row = columns.add_beams(generation.request_id, [_beam(b) for b in generation.beams])
        else:
            raise ValueError(f"a Generation carries one token or beams, not {len(ids)} tokens")
        if generation.HasField("prefill_tokens"):
            columns.prefill_tokens[row] = _tokens(generation.prefill_tokens)
    return columns


def _alternatives(top_tokens: RepeatedCompositeFieldContainer[pb.Tokens]) -> Tokens:
    if len(top_tokens) > 1:
        raise ValueError("a Generation of one token carries one set of alternatives")
    return _tokens(top_tokens[0])


def _beam(beam: pb.Beam) -> Beam:
    return Beam(_tokens(beam.tokens), beam.finish_reason, beam.score)


def _tokens(tokens: pb.Tokens) -> Tokens:
    return Tokens(list(tokens.ids), list(tokens.logprobs))
