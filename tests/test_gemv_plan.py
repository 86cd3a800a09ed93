"""The one-row GEMV's tilings (gemv_plan.py): where the kernel applies and what it runs with;
the kernel itself is tested on a GPU (test_triton_layers, test_gpu_fp8)."""

from __future__ import annotations

from shardline.shards.layers.gemv_plan import Epilogue, GemvConfig, gemv_config


def test_the_gemv_tiles_only_what_it_can_unroll() -> None:
    assert gemv_config(2048, 100) is None  # no power-of-two tile divides K
    assert gemv_config(2048, 2048 * 17) is None  # too many tiles to unroll
    assert gemv_config(6144, 2048).block_n == 2 and gemv_config(2048, 8192).block_n == 1
    assert gemv_config(4096, 14336, Epilogue.RESIDUAL).block_k == 1024  # 14 tiles, not 28
    assert gemv_config(301, 896, Epilogue.SILU_PAIRS) is None  # an odd row is half a pair
    # FP8 weights: tiles of 2,048 values, 4 warps (session 17's batch-1 sweep)
    assert gemv_config(6144, 4096, fp8=True) == GemvConfig(4, 2048, 4)
    assert gemv_config(4096, 4096, Epilogue.RESIDUAL, fp8=True) == GemvConfig(2, 2048, 4)
    assert gemv_config(4096, 14336, Epilogue.RESIDUAL, fp8=True) == GemvConfig(1, 2048, 4)
    assert gemv_config(28672, 4096, Epilogue.SILU_PAIRS, fp8=True) == GemvConfig(4, 2048, 4)
    # a program's rows are whole pairs, (gate, up) or rotary, at any K
    for epilogue in (Epilogue.SILU_PAIRS, Epilogue.ROPE_KV):
        for fp8 in (False, True):
            for k in (896, 4096, 8192, 14336, 28672):
                config = gemv_config(4096, k, epilogue, fp8=fp8)
                assert config is not None and config.block_n % 2 == 0, (epilogue, fp8, k)
    # the rotary pairs of qkv take its plain tiling where that has whole pairs
    assert gemv_config(6144, 4096, Epilogue.ROPE_KV, fp8=True) == GemvConfig(4, 2048, 4)
    assert gemv_config(6144, 2048, Epilogue.ROPE_KV) == gemv_config(6144, 2048)
    assert gemv_config(10240, 8192, Epilogue.ROPE_KV) == GemvConfig(2, 2048, 2)
    assert gemv_config(10240, 8192, Epilogue.ROPE_KV, fp8=True) == GemvConfig(4, 2048, 4)
