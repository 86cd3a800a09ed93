"""vLLM's output types of the offline API (`RequestOutput`, `CompletionOutput`, `Logprob`,
`BeamSearchOutput`) and their making from the batcher's events."""

from __future__ import annotations

from dataclasses import dataclass

from shardline.router.request_types import FinishReason, StreamEvent, ValidRequest

_VLLM_FINISH_REASONS = {
    FinishReason.LENGTH: "length",
    FinishReason.EOS_TOKEN: "stop",
    FinishReason.STOP_SEQUENCE: "stop",
}


@dataclass(frozen=True)
class Logprob:
    """vLLM's: a token's logprob, its rank among the alternatives (1 = most likely), its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None
    stop_reason: str | int | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool = True
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache (vLLM's)


def request_output(
    request_id: str, request: ValidRequest, events: list[StreamEvent]
) -> RequestOutput:
    """All n sequences; of best_of samples, the n with the highest cumulative logprob (vLLM's
    rule); beams come best first from the shard."""
    by_sequence: dict[int, list[StreamEvent]] = {}
    for event in events:
        by_sequence.setdefault(event.sequence_index, []).append(event)
    with_logprobs = request.top_n_tokens > 0
    completions = [_completion(i, by_sequence[i], with_logprobs) for i in sorted(by_sequence)]
    if not request.params.use_beam_search and len(completions) > request.params.n:
        completions.sort(key=lambda c: c.cumulative_logprob or 0.0, reverse=True)
        completions = completions[: request.params.n]
    first = events[0]
    prompt_logprobs = (
        [
            None if t.logprob is None else {t.id: Logprob(t.logprob, None, t.text)}
            for t in first.prefill
        ]
        if request.decoder_input_details
        else None
    )
    return RequestOutput(
        request_id=request_id,
        prompt=request.inputs or None,
        prompt_token_ids=request.input_ids,
        prompt_logprobs=prompt_logprobs,
        outputs=completions,
        num_cached_tokens=_cached_tokens(events),
    )


def _cached_tokens(events: list[StreamEvent]) -> int:
    return next((event.finished.cached_tokens for event in events if event.finished), 0)


def _completion(index: int, events: list[StreamEvent], with_logprobs: bool) -> CompletionOutput:
    finished = events[-1].finished
    logprobs = [event.token.logprob for event in events]
    known = [lp for lp in logprobs if lp is not None]
    return CompletionOutput(
        index=index,
        text=finished.generated_text if finished else "",
        token_ids=[event.token.id for event in events],
        cumulative_logprob=sum(known) if known else None,
        logprobs=[_step_logprobs(event) for event in events] if with_logprobs else None,
        finish_reason=_VLLM_FINISH_REASONS[finished.reason] if finished else None,
        stop_reason=finished.stop_reason if finished else None,
    )


def _step_logprobs(event: StreamEvent) -> dict[int, Logprob]:
    """The chosen token and the top alternatives of one step, ranked as vLLM ranks them."""
    ranked = {
        t.id: Logprob(t.logprob, rank, t.text)
        for rank, t in enumerate(event.top_tokens, start=1)
        if t.logprob is not None
    }
    chosen = event.token
    if chosen.id not in ranked and chosen.logprob is not None:
        ranked[chosen.id] = Logprob(chosen.logprob, None, chosen.text)
    return ranked


@dataclass
class BeamSearchSequence:
    """vLLM's: one beam; `tokens` include the prompt's, `text` is the generated part's."""

    tokens: list[int]
    cum_logprob: float
    text: str
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass
class BeamSearchOutput:
    """vLLM's: the beams of one prompt, best first."""

    sequences: list[BeamSearchSequence]


def beam_search_output(output: RequestOutput) -> BeamSearchOutput:
    return BeamSearchOutput(
        [
            BeamSearchSequence(
                tokens=output.prompt_token_ids + completion.token_ids,
                cum_logprob=completion.cumulative_logprob or 0.0,
                text=completion.text,
                finish_reason=completion.finish_reason,
                stop_reason=completion.stop_reason,
            )
            for completion in output.outputs
        ]
    )
