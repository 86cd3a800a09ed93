"""FP8 linear layers of a few rows on one CUDA GPU: the weight-only Triton GEMM
(triton_fp8_gemm.py) against torch._scaled_mm with the activations quantized per token (the
path past fp8.SKINNY_GEMM_MAX_ROWS), bf16 F.linear, and at one row the FP8 GEMV.

    python -m benchmarks.fp8_gemm_bench [--rows 1,2,4,8,16,32,64,128] [--sweep]

The Llama-3.1-8B layers (qkv, o, gate_up, down; the LM head, bf16 in the engine, for its width)
with bf16 activations. Each timed call reads its own copy of the weight (copies rotate until
they exceed the L2 several times over), a round of calls is replayed from a CUDA graph (as a
decode step is), and the median replay gives the time per call. GB/s counts the bytes a call
must move (weight, scales, x, y) against a measured device-to-device copy (bytes read +
written). The last lines add up the decoder's four projections over its 32 layers per M: the
linear layers' share of a decode step, to set SKINNY_GEMM_MAX_ROWS from. --sweep also times
other tilings of the Triton GEMM and prints the fastest (slow: a compile per tiling; pick
--layers and --rows).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton
from triton.runtime.errors import OutOfResources

from benchmarks.attention_kernels import copy_bandwidth
from shardline.shards.layers.fp8 import SKINNY_GEMM_MAX_ROWS, quantize_rows, scaled_mm_linear
from shardline.shards.layers.triton_fp8_gemm import (
    SkinnyConfig,
    fp8_skinny_gemm,
    row_block,
    skinny_config,
)
from shardline.shards.layers.triton_gemv import gemv, gemv_applies

LAYERS = {  # name: (N, K) of Llama-3.1-8B
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "lm_head": (128256, 4096),
}
DECODER_LAYERS, DECODER_DEPTH = ("qkv", "o", "gate_up", "down"), 32
ROWS = (1, 2, 4, 8, 16, 32, 64, 128)
ROTATION_BYTES = 512 << 20
REPLAYS = 50
DTYPE = torch.bfloat16
SWEEP_BLOCK_N, SWEEP_BLOCK_K, SWEEP_WARPS, SWEEP_STAGES = (
    (16, 32, 64),
    (128, 256, 512),
    (4, 8),
    (3, 5),
)


def per_call_ms(calls: list[Callable[[], torch.Tensor]]) -> float:
    """Median over graph replays of one round of `calls`, per call."""
    for call in calls:
        call()  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    times = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(calls))
    return statistics.median(times)


class Layer:
    """`copies` FP8 weights (with their scales) and bf16 weights of one shape."""

    def __init__(self, n: int, k: int) -> None:
        self.n, self.k = n, k
        copies = max(1, triton.cdiv(ROTATION_BYTES, n * k))
        self.fp8 = [quantize_rows(torch.randn(n, k, device="cuda") * 0.02) for _ in range(copies)]
        bf16_copies = max(1, triton.cdiv(ROTATION_BYTES, 2 * n * k))
        self.bf16 = [
            (torch.randn(n, k, device="cuda") * 0.02).to(DTYPE) for _ in range(bf16_copies)
        ]

    def bytes_moved(self, rows: int, weight_bytes: int, scales: bool) -> int:
        return self.n * self.k * weight_bytes + 2 * rows * (self.k + self.n) + 4 * self.n * scales

    def time_fp8(self, x: torch.Tensor, op: Callable) -> float:
        return per_call_ms([lambda w=w, s=s: op(x, w, s, None) for w, s in self.fp8])

    def time_bf16(self, x: torch.Tensor) -> float:
        return per_call_ms([lambda w=w: F.linear(x, w) for w in self.bf16])


def skinny_with(config: SkinnyConfig) -> Callable:
    return lambda x, w, s, bias: fp8_skinny_gemm(x, w, s, bias, config=config)


def sweep_configs(rows: int) -> list[SkinnyConfig]:
    block_m = row_block(rows)
    grid = itertools.product(SWEEP_BLOCK_N, SWEEP_BLOCK_K, SWEEP_WARPS, SWEEP_STAGES)
    return [SkinnyConfig(block_m, n, k, warps, stages) for n, k, warps, stages in grid]


def fastest(layer: Layer, x: torch.Tensor) -> tuple[float, SkinnyConfig]:
    """The fastest tiling that compiles (too much shared memory skips one)."""
    timed = []
    for config in sweep_configs(x.shape[0]):
        try:
            timed.append((layer.time_fp8(x, skinny_with(config)), config))
        except OutOfResources:
            continue
    return min(timed, key=lambda pair: pair[0])


def cell(layer: Layer, rows: int, ms: float, weight_bytes: int, bandwidth: float) -> str:
    rate = layer.bytes_moved(rows, weight_bytes, weight_bytes == 1) / (ms * 1e-3)
    return f"{ms:7.4f} ms {rate / 1e9:5.0f} GB/s {100 * rate / bandwidth:3.0f} %"


def print_layer(
    name: str, layer: Layer, rows: list[int], bandwidth: float, sweep: bool
) -> dict[int, tuple[float, float, float]]:
    """Prints a line per M; returns M -> (triton, scaled_mm, bf16) ms."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    times = {}
    for m in rows:
        x = torch.randn(m, layer.k, device="cuda").to(DTYPE)
        skinny = layer.time_fp8(x, fp8_skinny_gemm)
        scaled = layer.time_fp8(x, scaled_mm_linear)
        times[m] = (skinny, scaled, layer.time_bf16(x))
        config = skinny_config(m, layer.n, layer.k, sms)
        line = (
            f"{name:8s} {layer.n:6d} x {layer.k:5d}  M {m:3d}"
            f" | triton {cell(layer, m, skinny, 1, bandwidth)}"
            f" | scaled_mm {cell(layer, m, scaled, 1, bandwidth)}"
            f" | bf16 {cell(layer, m, times[m][2], 2, bandwidth)}"
            f" | scaled_mm/triton {scaled / skinny:4.2f}x"
            f" ({config.block_n}x{config.block_k} {config.num_warps}w {config.num_stages}s)"
        )
        if m == 1 and gemv_applies(x, layer.fp8[0][0]):
            gemv_ms = layer.time_fp8(x, lambda x, w, s, bias: gemv(x, w, scale=s))
            line += f" | fp8 gemv {cell(layer, m, gemv_ms, 1, bandwidth)}"
        print(line, flush=True)
        if sweep:
            ms, best = fastest(layer, x)
            print(f"{'':31s}fastest tiling {cell(layer, m, ms, 1, bandwidth)}: {best}", flush=True)
    return times


