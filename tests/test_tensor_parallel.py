"""Tensor parallelism over gloo: every rank's logits equal the single-rank logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from aiohttp.test_utils import unused_port
from safetensors.torch import load_file, save_file

from shardline.shards.utils.dist import TPGroup, init_distributed
from shardline.shards.utils.weights import Weights
from tests.model_factory import TinyModelSpec, build_tiny_model
from tests.shard_harness import leave_process_group
from tests.test_model_forward import load, prompts, run_engine, transformers_reference

# 2 KV heads over 4 ranks are replicated; 381 vocabulary rows over 2 or 4 ranks need padding.
SPEC = TinyModelSpec(architecture="qwen2", num_heads=8, num_kv_heads=2, seed=5)
VOCAB_SIZE = 381
BLOCK_SIZE = 4
DECODE_STEPS = 3


def trim_vocabulary(model_dir: Path, vocab_size: int) -> None:
    """Cuts the embedding and LM head to `vocab_size` rows so that ranks split it unevenly."""
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = tensors[name][:vocab_size].contiguous()
    save_file(tensors, path, metadata={"format": "pt"})
    config = json.loads((model_dir / "config.json").read_text())
    config["vocab_size"] = vocab_size
    (model_dir / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def uneven_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir = build_tiny_model(tmp_path_factory.mktemp("tp") / "qwen2", SPEC)
    trim_vocabulary(model_dir, VOCAB_SIZE)
    return model_dir


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    model_dir: Path,
    prompt_ids: list[list[int]],
    fed: list[list[int]],
    out_dir: Path,
) -> None:
    torch.set_num_threads(1)
    tp = init_distributed(rank, world_size, "127.0.0.1", port, torch.device("cpu"))
    model = load(model_dir, tp)
    torch.save(run_engine(model, prompt_ids, fed, BLOCK_SIZE), out_dir / f"rank{rank}.pt")
    leave_process_group()


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_match_single_rank(tmp_path: Path, uneven_model_dir: Path, world_size: int) -> None:
    prompt_ids = prompts(VOCAB_SIZE, seed=world_size)
    expected_hf, fed = transformers_reference(uneven_model_dir, prompt_ids, DECODE_STEPS)
    single = run_engine(load(uneven_model_dir), prompt_ids, fed, BLOCK_SIZE)
    for a, e in zip(single, expected_hf, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)

    args = (world_size, unused_port(), uneven_model_dir, prompt_ids, fed, tmp_path)
    mp.spawn(_rank_main, args=args, nprocs=world_size, join=True)

    for rank in range(world_size):
        per_step = torch.load(tmp_path / f"rank{rank}.pt")
        assert len(per_step) == len(single)
        for step, (a, e) in enumerate(zip(per_step, single, strict=True)):
            assert a.shape == (len(prompt_ids), VOCAB_SIZE)
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5, msg=f"rank {rank} step {step}")


@pytest.mark.parametrize("world_size", [2, 4])
def test_each_rank_reads_only_its_slice(uneven_model_dir: Path, world_size: int) -> None:
    full = Weights(uneven_model_dir, dtype=torch.float32, device=torch.device("cpu"), tp=TPGroup())
    gate = full.get_tensor("model.layers.0.mlp.gate_proj.weight")
    down = full.get_tensor("model.layers.0.mlp.down_proj.weight")
    embed = full.get_tensor("model.embed_tokens.weight")
    rows_per_rank = -(-VOCAB_SIZE // world_size)
    for rank in range(world_size):
        tp = TPGroup(rank=rank, world_size=world_size)
        weights = Weights(uneven_model_dir, dtype=torch.float32, device=torch.device("cpu"), tp=tp)
        column = weights.get_sharded("model.layers.0.mlp.gate_proj.weight", dim=0)
        row = weights.get_sharded("model.layers.0.mlp.down_proj.weight", dim=1)
        assert torch.equal(column, gate.chunk(world_size, dim=0)[rank])
        assert torch.equal(row, down.chunk(world_size, dim=1)[rank])

        vocab = weights.get_sharded("model.embed_tokens.weight", dim=0, pad=True)
        assert vocab.shape == (rows_per_rank, embed.shape[1])
        real = embed[rank * rows_per_rank : (rank + 1) * rows_per_rank]
        assert torch.equal(vocab[: len(real)], real)
        assert not vocab[len(real) :].any()


def test_uneven_split_without_padding_and_missing_tensor_are_refused(
    uneven_model_dir: Path,
) -> None:
    tp = TPGroup(rank=0, world_size=2)
    weights = Weights(uneven_model_dir, dtype=torch.float32, device=torch.device("cpu"), tp=tp)
    with pytest.raises(ValueError, match="model.embed_tokens.weight.*381.*2"):
        weights.get_sharded("model.embed_tokens.weight", dim=0)
    with pytest.raises(KeyError, match="model.layers.9.mlp.up_proj.weight"):
        weights.get_tensor("model.layers.9.mlp.up_proj.weight")
