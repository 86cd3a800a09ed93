"""Which tiling the one-row GEMV (triton_gemv.py) runs an [N, K] weight with, or whether it
applies at all: plain Python, so the CPU tests check it."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

import torch

from shardline.shards.kv_cache import is_keys_major
from shardline.shards.layers.fp8 import FP8
from shardline.shards.layers.spelled_tiling import SpelledTiling

MAX_K_TILES = 16


class Epilogue(IntEnum):
    PLAIN = 0  # y = x @ W.T (+ bias)
    RESIDUAL = 1  # y = residual + x @ W.T; sum(y^2) added to a float32 slot
    SILU_PAIRS = 2  # W = [gate; up] (gate_up_proj): y[j] = silu(gate j) * up j
    # W = [q; k; v] heads (qkv_proj): y's q and k heads rotated (rotate-half), each program's
    # rows whole rotary pairs (d, d + head_dim / 2); the keys and values also written to the
    # paged KV cache
    ROPE_KV = 3


PAIRED = (Epilogue.SILU_PAIRS, Epilogue.ROPE_KV)


@dataclass(frozen=True)
class RopeKV:
    """What the ROPE_KV epilogue rotates by and writes into: the token's cos/sin row `position`
    [1] of cos/sin [max_positions, head_dim / 2], its cache `slot` [1] (negative: not written)
    of the paged caches [pages, page_size, kv_heads, head_dim]; `num_heads` q heads."""

    position: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slot: torch.Tensor
    num_heads: int

    def layouts_agree(self) -> bool:
        """cos and sin share strides (the kernel takes one set), the caches a dtype; the K cache's
        head_dim is contiguous, the V cache's too or its keys (kv_cache.is_keys_major)."""
        return (
            self.cos.stride() == self.sin.stride()
            and self.cos.stride(-1) == 1
            and self.k_cache.dtype == self.v_cache.dtype
            and self.k_cache.stride(-1) == 1
            and (self.v_cache.stride(-1) == 1 or is_keys_major(self.v_cache))
        )


@dataclass(frozen=True)
class GemvConfig(SpelledTiling):
    LETTERS: ClassVar[str] = "nkw"
    EXAMPLE: ClassVar[str] = "n2k1024w4"

    block_n: int  # output rows per program
    block_k: int
    num_warps: int


@functools.cache  # asked on every one-row linear call, twice
def gemv_config(
    n: int, k: int, epilogue: Epilogue = Epilogue.PLAIN, fp8: bool = False
) -> GemvConfig | None:
    """The tiling for an [n, k] weight (`fp8`: float8_e4m3fn), or None where the kernel does not
    apply: K cut into at most MAX_K_TILES power-of-two tiles."""
    long_k = k >= 8192
    if fp8:
        block_n, block_k, num_warps = _fp8_tiling(long_k, epilogue)
    else:
        block_n, block_k, num_warps = _bf16_tiling(n, long_k, epilogue)
    while block_k < k and k // block_k > MAX_K_TILES:
        block_k *= 2
    while block_k > 16 and k % block_k:
        block_k //= 2
    if k % block_k or k // block_k > MAX_K_TILES:
        return None
    config = GemvConfig(block_n=block_n, block_k=block_k, num_warps=num_warps)
    return config if takes_whole_pairs(config, n, epilogue) else None


def takes_whole_pairs(config: GemvConfig, n: int, epilogue: Epilogue) -> bool:
    """With a paired epilogue the weight's rows and each program's are whole pairs: (gate, up)
    rows, or a head's rotary pairs."""
    return epilogue not in PAIRED or (n % 2 == 0 and config.block_n % 2 == 0)


def weight_tiling(weight: torch.Tensor, epilogue: Epilogue = Epilogue.PLAIN) -> GemvConfig | None:
    """gemv_config for this weight's shape and dtype."""
    return gemv_config(*weight.shape, epilogue, weight.dtype == FP8)


def _bf16_tiling(n: int, long_k: bool, epilogue: Epilogue) -> tuple[int, int, int]:
    """Best on the H100 for the 1.7B shape: 2 rows x 1024 of K a program, 1 x 2048 for a long K
    (8192); 2 warps on small weights (n <= 2048) and long K, 4 otherwise. A residual epilogue
    takes more rows a program (fewer atomics): 4 x 2048 (8 warps), 2 x 1024 (2 warps) for a long
    K; SiLU pairs 4 x 1024 (4 warps). The rotary pairs of qkv take its plain tiling, 2 rows for
    a long K."""
    if epilogue == Epilogue.RESIDUAL:
        return (2, 1024, 2) if long_k else (4, 2048, 8)
    if epilogue == Epilogue.SILU_PAIRS:
        return 4, 1024, 4
    if long_k:
        return (2 if epilogue == Epilogue.ROPE_KV else 1), 2048, 2
    return 2, 1024, 2 if n <= 2048 else 4


def _fp8_tiling(long_k: bool, epilogue: Epilogue) -> tuple[int, int, int]:
    """Tiles of 2,048 FP8 values (a bf16 tile's 2 KB of K a row) and 4 warps: the fastest of the
    ten tilings timed on each projection of the 8B shape as batch-1 decode calls it (H100,
    benchmarks/RESULTS.md, session 17): 4 rows a program for qkv and gate/up, 2 for o (a
    residual), 1 for down (a long K). Paired epilogues keep 4 rows at any K (takes_whole_pairs)."""
    if epilogue in PAIRED:
        return 4, 2048, 4
    return (1 if long_k else 2 if epilogue == Epilogue.RESIDUAL else 4), 2048, 4
