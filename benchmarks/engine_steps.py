"""Engine steps measured straight through the engine, no router: the batch-1 decode step
(with its phases, device and host profiles, and the CUDA graph replayed alone), a join's mixed
step, and one long prompt's prefill."""

from __future__ import annotations

import cProfile
import itertools
import json
import pstats
import random
import statistics
import time

import torch

from benchmarks.timed_requests import exact_length, random_prompt
from shardline import LLM
from shardline.proto import generate_pb2 as pb


def engine_decode_step_ms(llm: LLM, prompt_len: int, new_tokens: int, vocab: int) -> dict:
    """Decode ms/step at batch 1 straight through the engine (no router), each Decode launching
    the next step ahead as the router asks it to, no sync between them: the wall time of the
    first 100 steps over their number, and the mean and median step of the steps after the
    profilers (220 on). Prints the engine's phases, where the device time of 20 steps goes
    (torch profiler), the batch-1 graph replayed alone, and where the host time of 100 steps
    goes (cProfile)."""
    engine = llm._shards.engine
    prompt = random_prompt(prompt_len, random.Random(1), vocab)
    chooser, stopping = exact_length(new_tokens).to_proto(new_tokens)
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
    chooser, stopping = exact_length(new_tokens).to_proto(new_tokens)
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
    """One prompt's prefill straight through the engine: best of 3, then a profiled run; each
    a prompt of its own (the prefix cache would hit a repeated one)."""
    engine = llm._shards.engine
    chooser, stopping = exact_length(1).to_proto(1)

    def once(batch_id: int) -> float:
        prompt = random_prompt(prompt_len, random.Random(batch_id), vocab)
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
