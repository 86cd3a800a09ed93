"""The shard's sampler: greedy and seeded choices, logprobs, the counter hash, min_tokens, batch
filter and concatenate, CUDA-graph capture, and CUDA against CPU (the processors one by one:
test_logits_process.py)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from shardline.shards.sampling.counter_hash import pcg_hash
from shardline.shards.sampling.sampling import Sampler, SamplingState, reported_top_count
from shardline.shards.sampling.sampling_rows import RowConfig, RowTensors
from tests import sampling_helpers
from tests.sampling_helpers import (
    CPU,
    EOS,
    VOCAB,
    Req,
    assert_exact,
    chooser,
    state_of,
    step,
    stopping,
)

scores = sampling_helpers.scores


def generate(requests: Sequence[Req], steps: int, device: torch.device = CPU) -> list[list[int]]:
    sampler, state = Sampler(), state_of(requests, device=device)
    tokens = [step(sampler, state, requests).next_token_ids.tolist() for _ in range(steps)]
    return [list(row) for row in zip(*tokens, strict=True)]


# ---- the sampler -------------------------------------------------------------------------------


def test_greedy_rows_take_argmax_of_penalized_scores(scores: torch.Tensor) -> None:
    requests = [
        Req(0, chooser(repetition_penalty=1.5), prompt=scores[0].topk(3).indices.tolist()),
        Req(1, chooser(do_sample=False, top_k=2, temperature=0.5)),  # warpers ignored
        Req(2, chooser(do_sample=True, temperature=0.0)),  # temperature 0: greedy
        Req(3, chooser(do_sample=True, temperature=0.3, top_k=3, seed=5)),  # sampled companion
    ]
    state = state_of(requests)
    out = Sampler()(scores[:4], state)
    penalized = RepetitionPenaltyLogitsProcessor(1.5)(
        torch.tensor([requests[0].prompt]), scores[:1]
    )
    expected = torch.cat([penalized, scores[1:3]])
    assert out.next_token_ids[:3].tolist() == expected.argmax(-1).tolist()
    assert out.next_token_ids[0] != scores[0].argmax()
    chosen = expected.log_softmax(-1).gather(1, out.next_token_ids[:3, None]).squeeze(1)
    assert_exact(out.logprobs[:3], chosen)
    assert out.top_ids is None


def test_logprobs_and_top_tokens_are_of_the_processed_scores(scores: torch.Tensor) -> None:
    requests = [
        Req(0, chooser(do_sample=True, temperature=0.7, top_k=2, seed=1), top_n=3),
        Req(1, chooser(do_sample=False), top_n=3),
        Req(2, chooser(do_sample=False), top_n=0),
        Req(3, chooser(do_sample=True, top_p=0.5, seed=2), top_n=1),
    ]
    out = Sampler()(scores[:4], state_of(requests))
    warped = TopKLogitsWarper(2)(None, TemperatureLogitsWarper(0.7)(None, scores[:1]))
    nucleus = TopPLogitsWarper(0.5)(None, scores[3:4])
    processed = torch.cat([warped, scores[1:3], nucleus]).log_softmax(-1)
    assert_exact(out.logprobs, processed.gather(1, out.next_token_ids[:, None]).squeeze(1))
    top = processed.topk(3)
    counts = [
        reported_top_count(out.top_logprobs[row].tolist(), request.top_n)
        for row, request in enumerate(requests)
    ]
    assert counts == [2, 3, 0, 1]
    for row, count in enumerate(counts):
        assert out.top_ids[row, :count].tolist() == top.indices[row, :count].tolist()
        assert_exact(out.top_logprobs[row, :count], top.values[row, :count])
    assert out.logprobs[0] > -float("inf") and out.next_token_ids[0] in top.indices[0, :2]


def _chi_square_limit(degrees: int, z: float = 3.719) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z 3.719: p = 1e-4)."""
    scale = 2 / (9 * degrees)
    return degrees * (1 - scale + z * scale**0.5) ** 3


