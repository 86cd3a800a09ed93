"""GPT-2, BLOOM and Falcon (its new decoder architecture, Falcon 2's, its 7B multi-query layout
and its RW layout with ALiBi) loaded through the real loader from tiny checkpoints that
transformers' own config classes wrote: paged logits equal transformers', the engine's greedy
tokens equal transformers' generate for mixed batches with chunked prefill, and two ranks over
gloo (tensor or pipeline parallel) equal one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from aiohttp.test_utils import unused_port
from safetensors.torch import load_file, save_file

from shardline.shards.layers.alibi import alibi_slopes, rank_slopes
from shardline.shards.layers.attention.fp8_kv import KVScales
from shardline.shards.layers.attention.layer import PagedAttention
from shardline.shards.layers.fp8 import FP8
from shardline.shards.models import ModelConfig
from shardline.shards.utils.dist import TPGroup, init_distributed
from shardline.shards.utils.quantization import UnsupportedQuantizationError
from tests.model_factory import LAYER_NORM_ARCHITECTURES, TinyModelSpec, build_tiny_model
from tests.shard_harness import (
    leave_process_group,
    random_prompts,
    run_schedule,
    staggered_arrivals,
    transformers_greedy,
)
from tests.test_engine import assert_no_leaks, warmed_engine
from tests.test_fp8 import FP8_TOLERANCE, relative_error
from tests.test_fp8 import load as load_fp8
from tests.test_model_forward import (
    assert_logits_close,
    assert_paged_forward_matches,
    load,
    prompts,
    run_engine,
    transformers_reference,
    with_config_changes,
)

PROMPT_LENGTHS = (5, 11, 1, 30)
UNSCALED_GPT2 = {"scale_attn_weights": False}
DECODE_STEPS = 4


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny checkpoint per family layout, shared by this module's tests."""
    root = tmp_path_factory.mktemp("families")
    return {
        arch: build_tiny_model(root / arch, TinyModelSpec(architecture=arch, seed=10 + i))
        for i, arch in enumerate(LAYER_NORM_ARCHITECTURES)
    }


@pytest.mark.parametrize("arch", LAYER_NORM_ARCHITECTURES)
def test_paged_forward_matches_transformers(family_dirs: dict[str, Path], arch: str) -> None:
    assert_paged_forward_matches(family_dirs[arch], PROMPT_LENGTHS, DECODE_STEPS, block_size=4)


def test_gpt2_without_scaled_scores_matches_transformers(
    tmp_path: Path, family_dirs: dict[str, Path]
) -> None:
    model_dir = with_config_changes(family_dirs["gpt2"], tmp_path / "gpt2", UNSCALED_GPT2)
    model = load(model_dir)
    assert model.config.softmax_scale == 1.0
    prompt_ids = prompts(model.config.vocab_size, lengths=PROMPT_LENGTHS)
    expected, fed = transformers_reference(model_dir, prompt_ids, DECODE_STEPS)
    assert_logits_close(run_engine(model, prompt_ids, fed, block_size=4), expected)


LINEAR_ROPE = {"rope_type": "linear", "factor": 2.0}


@pytest.mark.parametrize("arch", ["gpt2", "bloom", "falcon-rw"])
def test_rope_scaling_is_refused_without_rotary(family_dirs: dict[str, Path], arch: str) -> None:
    """Learned or ALiBi positions: --rope-scaling / --rope-factor have nothing to scale (and a
    grown context would run past GPT-2's position table)."""
    with pytest.raises(ValueError, match="no rotary embedding: rope scaling does not apply"):
        ModelConfig.from_dir(family_dirs[arch], dict(LINEAR_ROPE))


def test_falcon_rope_scaling_matches_transformers(
    tmp_path: Path, family_dirs: dict[str, Path]
) -> None:
    """Falcon's rotary scaled linearly (config.json's rope_parameters): the context doubles and
    the logits are transformers'."""
    rope = {"rope_parameters": {**LINEAR_ROPE, "rope_theta": 10000.0}}
    model_dir = with_config_changes(family_dirs["falcon"], tmp_path / "falcon", rope)
    model = load(model_dir)
    assert model.config.max_position_embeddings == 2 * 1024
    prompt_ids = prompts(model.config.vocab_size, lengths=PROMPT_LENGTHS)
    expected, fed = transformers_reference(model_dir, prompt_ids, DECODE_STEPS)
    assert_logits_close(run_engine(model, prompt_ids, fed, block_size=4), expected)