def print_decoder_totals(by_layer: dict[str, dict[int, tuple[float, float, float]]]) -> None:
    """The 8B decoder's projections (qkv, o, gate_up, down) times its 32 layers, per M."""
    print(f"== the decoder's projections x {DECODER_DEPTH} layers (a decode step's linears)")
    for m in by_layer[DECODER_LAYERS[0]]:
        skinny, scaled, bf16 = (
            DECODER_DEPTH * sum(by_layer[name][m][i] for name in DECODER_LAYERS) for i in range(3)
        )
        print(
            f"M {m:3d} | triton {skinny:6.3f} ms"
            f" | scaled_mm {scaled:6.3f} ms | bf16 {bf16:6.3f} ms"
            f" | the faster FP8: {'triton' if skinny < scaled else 'scaled_mm'}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    parser.add_argument("--layers", default=",".join(LAYERS))
    parser.add_argument("--sweep", action="store_true", help="also time other Triton tilings")
    args = parser.parse_args()
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    print(
        f"device {torch.cuda.get_device_name()}  copy {bandwidth / 1e9:.0f} GB/s  "
        f"SKINNY_GEMM_MAX_ROWS {SKINNY_GEMM_MAX_ROWS}  bf16 activations",
        flush=True,
    )
    rows = [int(m) for m in args.rows.split(",")]
    by_layer = {}
    for name in args.layers.split(","):
        layer = Layer(*LAYERS[name])
        by_layer[name] = print_layer(name, layer, rows, bandwidth, args.sweep)
        del layer
        torch.cuda.empty_cache()
        if name in DECODER_LAYERS and set(DECODER_LAYERS) <= set(by_layer):
            print_decoder_totals(by_layer)


if __name__ == "__main__":
    main()
