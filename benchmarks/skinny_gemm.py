"""Decode-size linears: cuBLAS (F.linear) against the Triton weight-streaming GEMM, per weight
shape of the two benchmark models and rows 1 / 4 / 16, timed as CUDA-graph replays (no launch
overhead), with the bandwidth each reaches.

    python -m benchmarks.skinny_gemm
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton.testing

from shardline.shards.layers.triton_skinny_gemm import skinny_gemm

SHAPES = {  # (N, K) of each decoder-layer linear
    "8b qkv": (6144, 4096),
    "8b o": (4096, 4096),
    "8b gate_up": (28672, 4096),
    "8b down": (4096, 14336),
    "1.7b qkv": (6144, 2048),
    "1.7b o": (2048, 2048),
    "1.7b gate_up": (16384, 2048),
    "1.7b down": (2048, 8192),
}


def graph_us(call) -> float:
    return triton.testing.do_bench_cudagraph(call, rep=50, return_mode="median") * 1e3


def compare(name: str, weight: torch.Tensor, rows: int) -> str:
    n, k = weight.shape
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    expected = F.linear(x, weight)
    got = skinny_gemm(x, weight)  # autotunes outside the graph
    error = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
    assert error < 1e-2, f"{name} rows {rows}: relative error {error:.2e}"
    cublas = graph_us(lambda: F.linear(x, weight))
    triton_us = graph_us(lambda: skinny_gemm(x, weight))
    tbs = [2 * n * k / (us * 1e-6) / 1e12 for us in (cublas, triton_us)]
    return f"{name:14s} {rows:4d} {cublas:10.1f} {tbs[0]:5.2f} {triton_us:10.1f} {tbs[1]:5.2f}"


def main() -> None:
    torch.manual_seed(0)
    print("== decode-size linears, CUDA-graph replays", flush=True)
    print(
        f"{'linear':14s} {'rows':>4s} {'cuBLAS us':>10s} {'TB/s':>5s} {'triton us':>10s} {'TB/s':>5s}"
    )
    for name, (n, k) in SHAPES.items():
        weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        for rows in (1, 4, 16):
            print(compare(name, weight, rows), flush=True)
        del weight
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
