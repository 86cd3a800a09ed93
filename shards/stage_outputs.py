"""What the last pipeline stage computed, shared with every rank: the tokens it sampled (with
their logprobs and top-n alternatives) and the prompt logprobs it was asked for.

Only the last stage has logits. Every rank keeps the same batches, sampling state (penalty
counts, grammar states) and answers, so each receives the last stage's choices and records them
as its own; the shapes are known everywhere from the batch. The sampled tokens go from the last
stage to each earlier one, which posts its receives when it has sent its activations and waits
on them when it needs the step's result (`step_on_arrival`): a Decode there is answered before
the last stage has sampled (engine.py, stage_pending.py). Prompt logprobs (a Prefill, which
every rank finishes at once) are broadcast.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from shardline.shards.sampling.sampling import SamplerOutput, SamplingState
from shardline.shards.step_result import PendingStep, StepResult, pending_step
from shardline.shards.utils.pipeline import PipelineStage


def share_sampled(
    stage: PipelineStage, out: SamplerOutput | None, state: SamplingState, device: torch.device
) -> tuple[SamplerOutput, Callable[[], None] | None]:
    """The last stage's `out` on every rank (`out` is None elsewhere), and, on a stage but the
    last, the wait until it is in."""
    rows, top_n = len(state), state.flags.max_top_n
    if out is None:
        out = SamplerOutput(
            torch.empty(rows, dtype=torch.int64, device=device),
            torch.empty(rows, dtype=torch.float32, device=device),
        )
        if top_n:
            out.top_ids = torch.empty((rows, top_n), dtype=torch.int64, device=device)
            out.top_logprobs = torch.empty((rows, top_n), dtype=torch.float32, device=device)
    else:
        out = SamplerOutput(
            out.next_token_ids.to(torch.int64).contiguous(),
            out.logprobs.to(torch.float32).contiguous(),
            None if out.top_ids is None else out.top_ids.to(torch.int64).contiguous(),
            None if out.top_logprobs is None else out.top_logprobs.to(torch.float32).contiguous(),
        )
    tensors = [out.next_token_ids, out.logprobs, out.top_ids, out.top_logprobs]
    tensors = [tensor for tensor in tensors if tensor is not None]
    if stage.is_last:
        stage.send_back(tensors)
        return out, None
    return out, stage.receive_from_last(tensors)


def step_on_arrival(
    out: SamplerOutput,
    arrived: Callable[[], None],
    state: SamplingState,
    started: int,
    forward_done: int,
) -> PendingStep:
    """A step of a stage but the last: its result waits for the last stage's choices (into
    `out`), then records them in the sampling state as the last stage did at once."""

    def finish() -> StepResult:
        arrived()
        state.append(out.next_token_ids)
        return pending_step(out, started, forward_done).result()

    return PendingStep(out.next_token_ids, finish)


def share_prompt_logprobs(
    stage: PipelineStage,
    computed: dict[int, list[float]] | None,
    lengths: dict[int, int],
    device: torch.device,
) -> dict[int, list[float]]:
    """The last stage's prompt logprobs of each row in `lengths` (that many each) on every rank
    (`computed` is None elsewhere)."""
    if not lengths:
        return {}
    if computed is None:
        flat = torch.empty(sum(lengths.values()), dtype=torch.float32, device=device)
    else:
        values = [value for row in lengths for value in computed[row]]
        flat = torch.tensor(values, dtype=torch.float32, device=device)
    stage.share([flat])
    parts = flat.tolist()
    shared: dict[int, list[float]] = {}
    for row, length in lengths.items():
        shared[row], parts = parts[:length], parts[length:]
    return shared
