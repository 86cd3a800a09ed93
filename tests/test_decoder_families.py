"""Qwen3, Gemma 2, Gemma 3 and Phi-3 against transformers: the paged forward's logits, greedy
tokens through the engine (staggered joins, mixed and chunked prefill) and tensor parallelism
over gloo. One tiny checkpoint per family (tests/model_factory.py), written by transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from aiohttp.test_utils import unused_port

from shardline.shards.utils.dist import init_distributed
from tests.model_factory import DECODER_FAMILY_ARCHITECTURES, TinyModelSpec, build_tiny_model
from tests.shard_harness import (
    JOINING_CHUNKED_LLM,
    leave_process_group,
    llm_greedy,
    random_prompts,
    run_schedule,
    staggered_arrivals,
    transformers_greedy,
)
from tests.test_engine import assert_no_leaks, warmed_engine
from tests.test_model_forward import (
    assert_logits_close,
    assert_paged_forward_matches,
    load,
    prompts,
    run_engine,
    transformers_cached_logits,
    transformers_reference,
)

PROMPT_LENGTHS = (5, 11, 1, 21)
DECODE_STEPS = 4
BLOCK_SIZE = 4


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {
        arch: build_tiny_model(root / arch, TinyModelSpec(architecture=arch, seed=11))
        for arch in DECODER_FAMILY_ARCHITECTURES
    }


@pytest.mark.parametrize("arch", DECODER_FAMILY_ARCHITECTURES)
def test_paged_forward_matches_transformers(family_dirs: dict[str, Path], arch: str) -> None:
    assert_paged_forward_matches(family_dirs[arch], PROMPT_LENGTHS, DECODE_STEPS, BLOCK_SIZE, 1)


@pytest.mark.parametrize(("mixed", "chunk"), [(False, 0), (True, 5)])
@pytest.mark.parametrize("arch", DECODER_FAMILY_ARCHITECTURES)
def test_engine_greedy_matches_generate(
    family_dirs: dict[str, Path], arch: str, mixed: bool, chunk: int
) -> None:
    """6 prompts join at different steps and stop at different lengths; with `mixed`, joining
    prompts prefill `chunk` tokens a pass beside the running batch's decode."""
    engine = warmed_engine(family_dirs[arch])
    prompt_ids = random_prompts(6, engine.config.vocab_size, seed=7, max_len=16)
    max_new = [12, 5, 20, 9, 1, 15]
    expected = transformers_greedy(family_dirs[arch], prompt_ids, max_new)
    arrivals = staggered_arrivals([0, 0, 2, 3, 3, 6], prompt_ids, max_new)
    result = run_schedule(engine.prefill, engine.decode, arrivals, mixed=mixed, chunk=chunk)
    assert result.max_batch_size > 1
    for i in range(len(prompt_ids)):
        assert result.tokens[i] == expected[i], f"request {i}"
    assert_no_leaks(engine)


def _rank_main(rank: int, port: int, dirs: dict[str, Path], out_dir: Path) -> None:
    torch.set_num_threads(1)
    tp = init_distributed(rank, 2, "127.0.0.1", port, torch.device("cpu"))
    for arch, model_dir in dirs.items():
        model = load(model_dir, tp)
        prompt_ids = prompts(model.config.vocab_size, 3, PROMPT_LENGTHS)
        fed = torch.load(out_dir / f"{arch}-fed.pt")
        torch.save(run_engine(model, prompt_ids, fed, BLOCK_SIZE), out_dir / f"{arch}{rank}.pt")
    leave_process_group()


def test_two_ranks_match_transformers(tmp_path: Path, family_dirs: dict[str, Path]) -> None:
    """Heads, KV heads, the fused Phi-3 rows and the vocabulary split over 2 ranks (gloo)."""
    expected = {}
    for arch, model_dir in family_dirs.items():
        vocab_size = load(model_dir).config.vocab_size
        expected[arch], fed = transformers_reference(
            model_dir, prompts(vocab_size, 3, PROMPT_LENGTHS), DECODE_STEPS
        )
        torch.save(fed, tmp_path / f"{arch}-fed.pt")
    mp.spawn(_rank_main, args=(unused_port(), family_dirs, tmp_path), nprocs=2, join=True)
    for arch in family_dirs:
        for rank in range(2):
            assert_logits_close(torch.load(tmp_path / f"{arch}{rank}.pt"), expected[arch])