@pytest.mark.parametrize("arch", ["gpt2", "bloom"])
def test_checkpoint_without_the_wrapper_prefix(
    tmp_path: Path, family_dirs: dict[str, Path], arch: str
) -> None:
    """GPT-2's and BLOOM's own checkpoints name their tensors without "transformer."."""
    model_dir = shutil.copytree(family_dirs[arch], tmp_path / arch)
    path = model_dir / "model.safetensors"
    tensors = {name.removeprefix("transformer."): t for name, t in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})
    model = load(model_dir)
    prompt_ids = prompts(model.config.vocab_size, lengths=PROMPT_LENGTHS)
    fed = [[7] * len(prompt_ids)] * 2
    expected = run_engine(load(family_dirs[arch]), prompt_ids, fed, block_size=4)
    for a, e in zip(run_engine(model, prompt_ids, fed, block_size=4), expected, strict=True):
        assert torch.equal(a, e)


@pytest.mark.parametrize("arch", ["bloom", "falcon", "falcon-7b", "falcon-rw"])
def test_fp8_at_load_tracks_the_unquantized_model(family_dirs: dict[str, Path], arch: str) -> None:
    """Every linear layer FP8 (the fused qkv rows reordered with their scales)."""
    quantized = load_fp8(family_dirs[arch], "fp8")
    assert quantized.layers[0].self_attention.qkv.weight.dtype == FP8
    prompt_ids = prompts(quantized.config.vocab_size, lengths=PROMPT_LENGTHS)
    fed = [[7] * len(prompt_ids)] * 2
    expected = run_engine(load(family_dirs[arch]), prompt_ids, fed, block_size=4)
    for a, e in zip(run_engine(quantized, prompt_ids, fed, block_size=4), expected, strict=True):
        assert relative_error(a, e) < FP8_TOLERANCE


def test_gpt2_refuses_fp8_by_name(family_dirs: dict[str, Path]) -> None:
    with pytest.raises(UnsupportedQuantizationError, match="GPT2LMHeadModel"):
        load_fp8(family_dirs["gpt2"], "fp8")


ATTENTION_MODULES = {"gpt2": "attn", "bloom": "self_attention", "falcon": "self_attention"}


@pytest.mark.parametrize("arch", ["gpt2", "bloom", "falcon"])
def test_fp8_cache_scales_are_read_per_layer(
    tmp_path: Path, family_dirs: dict[str, Path], arch: str
) -> None:
    """The checkpoint's k_scale / v_scale beside each attention module (llm-compressor's names)
    reach that layer's attention; a layer without them keeps 1.0."""
    model_dir = shutil.copytree(family_dirs[arch], tmp_path / arch)
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    module = f"transformer.h.0.{ATTENTION_MODULES[arch]}"
    tensors[f"{module}.k_scale"], tensors[f"{module}.v_scale"] = (
        torch.tensor(0.5),
        torch.tensor(2.0),
    )
    save_file(tensors, path, metadata={"format": "pt"})
    model = load(model_dir)
    scales = [
        next(m for m in layer.modules() if isinstance(m, PagedAttention)).kv_scales
        for layer in model.layers
    ]
    assert scales == [KVScales(0.5, 2.0), KVScales()]


# (launch_next, mixed, chunk): plain joins, then chunked prefill beside a decoding batch.
SCHEDULES = [(False, False, 0), (True, True, 7)]


@pytest.mark.parametrize("arch", LAYER_NORM_ARCHITECTURES)
def test_engine_greedy_matches_transformers(family_dirs: dict[str, Path], arch: str) -> None:
    """6 prompts arrive at different steps and stop at different lengths, once prefilled whole
    and once 7 tokens a pass beside the running batch; every token is transformers'."""
    engine = warmed_engine(family_dirs[arch])
    prompt_ids = random_prompts(6, engine.config.vocab_size, seed=21, min_len=5, max_len=40)
    max_new = [12, 3, 20, 8, 15, 6]
    expected = transformers_greedy(family_dirs[arch], prompt_ids, max_new)
    arrivals = staggered_arrivals([0, 0, 2, 5, 5, 9], prompt_ids, max_new)
    for launch_next, mixed, chunk in SCHEDULES:
        result = run_schedule(engine.prefill, engine.decode, arrivals, launch_next, mixed, chunk)
        assert result.max_batch_size > 1
        for i in range(len(prompt_ids)):
            assert result.tokens[i] == expected[i], f"request {i}, chunk {chunk}"
        assert_no_leaks(engine)


