"""Micro-benchmark of the Triton attention kernels on one CUDA GPU.

    python -m benchmarks.attention_kernels [--sweep] [--batches 1,64,256] [--contexts 512,2048,8192]
        [--kv-dtype bf16|fp8_e4m3fn|fp8_e5m2] [--lengths uniform|mixed [--workload JSONL]
        [--splits 1,2,4,8] [--seed 0] [--page 16]] [--balanced 4,8]

Decode: Llama-3.1-8B attention shape (32 query heads, 8 KV heads, head_dim 128, bf16, page 16)
at batch 1/64/256 x context 512/2048/8192, pages shuffled; `--kv-dtype` an FP8 cache instead. Each timed call reads its own set of
pages (sets rotate until they exceed the L2 several times over), all calls of one round are
replayed from a CUDA graph, and the median replay over calls gives the time per call. Bandwidth
counts the K/V bytes every call must read (plus q and out) against a measured device-to-device
copy (bytes read + written). --sweep also times other tile/warp configurations and no split;
`--balanced` the balanced kernel (triton_decode_balanced.py) at each number of programs per SM.
`--lengths mixed` gives the rows different context lengths, as a large batch mid-run has them
(benchmarks/decode_lengths.py: from the `--workload`'s requests, else log-uniform from 32),
capped at the context (the block table's width): each (batch, context) prints its lengths, then
time and bandwidth (from the keys each row reads) with the plan's split choice and with each
`--splits` count forced, the rows as drawn and longest first (--sweep does not apply).
Prefill: one 8192-token prompt and 64 prompts of 256 tokens against a measured bf16 matmul rate.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

from benchmarks.decode_lengths import ORDERS, describe, draw_lengths
from benchmarks.workload import load_workload
from shardline.shards.kv_cache import allocate_pool, keys_major_values
from shardline.shards.layers.attention.decode_plan import (
    BalancedPlan,
    DecodeConfig,
    SplitPlan,
    default_decode_config,
    fills_gpu,
    plan_decode,
)
from shardline.shards.layers.attention.fp8_kv import FP8_KV_DTYPES
from shardline.shards.layers.attention.triton_decode import paged_decode_attention
from shardline.shards.layers.attention.triton_prefill import (
    PrefillConfig,
    default_prefill_config,
    varlen_causal_attention,
)

HEADS, KV_HEADS, HEAD_DIM, PAGE, DTYPE = 32, 8, 128, 16, torch.bfloat16
KV_DTYPES = {"bf16": DTYPE, **FP8_KV_DTYPES}
KV_NAMES = {dtype: name for name, dtype in KV_DTYPES.items()}  # e4m3fn: its long name
ROTATION_BYTES = 512 << 20
BATCHES, CONTEXTS = (1, 64, 256), (512, 2048, 8192)
SWEEP = [  # with both defaults (64 keys for a bf16 cache, 128 for FP8: triton_decode.py)
    DecodeConfig(32, 4),
    DecodeConfig(32, 4, 3),
    DecodeConfig(64, 4),
    DecodeConfig(64, 4, 3),
    DecodeConfig(64, 8),
    DecodeConfig(64, 8, 3),
    DecodeConfig(128, 4),
    DecodeConfig(128, 4, 3),
    DecodeConfig(128, 8),
    DecodeConfig(128, 8, 3),
]
PREFILL_SWEEP = [
    PrefillConfig(128, 64, 4, 3),
    PrefillConfig(64, 128, 4, 3),
    PrefillConfig(64, 64, 4, 4),
]


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 2 GiB device-to-device copy."""
    src = torch.empty(1 << 30, dtype=torch.int16, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def matmul_rate() -> float:
    a = torch.randn((8192, 8192), dtype=DTYPE, device="cuda")
    b = torch.randn((8192, 8192), dtype=DTYPE, device="cuda")
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return 2 * 8192**3 / (ms * 1e-3)


Plan = SplitPlan | BalancedPlan | None


class DecodeProblem:
    """Shuffled pages for `rounds` independent block tables over one cache: row i reads
    lengths[i] keys through a table of `width` pages (entries past its pages unread)."""

    def __init__(
        self,
        lengths: list[int],
        width: int,
        kv_dtype: torch.dtype = DTYPE,
        device: str = "cuda",
        page: int = PAGE,
    ) -> None:
        batch = len(lengths)
        row_pages = torch.tensor([triton.cdiv(n, page) for n in lengths], device=device)
        kv_bytes = 2 * sum(lengths) * KV_HEADS * HEAD_DIM * kv_dtype.itemsize
        self.rounds = max(1, triton.cdiv(ROTATION_BYTES, kv_bytes))
        num_pages = self.rounds * int(row_pages.sum())
        shape = (num_pages, page, KV_HEADS, HEAD_DIM)
        self.k_cache = torch.empty(shape, dtype=DTYPE, device=device).normal_().to(kv_dtype)
        keys_major = keys_major_values(kv_dtype)  # as KVCache lays the pool out
        self.v_cache = allocate_pool(shape, dtype=kv_dtype, device=device, keys_major=keys_major)
        self.v_cache.copy_(torch.empty(shape, dtype=DTYPE, device=device).normal_())
        pages = torch.randperm(num_pages, device=device, dtype=torch.int64).to(torch.int32)
        used = torch.arange(width, device=device)[None, :] < row_pages[:, None]
        self.tables = torch.zeros((self.rounds, batch, width), dtype=torch.int32, device=device)
        self.tables[:, used] = pages.view(self.rounds, -1)
        self.context_lens = torch.tensor(lengths, dtype=torch.int32, device=device)
        self.q = torch.randn((self.rounds, batch, HEADS, HEAD_DIM), device=device).to(DTYPE)
        self.bytes_per_call = kv_bytes + 2 * self.q[0].numel() * DTYPE.itemsize

    @classmethod
    def uniform(cls, batch: int, context: int, kv_dtype: torch.dtype = DTYPE) -> DecodeProblem:
        return cls([context] * batch, triton.cdiv(context, PAGE), kv_dtype)

    def attend(self, i: int, config: DecodeConfig, plan: Plan) -> None:
        args = (self.q[i], self.k_cache, self.v_cache, self.tables[i], self.context_lens)
        paged_decode_attention(*args, HEAD_DIM**-0.5, config, plan)

    def run_round(self, config: DecodeConfig, plan: Plan) -> None:
        for i in range(self.rounds):
            self.attend(i, config, plan)

    def time_per_call_us(self, config: DecodeConfig, plan: Plan = None) -> float:
        self.run_round(config, plan)  # compiles outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.run_round(config, plan)
        times = []
        for _ in range(max(5, 200 // self.rounds)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / self.rounds)
        return statistics.median(times)

    def eager_us(self, config: DecodeConfig) -> float:
        return 1e3 * triton.testing.do_bench(
            lambda: self.attend(0, config, None), warmup=25, rep=100, return_mode="median"
        )


def decode_rows(
    bandwidth: float,
    sweep: bool,
    batches: list[int],
    contexts: list[int],
    kv_dtype: torch.dtype,
    balanced: list[int],
) -> list[str]:
    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for batch in batches:
        for context in contexts:
            problem = DecodeProblem.uniform(batch, context, kv_dtype)
            default, plan = planned(batch, context, kv_dtype, sms)
            us = problem.time_per_call_us(default, plan)
            row = (
                f"decode {KV_NAMES[kv_dtype]} b={batch:<3} ctx={context:<5} "
                f"splits={plan_name(plan):<4} {_rate(problem, us, bandwidth)}  "
                f"eager {problem.eager_us(default):8.1f} us"
            )
            for programs in balanced:
                us = problem.time_per_call_us(default, BalancedPlan(programs))
                row += f"  bal{programs} {us:.1f} us"
            if sweep:
                row += _sweep_cells(problem, batch, context)
            rows.append(row)
            del problem
            torch.cuda.empty_cache()
    return rows


def planned(
    batch: int, max_tokens: int, kv_dtype: torch.dtype, sms: int
) -> tuple[DecodeConfig, SplitPlan | BalancedPlan]:
    """The tiling and schedule paged_decode_attention picks for this shape (decode_plan.py)."""
    config = default_decode_config(DTYPE, kv_dtype, fills_gpu(batch, KV_HEADS, sms))
    return config, plan_decode(batch, KV_HEADS, max_tokens, config, kv_dtype, sms)


def plan_name(plan: SplitPlan | BalancedPlan) -> str:
    if isinstance(plan, BalancedPlan):
        return f"bal{plan.programs_per_sm}"
    return str(plan.num_splits)


def _rate(problem: DecodeProblem, us: float, bandwidth: float) -> str:
    gbs = problem.bytes_per_call / (us * 1e-6) / 1e9
    return f"graph {us:8.1f} us  {gbs:7.0f} GB/s  {gbs * 1e9 / bandwidth:5.1%} of copy"


@dataclass(frozen=True)
class MixedLengths:
    """--lengths mixed: each row's context length drawn (benchmarks/decode_lengths.py) from
    `workload` (input_len, output_len pairs; log-uniform without one), seeded by `seed`, timed
    with the plan's split choice and with each of `splits` forced, rows in each of ORDERS."""

    workload: list[tuple[int, int]] | None
    splits: list[int]
    balanced: list[int]
    seed: int = 0
    configs: tuple[DecodeConfig, ...] = ()  # each plan with each; none: the default only
    orders: tuple[str, ...] = tuple(ORDERS)
    page: int = PAGE  # tokens a page of the cache (--block-size)


def mixed_rows(
    bandwidth: float,
    batches: list[int],
    contexts: list[int],
    kv_dtype: torch.dtype,
    mixed: MixedLengths,
    device: str = "cuda",
) -> list[str]:
    """One line of lengths per (batch, context: the block table's width and the lengths' cap),
    then one per order and split choice; bandwidth from the keys each row reads."""
    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 1
    source = "workload" if mixed.workload else "log-uniform"
    for batch in batches:
        for context in contexts:
            lengths = draw_lengths(mixed.workload, batch, context, mixed.seed)
            width = triton.cdiv(context, mixed.page)
            default, plan = planned(batch, width * mixed.page, kv_dtype, sms)
            label = f"decode-mixed {KV_NAMES[kv_dtype]} b={batch:<3} ctx={context:<5}"
            rows.append(f"{label} {source} {describe(lengths)} page={mixed.page}")
            plans = [(f"plan({plan_name(plan)})", plan)]
            plans += [(str(n), SplitPlan(n)) for n in mixed.splits]
            plans += [(f"bal{n}", BalancedPlan(n)) for n in mixed.balanced]
            for order in mixed.orders:
                problem = DecodeProblem(ORDERS[order](lengths), width, kv_dtype, device, mixed.page)
                for config in mixed.configs or (default,):
                    for name, plan in plans:
                        us = problem.time_per_call_us(config, plan)
                        rows.append(
                            f"{label} order={order:<7} {config.name} splits={name:<8} "
                            f"{_rate(problem, us, bandwidth)}"
                        )
                del problem
                torch.cuda.empty_cache()
    return rows


def _sweep_cells(problem: DecodeProblem, batch: int, context: int) -> str:
    cells = [f"{c.name} {problem.time_per_call_us(c):.1f}" for c in SWEEP]
    no_split = SplitPlan(1)
    default = default_decode_config(DTYPE, problem.k_cache.dtype, fills_gpu=True)
    cells.append(f"nosplit {problem.time_per_call_us(default, no_split):.1f}")
    return "  | " + "  ".join(cells)


def prefill_rows(rate: float, sweep: bool) -> list[str]:
    rows = []
    configs = [default_prefill_config(DTYPE), *(PREFILL_SWEEP if sweep else [])]
    for lengths in ([8192], [256] * 64):
        flops = sum(4 * n * (n + 1) / 2 * HEADS * HEAD_DIM for n in lengths)
        for config in configs:
            ms = _prefill_ms(lengths, config)
            tflops = flops / (ms * 1e-3) / 1e12
            rows.append(
                f"prefill {len(lengths)}x{lengths[0]:<5} m{config.block_m}n{config.block_n}"
                f"w{config.num_warps}s{config.num_stages}  {ms * 1e3:8.1f} us  "
                f"{tflops:6.1f} TFLOP/s  {tflops * 1e12 / rate:5.1%} of matmul"
            )
    return rows


def _prefill_ms(lengths: list[int], config: PrefillConfig) -> float:
    total = sum(lengths)
    q = torch.randn((total, HEADS, HEAD_DIM), device="cuda").to(DTYPE)
    k = torch.randn((total, KV_HEADS, HEAD_DIM), device="cuda").to(DTYPE)
    v = torch.randn((total, KV_HEADS, HEAD_DIM), device="cuda").to(DTYPE)
    cu = torch.tensor([0, *lengths], device="cuda").cumsum(0).to(torch.int32)
    return triton.testing.do_bench(
        lambda: varlen_causal_attention(q, k, v, cu, max(lengths), HEAD_DIM**-0.5, config),
        warmup=25, rep=200, return_mode="median",
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time other kernel configs")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    parser.add_argument("--no-prefill", action="store_true")
    parser.add_argument("--kv-dtype", choices=sorted(KV_DTYPES), default="bf16")
    parser.add_argument(
        "--lengths",
        choices=["uniform", "mixed"],
        default="uniform",
        help="every row at the context, or rows of drawn lengths up to it (decode)",
    )
    parser.add_argument("--workload", type=Path, help="mixed: JSON lines of input/output_len")
    parser.add_argument("--splits", default="1,2,4,8", help="mixed: forced split counts")
    parser.add_argument("--seed", type=int, default=0, help="mixed: seed of the lengths")
    parser.add_argument(
        "--balanced", default="4", help="programs per SM of the balanced kernel, also timed"
    )
    parser.add_argument("--configs", default="", help="mixed: tilings as n64w4s2, comma-separated")
    parser.add_argument("--orders", default=",".join(ORDERS), help="mixed: row orders")
    parser.add_argument("--page", type=int, default=PAGE, help="mixed: tokens a cache page")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    kv_dtype = KV_DTYPES[args.kv_dtype]
    balanced = [int(n) for n in args.balanced.split(",") if n]
    torch.manual_seed(0)
    bandwidth, rate = copy_bandwidth(), matmul_rate()
    if args.lengths == "mixed":
        workload = load_workload(args.workload, None) if args.workload else None
        splits = [int(n) for n in args.splits.split(",") if n]
        configs = tuple(DecodeConfig.parse(name) for name in args.configs.split(",") if name)
        orders = tuple(args.orders.split(","))
        mixed = MixedLengths(workload, splits, balanced, args.seed, configs, orders, args.page)
        decode = mixed_rows(bandwidth, batches, contexts, kv_dtype, mixed)
    else:
        decode = decode_rows(bandwidth, args.sweep, batches, contexts, kv_dtype, balanced)
    rows = [
        f"device {torch.cuda.get_device_name()}  copy {bandwidth / 1e9:.0f} GB/s  "
        f"bf16 matmul {rate / 1e12:.0f} TFLOP/s",
        *decode,
        *([] if args.no_prefill else prefill_rows(rate, args.sweep)),
    ]
    print("\n".join(rows), flush=True)


if __name__ == "__main__":
    main()