def test_longrope_rotates_a_prompt_longer_than_the_original_length_long(
    family_dirs: dict[str, Path],
) -> None:
    """A 52-token prompt (and the 11-token one beside it, short) in one pass: transformers
    rotates every token of the long sequence with the long factors, as ours."""
    model = load(family_dirs["phi3"])
    prompt_ids = prompts(model.config.vocab_size, 6, (52, 11))
    expected, fed = transformers_reference(family_dirs["phi3"], prompt_ids, steps=3)
    assert_logits_close(run_engine(model, prompt_ids, fed, BLOCK_SIZE), expected)


def test_longrope_switches_to_its_long_factors_past_the_original_length(
    family_dirs: dict[str, Path],
) -> None:
    """Phi-3's tiny checkpoint was trained to 48 positions: a 40-token prompt decodes past it."""
    model = load(family_dirs["phi3"])
    prompt = prompts(model.config.vocab_size, 5, (40,))[0]
    expected, fed = transformers_cached_logits(family_dirs["phi3"], prompt, steps=14)
    assert_logits_close(run_engine(model, [prompt], fed, BLOCK_SIZE), expected)


GEMMA3_V4_CONFIG = {  # as transformers 4 saved Gemma 3 1B's text config
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "vocab_size": 262144,
    "hidden_size": 1152,
    "intermediate_size": 6912,
    "num_hidden_layers": 12,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "query_pre_attn_scalar": 256,
    "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0,
    "rope_scaling": {"rope_type": "linear", "factor": 8.0},
    "sliding_window": 512,
    "sliding_window_pattern": 6,
    "max_position_embeddings": 32768,
}


def test_a_transformers_4_gemma3_config_reads_as_transformers_5_does() -> None:
    from transformers import Gemma3TextConfig

    from shardline.shards.models import ModelConfig

    config = ModelConfig.from_dicts(GEMMA3_V4_CONFIG, {})
    reference = Gemma3TextConfig(**GEMMA3_V4_CONFIG)
    assert config.layer_windows == tuple(
        512 if kind == "sliding_attention" else 0 for kind in reference.layer_types
    )
    assert config.rope_theta == reference.rope_parameters["full_attention"]["rope_theta"]
    assert config.rope_scaling["rope_type"] == "linear" and config.rope_scaling["factor"] == 8.0
    assert config.local_rope_theta == 10000.0 and config.tie_word_embeddings
    assert config.max_position_embeddings == 32768  # stated with the linear factor applied
    assert config.softmax_scale == 256**-0.5 and config.embed_scale == 1152**0.5
    with pytest.raises(ValueError, match="hidden_activation 'relu'.*gelu_pytorch_tanh"):
        ModelConfig.from_dicts({**GEMMA3_V4_CONFIG, "hidden_activation": "relu"}, {})


@pytest.mark.parametrize("name", ["su", "yarn"])
def test_phi3s_first_longrope_names_read_as_longrope(name: str) -> None:
    from transformers import Phi3Config

    from shardline.shards.models import ModelConfig

    scaling = {"type": name, "short_factor": [1.0] * 48, "long_factor": [2.0] * 48}
    raw = {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "vocab_size": 32064,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096,
        "rope_scaling": scaling,
        "sliding_window": 262144,
    }
    config = ModelConfig.from_dicts(raw, {})
    reference = Phi3Config(**raw).rope_parameters
    assert config.rope_scaling["rope_type"] == reference["rope_type"] == "longrope"
    assert config.rope_scaling["original_max_position_embeddings"] == 4096
    assert config.max_position_embeddings == 131072


