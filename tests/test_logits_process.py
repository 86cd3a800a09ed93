"""Each logits processor of the shard's sampler against its transformers counterpart, with mixed
values per row: temperature, top-k, top-p, min-p, typical-p and the penalties."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from shardline.shards.sampling import logits_process
from shardline.shards.sampling.sampling import process_logits
from tests import sampling_helpers
from tests.sampling_helpers import VOCAB, Req, assert_exact, chooser, state_of

scores = sampling_helpers.scores

Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def rowwise(processors: Sequence[Processor | None], scores: torch.Tensor) -> torch.Tensor:
    """Each row through its own transformers processor (None: the row must stay unchanged)."""
    ids = torch.zeros(1, 1, dtype=torch.int64)
    rows = [
        scores[i : i + 1] if p is None else p(ids, scores[i : i + 1])
        for i, p in enumerate(processors)
    ]
    return torch.cat(rows)


# ---- each processor against transformers, mixed values per row --------------------------------


def test_temperature(scores: torch.Tensor) -> None:
    values = [0.5, 1.0, 1.7, 0.25, 1.0, 3.0]
    actual = logits_process.apply_temperature(scores, torch.tensor(values))
    expected = rowwise([TemperatureLogitsWarper(t) for t in values], scores)
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=0)
    assert_exact(actual[[1, 4]], scores[[1, 4]])


def transformers_top_k_top_p(
    scores: torch.Tensor, top_k: list[int], top_p: list[float]
) -> torch.Tensor:
    """Each row filtered by transformers' top-k then top-p warpers (0 and 1: off)."""
    expected = scores.clone()
    for i, (k, p) in enumerate(zip(top_k, top_p, strict=True)):
        if k:
            expected[i : i + 1] = TopKLogitsWarper(k)(None, expected[i : i + 1])
        if p < 1:
            expected[i : i + 1] = TopPLogitsWarper(p)(None, expected[i : i + 1])
    return expected


