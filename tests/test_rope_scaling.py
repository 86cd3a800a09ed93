"""Every rope scaling kind's cos/sin table equals transformers' rotary embedding, position by
position as a sequence grows one token at a time (dynamic NTK and LongRoPE change there)."""

from __future__ import annotations

import pytest
import torch

from shardline.shards.layers.attention import get_attention_backend
from shardline.shards.layers.rope_scaling import rope_cos_sin
from shardline.shards.models import load_model
from shardline.shards.models.config import rope_override, rope_parameters
from shardline.shards.utils.dist import TPGroup
from tests.test_model_forward import (
    assert_logits_close,
    prompts,
    run_engine,
    transformers_cached_logits,
    with_config_changes,
)

HEAD_DIM = 16
MAX_POSITIONS = 32
POSITIONS = 96  # past max_position_embeddings: where dynamic, YaRN and LongRoPE differ
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 3.0},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn_mscale": {
        "rope_type": "yarn",
        "factor": 4.0,
        "mscale": 0.9,
        "mscale_all_dim": 0.7,
        "beta_fast": 16,
        "truncate": False,
    },
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
    },
    "longrope": {
        "rope_type": "longrope",
        "short_factor": [1.0 + 0.1 * i for i in range(HEAD_DIM // 2)],
        "long_factor": [2.0 + 0.5 * i for i in range(HEAD_DIM // 2)],
    },
}


def transformers_tables(raw: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [POSITIONS, HEAD_DIM / 2] from transformers, fed one position per call."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(LlamaConfig(**raw))
    x = torch.zeros(1, 1, HEAD_DIM)
    rows = [rotary(x, torch.tensor([[p]])) for p in range(POSITIONS)]
    cos = torch.cat([c[0, :, : HEAD_DIM // 2] for c, _ in rows])
    sin = torch.cat([s[0, :, : HEAD_DIM // 2] for _, s in rows])
    return cos, sin


@pytest.mark.parametrize("name", sorted(SCALINGS))
@pytest.mark.parametrize("phi3_style", [False, True])
def test_rope_tables_follow_transformers(name: str, phi3_style: bool) -> None:
    raw = {
        "hidden_size": 64,
        "num_attention_heads": 4,
        "head_dim": HEAD_DIM,
        "max_position_embeddings": MAX_POSITIONS,
        "rope_theta": 500.0,
        "rope_scaling": dict(SCALINGS[name]),
    }
    if phi3_style:  # the original length at the top level, as Phi-3 keeps it
        raw["original_max_position_embeddings"] = 20
    theta, scaling = rope_parameters(raw)
    cos, sin = rope_cos_sin(HEAD_DIM, POSITIONS, theta, scaling)
    if name == "longrope":  # a sequence fed one position at a time turns long at the original
        rows = torch.arange(POSITIONS)
        rows += POSITIONS * (rows >= scaling["original_max_position_embeddings"])
        cos, sin = cos[rows], sin[rows]
    expected_cos, expected_sin = transformers_tables(raw)
    torch.testing.assert_close(cos, expected_cos, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sin, expected_sin, rtol=1e-5, atol=1e-5)


def test_unknown_rope_type_names_the_supported_ones() -> None:
    with pytest.raises(ValueError, match="'mrope'.*linear, dynamic, yarn, llama3, longrope"):
        rope_cos_sin(HEAD_DIM, 4, 10000.0, {"rope_type": "mrope"})


@pytest.mark.parametrize(
    ("scaling", "context"),
    [
        ({"rope_type": "linear", "factor": 2.0}, 64),
        ({"rope_type": "dynamic", "factor": 3.0}, 96),
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}, 64),
        ({"rope_type": "yarn", "factor": 4.0}, 128),
        (SCALINGS["llama3"], MAX_POSITIONS),
        (SCALINGS["longrope"], MAX_POSITIONS),
    ],
)
def test_scaled_rope_sets_the_context_length(scaling: dict, context: int) -> None:
    from shardline.shards.models.config import decoder_config

    raw = {
        "model_type": "llama",
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_POSITIONS,
        "rope_scaling": scaling,
    }
    assert decoder_config(raw, {}).max_position_embeddings == context


def test_rope_override_follows_tgis_rule() -> None:
    assert rope_override(None, None) is None
    assert rope_override("dynamic", None) == {"rope_type": "dynamic", "factor": 1.0}
    assert rope_override(None, 2.0) == {"rope_type": "linear", "factor": 2.0}
    assert rope_override("dynamic", 3.0) == {"rope_type": "dynamic", "factor": 3.0}


@pytest.mark.parametrize("kind", ["linear", "dynamic"])
def test_forced_rope_scaling_equals_transformers_with_it_in_config(
    tmp_path, tiny_model_dirs, kind: str
) -> None:
    """--rope-scaling / --rope-factor on the tiny Llama (1024 positions, shrunk to 16 so that
    dynamic NTK acts past it) against transformers reading the same scaling from config.json,
    decoding through its cache past 16 positions."""
    short = with_config_changes(
        tiny_model_dirs["llama"], tmp_path / "short", {"max_position_embeddings": 16}
    )
    scaled = with_config_changes(
        short, tmp_path / "scaled", {"rope_scaling": {"rope_type": kind, "factor": 2.0}}
    )
    cpu = torch.device("cpu")
    model = load_model(
        short,
        dtype=torch.float32,
        device=cpu,
        tp=TPGroup(),
        attention_backend=get_attention_backend("torch", cpu),
        rope_override=rope_override(kind, 2.0),
    )
    assert model.config.max_position_embeddings == 32
    prompt = prompts(model.config.vocab_size, 2, (12,))[0]
    expected, fed = transformers_cached_logits(scaled, prompt, steps=12)
    assert_logits_close(run_engine(model, [prompt], fed, 4), expected)
