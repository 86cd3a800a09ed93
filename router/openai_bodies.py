"""The bodies of /v1/chat/completions and /v1/completions: answers and stream chunks.

Choices are numbered prompt by prompt, the n samples of each in order (with `best_of`, the n of
highest mean logprob per token, best first, as OpenAI ranks them). A chat answer that
calls a tool finishes with "tool_calls" (unless cut by the token limit), as OpenAI and vLLM
answer. Completions' `logprobs` are OpenAI's legacy shape ({tokens, token_logprobs,
top_logprobs, text_offset}); with `echo` the prompt and its tokens come first (the first prompt
token has no logprob), and `text_offset` counts from the start of the choice's text, as vLLM.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from shardline.router.errors import RouterError
from shardline.router.http import RouterContext, sse_event
from shardline.router.openai_serving import OpenAIJob, Presenter, Usage
from shardline.router.request_types import (
    Finished,
    FinishReason,
    StreamEvent,
    Token,
    ValidRequest,
    by_sequence,
    mean_logprob,
)
from shardline.router.tools import ToolCallStream, tool_call

_DONE = b"data: [DONE]\n\n"


def present(ctx: RouterContext, job: OpenAIJob, requests: list[ValidRequest]) -> Presenter:
    if job.chat:
        return ChatPresenter(ctx, job)
    return CompletionPresenter(ctx, job, requests)


def usage_json(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def finish_reason(finished: Finished | None) -> str | None:
    if finished is None:
        return None
    return "length" if finished.reason is FinishReason.LENGTH else "stop"


class _OpenAIPresenter:
    """What chat and completions share: the header, the usage chunk, [DONE], errors."""

    def __init__(self, ctx: RouterContext, job: OpenAIJob) -> None:
        self.job = job
        info = ctx.info
        self._id = f"{'chatcmpl' if job.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self._header = {
            "created": int(time.time()),
            "model": info["model_id"],
            "system_fingerprint": f"{info['version']}-{info.get('docker_label') or 'native'}",
        }

    def header(self, kind: str) -> dict[str, Any]:
        return {"id": self._id, "object": kind, **self._header}

    def answer_body(self, kind: str, choices: list[dict[str, Any]], usage: Usage) -> dict:
        choices.sort(key=lambda choice: choice["index"])
        return {**self.header(kind), "choices": choices, "usage": usage_json(usage)}

    def opening(self) -> list[bytes]:
        return []

    def _closing(self, usage: Usage, kind: str) -> list[bytes]:
        if not self.job.include_usage:
            return [_DONE]
        chunk = {**self.header(kind), "choices": [], "usage": usage_json(usage)}
        return [sse_event(chunk), _DONE]

    def failure(self, error: RouterError) -> bytes:
        return sse_event(error.to_json())


# ---- chat --------------------------------------------------------------------------------------


class ChatPresenter(_OpenAIPresenter):
    _CHUNK = "chat.completion.chunk"

    def __init__(self, ctx: RouterContext, job: OpenAIJob) -> None:
        super().__init__(ctx, job)
        self._calls: dict[int, ToolCallStream] = {}
        self._held: dict[int, list[StreamEvent]] = {}

    def answer(self, results: list[list[StreamEvent]], usage: Usage) -> dict[str, Any]:
        choices = [
            self._choice(self.job.choice_index(prompt_index, sequence[0]), sequence)
            for prompt_index, events in enumerate(results)
            for sequence in by_sequence(events)
        ]
        return self.answer_body("chat.completion", choices, usage)

    def _choice(self, index: int, events: list[StreamEvent]) -> dict[str, Any]:
        finished = _finished(events)
        message: dict[str, Any] = {"role": "assistant", "content": finished.generated_text}
        if self.job.tools is not None:
            message = {"role": "assistant", "tool_calls": [tool_call(finished.generated_text)]}
        return {
            "index": index,
            "message": message,
            "logprobs": self._logprobs(events),
            "finish_reason": self._finish_reason(finished),
        }

    def events(self, prompt_index: int, event: StreamEvent) -> list[bytes]:
        index = self.job.choice_index(prompt_index, event)
        if self.job.tools is None:
            delta = {"role": "assistant", "content": event.text}
            return [sse_event(self._chunk(index, delta, [event]))]
        held = self._held.setdefault(index, [])
        held.append(event)
        calls = self._calls.setdefault(index, ToolCallStream())
        delta = calls.push(event.text, final=event.finished is not None)
        if delta is None:
            return []
        chunk = self._chunk(index, delta, list(held))
        held.clear()
        return [sse_event(chunk)]

    def closing(self, finals: list[StreamEvent], usage: Usage) -> list[bytes]:
        return self._closing(usage, self._CHUNK)

    def _chunk(self, index: int, delta: dict[str, Any], events: list[StreamEvent]) -> dict:
        """A chunk for `events` (the last one may finish the answer)."""
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": self._logprobs(events),
            "finish_reason": self._finish_reason(events[-1].finished),
        }
        usage = {"usage": None} if self.job.include_usage else {}
        return {**self.header(self._CHUNK), "choices": [choice], **usage}

    def _finish_reason(self, finished: Finished | None) -> str | None:
        reason = finish_reason(finished)
        if reason == "stop" and self.job.tools is not None:
            return "tool_calls"
        return reason

    def _logprobs(self, events: list[StreamEvent]) -> dict[str, Any] | None:
        if self.job.top_logprobs is None:
            return None
        return {
            "content": [
                {
                    "token": event.token.text,
                    "logprob": event.token.logprob,
                    "top_logprobs": [
                        {"token": top.text, "logprob": top.logprob} for top in event.top_tokens
                    ],
                }
                for event in events
            ]
        }


# ---- completions -------------------------------------------------------------------------------


class CompletionPresenter(_OpenAIPresenter):
    def __init__(self, ctx: RouterContext, job: OpenAIJob, requests: list[ValidRequest]) -> None:
        super().__init__(ctx, job)
        self._prompts = [valid.inputs for valid in requests]
        self._offsets: dict[int, int] = {}  # streamed: each choice's text so far, in characters

    def answer(self, results: list[list[StreamEvent]], usage: Usage) -> dict[str, Any]:
        choices = []
        for prompt_index, events in enumerate(results):
            for rank, sequence in enumerate(self._best(by_sequence(events))):
                finished = _finished(sequence)
                prefix = self._echoed(prompt_index)
                choices.append(
                    {
                        "index": prompt_index * self.job.params.n + rank,
                        "text": prefix + finished.generated_text,
                        "logprobs": self._logprobs(sequence, 0, prefix),
                        "finish_reason": finish_reason(finished),
                    }
                )
        return self.answer_body("text_completion", choices, usage)

    def events(self, prompt_index: int, event: StreamEvent) -> list[bytes]:
        """TGI's completion chunks carry finish_reason "" until the last one; with echo, the
        first chunk of each choice starts with the prompt (as vLLM streams it)."""
        index = self.job.choice_index(prompt_index, event)
        prefix = "" if index in self._offsets else self._echoed(prompt_index)
        offset = self._offsets.get(index, 0)
        self._offsets[index] = offset + len(prefix) + len(event.text)
        choice = {
            "index": index,
            "text": prefix + event.text,
            "logprobs": self._logprobs([event], offset, prefix),
            "finish_reason": finish_reason(event.finished) or "",
        }
        return [sse_event({**self.header("text_completion"), "choices": [choice]})]

    def closing(self, finals: list[StreamEvent], usage: Usage) -> list[bytes]:
        return self._closing(usage, "text_completion")

    def _best(self, samples: list[list[StreamEvent]]) -> list[list[StreamEvent]]:
        """The n samples that answer: all of them, or with best_of the n of highest mean
        logprob per token, best first."""
        if len(samples) <= self.job.params.n:
            return samples
        return sorted(samples, key=mean_logprob, reverse=True)[: self.job.params.n]

    def _echoed(self, prompt_index: int) -> str:
        return self._prompts[prompt_index] if self.job.echo else ""

    def _logprobs(self, events: list[StreamEvent], offset: int, prompt: str) -> dict | None:
        """`events` of one choice from character `offset` on, after the echoed `prompt` (if
        any, its tokens come first). `top_logprobs` maps each token and its alternatives to
        their logprobs; a prompt token has no alternatives (the shards score it alone)."""
        if self.job.top_logprobs is None:
            return None
        body: dict[str, list[Any]] = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
        }
        if prompt:
            _add_tokens(
                body, [(t, None if t.logprob is None else []) for t in events[0].prefill], offset
            )
        _add_tokens(body, [(e.token, e.top_tokens) for e in events], offset + len(prompt))
        return body


def _add_tokens(
    body: dict[str, list[Any]], scored: list[tuple[Token, list[Token] | None]], offset: int
) -> None:
    """Appends tokens (each with its alternatives; None: not scored) from character `offset`."""
    for token, alternatives in scored:
        body["tokens"].append(token.text)
        body["token_logprobs"].append(token.logprob)
        body["top_logprobs"].append(_top(token, alternatives))
        body["text_offset"].append(offset)
        offset += len(token.text)


def _top(token: Token, alternatives: list[Token] | None) -> dict[str, float | None] | None:
    if alternatives is None:
        return None
    return {token.text: token.logprob, **{top.text: top.logprob for top in alternatives}}


def _finished(events: list[StreamEvent]) -> Finished:
    finished = events[-1].finished
    if finished is None:
        raise RuntimeError("a finished request has no final event")
    return finished
