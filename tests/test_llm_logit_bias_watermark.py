"""logit_bias and TGI's watermark through the offline API and the shard's sampler: a +100 bias
makes greedy pick its token, -100 forbids the greedy choice, a watermarked text holds far more
green tokens than gamma (a z-test with the shard's own green lists) and greedy without either
stays transformers' greedy."""

from __future__ import annotations

import math

import pytest
import torch

from shardline import LLM, SamplingParams
from shardline.proto import generate_pb2 as pb
from shardline.shards.request_checks import admit
from shardline.shards.sampling.watermark import WatermarkSettings, green_mask
from tests.shard_harness import make_request, random_prompts, transformers_greedy

VOCAB = 384


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(4, VOCAB, seed=57, min_len=3, max_len=20)


def generate(llm: LLM, prompts: list[list[int]], **kwargs: object) -> list[list[int]]:
    params = SamplingParams(**{"temperature": 0, "max_tokens": 8, **kwargs})
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    return [output.outputs[0].token_ids for output in outputs]


def green_z_score(prompt: list[int], tokens: list[int], gamma: float) -> float:
    """Kirchenbauer et al.'s detector: z of the count of tokens in their step's green list."""
    previous = torch.tensor([prompt[-1], *tokens[:-1]])
    green = green_mask(previous, VOCAB, torch.full((len(tokens),), gamma))
    hits = int(green[torch.arange(len(tokens)), torch.tensor(tokens)].sum())
    count = len(tokens)
    return (hits - gamma * count) / math.sqrt(count * gamma * (1 - gamma))


def test_a_positive_bias_makes_greedy_pick_the_token(llm, prompts):
    assert generate(llm, prompts, logit_bias={77: 100}, ignore_eos=True) == [[77] * 8] * 4


def test_a_negative_bias_forbids_the_greedy_choice(llm, prompts, tiny_llama_dir):
    reference = transformers_greedy(tiny_llama_dir, prompts, [8] * len(prompts))
    assert generate(llm, prompts) == reference
    for prompt, expected in zip(prompts, reference):
        (tokens,) = generate(llm, [prompt], logit_bias={expected[0]: -100.0})
        assert tokens[0] != expected[0]
    mixed = [SamplingParams(temperature=0, max_tokens=8, logit_bias={5: 100}), *[None] * 3]
    mixed[1:] = [SamplingParams(temperature=0, max_tokens=8)] * 3
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=mixed, use_tqdm=False)
    assert outputs[0].outputs[0].token_ids[0] == 5
    assert [o.outputs[0].token_ids for o in outputs[1:]] == reference[1:]


def test_sampled_rows_take_the_bias_too(llm, prompts):
    params = {"temperature": 1.0, "seed": 3, "logit_bias": {9: 100}, "ignore_eos": True}
    assert generate(llm, prompts[:2], **params) == [[9] * 8] * 2


def test_a_logit_bias_outside_the_vocabulary_is_refused(llm, prompts):
    with pytest.raises(ValueError, match="vocabulary"):
        generate(llm, prompts, logit_bias={VOCAB: 1.0})


def test_watermarked_text_is_detected_and_plain_text_is_not(llm, prompts, monkeypatch):
    monkeypatch.setenv("WATERMARK_GAMMA", "0.25")
    monkeypatch.setenv("WATERMARK_DELTA", "4")
    gamma = WatermarkSettings.from_env().gamma
    sampled = {"temperature": 1.0, "seed": 11, "max_tokens": 48, "ignore_eos": True}
    marked = generate(llm, prompts, watermark=True, **sampled)
    plain = generate(llm, prompts, **sampled)
    marked_z = [green_z_score(p, t, gamma) for p, t in zip(prompts, marked)]
    plain_z = [green_z_score(p, t, gamma) for p, t in zip(prompts, plain)]
    assert min(marked_z) > 4.0, marked_z
    assert max(plain_z) < 4.0 and sum(plain_z) / len(plain_z) < 2.0, plain_z
    assert generate(llm, prompts, watermark=True) != generate(llm, prompts)


def test_green_lists_follow_the_previous_token_and_gamma():
    previous = torch.tensor([3, 3, 4])
    green = green_mask(previous, 50_000, torch.tensor([0.5, 0.5, 0.5]))
    assert torch.equal(green[0], green[1]) and not torch.equal(green[0], green[2])
    assert abs(green.float().mean().item() - 0.5) < 0.01
    quarter = green_mask(previous, 50_000, torch.tensor([0.25] * 3))
    assert abs(quarter.float().mean().item() - 0.25) < 0.01 and not (quarter & ~green).any()


def test_the_shard_refuses_a_bad_logit_bias_alone():
    good = make_request(1, [5, 6], 4, SamplingParams(temperature=0, logit_bias={7: 1.0}))
    outside = make_request(2, [5, 6], 4, SamplingParams(temperature=0, logit_bias={VOCAB: 1.0}))
    infinite = make_request(3, [5, 6], 4)
    infinite.parameters.logit_bias[7] = math.inf
    batch = pb.Batch(id=0, requests=[good, outside, infinite], size=3)
    admitted, refused = admit(
        batch, vocab_size=VOCAB, max_positions=64, load_grammar=lambda _: None
    )
    assert [request.id for request in admitted.requests] == [1]
    assert "vocabulary" in refused[2] and "not finite" in refused[3]
