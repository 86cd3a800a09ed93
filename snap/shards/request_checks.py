"""What a shard refuses before it touches anything: malformed batches and requests.

A malformed batch (no requests, a cached id, a repeated request id) fails the whole call; a
request whose own data is invalid is refused alone (`admit`): the others of its batch run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection

from shardline.proto import generate_pb2 as pb
from shardline.shards.utils.grammar import InvalidGrammarError


class InvalidRequestError(ValueError):
    """A request the shard cannot run; nothing was changed."""


def check_batch(batch: pb.Batch, *, cached_batch_ids: Collection[int]) -> None:
    if not batch.requests:
        raise InvalidRequestError(f"batch {batch.id} has no requests")
    if batch.id in cached_batch_ids:
        raise InvalidRequestError(f"batch {batch.id} is already cached")
    ids = [r.id for r in batch.requests]
    if len(set(ids)) != len(ids):
        raise InvalidRequestError(f"batch {batch.id} repeats a request id")


def admit(
    batch: pb.Batch,
    *,
    vocab_size: int,
    max_positions: int,
    compile_grammar: Callable[[int, str], object],
) -> tuple[pb.Batch, dict[int, str]]:
    """The batch without the requests it refuses, and why each was refused (by request id)."""
    refused = {}
    for request in batch.requests:
        try:
            _check_request(request, vocab_size, max_positions)
            _check_sampling(request)
            _check_grammar(request, compile_grammar)
        except InvalidRequestError as error:
            refused[request.id] = str(error)
    if not refused:
        return batch, refused
    kept = [request for request in batch.requests if request.id not in refused]
    admitted = pb.Batch(id=batch.id, requests=kept, size=len(kept), max_tokens=batch.max_tokens)
    return admitted, refused


def _check_request(request: pb.Request, vocab_size: int, max_positions: int) -> None:
    if not request.input_ids:
        raise InvalidRequestError(f"request {request.id} has an empty prompt")
    if max(request.input_ids) >= vocab_size:
        raise InvalidRequestError(
            f"request {request.id} has a token id >= the vocabulary size {vocab_size}"
        )
    if request.prefix_len >= len(request.input_ids):
        raise InvalidRequestError(
            f"request {request.id}: prefix_len {request.prefix_len} is not within its "
            f"{len(request.input_ids)}-token prompt"
        )
    if request.stopping_parameters.max_new_tokens < 1:
        raise InvalidRequestError(f"request {request.id} asks for max_new_tokens < 1")
    if request.HasField("beam_search"):
        _check_beam_search(request)
    total = len(request.input_ids) + request.stopping_parameters.max_new_tokens
    if total > max_positions:
        raise InvalidRequestError(
            f"request {request.id} needs {total} positions; the model has {max_positions}"
        )


# name -> (low, high) of a float a row's sampling reads; proto3 sends an unset one as 0.
_SAMPLING_RANGES = {
    "temperature": (0.0, math.inf),
    "top_p": (0.0, 1.0),
    "typical_p": (0.0, 1.0),
    "min_p": (0.0, 1.0),
    "repetition_penalty": (0.0, math.inf),
    "frequency_penalty": (-math.inf, math.inf),
    "presence_penalty": (-math.inf, math.inf),
}


def _check_sampling(request: pb.Request) -> None:
    """Finite floats within range: a NaN or an infinity in one row would poison the batch's
    sampling (a NaN probability fails the whole draw)."""
    params = request.parameters
    for name, (low, high) in _SAMPLING_RANGES.items():
        value = getattr(params, name)
        if not (math.isfinite(value) and low <= value <= high):
            raise InvalidRequestError(f"request {request.id}: {name} {value} is out of range")
    if request.HasField("beam_search") and not math.isfinite(request.beam_search.length_penalty):
        raise InvalidRequestError(f"request {request.id}: length_penalty is not finite")


def _check_beam_search(request: pb.Request) -> None:
    beam = request.beam_search
    if beam.beam_width < 1:
        raise InvalidRequestError(f"request {request.id} asks for beam_width < 1")
    if not 1 <= beam.num_return_sequences <= beam.beam_width:
        raise InvalidRequestError(
            f"request {request.id}: num_return_sequences must be in [1, beam_width]"
        )
    if request.parameters.do_sample:
        raise InvalidRequestError(f"request {request.id}: beam search does not sample")


def _check_grammar(request: pb.Request, compile_grammar: Callable[[int, str], object]) -> None:
    params = request.parameters
    if params.grammar_type == pb.GRAMMAR_TYPE_NONE:
        return
    if request.HasField("beam_search"):
        raise InvalidRequestError(f"request {request.id}: beam search takes no grammar")
    try:
        compile_grammar(params.grammar_type, params.grammar)
    except InvalidGrammarError as error:
        raise InvalidRequestError(f"request {request.id}: {error}") from error
