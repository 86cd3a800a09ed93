"""A shard's Generations as a request's StreamEvents: each token detokenized, stop sequences
matched on the text (across tokens), a sequence's last event carrying `finished`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from shardline.proto import generate_pb2 as pb
from shardline.router.detokenizer import IncrementalDetokenizer, backend_tokenizer
from shardline.router.queue import Entry, SequenceOutput
from shardline.router.request_types import (
    Finished,
    FinishReason,
    StreamEvent,
    Token,
    ValidRequest,
)
from shardline.router.stop_sequences import StopSequenceMatcher

_SHARD_FINISH_REASONS = {
    pb.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    pb.FINISH_REASON_EOS_TOKEN: FinishReason.EOS_TOKEN,
    pb.FINISH_REASON_STOP_SEQUENCE: FinishReason.STOP_SEQUENCE,
}


class GenerationEvents:
    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._backend_tokenizer = backend_tokenizer(tokenizer)
        self._special_ids = frozenset(tokenizer.all_special_ids)

    def sequence_outputs(self, request: ValidRequest) -> list[SequenceOutput]:
        """One per sequence the request answers with: every sample (the caller picks the
        best), or the n best beams."""
        params = request.params
        count = params.n if params.use_beam_search else params.num_sequences
        return [self._sequence_output(request) for _ in range(count)]

    def _sequence_output(self, request: ValidRequest) -> SequenceOutput:
        return SequenceOutput(
            detokenizer=IncrementalDetokenizer(
                self._tokenizer, request.input_ids, request.params.skip_special_tokens
            ),
            stop_matcher=StopSequenceMatcher(
                request.params.stop, keep_stop=request.params.include_stop_str_in_output
            ),
        )

    def of(self, entry: Entry, generation: pb.Generation) -> list[StreamEvent]:
        """The events of one Generation; a sequence that finishes here ends with a `finished`
        event (and its later tokens, if the shard sent any, are dropped)."""
        # A beam search's Generation carries no tokens of its own: `beams` (whose reading
        # costs as much as the tokens') is looked at only then.
        tokens = generation.tokens
        ids = tokens.ids
        if not ids and generation.beams:
            return self._beam_events(entry, generation)
        return self._events(entry, generation, ids, tokens.logprobs)

    def _events(
        self,
        entry: Entry,
        generation: pb.Generation,
        ids: Sequence[int],
        logprobs: Sequence[float],
    ) -> list[StreamEvent]:
        index = generation.sequence_index
        seq = entry.sequences[index]
        if seq.done:
            return []
        events = []
        # Indexed once per token: iterating or re-reading protobuf fields costs µs per token;
        # the events are built with positional arguments (keywords cost ~30 % more).
        last, top_tokens = len(ids) - 1, generation.top_tokens
        top_count, details = len(top_tokens), entry.request.decoder_input_details
        for position in range(last + 1):
            shard_reason = (
                _SHARD_FINISH_REASONS.get(generation.finish_reason) if position == last else None
            )
            token, text, reason = self._next_token(
                seq, ids[position], logprobs[position], shard_reason
            )
            event = StreamEvent(len(seq.generated_ids), token, text, index)
            events.append(event)
            if position < top_count:
                event.top_tokens = self._tokens(top_tokens[position])
            if details and len(seq.generated_ids) == 1:
                event.prefill = self._tokens(generation.prefill_tokens)
            if reason is not None:
                event.finished = self._finish(entry, seq, reason, generation.seed)
                break
        return events

    def _beam_events(self, entry: Entry, generation: pb.Generation) -> list[StreamEvent]:
        """The returned beams, best first, each as the events of one finished sequence."""
        events = []
        for index, beam in enumerate(generation.beams):
            beam_generation = pb.Generation(
                request_id=generation.request_id,
                sequence_index=index,
                prefill_tokens=generation.prefill_tokens,
                tokens=beam.tokens,
                finish_reason=beam.finish_reason,
            )
            events += self._events(entry, beam_generation, beam.tokens.ids, beam.tokens.logprobs)
        return events

    def _next_token(
        self, seq: SequenceOutput, token_id: int, logprob: float, reason: FinishReason | None
    ) -> tuple[Token, str, FinishReason | None]:
        """The token, the text it releases, and why the sequence finishes (if it does)."""
        seq.generated_ids.append(token_id)
        special = token_id in self._special_ids
        delta = seq.detokenizer.add(token_id)
        if seq.stop_matcher.watching:
            released, reason = _stop_checked(seq, delta, reason)
        else:  # no stop sequences: the text goes out as it comes
            released = delta if reason is None else delta + seq.detokenizer.flush()
        seq.text.append(released)
        text = self._token_text(token_id) if special else delta
        return Token(token_id, text, _logprob(logprob), special), released, reason

    def _finish(
        self, entry: Entry, seq: SequenceOutput, reason: FinishReason, seed: int
    ) -> Finished:
        seq.done = True
        if entry.trace is not None:
            entry.trace.finish_reasons.append(reason.value)
        return Finished(
            reason=reason,
            generated_text="".join(seq.text),
            generated_tokens=len(seq.generated_ids),
            input_length=entry.request.input_length,
            seed=None if entry.request.params.greedy else seed,
            stop_reason=_stop_reason(seq, reason),
            cached_tokens=entry.cached,
        )

    def _token_text(self, token_id: int) -> str:
        """One token's own text, through the fast tokenizer itself (the transformers wrapper
        costs ~20x more per call, and this runs per streamed and per prompt token)."""
        return self._backend_tokenizer.decode([token_id], skip_special_tokens=False)

    def _tokens(self, tokens: pb.Tokens) -> list[Token]:
        return [
            Token(
                id=token_id,
                text=self._token_text(token_id),
                logprob=_logprob(logprob),
                special=token_id in self._special_ids,
            )
            for token_id, logprob in zip(tokens.ids, tokens.logprobs, strict=False)
        ]


def _stop_checked(
    seq: SequenceOutput, delta: str, reason: FinishReason | None
) -> tuple[str, FinishReason | None]:
    """The text `delta` releases past the stop sequences, and why the sequence finishes."""
    check = seq.stop_matcher.feed(delta)
    if check.stopped:
        return check.text, FinishReason.STOP_SEQUENCE
    if reason is None:
        return check.text, None
    tail = seq.stop_matcher.feed(seq.detokenizer.flush())
    if tail.stopped:
        return check.text + tail.text, FinishReason.STOP_SEQUENCE
    return check.text + tail.text + seq.stop_matcher.flush(), reason


def _stop_reason(seq: SequenceOutput, reason: FinishReason) -> str | int | None:
    """vLLM's: the stop string that matched, or the stop token (a shard-side stop ends on it)."""
    if reason is not FinishReason.STOP_SEQUENCE:
        return None
    return seq.stop_matcher.matched or seq.generated_ids[-1]


def _logprob(value: float) -> float | None:
    return None if math.isnan(value) else value
