"""A step's Generations (shardline/shard_answers.py) as a request's StreamEvents: each token
detokenized, stop sequences matched on the text (across tokens), a sequence's last event
carrying `finished`."""

from __future__ import annotations

import math
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
from shardline.shard_answers import Beam, GenerationColumns, Tokens

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

    def of(self, entry: Entry, step: GenerationColumns, row: int) -> list[StreamEvent]:
        """The events of a step's Generation `row`; a sequence that finishes here ends with a
        `finished` event (and its later tokens, if the shard sent any, are dropped)."""
        beams = step.beams.get(row) if step.beams else None
        if beams is not None:
            return self._beam_events(entry, beams, step.prefill_tokens.get(row))
        index = step.sequence_indexes[row]
        seq = entry.sequences[index]
        if seq.done:
            return []
        reason = step.finish_reasons[row]
        event = self._event(
            entry,
            seq,
            index,
            step.token_ids[row],
            step.logprobs[row],
            _SHARD_FINISH_REASONS.get(reason) if reason else None,
            step.prefill_tokens.get(row) if step.prefill_tokens else None,
            step.seeds[row],
        )
        if step.top_tokens and (top := step.top_tokens.get(row)) is not None:
            event.top_tokens = self._tokens(top)
        return [event]

    def _beam_events(
        self, entry: Entry, beams: list[Beam], prefill: Tokens | None
    ) -> list[StreamEvent]:
        """The returned beams, best first, each as the events of one finished sequence."""
        events = []
        for index, beam in enumerate(beams):
            seq = entry.sequences[index]
            if seq.done:
                continue
            ids, logprobs = beam.tokens
            last = len(ids) - 1
            for position in range(last + 1):
                done = _SHARD_FINISH_REASONS.get(beam.finish_reason) if position == last else None
                event = self._event(
                    entry, seq, index, ids[position], logprobs[position], done, prefill, 0
                )
                events.append(event)
                if event.finished is not None:
                    break
        return events

    def _event(
        self,
        entry: Entry,
        seq: SequenceOutput,
        index: int,
        token_id: int,
        logprob: float,
        shard_reason: FinishReason | None,
        prefill: Tokens | None,
        seed: int,
    ) -> StreamEvent:
        """One token's event (built with positional arguments: keywords cost ~30 % more)."""
        token, text, reason = self._next_token(seq, token_id, logprob, shard_reason)
        event = StreamEvent(len(seq.generated_ids), token, text, index)
        if entry.request.decoder_input_details and len(seq.generated_ids) == 1:
            event.prefill = self._tokens(prefill)
        if reason is not None:
            event.finished = self._finish(entry, seq, reason, seed)
        return event

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

    def _tokens(self, tokens: Tokens | None) -> list[Token]:
        if tokens is None:
            return []
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
