"""The decode step's small kernels on one CUDA GPU, at the row counts of the offline run's steps:
RMSNorm with the residual add (bf16 out, and FP8 rows for an FP8 layer), SiLU * up (bf16 and
FP8 out), and the rotary + KV-cache write, each against the copy bandwidth for the bytes it must
move. In the bf16 8B profile (benchmarks/RESULTS.md, session 16) they take ~0.5 s of the decode
steps' 10.5 s of GPU time (SiLU * up ~10 µs a call, RMSNorm ~5 µs, 65 a step).

    python -m benchmarks.step_kernels_bench [--rows 64,128,192,256,320]

Llama-3.1-8B shapes (hidden 4096, intermediate 14336, 32 query / 8 KV heads of 128), bf16.
Calls are replayed from a CUDA graph over inputs rotated past the L2 (fp8_gemm_bench.per_call_ms);
in a real step the input of SiLU * up was just written by the GEMM before it and may sit in L2.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from benchmarks.attention_kernels import copy_bandwidth
from benchmarks.fp8_gemm_bench import per_call_ms
from shardline.shards.layers.attention.triton_kv_write import rotate_and_write_kv_cache
from shardline.shards.layers.triton_activation import triton_silu_and_mul
from shardline.shards.layers.triton_norm import rms_norm

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 4096, 14336, 32, 8, 128
PAGE, MAX_POSITION = 16, 4096
ROWS = (64, 128, 192, 256, 320)
ROTATION_BYTES = 256 << 20
DTYPE = torch.bfloat16


def copies(bytes_each: int) -> int:
    return max(2, ROTATION_BYTES // max(1, bytes_each))


def bf16_rows(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, device="cuda").to(DTYPE)


def norm_calls(rows: int, fp8: bool) -> tuple[list[Callable], int]:
    """RMSNorm(x + residual): reads x, residual and the weight, writes the sum and the normed
    rows (FP8 ones with a scale a row)."""
    out_bytes = rows * HIDDEN * (1 if fp8 else 2) + 4 * rows * fp8
    moved = 3 * rows * HIDDEN * 2 + out_bytes + 2 * HIDDEN
    weight = torch.ones(HIDDEN, dtype=DTYPE, device="cuda")
    inputs = [(bf16_rows(rows, HIDDEN), bf16_rows(rows, HIDDEN)) for _ in range(copies(moved))]
    return [lambda x=x, r=r: rms_norm(x, weight, 1e-5, r, fp8=fp8) for x, r in inputs], moved


def act_calls(rows: int, fp8: bool) -> tuple[list[Callable], int]:
    """SiLU(gate) * up: reads [rows, 2 x intermediate], writes [rows, intermediate]."""
    moved = rows * 2 * INTERMEDIATE * 2 + rows * INTERMEDIATE * (1 if fp8 else 2) + 4 * rows * fp8
    inputs = [bf16_rows(rows, 2 * INTERMEDIATE) for _ in range(copies(moved))]
    return [lambda g=g: triton_silu_and_mul(g, fp8=fp8) for g in inputs], moved


def kv_write_calls(rows: int) -> tuple[list[Callable], int]:
    """Rotates q and k in place and writes k and v into a paged bf16 cache."""
    q_bytes, kv_bytes = rows * HEADS * HEAD_DIM * 2, rows * KV_HEADS * HEAD_DIM * 2
    moved = 2 * q_bytes + 2 * kv_bytes + kv_bytes + 2 * kv_bytes  # q, k in, out; v in; k, v out
    pages = rows * 4
    cache = [torch.zeros(pages, PAGE, KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda") for _ in "kv"]
    angles = torch.rand(MAX_POSITION, HEAD_DIM // 2, device="cuda")
    cos, sin = angles.cos().to(DTYPE), angles.sin().to(DTYPE)
    slots = (torch.randperm(pages, device="cuda")[:rows] * PAGE).long()
    positions = torch.randint(0, MAX_POSITION, (rows,), device="cuda")
    heads = (HEADS, KV_HEADS, KV_HEADS)  # q, k, v: views of the qkv projection's rows
    inputs = [
        bf16_rows(rows, sum(heads), HEAD_DIM).split(heads, dim=1) for _ in range(copies(moved))
    ]
    return [
        lambda q=q, k=k, v=v: rotate_and_write_kv_cache(q, k, v, positions, cos, sin, *cache, slots)
        for q, k, v in inputs
    ], moved


KERNELS: dict[str, Callable[[int], tuple[list[Callable], int]]] = {
    "rms_norm + residual": lambda rows: norm_calls(rows, fp8=False),
    "rms_norm + residual, fp8 out": lambda rows: norm_calls(rows, fp8=True),
    "silu * up": lambda rows: act_calls(rows, fp8=False),
    "silu * up, fp8 out": lambda rows: act_calls(rows, fp8=True),
    "rotary + kv write": kv_write_calls,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    args = parser.parse_args()
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}  copy {bandwidth / 1e9:.0f} GB/s", flush=True)
    for name, build in KERNELS.items():
        for rows in map(int, args.rows.split(",")):
            calls, moved = build(rows)
            ms = per_call_ms(calls)
            rate = moved / (ms * 1e-3)
            print(
                f"{name:30s} rows {rows:4d}  {1e3 * ms:7.2f} µs  {moved / 1e6:6.2f} MB"
                f"  {rate / 1e9:5.0f} GB/s  {100 * rate / bandwidth:3.0f} % of copy",
                flush=True,
            )
            del calls
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
