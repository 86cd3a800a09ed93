"""What a shard refuses before it touches anything: malformed batches and requests."""

from __future__ import annotations

from collections.abc import Callable, Collection

from shardline.proto import generate_pb2 as pb
from shardline.shards.utils.grammar import InvalidGrammarError


class InvalidRequestError(ValueError):
    """A request the shard cannot run; nothing was changed."""


def check_batch(
    batch: pb.Batch,
    *,
    cached_batch_ids: Collection[int],
    vocab_size: int,
    max_positions: int,
    compile_grammar: Callable[[int, str], object],
) -> None:
    if not batch.requests:
        raise InvalidRequestError(f"batch {batch.id} has no requests")
    if batch.id in cached_batch_ids:
        raise InvalidRequestError(f"batch {batch.id} is already cached")
    ids = [r.id for r in batch.requests]
    if len(set(ids)) != len(ids):
        raise InvalidRequestError(f"batch {batch.id} repeats a request id")
    for request in batch.requests:
        _check_request(request, vocab_size, max_positions)
        _check_grammar(request, compile_grammar)


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
