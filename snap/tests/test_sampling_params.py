from __future__ import annotations

import math

import pytest

from shardline.sampling_params import SamplingParams, SamplingParamsError

BAD_VALUES = [
    ("n", 0),
    ("n", 1.5),
    ("presence_penalty", 2.5),
    ("presence_penalty", math.nan),
    ("frequency_penalty", -2.1),
    ("frequency_penalty", "0.1"),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", math.inf),
    ("temperature", -0.1),
    ("temperature", math.nan),
    ("top_p", 0.0),
    ("top_p", 1.01),
    ("top_k", -2),
    ("top_k", 2.5),
    ("min_p", -0.1),
    ("min_p", 1.5),
    ("typical_p", 0.0),
    ("typical_p", 1.2),
    ("seed", -2),
    ("seed", 2**64),
    ("max_tokens", 0),
    ("min_tokens", -1),
    ("stop", [""]),
    ("stop", [3]),
    ("stop", 3),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", ["7"]),
    ("logprobs", -2),
    ("prompt_logprobs", -3),
    ("length_penalty", math.inf),
    ("early_stopping", "sometimes"),
    ("watermark", True),
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_bad_value_raises_naming_the_parameter(name: str, value: object) -> None:
    with pytest.raises(SamplingParamsError, match=f"`{name}`"):
        SamplingParams(**{name: value})


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n": 3, "best_of": 2}, "best_of"),
        ({"max_tokens": 5, "min_tokens": 6}, "min_tokens"),
        ({"temperature": 0.0, "n": 2}, "n"),
        ({"temperature": 0.0, "best_of": 3}, "n"),
        ({"use_beam_search": True, "beam_width": 0}, "beam_width"),
        ({"use_beam_search": True, "beam_width": 2, "n": 3}, "n"),
        ({"use_beam_search": True, "temperature": 0.7}, "temperature"),
        ({"use_beam_search": True, "best_of": 2}, "best_of"),
    ],
)
def test_bad_combination_raises_naming_the_parameter(kwargs: dict, name: str) -> None:
    with pytest.raises(SamplingParamsError, match=f"`{name}`"):
        SamplingParams(**kwargs)


def test_vllm_normalizations() -> None:
    params = SamplingParams(stop="###", stop_token_ids=(5, 7, 5), top_k=-1, seed=-1)
    assert (params.stop, params.stop_token_ids, params.top_k, params.seed) == (
        ["###"],
        [5, 7],
        0,
        None,
    )
    assert SamplingParams(temperature=0.001).temperature == 0.01
    assert SamplingParams(logprobs=-1, prompt_logprobs=-1).logprobs == -1


def test_greedy_resets_the_warpers() -> None:
    params = SamplingParams(temperature=0.0, top_p=0.5, top_k=5, min_p=0.1, typical_p=0.9)
    assert params.greedy
    assert (params.top_p, params.top_k, params.min_p, params.typical_p) == (1.0, 0, 0.0, 1.0)


def test_seed_document_presets_are_valid() -> None:
    SamplingParams(temperature=0.8, top_p=0.95, top_k=50, max_tokens=100)
    SamplingParams(presence_penalty=0.2, frequency_penalty=0.1, repetition_penalty=1.2)
    SamplingParams(min_tokens=10, stop=["###", "\n\n"], ignore_eos=False, skip_special_tokens=True)
    beams = SamplingParams(use_beam_search=True, beam_width=5, length_penalty=1.0)
    assert beams.num_sequences == 5 and beams.greedy


def test_to_proto_sampling() -> None:
    params = SamplingParams(
        temperature=0.8, top_k=50, top_p=0.95, seed=2**64 - 1, min_tokens=3, stop_token_ids=[9]
    )
    chooser, stopping = params.to_proto(max_new_tokens=20)
    assert chooser.do_sample and chooser.top_k == 50 and chooser.seed == 2**64 - 1
    assert math.isclose(chooser.temperature, 0.8, rel_tol=1e-6)
    assert (stopping.max_new_tokens, stopping.min_new_tokens) == (20, 3)
    assert list(stopping.stop_token_ids) == [9]
    second, _ = params.to_proto(max_new_tokens=20, sequence_index=1)
    assert second.seed == 0


def test_to_proto_greedy_and_unseeded() -> None:
    chooser, _ = SamplingParams(temperature=0.0).to_proto(max_new_tokens=4)
    assert not chooser.do_sample and chooser.temperature == 1.0
    seeds = {SamplingParams().to_proto(max_new_tokens=4)[0].seed for _ in range(4)}
    assert len(seeds) == 4
