"""The paged cache's pools (shards/kv_cache.py): an FP8 value pool stored keys-major, any other
pool contiguous, and block copies and the torch backend's writes and reads in either layout."""

from __future__ import annotations

import pytest
import torch

from shardline.shards.kv_cache import KVCache, is_keys_major
from shardline.shards.layers.attention.metadata import AttentionMetadata
from shardline.shards.layers.attention.torch_native import TorchNativeBackend

SHAPE = (5, 4, 3, 8)  # blocks, block size, KV heads, head_dim


def _cache(dtype: torch.dtype, num_layers: int = 2) -> KVCache:
    blocks, block_size, kv_heads, head_dim = SHAPE
    return KVCache.allocate(
        num_layers=num_layers, num_blocks=blocks, block_size=block_size, num_kv_heads=kv_heads,
        head_dim=head_dim, dtype=dtype, device=torch.device("cpu"),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("dtype", "keys_major"),
    [(torch.float8_e4m3fn, True), (torch.float8_e5m2, True), (torch.bfloat16, False)],
)
def test_only_an_fp8_value_pool_is_keys_major(dtype: torch.dtype, keys_major: bool) -> None:
    for k_cache, v_cache in _cache(dtype).layers:
        assert k_cache.shape == v_cache.shape == SHAPE
        assert k_cache.dtype == v_cache.dtype == dtype
        assert k_cache.is_contiguous() and not is_keys_major(k_cache)
        assert is_keys_major(v_cache) == keys_major
        # keys-major: each block's KV head one [head_dim, block_size] run
        stored = v_cache.permute(0, 2, 3, 1) if keys_major else v_cache
        assert stored.is_contiguous()
        assert not k_cache.float().any() and not v_cache.float().any()


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.bfloat16])
def test_copy_blocks_copies_keys_and_values_in_either_layout(dtype: torch.dtype) -> None:
    cache = _cache(dtype)
    pools = [pool for layer in cache.layers for pool in layer]
    for pool in pools:
        pool.copy_(torch.randn(SHAPE).to(dtype))
    before = [pool.float() for pool in pools]
    cache.copy_blocks([1, 3], [4, 0])
    for pool, old in zip(pools, before, strict=True):
        expected = old.clone()
        expected[[4, 0]] = old[[1, 3]]
        assert torch.equal(pool.float(), expected)


def test_torch_backend_reads_what_it_wrote_into_a_keys_major_fp8_cache() -> None:
    """The same decode from the production FP8 cache as from a contiguous copy of it."""
    k_cache, v_cache = _cache(torch.float8_e4m3fn, num_layers=1).layers[0]
    backend = TorchNativeBackend()
    slots = torch.tensor([8, 9, 10, 11, 12, 0, 1, -1])  # rows of 5 keys (blocks 2, 3) and 2 (0)
    k, v = torch.randn(2, len(slots), *SHAPE[2:]).unbind()
    backend.write_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(v_cache[3, 0].float(), v[4].to(v_cache.dtype).float())
    tables, lens = torch.tensor([[2, 3], [0, 0]]), torch.tensor([5, 2])
    meta = AttentionMetadata(False, slots[:2], block_tables=tables, context_lens=lens)
    q = torch.randn(2, 6, SHAPE[3])
    contiguous = v_cache.contiguous()
    assert not is_keys_major(contiguous)
    for window in (0, 4):
        out = backend.decode(q, k_cache, v_cache, meta, 0.3, window=window)
        assert torch.equal(out, backend.decode(q, k_cache, contiguous, meta, 0.3, window=window))