def _rank_main(rank: int, stages: int, port: int, cases: dict[str, tuple], out_dir: Path) -> None:
    torch.set_num_threads(1)
    tp = init_distributed(rank, 2, "127.0.0.1", port, torch.device("cpu"), pipeline_size=stages)
    logits = {}
    for arch, (model_dir, prompt_ids, fed) in cases.items():
        model = load(model_dir, tp)
        if not tp.stage.is_last:  # no LM head: its forward sends the hidden states on
            model.compute_logits = lambda hidden: hidden
        logits[arch] = run_engine(model, prompt_ids, fed, 4)
    if tp.stage.is_last:
        torch.save(logits, out_dir / f"rank{rank}.pt")
    leave_process_group()


@pytest.mark.parametrize("stages", [1, 2])
def test_two_ranks_match_one(tmp_path: Path, family_dirs: dict[str, Path], stages: int) -> None:
    """Tensor parallel (1 stage): heads and ALiBi slopes split over 2 ranks, Falcon 7B's one KV
    head replicated; pipeline parallel (2 stages): one layer each, the hidden states handed on."""
    cases, single = {}, {}
    for arch, model_dir in family_dirs.items():
        model = load(model_dir)
        prompt_ids = prompts(model.config.vocab_size, seed=3, lengths=PROMPT_LENGTHS)
        _, fed = transformers_reference(model_dir, prompt_ids, steps=2)
        cases[arch] = (model_dir, prompt_ids, fed)
        single[arch] = run_engine(model, prompt_ids, fed, 4)
    mp.spawn(_rank_main, args=(stages, unused_port(), cases, tmp_path), nprocs=2, join=True)
    for rank in range(2 - 2 // stages, 2):  # the last stage's ranks
        per_arch = torch.load(tmp_path / f"rank{rank}.pt")
        for arch, steps in single.items():
            for step, (a, e) in enumerate(zip(per_arch[arch], steps, strict=True)):
                torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5, msg=f"{arch} {step}")


@pytest.mark.parametrize("num_heads", [*range(1, 20), 71, 112])
def test_alibi_slopes_are_transformers(num_heads: int) -> None:
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    expected = _get_alibi_slopes(num_heads, torch.device("cpu"))
    assert torch.equal(alibi_slopes(num_heads), expected)
    if num_heads % 4 == 0:
        parts = [rank_slopes(expected, TPGroup(rank, 4)) for rank in range(4)]
        assert torch.equal(torch.cat(parts), expected)


FALCON_7B = {
    "architectures": ["FalconForCausalLM"],
    "model_type": "falcon",
    "vocab_size": 65024,
    "hidden_size": 4544,
    "num_attention_heads": 71,
    "num_hidden_layers": 32,
    "multi_query": True,
    "parallel_attn": True,
    "new_decoder_architecture": False,
    "bias": False,
    "alibi": False,
}
FALCON_40B = {
    **FALCON_7B,
    "hidden_size": 8192,
    "num_attention_heads": 128,
    "num_hidden_layers": 60,
    "num_kv_heads": 8,
    "new_decoder_architecture": True,
    "rope_theta": 10000.0,
}
RW_40B = {  # the RefinedWeb checkpoints' own config.json names
    "architectures": ["RWForCausalLM"],
    "model_type": "RefinedWeb",
    "vocab_size": 65024,
    "hidden_size": 8192,
    "n_head": 128,
    "n_head_kv": 8,
    "n_layer": 60,
    "parallel_attn": True,
    "bias": False,
    "alibi": False,
}


@pytest.mark.parametrize(
    ("raw", "kv_heads", "head_dim", "parallel"),
    [
        (FALCON_7B, 1, 64, True),
        (FALCON_40B, 8, 64, True),
        (RW_40B, 8, 64, True),
        ({**FALCON_7B, "multi_query": False, "parallel_attn": False}, 71, 64, False),
    ],
)
def test_falcon_layouts_read_as_transformers(
    raw: dict, kv_heads: int, head_dim: int, parallel: bool
) -> None:
    config = ModelConfig.from_dicts(raw, {})
    assert (config.num_kv_heads, config.head_dim) == (kv_heads, head_dim)
    assert config.parallel_blocks is parallel and config.tie_word_embeddings
    assert config.intermediate_size == 4 * config.hidden_size and not config.alibi


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({**FALCON_40B, "parallel_attn": False}, "new decoder architecture without parallel"),
        ({**FALCON_7B, "activation": "relu"}, "unsupported activation 'relu'"),
        (
            {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
             "scale_attn_by_inverse_layer_idx": True},
            "scale_attn_by_inverse_layer_idx",
        ),
        (
            {"architectures": ["BloomForCausalLM"], "model_type": "bloom",
             "apply_residual_connection_post_layernorm": True},
            "apply_residual_connection_post_layernorm",
        ),
    ],
)  # fmt: skip
def test_unsupported_variants_are_refused_by_name(raw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dicts(raw, {})