@pytest.mark.parametrize("arch", ["qwen3", "gemma2", "phi3"])  # the others load as these do
def test_fp8_at_load_stays_within_fp8_rounding(family_dirs: dict[str, Path], arch: str) -> None:
    """--quantize fp8: every projection (Phi-3's fused rows too) in FP8, logits near the
    unquantized model's on average over the steps (each step's error is FP8 noise, 9-14 %)."""
    from tests.test_fp8 import FP8, FP8_TOLERANCE, relative_error
    from tests.test_fp8 import load as load_quantized

    model = load_quantized(family_dirs[arch], "fp8")
    attention, mlp = model.layers[0].self_attn, model.layers[0].mlp
    for projection in (attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj):
        assert projection.weight.dtype == FP8
    prompt_ids = prompts(model.config.vocab_size, 4, PROMPT_LENGTHS)
    expected, fed = transformers_reference(family_dirs[arch], prompt_ids, DECODE_STEPS)
    actual = run_engine(model, prompt_ids, fed, BLOCK_SIZE)
    errors = [relative_error(a, e) for a, e in zip(actual, expected, strict=True)]
    assert sum(errors) / len(errors) < FP8_TOLERANCE, errors  # a misplaced scale: 100 % and more


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_two_pipeline_stages_match_transformers(family_dirs: dict[str, Path], arch: str) -> None:
    """The scaled embedding on the first stage, the capped logits on the last, Gemma 3's local
    rope on both: two shard processes, prompts prefilled in chunks beside running rows."""
    prompt_ids = random_prompts(4, 384, seed=43, min_len=10, max_len=20)
    lengths = [8, 5, 9, 6]
    expected = transformers_greedy(family_dirs[arch], prompt_ids, lengths)
    pipelined = llm_greedy(
        family_dirs[arch],
        prompt_ids,
        lengths,
        pipeline_parallel_size=2,
        **JOINING_CHUNKED_LLM,
    )
    assert pipelined == expected


def test_a_hub_gemma3_image_text_config_reads_with_transformers_defaults() -> None:
    """Gemma 3 4B's config.json names only what differs from Gemma3TextConfig's defaults."""
    from shardline.shards.models import ModelConfig

    raw = {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "eos_token_id": [1, 106],
        "text_config": {
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "model_type": "gemma3_text",
            "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024,
        },
        "vision_config": {"model_type": "siglip_vision_model"},
    }
    config = ModelConfig.from_dicts(raw, {})
    assert config.architecture == "Gemma3ForConditionalGeneration"
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (8, 4, 256)
    assert config.vocab_size == 262208 and config.max_position_embeddings == 131072
    assert config.layer_windows == tuple(0 if i % 6 == 5 else 1024 for i in range(34))
    assert config.rope_scaling["factor"] == 8.0 and config.rope_theta == 1e6
    assert config.local_rope_theta == 10000.0 and config.eos_token_ids == (1, 106)


def test_gemmas_release_config_names_its_tanh_gelu_gelu() -> None:
    from shardline.shards.models import ModelConfig

    raw = {
        "architectures": ["GemmaForCausalLM"],
        "model_type": "gemma",
        "vocab_size": 256000,
        "hidden_size": 3072,
        "intermediate_size": 24576,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "head_dim": 256,
        "hidden_act": "gelu",
    }
    config = ModelConfig.from_dicts(raw, {})
    assert config.hidden_act == "gelu_pytorch_tanh" and config.layer_windows == (0,) * 28
    assert config.softmax_scale == 256**-0.5 and config.tie_word_embeddings


def test_prefix_caching_is_off_where_rotation_follows_the_sequence_length(
    family_dirs: dict[str, Path],
) -> None:
    """Phi-3's LongRoPE rotates a prompt by its sequence's length, which cached blocks do not
    record: its engine runs without the prefix cache; the others keep it."""
    assert not warmed_engine(family_dirs["phi3"]).settings.prefix_caching
    assert warmed_engine(family_dirs["qwen3"]).settings.prefix_caching
