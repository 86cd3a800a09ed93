"""What the last pipeline stage computed, shared with every rank: the tokens it sampled (with
their logprobs and top-n alternatives) and the prompt logprobs it was asked for.

Only the last stage has logits. Every rank keeps the same batches, sampling state (penalty
counts, grammar states) and answers, so each receives the last stage's choices and records them
as its own; the shapes are known everywhere from the batch, so one broadcast per tensor does it.
"""

from __future__ import annotations

import torch

from shardline.shards.sampling.sampling import SamplerOutput, SamplingState
from shardline.shards.utils.pipeline import PipelineStage


def share_sampled(
    stage: PipelineStage, out: SamplerOutput | None, state: SamplingState, device: torch.device
) -> SamplerOutput:
    """The last stage's `out` on every rank (`out` is None elsewhere)."""
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
    stage.share([tensor for tensor in tensors if tensor is not None])
    return out


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
