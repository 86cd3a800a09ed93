"""Requests, sampling states and the random `scores` fixture for the sampler tests (a test module
binds the fixture by name: `scores = sampling_helpers.scores`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
import torch

from shardline.proto import generate_pb2
from shardline.shards.sampling.sampling import Sampler, SamplerOutput, SamplingState

VOCAB = 512
EOS = 0
CPU = torch.device("cpu")


def chooser(**fields: object) -> generate_pb2.NextTokenChooserParameters:
    defaults = {"temperature": 1.0, "top_p": 1.0, "typical_p": 1.0, "repetition_penalty": 1.0}
    return generate_pb2.NextTokenChooserParameters(**{**defaults, **fields})


def stopping(**fields: object) -> generate_pb2.StoppingCriteriaParameters:
    return generate_pb2.StoppingCriteriaParameters(**{"max_new_tokens": 64, **fields})


@dataclass
class Req:
    """A request of the reproducibility tests; its logits at each step depend only on `name`."""

    name: int
    params: generate_pb2.NextTokenChooserParameters
    stop: generate_pb2.StoppingCriteriaParameters = field(default_factory=stopping)
    prompt: list[int] = field(default_factory=lambda: [3, 4, 5])
    top_n: int = 0

    def logits(self, step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.name * 1000 + step)
        return torch.randn(VOCAB, generator=generator) * 2


def state_of(
    requests: Sequence[Req], vocab: int = VOCAB, device: torch.device = CPU
) -> SamplingState:
    return SamplingState.from_requests(
        [r.params for r in requests],
        [r.stop for r in requests],
        [r.prompt for r in requests],
        [EOS],
        [r.top_n for r in requests],
        vocab,
        device,
    )


def step(sampler: Sampler, state: SamplingState, requests: Sequence[Req]) -> SamplerOutput:
    generated = state.generated.tolist()
    logits = torch.stack([r.logits(n) for r, n in zip(requests, generated, strict=True)])
    out = sampler(logits.to(state.device), state)
    state.append(out.next_token_ids)
    return out


@pytest.fixture
def scores() -> torch.Tensor:
    return torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(0)) * 3


def assert_exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
