"""Tiny random Llama-family models and a tokenizer trained on the spot, saved as real HF folders.

Every test that needs a model builds one here and loads it through the real loading code.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_WORDS = [
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "it",
    "this",
    "be",
    "are",
    "or",
    "an",
    "have",
    "not",
    "which",
    "one",
    "all",
    "their",
    "there",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "model",
    "token",
    "server",
    "shard",
    "batch",
    "cache",
    "block",
    "paged",
    "attention",
    "tensor",
    "parallel",
    "router",
    "queue",
    "stream",
    "Paris",
    "France",
    "capital",
    "river",
    "city",
    "north",
    "south",
    "east",
    "west",
    "café",
    "naïve",
    "über",
    "東京",
    "☃",
    "🙂",
]

ARCHITECTURES = ("llama", "mistral", "qwen2")
# LayerNorm families (tests/test_model_families.py): Falcon's new decoder architecture (grouped
# KV, ln_attn / ln_mlp, an untied LM head), Falcon 2's (one norm for both), its 7B layout
# (multi-query, parallel attention, here with biases) and its RW layout (ALiBi, sequential
# blocks, biases).
LAYER_NORM_ARCHITECTURES = ("gpt2", "bloom", "falcon", "falcon2", "falcon-7b", "falcon-rw")
# RMSNorm families beside Llama's (tests/test_decoder_families.py), each with what sets it apart
# made to matter at this size: short sliding windows, low soft-caps, scaled rope.
DECODER_FAMILY_ARCHITECTURES = ("qwen3", "gemma", "gemma2", "gemma3", "gemma3-image-text", "phi3")


@dataclass(frozen=True)
class TinyModelSpec:
    architecture: str = "llama"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 8
    num_kv_heads: int = 4
    intermediate_size: int = 128
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = False
    initializer_range: float = 0.15
    rope_scaling: dict | None = None
    seed: int = 0


def corpus(num_lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 20))) for _ in range(num_lines)
    ]


def train_tokenizer(out_dir: Path, vocab_size: int = 384) -> None:
    """A byte-level BPE tokenizer saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)


def _layer_norm_config(spec: TinyModelSpec, vocab_size: int, bos_id: int, eos_id: int):
    from transformers import BloomConfig, FalconConfig, GPT2Config

    tokens = dict(
        vocab_size=vocab_size,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        initializer_range=spec.initializer_range,
        layer_norm_epsilon=1e-5,
        dtype="float32",
    )
    if spec.architecture == "gpt2":
        return GPT2Config(
            **tokens,
            n_positions=spec.max_position_embeddings,
            n_embd=spec.hidden_size,
            n_layer=spec.num_layers,
            n_head=spec.num_heads,
            n_inner=spec.intermediate_size,
        )
    if spec.architecture == "bloom":
        return BloomConfig(
            **tokens, hidden_size=spec.hidden_size, n_layer=spec.num_layers, n_head=spec.num_heads
        )
    layouts = {
        "falcon": dict(
            new_decoder_architecture=True, num_kv_heads=spec.num_kv_heads, tie_word_embeddings=False
        ),
        "falcon2": dict(
            new_decoder_architecture=True, num_kv_heads=spec.num_kv_heads, num_ln_in_parallel_attn=1
        ),
        "falcon-7b": dict(multi_query=True, bias=True),
        "falcon-rw": dict(multi_query=False, parallel_attn=False, bias=True, alibi=True),
    }
    return FalconConfig(
        **tokens,
        **layouts[spec.architecture],
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        ffn_hidden_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
    )


def _config(spec: TinyModelSpec, vocab_size: int, bos_id: int, eos_id: int):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    if spec.architecture in LAYER_NORM_ARCHITECTURES:
        return _layer_norm_config(spec, vocab_size, bos_id, eos_id)

    common = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        initializer_range=spec.initializer_range,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        rms_norm_eps=1e-5,
        dtype="float32",
    )
    if spec.architecture == "llama":
        return LlamaConfig(**common, rope_theta=10000.0, rope_scaling=spec.rope_scaling)
    if spec.architecture == "mistral":
        return MistralConfig(**common, rope_theta=10000.0, sliding_window=None)
    if spec.architecture == "qwen2":
        return Qwen2Config(**common, rope_theta=10000.0, use_sliding_window=False)
    if spec.architecture in DECODER_FAMILY_ARCHITECTURES:
        return _decoder_family_config(spec, common)
    raise ValueError(f"unknown architecture {spec.architecture!r}")


def _decoder_family_config(spec: TinyModelSpec, common: dict):
    from transformers import Gemma2Config, Gemma3TextConfig, GemmaConfig, Phi3Config, Qwen3Config

    head_dim = spec.hidden_size // spec.num_heads
    if spec.architecture == "qwen3":
        return Qwen3Config(**common, head_dim=head_dim, attention_bias=True)
    if spec.architecture == "gemma":  # its release's config names tanh GELU "gelu"
        return GemmaConfig(**common, head_dim=head_dim, hidden_act="gelu")
    gemma = dict(
        head_dim=head_dim,
        query_pre_attn_scalar=2 * head_dim,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * (spec.num_layers // 2),
    )
    if spec.architecture == "gemma2":
        return Gemma2Config(
            **common, **gemma, attn_logit_softcapping=3.0, final_logit_softcapping=5.0
        )
    if spec.architecture.startswith("gemma3"):
        rope = {
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
        }
        text = Gemma3TextConfig(**common, **gemma, rope_parameters=rope)
        return text if spec.architecture == "gemma3" else _image_text_config(text)
    longrope = {
        "rope_type": "longrope",
        "short_factor": [1.0 + 0.2 * i for i in range(head_dim // 2)],
        "long_factor": [2.0 + 1.5 * i for i in range(head_dim // 2)],
    }
    return Phi3Config(
        **{**common, "max_position_embeddings": 256},
        pad_token_id=common["eos_token_id"],
        original_max_position_embeddings=48,
        rope_parameters=longrope,
        sliding_window=12,
    )


def _image_text_config(text):
    """Gemma 3's image-text model around `text`, with a one-layer vision tower."""
    from transformers import Gemma3Config, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    # special ids outside the vocabulary: no random prompt holds an image placeholder
    image_tokens = dict(image_token_index=1000, boi_token_index=1001, eoi_token_index=1002)
    return Gemma3Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
        **image_tokens, eos_token_id=text.eos_token_id, bos_token_id=text.bos_token_id,
    )  # fmt: skip


def build_tiny_model(out_dir: Path, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Writes config.json, model.safetensors, generation_config.json and tokenizer files."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_tokenizer(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    config = _config(spec, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _spread_weights(model, spec)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def _spread_weights(model: torch.nn.Module, spec: TinyModelSpec) -> None:
    """Random weights with enough variance that greedy decoding does not collapse."""
    generator = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if _is_norm_weight(name):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(spec.initializer_range * torch.randn(param.shape, generator=generator))


def _is_norm_weight(name: str) -> bool:
    """RMSNorm and LayerNorm scales (GPT-2 and Falcon name theirs ln_*)."""
    return ("norm" in name or ".ln_" in name or name.startswith("ln_")) and not name.endswith(
        "bias"
    )


def read_config(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())