@pytest.mark.parametrize(
    ("top_k", "top_p"),
    [
        ([0, 1, 10, 0, 0, 50], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
        ([0, 0, 0, 0, 0, 0], [1.0, 0.9, 0.5, 0.1, 0.999, 0.95]),
        ([0, 5, 20, 0, 100, 3], [1.0, 0.9, 0.8, 0.3, 1.0, 0.1]),
    ],
)
def test_top_k_top_p(scores: torch.Tensor, top_k: list[int], top_p: list[float]) -> None:
    actual = logits_process.apply_top_k_top_p(
        scores, torch.tensor([k or VOCAB for k in top_k]), torch.tensor([1 - p for p in top_p])
    )
    assert_exact(actual, transformers_top_k_top_p(scores, top_k, top_p))
    assert actual.isfinite().sum(dim=-1).tolist() != [VOCAB] * 6


def test_top_k_alone_through_topk(scores: torch.Tensor) -> None:
    top_k = [0, 1, 10, 0, 3, 50]
    actual = logits_process.apply_top_k(scores, torch.tensor([k or VOCAB for k in top_k]), 50)
    expected = rowwise([TopKLogitsWarper(k) if k else None for k in top_k], scores)
    assert_exact(actual, expected)


def test_top_k_keeps_ties_at_the_kth_score() -> None:
    scores = torch.tensor([[0.0, 2.0, 1.0, 1.0, 1.0, -1.0]])
    actual = logits_process.apply_top_k(scores, torch.tensor([2]), 2)
    assert actual.isfinite().tolist() == [[False, True, True, True, True, False]]


@pytest.mark.parametrize(
    ("top_k", "top_p"),
    [
        ([5, 20, 50, 3, 7, 50], [0.9, 0.8, 0.3, 0.5, 1.0, 0.95]),
        ([0, 20, 50, 1, 0, 10], [1.0, 0.2, 0.999, 0.5, 1.0, 0.1]),
    ],
)
def test_top_p_cut_from_top_k_candidates(
    scores: torch.Tensor, top_k: list[int], top_p: list[float]
) -> None:
    actual = logits_process.apply_top_k_top_p_candidates(
        scores,
        torch.tensor([k or VOCAB for k in top_k]),
        torch.tensor([1 - p for p in top_p]),
        max(top_k),
    )
    assert_exact(actual, transformers_top_k_top_p(scores, top_k, top_p))


@pytest.mark.parametrize(
    ("settings", "path"),
    [
        ({"top_k": 7}, "apply_top_k"),
        ({"top_k": 7, "top_p": 0.9}, "apply_top_k_top_p_candidates"),
        ({"top_p": 0.9}, "apply_top_k_top_p"),
        ({"top_k": VOCAB, "top_p": 1.0}, None),
    ],
)
def test_a_vocabulary_sort_only_for_top_p_without_top_k(
    monkeypatch: pytest.MonkeyPatch, settings: dict[str, float], path: str | None
) -> None:
    called = []
    for name in ("apply_top_k", "apply_top_k_top_p_candidates", "apply_top_k_top_p"):
        original = getattr(logits_process, name)
        monkeypatch.setattr(
            logits_process, name, lambda *a, _f=original, _n=name: called.append(_n) or _f(*a)
        )
    requests = [
        Req(0, chooser(do_sample=True, seed=1, **settings)),
        Req(1, chooser(do_sample=True, seed=2, top_k=3)),
        Req(2, chooser(do_sample=False)),
    ]
    process_logits(torch.randn(3, VOCAB), state_of(requests[:1] if path is None else requests))
    assert called == ([] if path is None else [path])


def test_min_p(scores: torch.Tensor) -> None:
    values = [0.0, 0.05, 0.2, 1.0, 0.5, 0.0]
    actual = logits_process.apply_min_p(scores, torch.tensor(values))
    expected = rowwise([MinPLogitsWarper(p) if p else None for p in values], scores)
    assert_exact(actual, expected)


def test_typical_p(scores: torch.Tensor) -> None:
    values = [1.0, 0.2, 0.5, 0.9, 0.99, 1.0]
    actual = logits_process.apply_typical_p(scores, torch.tensor(values))
    expected = rowwise([TypicalLogitsWarper(p) if p < 1 else None for p in values], scores)
    assert_exact(actual, expected)


def test_repetition_penalty_over_prompt_and_generated(scores: torch.Tensor) -> None:
    penalties = [1.0, 1.3, 0.7, 2.0, 1.5, 1.05]
    prompts = [list(range(7 * i, 7 * i + 5 + i)) for i in range(6)]
    prompts[4] = []  # an empty prompt marks nothing (not token 0)
    requests = [
        Req(i, chooser(repetition_penalty=p), prompt=prompt)
        for i, (p, prompt) in enumerate(zip(penalties, prompts, strict=True))
    ]
    state = state_of(requests)
    generated = torch.tensor([[1, 2, 3, 4, 5, 6], [9, 9, 9, 9, 9, 9]])
    for ids in generated:
        state.append(ids)
    actual = process_logits(scores, state)
    for i, (request, penalty) in enumerate(zip(requests, penalties, strict=True)):
        ids = torch.tensor([request.prompt + generated[:, i].tolist()])
        expected = RepetitionPenaltyLogitsProcessor(penalty)(ids, scores[i : i + 1].clone())
        assert_exact(actual[i : i + 1], expected)


def test_frequency_and_presence_penalties_follow_openai(scores: torch.Tensor) -> None:
    penalties = [(0.0, 0.0), (0.5, 0.0), (0.0, 1.2), (-0.4, 0.3), (2.0, -2.0), (0.0, 0.0)]
    requests = [
        Req(i, chooser(frequency_penalty=f, presence_penalty=p), prompt=[11, 12])
        for i, (f, p) in enumerate(penalties)
    ]
    state = state_of(requests)
    history = torch.randint(0, 8, (10, 6), generator=torch.Generator().manual_seed(1))
    for ids in history:
        state.append(ids)
    actual = process_logits(scores, state)
    expected = scores.clone()
    for row, (frequency, presence) in enumerate(penalties):
        tokens = history[:, row].tolist()
        for token in set(tokens):
            expected[row, token] -= tokens.count(token) * frequency + presence
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
    assert_exact(actual[[0, 5]], scores[[0, 5]])
    assert_exact(actual[:, 11:13], scores[:, 11:13])  # prompt tokens are not counted