@pytest.mark.parametrize("vary", ["seed", "step"])
def test_sampled_frequencies_match_the_processed_softmax(vary: str) -> None:
    draws, vocab = 20_000, 16
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(3)) * 1.5
    seeds = range(draws) if vary == "seed" else [12345] * draws
    params = [chooser(do_sample=True, temperature=0.8, top_k=12, top_p=0.95, seed=s) for s in seeds]
    state = SamplingState.from_requests(
        params, [stopping()] * draws, [[]] * draws, [EOS], [0] * draws, vocab, CPU
    )
    if vary == "step":
        state.generated = torch.arange(draws)
    tokens = Sampler()(logits.expand(draws, vocab), state).next_token_ids
    processed = TopPLogitsWarper(0.95)(None, TopKLogitsWarper(12)(None, logits[None] / 0.8))
    expected = processed.softmax(-1)[0] * draws
    observed = torch.bincount(tokens, minlength=vocab).float()
    support = expected > 0
    assert observed[~support].sum() == 0
    chi_square = ((observed - expected)[support] ** 2 / expected[support]).sum().item()
    assert chi_square < _chi_square_limit(int(support.sum()) - 1)


def test_a_seed_gives_the_same_tokens_whatever_the_batch() -> None:
    target = Req(
        1,
        chooser(do_sample=True, seed=42, temperature=0.9, top_p=0.9, top_k=50),
        stop=stopping(min_new_tokens=2),
    )
    target.params.repetition_penalty, target.params.frequency_penalty = 1.1, 0.3
    companions = [
        Req(2, chooser(do_sample=False, repetition_penalty=1.4)),
        Req(3, chooser(do_sample=True, seed=7, typical_p=0.5, presence_penalty=0.5), top_n=4),
        Req(4, chooser(do_sample=True, seed=42, min_p=0.1, temperature=1.3)),
    ]
    alone = generate([target], 8)[0]
    assert generate([*companions[:2], target, companions[2]], 8)[2] == alone
    assert generate([target, companions[2]], 8)[0] == alone
    reseeded = Req(1, chooser(do_sample=True, seed=43, temperature=0.9, top_p=0.9, top_k=50))
    reseeded.params.repetition_penalty, reseeded.params.frequency_penalty = 1.1, 0.3
    assert generate([reseeded], 8)[0] != alone


def _python_pcg_hash(value: int) -> int:
    state = (value * 747796405 + 2891336453) % 2**32
    word = (((state >> ((state >> 28) + 4)) ^ state) * 277803737) % 2**32
    return (word >> 22) ^ word


def test_hash_is_exact_pcg_over_the_whole_32_bit_range() -> None:
    values = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1]
    expected = [_python_pcg_hash(v) for v in values]
    assert pcg_hash(torch.tensor(values)).tolist() == expected


def test_the_full_64_bit_seed_counts() -> None:
    tokens = generate([Req(1, chooser(do_sample=True, seed=s)) for s in (5, 5 + 2**32)], 8)
    assert tokens[0] != tokens[1]


def test_min_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    logits = torch.full((4, VOCAB), -5.0)
    logits[:, [EOS, 5, 7]] = torch.tensor([3.0, 2.0, 1.0])
    rows = [
        stopping(min_new_tokens=2, stop_token_ids=[5]),
        stopping(min_new_tokens=2, stop_token_ids=[5], ignore_eos_token=True),
        stopping(min_new_tokens=0, stop_token_ids=[5]),
        stopping(min_new_tokens=3, ignore_eos_token=True),
    ]
    state = SamplingState.from_requests(
        [chooser()] * 4, rows, [[1]] * 4, [EOS, 9], [0] * 4, VOCAB, CPU
    )
    sampler, history = Sampler(), []
    for _ in range(3):
        out = sampler(logits, state)
        state.append(out.next_token_ids)
        history.append(out.next_token_ids.tolist())
    assert [list(row) for row in zip(*history, strict=True)] == [
        [7, 7, EOS],
        [EOS, EOS, EOS],
        [EOS, EOS, EOS],
        [EOS, EOS, EOS],
    ]
    assert out.logprobs[0] > -1.0


def test_min_tokens_lets_eos_through_when_nothing_else_is_left() -> None:
    """A constrained row whose grammar is complete may only end: min_tokens must not strand it."""
    logits = torch.full((2, VOCAB), float("-inf"))
    logits[:, EOS] = 0.0
    logits[1, 7] = 1.0
    state = SamplingState.from_requests(
        [chooser()] * 2, [stopping(min_new_tokens=5)] * 2, [[1]] * 2, [EOS], [0, 0], VOCAB, CPU
    )
    assert Sampler()(logits, state).next_token_ids.tolist() == [EOS, 7]


