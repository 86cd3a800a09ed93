"""Several sequences per request on the shard engine: best_of / n samples and beam search share
the prompt's KV blocks (reference counts, copy-on-write of the partial last block) and return
every block when they end. Beam search equals transformers' beam search."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shardline.proto import generate_pb2 as pb
from shardline.sampling_params import SamplingParams
from shardline.shards.engine import ShardEngine
from tests.shard_harness import make_request, random_prompts
from tests.test_engine import assert_no_leaks, warmed_engine

SAMPLED = SamplingParams(temperature=0.9, top_k=50, seed=11)


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path) -> ShardEngine:
    return warmed_engine(tiny_llama_dir, block_size=4)


def used_blocks(engine: ShardEngine) -> int:
    stats = engine.stats()
    return stats.total_blocks - stats.free_blocks


def run_to_end(
    engine: ShardEngine, requests: list[pb.Request], batch_id: int = 1
) -> tuple[dict[tuple[int, int], list[int]], list[pb.Generation], int]:
    """Prefills then decodes until every sequence ended; tokens by (request, sequence), the
    Generations that ended a request or sequence, and the most blocks used at once."""
    answer = engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=batch_id, requests=requests)))
    tokens: dict[tuple[int, int], list[int]] = {}
    finals: list[pb.Generation] = []
    peak = 0
    while True:
        for generation in answer.generations:
            key = (generation.request_id, generation.sequence_index)
            tokens.setdefault(key, []).extend(generation.tokens.ids)
            if generation.finish_reason != pb.FINISH_REASON_NONE:
                finals.append(generation)
        peak = max(peak, used_blocks(engine))
        if not answer.HasField("batch"):
            return tokens, finals, peak
        answer = engine.decode(pb.DecodeRequest(batches=[answer.batch]))


def sampled_request(request_id: int, prompt: list[int], n: int, seed: int = 11) -> pb.Request:
    params = SamplingParams(temperature=0.9, top_k=50, seed=seed, ignore_eos=True)
    return make_request(request_id, prompt, 12, params, num_sequences=n)


def test_samples_share_the_prompt_blocks_and_free_them_all(engine):
    prompt = random_prompts(1, engine.config.vocab_size, seed=41, min_len=10, max_len=10)[0]
    request = sampled_request(1, prompt, 4)
    answer = engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=1, requests=[request])))
    assert answer.batch.size == 4 and list(answer.batch.request_ids) == [1]
    # 10 prompt tokens in blocks of 4: 2 full blocks shared by all, 4 private partial blocks.
    assert used_blocks(engine) == 2 + 4 < 4 * 3
    assert [g.sequence_index for g in answer.generations] == [0, 1, 2, 3]
    assert [g.seed for g in answer.generations] == [11, 12, 13, 14]
    engine.clear_cache(pb.ClearCacheRequest(id=1))
    assert_no_leaks(engine)


def test_each_sample_equals_the_same_seed_run_alone(engine):
    """Copy-on-write is exact: sample i of a forked request is the request run alone with
    seed + i, while the forks wrote their own tokens next to shared prompt blocks."""
    prompt = random_prompts(1, engine.config.vocab_size, seed=42, min_len=9, max_len=9)[0]
    forked, _, peak = run_to_end(engine, [sampled_request(1, prompt, 3)])
    assert_no_leaks(engine)
    alone = [run_to_end(engine, [sampled_request(1, prompt, 1, seed=11 + i)])[0] for i in range(3)]
    assert [forked[(1, i)] for i in range(3)] == [run[(1, 0)] for run in alone]
    assert len({tuple(forked[(1, i)]) for i in range(3)}) == 3
    assert peak < 3 * -(-(9 + 12) // 4)
    again, _, _ = run_to_end(engine, [sampled_request(1, prompt, 3)])
    assert again == forked
    assert_no_leaks(engine)


def test_a_stopped_sample_frees_its_blocks_and_the_others_go_on(engine):
    prompts = random_prompts(2, engine.config.vocab_size, seed=43, min_len=6, max_len=6)
    requests = [sampled_request(1, prompts[0], 3), sampled_request(2, prompts[1], 1)]
    answer = engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=1, requests=requests)))
    answer = engine.decode(pb.DecodeRequest(batches=[answer.batch]))
    before = used_blocks(engine)
    filtered = engine.filter_batch(
        pb.FilterBatchRequest(
            batch_id=1,
            request_ids=[1, 2],
            stopped_sequences=[pb.SequenceRef(request_id=1, sequence_index=1)],
        )
    )
    assert filtered.batch.size == 3 and used_blocks(engine) < before
    answer = engine.decode(pb.DecodeRequest(batches=[filtered.batch]))
    assert sorted((g.request_id, g.sequence_index) for g in answer.generations) == [
        (1, 0),
        (1, 2),
        (2, 0),
    ]
    engine.filter_batch(pb.FilterBatchRequest(batch_id=1, request_ids=[2]))
    engine.clear_cache(pb.ClearCacheRequest())
    assert_no_leaks(engine)


# ---- beam search -------------------------------------------------------------------------------


def beam_request(
    request_id: int,
    prompt: list[int],
    max_new_tokens: int,
    width: int,
    length_penalty: float,
    early_stopping: bool | str,
    stop_token_ids: list[int],
    num_return: int,
) -> pb.Request:
    params = SamplingParams(
        use_beam_search=True,
        beam_width=width,
        n=num_return,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        temperature=0.0,
        stop_token_ids=stop_token_ids,
    )
    return make_request(
        request_id, prompt, max_new_tokens, params, beam_search=params.beam_search_proto()
    )


def transformers_beams(
    model_dir: Path,
    prompt: list[int],
    max_new_tokens: int,
    width: int,
    length_penalty: float,
    early_stopping: bool | str,
    eos_token_ids: list[int],
    num_return: int,
) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        num_beams=width,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        do_sample=False,
        num_return_sequences=num_return,
        eos_token_id=eos_token_ids,
        return_dict_in_generate=True,
        output_scores=True,
    )
    lengths = (out.beam_indices >= 0).sum(dim=1).tolist()
    return [out.sequences[i, len(prompt) : len(prompt) + n].tolist() for i, n in enumerate(lengths)]


@pytest.mark.parametrize(
    ("width", "length_penalty", "early_stopping", "num_return", "max_new"),
    [
        (2, 1.0, False, 1, 14),
        (3, 0.5, True, 2, 12),
        (4, 2.0, "never", 3, 12),
        (3, -1.0, False, 3, 10),
    ],
)
def test_beam_search_equals_transformers(
    engine, tiny_llama_dir, width, length_penalty, early_stopping, num_return, max_new
):
    prompt = random_prompts(1, engine.config.vocab_size, seed=50 + width, min_len=7)[0]
    stop_token = _frequent_token(engine, prompt)
    eos = sorted(engine.config.eos_token_ids)
    expected = transformers_beams(
        tiny_llama_dir,
        prompt,
        max_new,
        width,
        length_penalty,
        early_stopping,
        [*eos, stop_token],
        num_return,
    )
    request = beam_request(
        1, prompt, max_new, width, length_penalty, early_stopping, [stop_token], num_return
    )
    _, finals, peak = run_to_end(engine, [request])
    assert_no_leaks(engine)
    (final,) = finals
    assert [list(beam.tokens.ids) for beam in final.beams] == expected
    scores = [beam.score for beam in final.beams]
    assert scores == sorted(scores, reverse=True)
    assert peak < width * -(-(len(prompt) + max_new) // 4)


def _frequent_token(engine: ShardEngine, prompt: list[int]) -> int:
    """A token the model likes after this prompt, used as a stop token so that beams finish
    at different lengths."""
    tokens, _, _ = run_to_end(
        engine, [make_request(9, prompt, 6, SamplingParams(temperature=0, ignore_eos=True))]
    )
    assert_no_leaks(engine)
    return tokens[(9, 0)][3]


def test_beam_search_alongside_other_requests_frees_every_block(engine):
    prompts = random_prompts(3, engine.config.vocab_size, seed=60, min_len=5)
    requests = [
        beam_request(1, prompts[0], 9, 3, 1.0, False, [], 3),
        sampled_request(2, prompts[1], 2),
        make_request(3, prompts[2], 7, SamplingParams(temperature=0, ignore_eos=True)),
    ]
    tokens, finals, _ = run_to_end(engine, requests)
    assert_no_leaks(engine)
    assert {g.request_id for g in finals if g.beams} == {1}
    assert len(tokens[(3, 0)]) == 7 and len(tokens[(2, 1)]) == 12
    (beams,) = [g.beams for g in finals if g.beams]
    assert len(beams) == 3 and all(len(b.tokens.ids) == len(b.tokens.logprobs) for b in beams)
