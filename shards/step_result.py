"""A step's chosen tokens: on the device at once (`PendingStep.next_tokens`, the next step's
inputs), on the host once copied (`StepResult`), for rows selected or steps concatenated."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from shardline.shards.sampling.sampling import SamplerOutput
from shardline.shards.utils.transfer import index_on


@dataclass
class StepResult:
    """The tokens one forward pass chose, copied to the host."""

    next_tokens: torch.Tensor
    next_token_ids: list[int]
    logprobs: list[float]
    top_ids: list[list[int]] | None
    top_logprobs: list[list[float]] | None
    forward_ns: int
    sample_ns: int

    def select(self, rows: list[int], next_tokens: torch.Tensor) -> StepResult:
        """The result of rows `rows` alone, whose tokens on the device are `next_tokens`."""
        return replace(
            self,
            next_tokens=next_tokens,
            next_token_ids=[self.next_token_ids[row] for row in rows],
            logprobs=[self.logprobs[row] for row in rows],
            top_ids=None if self.top_ids is None else [self.top_ids[row] for row in rows],
            top_logprobs=(
                None if self.top_logprobs is None else [self.top_logprobs[row] for row in rows]
            ),
        )

    @classmethod
    def concatenate(cls, results: list[StepResult]) -> StepResult:
        """One result of several decode steps' rows, in order (the slowest phase times)."""
        return cls(
            next_tokens=torch.cat([r.next_tokens for r in results]),
            next_token_ids=[t for r in results for t in r.next_token_ids],
            logprobs=[x for r in results for x in r.logprobs],
            top_ids=_concat_rows([r.top_ids for r in results], [len(r.logprobs) for r in results]),
            top_logprobs=_concat_rows(
                [r.top_logprobs for r in results], [len(r.logprobs) for r in results]
            ),
            forward_ns=max(r.forward_ns for r in results),
            sample_ns=max(r.sample_ns for r in results),
        )


def _concat_rows(parts: list[list | None], sizes: list[int]) -> list | None:
    """Per-row lists of several results; a result without them gives its rows empty lists."""
    if all(part is None for part in parts):
        return None
    return [row for part, n in zip(parts, sizes) for row in (part or [[] for _ in range(n)])]


class PendingStep:
    """A step launched on the device: its chosen token ids are usable as device inputs at once
    (`next_tokens`), its host-side result once the device has produced it (`result()`)."""

    def __init__(self, next_tokens: torch.Tensor, finish: Callable[[], StepResult]) -> None:
        self.next_tokens = next_tokens
        self._finish = finish
        self._result: StepResult | None = None

    def result(self) -> StepResult:
        if self._result is None:
            self._result = self._finish()
        return self._result

    def select(self, rows: list[int]) -> PendingStep:
        """The step of rows `rows` alone (StepAhead.select hands back the whole step itself)."""
        selected = self.next_tokens.index_select(0, index_on(rows, self.next_tokens.device))
        return PendingStep(selected, lambda: self.result().select(rows, selected))

    @staticmethod
    def concatenate(steps: list[PendingStep]) -> PendingStep:
        if len(steps) == 1:
            return steps[0]
        return PendingStep(
            torch.cat([step.next_tokens for step in steps]),
            lambda: StepResult.concatenate([step.result() for step in steps]),
        )


def pending_step(out: SamplerOutput, started: int, forward_done: int) -> PendingStep:
    """The step of a sampler output on the device, its copy to the host started now; its
    result waits for that copy alone. `started` / `forward_done`: perf_counter_ns stamps."""
    host = _HostCopy.start(out)

    def finish() -> StepResult:
        host.wait()
        return StepResult(
            next_tokens=out.next_token_ids,
            next_token_ids=host.next_token_ids.tolist(),
            logprobs=host.logprobs.tolist(),
            top_ids=None if host.top_ids is None else host.top_ids.tolist(),
            top_logprobs=None if host.top_logprobs is None else host.top_logprobs.tolist(),
            forward_ns=forward_done - started,
            sample_ns=time.perf_counter_ns() - forward_done,
        )

    return PendingStep(out.next_token_ids, finish)


@dataclass
class _HostCopy:
    """Pinned host copies of a sampler output, filled by non-blocking copies."""

    next_token_ids: torch.Tensor
    logprobs: torch.Tensor
    top_ids: torch.Tensor | None
    top_logprobs: torch.Tensor | None
    done: torch.cuda.Event | None

    @classmethod
    def start(cls, out: SamplerOutput) -> _HostCopy:
        if not out.next_token_ids.is_cuda:
            return cls(out.next_token_ids, out.logprobs, out.top_ids, out.top_logprobs, None)
        sources = (out.next_token_ids, out.logprobs, out.top_ids, out.top_logprobs)
        copies = [None if t is None else _pinned_copy(t) for t in sources]
        done = torch.cuda.Event()
        done.record()
        return cls(*copies, done)

    def wait(self) -> None:
        if self.done is not None:
            self.done.synchronize()


def _pinned_copy(tensor: torch.Tensor) -> torch.Tensor:
    copy = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return copy.copy_(tensor, non_blocking=True)
