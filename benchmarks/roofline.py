"""The device's measured ceilings (copy bandwidth, bf16 and FP8 matmul rates) and a decode step's
roofline from them: the bound the engine benchmarks compare their steps with."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from benchmarks.random_model import head_dim, tensor_shapes


def device_ceilings() -> dict:
    """Measured copy bandwidth (bytes read + written), bf16 matmul rate and (compute capability
    8.9 and up) FP8 `_scaled_mm` rate."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(20):
        dst.copy_(src)
    torch.cuda.synchronize()
    bandwidth = 2 * 20 * src.numel() / (time.perf_counter() - started)
    del src, dst
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    flops = 10 * 2 * 8192**3 / (time.perf_counter() - started)
    ceilings = {"copy_bytes_s": bandwidth, "matmul_flops": flops}
    if torch.cuda.get_device_capability() >= (8, 9):
        ceilings["fp8_matmul_flops"] = _fp8_matmul_flops(a)
    return ceilings


def _fp8_matmul_flops(a: torch.Tensor) -> float:
    """The rate of `--quantize fp8`'s GEMM (torch._scaled_mm, row-wise scales, bf16 out)."""
    q = a.to(torch.float8_e4m3fn)
    rows = torch.ones((q.shape[0], 1), device=q.device)
    cols = torch.ones((1, q.shape[0]), device=q.device)

    def product() -> torch.Tensor:
        return torch._scaled_mm(
            q, q.t(), scale_a=rows, scale_b=cols, out_dtype=torch.bfloat16, use_fast_accum=True
        )

    for _ in range(3):
        product()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        product()
    torch.cuda.synchronize()
    return 10 * 2 * q.shape[0] ** 3 / (time.perf_counter() - started)


def roofline_step_ms(
    model_dir: Path,
    context: int,
    batch: int,
    ceilings: dict,
    *,
    fp8_weights: bool = False,
    fp8_lm_head: bool = False,
    kv_element_bytes: int = 2,
) -> dict:
    """bf16 weights, or FP8 decoder projections (`--quantize fp8`: one byte each, the
    embeddings, norms and LM head in bf16; `fp8_lm_head`: the LM head one byte too); a KV cache
    of `kv_element_bytes` per value."""
    config = json.loads((model_dir / "config.json").read_text())
    shapes = tensor_shapes(config)
    params = sum(math.prod(shape) for shape in shapes.values())
    one_byte = sum(
        math.prod(shape)
        for name, shape in shapes.items()
        if fp8_weights and ("_proj." in name or (fp8_lm_head and name == "lm_head.weight"))
    )
    kv_per_token = (
        2
        * config["num_hidden_layers"]
        * config["num_key_value_heads"]
        * head_dim(config)
        * kv_element_bytes
    )
    bytes_moved = 2 * params - one_byte + batch * context * kv_per_token
    flops = 2 * params * batch
    return {
        "params": params,
        "memory_ms": 1e3 * bytes_moved / ceilings["copy_bytes_s"],
        "compute_ms": 1e3 * flops / ceilings["matmul_flops"],
    }
