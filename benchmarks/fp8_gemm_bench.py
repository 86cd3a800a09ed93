"""FP8 linear layers of a few rows on one CUDA GPU: cuBLASLt's row-scaled GEMM (torch._scaled_mm),
its unscaled tensor-wise GEMM whose scales the next kernel applies ("deferred", fp8.ScaledProduct)
and the Triton GEMM (triton_fp8_gemm.py, each tiling of --tilings) on activations already
quantized per token (as the fused norm and SiLU kernels hand them over), against bf16 F.linear;
at one row the FP8 GEMV.

    python -m benchmarks.fp8_gemm_bench [--rows 1,2,4,8,16,32,64,128] [--tilings m64n64k128w4s4,...]

The Llama-3.1-8B layers (qkv, o, gate_up, down; the LM head, bf16 in the engine, for its width)
with bf16 activations. Each timed call reads its own copy of the weight (copies rotate until
they exceed the L2 several times over), a round of calls is replayed from a CUDA graph (as a
decode step is), and the median replay gives the time per call. GB/s counts the bytes a call
must move (weight, scales, x, y) against a measured device-to-device copy (bytes read +
written). The last lines add up the decoder's four projections over its 32 layers per M: the
linear layers' share of a decode step, for cuBLASLt, each tiling, the best tiling per layer and
the engine's choice (deferred scales for every projection of the Llama family). --bf16-tilings times the same Triton kernel on
bf16 operands (unit scales), against cuBLAS's bf16 GEMM, for the bf16 engine's decode steps;
--blas cublaslt has torch run the bf16 GEMMs through cuBLASLt instead of cuBLAS; --gemv-tilings
times the FP8 GEMV at one row as the batch-1 decode calls it (qkv and gate_up with the RMSNorm
folded in, gate_up's SiLU * up and o's and down's residual in the epilogue) with each tiling
(n2k1024w4: rows and K a program, warps) beside the engine's (gemv_config's for that epilogue),
and the LM head's plain GEMV on its bf16 weight with the same tilings.
(A weight-only Triton GEMM for 2-128 rows ran at 14-68 %
of the copy bandwidth here, slower than _scaled_mm at every M on an H100, and was dropped:
benchmarks/RESULTS.md.)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton

from benchmarks.attention_kernels import copy_bandwidth
from shardline.shards.kv_cache import KVCache
from shardline.shards.layers.fp8 import FP8Rows, cublas_scaled_mm, quantize_rows, scaled_mm_rows
from shardline.shards.layers.gemv_plan import (
    Epilogue,
    GemvConfig,
    RopeKV,
    gemv_config,
    takes_whole_pairs,
)
from shardline.shards.layers.triton_fp8_gemm import NARROW, WIDE, GemmTiling, fp8_gemm, tiling_for
from shardline.shards.layers.triton_gemv import gemv, gemv_applies, gemv_normed, gemv_residual

LAYERS = {  # name: (N, K) of Llama-3.1-8B
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "lm_head": (128256, 4096),
}
DECODER_LAYERS, DECODER_DEPTH = ("qkv", "o", "gate_up", "down"), 32
# the layers whose scales the kernel after them applies (LlamaAttention's qkv read by the rotary
# + KV write, o by RMSNorm, LlamaMLP's gate_up by SiLU * up and down by the next RMSNorm)
DEFERRED_LAYERS = ("qkv", "o", "gate_up", "down")
ROWS = (1, 2, 4, 8, 16, 32, 64, 128)
BASELINES = ("scaled_mm", "deferred", "bf16")
BF16 = "bf16 "  # a bf16-operand tiling's key: BF16 + its name
GEMV = "gemv "  # a one-row GEMV tiling's key: GEMV + its name
GEMV16 = "gemv16 "  # the LM head's: a plain GEMV on its bf16 weight
FAMILIES = {"best tiling": "", "bf16 best tiling": BF16, "gemv best tiling": GEMV}
TILINGS = (NARROW.name, WIDE.name, "m64n64k128w4s4", "m128n128k128w8s3")  # the engine's first
ROTATION_BYTES = 512 << 20
REPLAYS = 50
DTYPE = torch.bfloat16


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


def host_launch_us(call: Callable[[], torch.Tensor], launches: int = 200) -> float:
    """The host's time to launch one eager call (the launches queue up faster than the GPU
    drains them only if the kernel is shorter than its launch)."""
    call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(launches):
        call()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e6 * elapsed / launches


def print_host_launch(name: str, layer: Layer, m: int) -> None:
    """Eager calls (a prefill's, outside CUDA graphs) pay their launch on the host: µs a call."""
    x = torch.randn(m, layer.k, device="cuda").to(DTYPE)
    rows = FP8Rows(*quantize_rows(x), DTYPE)
    (w, s), w16 = layer.fp8[0], layer.bf16[0]
    calls = {
        "scaled_mm": lambda: cublas_scaled_mm(rows, w, s, None),
        "bf16": lambda: F.linear(x, w16),
        NARROW.name: lambda: fp8_gemm(rows, w, s, None, NARROW),
    }
    line = " | ".join(f"{kind} {host_launch_us(call):5.1f}" for kind, call in calls.items())
    print(f"{name:8s} M {m:3d} host launch µs a call | {line}", flush=True)


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

    def time_fp8(self, x: torch.Tensor | FP8Rows, op: Callable) -> float:
        return per_call_ms([lambda w=w, s=s: op(x, w, s, None) for w, s in self.fp8])

    def time_bf16(self, x: torch.Tensor) -> float:
        return per_call_ms([lambda w=w: F.linear(x, w) for w in self.bf16])

    def time_bf16_triton(self, x: torch.Tensor, tiling: GemmTiling) -> float:
        """The Triton kernel on bf16 operands: unit scales stand for FP8's."""
        rows = FP8Rows(x, torch.ones(x.shape[0], device="cuda"), DTYPE)
        ones = torch.ones(self.n, device="cuda")
        return per_call_ms([lambda w=w: fp8_gemm(rows, w, ones, None, tiling) for w in self.bf16])


def cell(layer: Layer, rows: int, ms: float, weight_bytes: int, bandwidth: float) -> str:
    rate = layer.bytes_moved(rows, weight_bytes, weight_bytes == 1) / (ms * 1e-3)
    return f"{ms:7.4f} ms {rate / 1e9:5.0f} GB/s {100 * rate / bandwidth:3.0f} %"


def fits(layer: Layer, tiling: GemmTiling | GemvConfig) -> bool:
    return layer.n % tiling.block_n == 0 and layer.k % tiling.block_k == 0


def family(kind: str) -> str:
    """The key prefix of a timed kind's family: BF16, GEMV or "" (FP8 GEMM tilings)."""
    return next((prefix for prefix in (BF16, GEMV) if kind.startswith(prefix)), "")


# How the batch-1 decode calls each layer's GEMV (LlamaDecoderLayer.decode_one)
GEMV_EPILOGUES = {
    "qkv": Epilogue.ROPE_KV,
    "o": Epilogue.RESIDUAL,
    "gate_up": Epilogue.SILU_PAIRS,
    "down": Epilogue.RESIDUAL,
    "lm_head": Epilogue.PLAIN,
}


def batch1_gemv(layer: Layer, epilogue: Epilogue, x: torch.Tensor) -> Callable:
    """The layer's one-row call with its epilogue: fn(x, w, s, bias, config)."""
    ss = torch.ones(2, device="cuda")
    if epilogue == Epilogue.RESIDUAL:
        residual = torch.randn(1, layer.n, device="cuda").to(DTYPE)
        return lambda x, w, s, bias, c: gemv_residual(x, w, residual, ss[0], scale=s, config=c)
    norm_weight = torch.ones(layer.k, device="cuda").to(DTYPE)
    silu = epilogue == Epilogue.SILU_PAIRS
    rope_kv = one_token_rope_kv(layer.n) if epilogue == Epilogue.ROPE_KV else None
    return lambda x, w, s, bias, c: gemv_normed(
        x, ss[0], norm_weight, 1e-5, w, silu_pairs=silu, zero=ss[1], scale=s, config=c,
        rope_kv=rope_kv,
    )  # fmt: skip


def one_token_rope_kv(n: int, head_dim: int = 128, kv_heads: int = 8) -> RopeKV:
    """A qkv projection's ROPE_KV arguments for one token of the 8B shape: its rotation and
    a slot of an FP8 cache laid out as KVCache lays it out."""
    cos, sin = (torch.randn(8192, head_dim // 2, device="cuda").to(DTYPE) for _ in range(2))
    cache = KVCache.allocate(
        num_layers=1, num_blocks=64, block_size=16, num_kv_heads=kv_heads, head_dim=head_dim,
        dtype=torch.float8_e4m3fn, device=torch.device("cuda"),
    )  # fmt: skip
    where = torch.tensor([1000], device="cuda")
    return RopeKV(where, cos, sin, *cache.layers[0], where, n // head_dim - 2 * kv_heads)


def engine_gemv_key(name: str) -> str | None:
    """The key of the tiling the engine gives layer `name`'s batch-1 GEMV."""
    tiling = gemv_config(*LAYERS[name], GEMV_EPILOGUES[name], fp8=True)
    return None if tiling is None else GEMV + tiling.name


def time_gemvs(
    name: str, layer: Layer, x: torch.Tensor, tilings: list[GemvConfig]
) -> dict[str, float]:
    """The FP8 GEMV at one row, plain ("fp8 gemv"), then as the batch-1 decode calls it with the
    engine's tiling (GEMV + its name) and each of `tilings` that fits."""
    times = {"fp8 gemv": layer.time_fp8(x, lambda x, w, s, bias: gemv(x, w, scale=s))}
    if not tilings:
        return times
    epilogue = GEMV_EPILOGUES[name]
    call = batch1_gemv(layer, epilogue, x)
    default = gemv_config(layer.n, layer.k, epilogue, fp8=True)
    for tiling in [default, *tilings]:
        runs = tiling is not None and fits(layer, tiling)
        if (
            runs
            and takes_whole_pairs(tiling, layer.n, epilogue)
            and GEMV + tiling.name not in times
        ):
            op = lambda x, w, s, bias, t=tiling: call(x, w, s, bias, t)  # noqa: E731
            times[GEMV + tiling.name] = layer.time_fp8(x, op)
    return times


def time_bf16_gemvs(layer: Layer, x: torch.Tensor, tilings: list[GemvConfig]) -> dict[str, float]:
    """The plain GEMV at one row on the bf16 weight, as batch-1 decode runs the LM head (bf16
    beside FP8 layers too), with the engine's tiling (GEMV16 + its name) and each of `tilings`."""
    times = {}
    for tiling in [gemv_config(layer.n, layer.k), *tilings]:
        if tiling is not None and fits(layer, tiling) and GEMV16 + tiling.name not in times:
            calls = [lambda w=w, t=tiling: gemv(x, w, config=t) for w in layer.bf16]
            times[GEMV16 + tiling.name] = per_call_ms(calls)
    return times


def print_layer(
    name: str,
    layer: Layer,
    rows: list[int],
    tilings: list[GemmTiling],
    bf16_tilings: list[GemmTiling],
    gemv_tilings: list[GemvConfig],
    bandwidth: float,
) -> dict[int, dict[str, float]]:
    """Prints a line per M; returns M -> {"scaled_mm" | "bf16" | tiling name | BF16 + tiling
    name: ms}."""
    times = {}
    for m in rows:
        x = torch.randn(m, layer.k, device="cuda").to(DTYPE)
        fp8_rows = FP8Rows(*quantize_rows(x), DTYPE)
        times[m] = {
            "scaled_mm": layer.time_fp8(fp8_rows, cublas_scaled_mm),
            "deferred": layer.time_fp8(fp8_rows, deferred_scales),
            "bf16": layer.time_bf16(x),
        }
        line = f"{name:8s} {layer.n:6d} x {layer.k:5d}  M {m:3d}" + "".join(
            f" | {kind} {cell(layer, m, times[m][kind], 2 if kind == 'bf16' else 1, bandwidth)}"
            for kind in BASELINES
        )
        for tiling in filter(lambda t: fits(layer, t), bf16_tilings):
            times[m][BF16 + tiling.name] = layer.time_bf16_triton(x, tiling)
            line += f" | bf16 {tiling.name} {cell(layer, m, times[m][BF16 + tiling.name], 2, bandwidth)}"
        for tiling in tilings:
            if fits(layer, tiling):
                triton_op = lambda r, w, s, bias, t=tiling: fp8_gemm(r, w, s, bias, t)  # noqa: E731
                times[m][tiling.name] = layer.time_fp8(fp8_rows, triton_op)
                line += f" | {tiling.name} {cell(layer, m, times[m][tiling.name], 1, bandwidth)}"
        if m == 1 and gemv_applies(x, layer.fp8[0][0]):
            times[m].update(time_gemvs(name, layer, x, gemv_tilings))
            for kind in ("fp8 gemv", *(k for k in times[m] if k.startswith(GEMV))):
                engine = " (engine)" if kind == engine_gemv_key(name) else ""
                line += f" | {kind}{engine} {cell(layer, m, times[m][kind], 1, bandwidth)}"
        if m == 1 and name == "lm_head" and gemv_tilings:
            times[m].update(time_bf16_gemvs(layer, x, gemv_tilings))
            engine = GEMV16 + gemv_config(layer.n, layer.k).name
            for kind in (k for k in times[m] if k.startswith(GEMV16)):
                marked = f"{kind} (engine)" if kind == engine else kind
                line += f" | {marked} {cell(layer, m, times[m][kind], 2, bandwidth)}"
        print(line, flush=True)
    return times


def deferred_scales(rows: FP8Rows, w: torch.Tensor, s: torch.Tensor, bias: None) -> torch.Tensor:
    return scaled_mm_rows(rows, w, s, bias, defer_scales=True).raw


def layer_ms(name: str, times: dict[str, float], m: int) -> float | None:
    """A layer's time with the engine's choice: deferred scales, the Triton tiling, or cuBLASLt."""
    if name in DEFERRED_LAYERS:
        return times["deferred"]
    tiling = tiling_for(m, LAYERS[name][0])
    return times["scaled_mm"] if tiling is None else times.get(tiling.name)


def print_decoder_totals(by_layer: dict[str, dict[int, dict[str, float]]]) -> None:
    """The 8B decoder's projections (qkv, o, gate_up, down) times its 32 layers, per M: each
    kernel, the best tiling per layer, and the engine's choice."""
    print(f"== the decoder's projections x {DECODER_DEPTH} layers (a decode step's linears), ms")
    for m in by_layer[DECODER_LAYERS[0]]:
        layers = [by_layer[name][m] for name in DECODER_LAYERS]
        kinds = [kind for kind in layers[0] if all(kind in layer for layer in layers)]
        totals = {kind: DECODER_DEPTH * sum(layer[kind] for layer in layers) for kind in kinds}
        for label, prefix in FAMILIES.items():
            triton = [
                [
                    ms
                    for kind, ms in layer.items()
                    if kind not in (*BASELINES, "fp8 gemv") and family(kind) == prefix
                ]
                for layer in layers
            ]
            if all(triton):
                totals[label] = DECODER_DEPTH * sum(min(ms) for ms in triton)
        engine = [layer_ms(name, layer, m) for name, layer in zip(DECODER_LAYERS, layers)]
        if None not in engine:
            totals["engine's choice"] = DECODER_DEPTH * sum(engine)
        gemvs = [layer.get(engine_gemv_key(name)) for name, layer in zip(DECODER_LAYERS, layers)]
        if None not in gemvs:
            totals["engine's batch-1 gemv"] = DECODER_DEPTH * sum(gemvs)
        print(f"M {m:3d} | " + " | ".join(f"{k} {v:6.3f}" for k, v in totals.items()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    parser.add_argument("--layers", default=",".join(LAYERS))
    parser.add_argument("--tilings", default=",".join(TILINGS))
    parser.add_argument("--bf16-tilings", default="", help="tilings for bf16 operands")
    parser.add_argument("--gemv-tilings", default="", help="FP8 GEMV tilings at one row")
    parser.add_argument("--host-launch", action="store_true", help="eager launch µs a call")
    parser.add_argument(
        "--blas", choices=("cublas", "cublaslt"), help="torch's library for the bf16 GEMMs"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.blas:
        torch.backends.cuda.preferred_blas_library(args.blas)
    bandwidth = copy_bandwidth()
    print(
        f"device {torch.cuda.get_device_name()}  copy {bandwidth / 1e9:.0f} GB/s  bf16 activations"
        f"  bf16 GEMMs by {torch.backends.cuda.preferred_blas_library()}",
        flush=True,
    )
    rows = [int(m) for m in args.rows.split(",")]
    tilings = [GemmTiling.parse(name) for name in args.tilings.split(",") if name]
    bf16_tilings = [GemmTiling.parse(name) for name in args.bf16_tilings.split(",") if name]
    gemv_tilings = [GemvConfig.parse(name) for name in args.gemv_tilings.split(",") if name]
    by_layer = {}
    for name in args.layers.split(","):
        layer = Layer(*LAYERS[name])
        by_layer[name] = print_layer(
            name, layer, rows, tilings, bf16_tilings, gemv_tilings, bandwidth
        )
        if args.host_launch:
            print_host_launch(name, layer, rows[0])
        del layer
        torch.cuda.empty_cache()
        if name in DECODER_LAYERS and set(DECODER_LAYERS) <= set(by_layer):
            print_decoder_totals(by_layer)


if __name__ == "__main__":
    main()
