"""The value pools' layouts (shards/kv_cache.py): FP8 pages of whole 16-token runs are stored
keys-contiguous under a [blocks, block_size, kv_heads, head_dim] view, and the torch backend
writes, reads and copies them exactly as the token-contiguous layout."""

from __future__ import annotations

import pytest
import torch

from shardline.shards.kv_cache import KVCache, as_value_pool, value_pool, values_by_keys
from shardline.shards.layers.attention.metadata import AttentionMetadata
from shardline.shards.layers.attention.torch_native import TorchNativeBackend

FP8 = torch.float8_e4m3fn


@pytest.mark.parametrize(
    ("dtype", "block_size", "by_keys"),
    [(FP8, 16, True), (torch.float8_e5m2, 32, True), (FP8, 8, False), (torch.bfloat16, 16, False)],
)
def test_fp8_pages_of_whole_runs_are_stored_keys_contiguous(
    dtype: torch.dtype, block_size: int, by_keys: bool
) -> None:
    pool = value_pool((3, block_size, 2, 8), dtype, "cpu")
    assert pool.shape == (3, block_size, 2, 8)
    assert values_by_keys(pool) is by_keys
    assert pool.is_contiguous() is not by_keys
    assert not pool.float().any()


def _written_pools(value_layout: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys and values of 40 tokens written by the torch backend at scattered slots of FP8 pools
    (5 pages of 16), the value pool in value_pool's layout or token-contiguous."""
    torch.manual_seed(0)
    shape = (5, 16, 2, 8)
    k_cache = torch.zeros(shape, dtype=FP8)
    v_cache = value_pool(shape, FP8, "cpu") if value_layout else torch.zeros(shape, dtype=FP8)
    k, v = torch.randn(40, 2, 8), torch.randn(40, 2, 8)
    slots = torch.cat([torch.arange(48, 64), torch.arange(0, 16), torch.arange(32, 40)])
    TorchNativeBackend().write_kv(k, v, k_cache, v_cache, slots)
    return k_cache, v_cache, slots


def test_the_torch_backend_reads_keys_contiguous_values_as_token_contiguous_ones() -> None:
    k_cache, by_keys, _ = _written_pools(value_layout=True)
    _, by_tokens, _ = _written_pools(value_layout=False)
    assert values_by_keys(by_keys) and not values_by_keys(by_tokens)
    assert torch.equal(by_keys.float(), by_tokens.float())
    q = torch.randn(1, 4, 8)
    meta = AttentionMetadata(
        False,
        torch.tensor([39]),
        block_tables=torch.tensor([[3, 0, 2]], dtype=torch.int32),
        context_lens=torch.tensor([40], dtype=torch.int32),
    )
    backend = TorchNativeBackend()
    out = backend.decode(q, k_cache, by_keys, meta, 0.3)
    assert torch.equal(out, backend.decode(q, k_cache, by_tokens, meta, 0.3))
    assert torch.equal(as_value_pool(by_tokens).float(), by_tokens.float())


def test_copied_blocks_carry_keys_contiguous_values() -> None:
    cache = KVCache.allocate(
        num_layers=2, num_blocks=4, block_size=16, num_kv_heads=2, head_dim=8, dtype=FP8,
        device=torch.device("cpu"),
    )  # fmt: skip
    for k_pool, v_pool in cache.layers:
        assert values_by_keys(v_pool) and k_pool.is_contiguous()
        v_pool.copy_(torch.randn(v_pool.shape))
    before = [v_pool[1].float().clone() for _, v_pool in cache.layers]
    cache.copy_blocks([1], [3])
    for (_, v_pool), source in zip(cache.layers, before, strict=True):
        assert torch.equal(v_pool[3].float(), source) and values_by_keys(v_pool)