def test_min_tokens_counter_survives_filter_and_concatenate() -> None:
    logits = torch.zeros(2, VOCAB)
    logits[:, EOS] = 5.0
    first = SamplingState.from_requests(
        [chooser()] * 2, [stopping(min_new_tokens=2)] * 2, [[1]] * 2, [EOS], [0, 0], VOCAB, CPU
    )
    sampler = Sampler()
    first.append(sampler(logits, first).next_token_ids)
    fresh = SamplingState.from_requests([chooser()], [stopping()], [[1]], [EOS], [0], VOCAB, CPU)
    merged = SamplingState.concatenate([fresh, first.filter([1])])
    assert merged.generated.tolist() == [0, 1]
    assert sampler(logits, merged).next_token_ids.tolist()[1] != EOS
    merged.append(torch.tensor([EOS, 3]))
    assert sampler(logits, merged).next_token_ids.tolist() == [EOS, EOS]


def test_filter_and_concatenate_keep_every_row_on_its_own_track() -> None:
    requests = [
        Req(10, chooser(do_sample=True, seed=1, repetition_penalty=1.3, temperature=1.5)),
        Req(11, chooser(do_sample=False, frequency_penalty=1.0, presence_penalty=0.5)),
        Req(12, chooser(do_sample=True, seed=3, top_k=20, repetition_penalty=0.9), top_n=2),
        Req(13, chooser(do_sample=True, seed=4, top_p=0.8)),
        Req(14, chooser(do_sample=False)),
    ]
    reference = {r.name: generate([r], 7)[0] for r in requests}
    sampler, produced = Sampler(), {r.name: [] for r in requests}

    def run(state: SamplingState, rows: list[Req], steps: int) -> None:
        for _ in range(steps):
            out = step(sampler, state, rows)
            for request, token in zip(rows, out.next_token_ids.tolist(), strict=True):
                produced[request.name].append(token)

    a, b = state_of(requests[:3]), state_of(requests[3:])
    run(a, requests[:3], 2)
    run(b, requests[3:], 3)
    merged = SamplingState.concatenate([a.filter([2, 0]), b])
    assert merged.counts is None and merged.seen is not None
    rows = [requests[2], requests[0], *requests[3:]]
    run(merged, rows, 2)
    kept = merged.filter([2, 0, 3])
    assert kept.seen is not None and kept.generated.tolist() == [5, 4, 5]
    run(kept, [rows[2], rows[0], rows[3]], 2)
    with_counts = SamplingState.concatenate([kept, a.filter([1])])
    assert with_counts.counts is not None
    for request in requests:
        assert produced[request.name] == reference[request.name][: len(produced[request.name])]
    assert [len(produced[r.name]) for r in requests] == [4, 2, 6, 7, 7]


def _varied_rows(count: int) -> list[RowConfig]:
    return [
        RowConfig(
            sample=row % 2 == 0,
            temperature=0.5 + row / 100,
            top_k=row % 7,
            seed=row * 7919 + (row << 40),
            min_new_tokens=row % 3,
            min_tokens_ids=tuple(range(row % 4)),
            logit_bias=((5, 1.5), (9, -2.0))[: row % 3] if row % 4 else (),
        )
        for row in range(count)
    ]


def _tensors_of(tensors: RowTensors) -> dict[str, torch.Tensor | None]:
    names = ("floats", "ints", "sample", "min_tokens_ids", "logit_bias_ids", "logit_bias_values")
    return {name: getattr(tensors, name) for name in names}


def _assert_same(got: RowTensors, want: RowTensors) -> None:
    for name, tensor in _tensors_of(want).items():
        assert torch.equal(_tensors_of(got)[name], tensor), name


