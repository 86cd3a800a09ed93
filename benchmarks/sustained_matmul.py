"""The GEMM rate a GPU keeps up, against the burst that `roofline.device_ceilings` times (10
GEMMs, ~14 ms on an H100): back-to-back matmuls of the 8B shape's prefill (4,096 tokens through
gate_up) for some seconds, the TFLOP/s of each window with the SM clock, power draw and
throttle reasons nvidia-smi reports at its end. On a power-capped card the clock falls once the
board reaches its cap, and with it the rate a long run's GEMMs can reach: a floor term that the
burst ceiling misses.

    python -m benchmarks.sustained_matmul [--seconds 8] [--window 0.5] [--fp8]
"""

from __future__ import annotations

import argparse
import subprocess
import time

import torch

from shardline.shards.layers.fp8 import fp8_linear, quantize_rows

SMI_FIELDS = "clocks.sm,power.draw,clocks_throttle_reasons.active"


def smi() -> str:
    """SM clock, power draw and throttle reasons now (0x4: the software power cap)."""
    query = ["nvidia-smi", f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader"]
    return subprocess.run(query, capture_output=True, text=True, check=False).stdout.strip()


def matmul(tokens: int, k: int, n: int, fp8: bool):
    """One GEMM of x [tokens, k] by a weight [n, k] (FP8 per-row scaled with `fp8`)."""
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(n, k, device="cuda") * 0.02
    if fp8:
        quantized, scale = quantize_rows(weight)
        return lambda: fp8_linear(x, quantized, scale)
    weight = weight.to(torch.bfloat16)
    return lambda: torch.nn.functional.linear(x, weight)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--window", type=float, default=0.5)
    parser.add_argument("--fp8", action="store_true")
    parser.add_argument("--shape", default="4096,4096,28672", help="tokens,K,N")
    args = parser.parse_args()
    tokens, k, n = (int(v) for v in args.shape.split(","))
    run = matmul(tokens, k, n, args.fp8)
    flop = 2 * tokens * k * n
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    rates, ended = [], time.perf_counter() + args.seconds
    while time.perf_counter() < ended:
        calls, started = 0, time.perf_counter()
        while time.perf_counter() - started < args.window:
            for _ in range(8):
                run()
            calls += 8
            torch.cuda.synchronize()
        rate = calls * flop / (time.perf_counter() - started) / 1e12
        rates.append(rate)
        print(f"{'fp8' if args.fp8 else 'bf16'} {rate:6.0f} TFLOP/s | {smi()}", flush=True)
    half = rates[len(rates) // 2 :]
    print(
        f"{'fp8' if args.fp8 else 'bf16'} {tokens}x{k}x{n}: first window {rates[0]:.0f}, "
        f"best {max(rates):.0f}, mean of the second half {sum(half) / len(half):.0f} TFLOP/s",
        flush=True,
    )


if __name__ == "__main__":
    main()
