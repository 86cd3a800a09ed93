"""A step's answer as plain data and as generate.proto's messages: the wire form decodes back to
the same columns, and re-encodes to the same bytes."""

from __future__ import annotations

import math

import pytest

from shardline.proto import generate_pb2 as pb
from shardline.shard_answers import (
    Beam,
    GenerationColumns,
    StepResult,
    Timings,
    Tokens,
    decode_response,
    generation_columns,
    prefill_response,
    step_result,
)


def _columns() -> GenerationColumns:
    """Every kind of row: plain, sampled with a seed, alternatives (none reported too), a
    prompt's logprobs, a finished beam search."""
    columns = GenerationColumns()
    columns.add_token(4, 0, 17, -0.25, pb.FINISH_REASON_NONE, 3, 0)
    row = columns.add_token(5, 2, 9, -1.5, pb.FINISH_REASON_EOS_TOKEN, 7, 1234)
    columns.top_tokens[row] = Tokens([9, 8], [-1.5, -2.0])
    row = columns.add_token(6, 0, 3, -0.5, pb.FINISH_REASON_LENGTH, 1, 0)
    columns.top_tokens[row] = Tokens([], [])
    columns.prefill_tokens[row] = Tokens([1, 2], [math.nan, -3.0])
    beams = [
        Beam(Tokens([5, 6], [-0.5, -0.75]), pb.FINISH_REASON_STOP_SEQUENCE, -0.625),
        Beam(Tokens([5], [-0.5]), pb.FINISH_REASON_LENGTH, -0.5),
    ]
    row = columns.add_beams(8, beams)
    columns.prefill_tokens[row] = Tokens([1], [math.nan])
    return columns


def _same(a: GenerationColumns, b: GenerationColumns) -> bool:
    """Equal, NaN equal to NaN (a beam row's logprob, a prompt's first)."""
    return repr(a) == repr(b)


def test_a_prefill_answer_decodes_to_the_same_columns_and_bytes():
    result = StepResult(
        _columns(),
        pb.CachedBatch(id=3, request_ids=[4, 5], size=2, max_tokens=40),
        Timings(forward_ns=11, decode_ns=7, total_ns=30),
        refused={9: "too long"},
        cached_tokens={4: 16},
    )
    wire = prefill_response(result)
    back = step_result(pb.PrefillResponse.FromString(wire.SerializeToString()))
    assert _same(back.generations, result.generations)
    assert (back.batch, back.timings, back.refused) == (
        result.batch,
        result.timings,
        {9: "too long"},
    )
    assert back.cached_tokens == {4: 16}
    assert prefill_response(back).SerializeToString() == wire.SerializeToString()
    assert wire.generations[1].seed == 1234 and not wire.generations[0].HasField("prefill_tokens")
    assert len(wire.generations[2].top_tokens) == 1 and not wire.generations[3].tokens.ids
    assert [b.tokens.ids for b in wire.generations[3].beams] == [[5, 6], [5]]


def test_a_decode_answer_keeps_its_timings_and_an_absent_batch():
    result = StepResult(_columns(), None, Timings(1, 2, 5, concat_ns=3))
    wire = decode_response(result)
    back = step_result(pb.DecodeResponse.FromString(wire.SerializeToString()))
    assert back.batch is None and back.timings == result.timings
    assert decode_response(back).SerializeToString() == wire.SerializeToString()


def test_extend_moves_the_extras_to_their_rows():
    columns = _columns()
    columns.extend(_columns())
    assert len(columns) == 8
    assert sorted(columns.top_tokens) == [1, 2, 5, 6]
    assert sorted(columns.prefill_tokens) == [2, 3, 6, 7] and sorted(columns.beams) == [3, 7]
    assert columns.request_ids == [4, 5, 6, 8] * 2


_TWO = pb.Tokens(ids=[1, 2], logprobs=[0.0, 0.0])
_ONE = pb.Tokens(ids=[1], logprobs=[0.0])


@pytest.mark.parametrize(
    "generation, message",
    [
        (pb.Generation(request_id=1, tokens=_TWO), "not 2 tokens"),
        (pb.Generation(request_id=1, tokens=_ONE, top_tokens=[_ONE, _ONE]), "one set"),
    ],
)
def test_a_generation_of_several_tokens_is_refused(generation, message):
    with pytest.raises(ValueError, match=message):
        generation_columns([generation])