def test_row_tensors_join_and_gather_as_if_built_from_the_rows() -> None:
    rows = _varied_rows(12)
    whole = RowTensors.build(rows, VOCAB, CPU)
    unbiased = [RowConfig(sample=True, seed=3), RowConfig(sample=False)]
    parts = [rows[:5], rows[5:9], unbiased]  # the last is narrower and has no bias: widened
    joined = RowTensors.concatenate([RowTensors.build(part, VOCAB, CPU) for part in parts])
    _assert_same(joined, RowTensors.build([row for part in parts for row in part], VOCAB, CPU))
    keep = [9, 2, 4, 11]  # rows of one width: gathered, they are what building them gives
    _assert_same(
        whole.select(torch.tensor(keep)), RowTensors.build([rows[i] for i in keep], VOCAB, CPU)
    )
    assert whole.temperature.tolist() == pytest.approx([row.temperature for row in rows])
    assert whole.seed_high.tolist() == [row.seed >> 32 for row in rows]
    plain = RowTensors.concatenate([RowTensors.build(unbiased, VOCAB, CPU)] * 2)
    assert plain.logit_bias_ids is None and plain.min_tokens_ids.shape == (4, 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampler_is_cuda_graph_capturable() -> None:
    device = torch.device("cuda")
    requests = [
        Req(0, chooser(do_sample=True, seed=1, top_k=20, top_p=0.9, repetition_penalty=1.2)),
        Req(1, chooser(do_sample=False, frequency_penalty=0.5), stop=stopping(min_new_tokens=3)),
        Req(2, chooser(do_sample=True, seed=2, typical_p=0.7, min_p=0.05), top_n=3),
    ]
    state = state_of(requests, device=device)
    sampler = Sampler()
    logits = torch.stack([r.logits(0) for r in requests]).to(device)
    eager = sampler(logits, state)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        sampler(logits, state)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = sampler(logits, state)
    graph.replay()
    assert torch.equal(captured.next_token_ids, eager.next_token_ids)
    assert torch.equal(captured.top_ids, eager.top_ids)


CUDA_REQUESTS = [
    Req(0, chooser(do_sample=True, seed=1, top_k=20, top_p=0.9, repetition_penalty=1.2), top_n=3),
    Req(1, chooser(do_sample=False, frequency_penalty=0.5), stop=stopping(min_new_tokens=3)),
    Req(2, chooser(do_sample=True, seed=2, typical_p=0.7, min_p=0.05), top_n=2),
    Req(3, chooser(do_sample=False, repetition_penalty=1.3), top_n=4),
    Req(4, chooser(do_sample=True, seed=2**40 + 9, temperature=0.8, top_k=50)),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_greedy_equals_cpu() -> None:
    greedy = [r for r in CUDA_REQUESTS if not r.params.do_sample]
    cpu_state, cuda_state = state_of(greedy), state_of(greedy, device=torch.device("cuda"))
    cpu_sampler, cuda_sampler = Sampler(), Sampler()
    for _ in range(6):
        expected = step(cpu_sampler, cpu_state, greedy)
        actual = step(cuda_sampler, cuda_state, greedy)
        assert actual.next_token_ids.tolist() == expected.next_token_ids.tolist()
        torch.testing.assert_close(actual.logprobs.cpu(), expected.logprobs)
        assert actual.top_ids.tolist() == expected.top_ids.tolist()
        torch.testing.assert_close(actual.top_logprobs.cpu(), expected.top_logprobs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_seeded_samples_are_the_same_whatever_the_batch() -> None:
    cuda = torch.device("cuda")
    together = generate(CUDA_REQUESTS, 10, cuda)
    alone = [generate([request], 10, cuda)[0] for request in CUDA_REQUESTS]
    reordered = generate(CUDA_REQUESTS[::-1], 10, cuda)[::-1]
    assert together == alone == reordered


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("vocab", [VOCAB, 128_000])
def test_triton_choice_equals_the_torch_reference_on_cuda(vocab: int) -> None:
    cuda = torch.device("cuda")
    requests = [Req(i, chooser(do_sample=i % 3 != 0, seed=i * 977 + 2**33)) for i in range(64)]
    state = state_of(requests, vocab, cuda)
    state.generated = torch.arange(64, device=cuda) * 5
    sampler = Sampler()
    for trial in range(3):
        generator = torch.Generator(cuda).manual_seed(trial)
        scores = torch.randn(64, vocab, device=cuda, generator=generator) * 4
        scores[::4, : vocab // 2] = float("-inf")
        out = sampler(scores, state)
        assert torch.equal(out.next_token_ids, sampler._choose(scores, state))
        chosen = scores.log_softmax(-1).gather(1, out.next_token_ids[:, None]).squeeze(1)
        torch.testing.assert_close(out.logprobs, chosen)
