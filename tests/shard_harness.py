"""Drives a shard the way the router does, and computes transformers' reference outputs."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from aiohttp.test_utils import unused_port

from shardline.proto import generate_pb2 as pb
from shardline.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, seed=0)
# transformers' reference attention: some releases default Gemma 2 to SDPA, which drops its
# logit soft-capping (with a warning) and so is not Gemma 2 any more
EXACT_ATTENTION = {"attn_implementation": "eager"}
# An offline LLM's settings (a small CPU cache) under which requests join running batches, three
# rows at a time, and prompts are prefilled in chunks of 16 tokens beside them.
JOINING_CHUNKED_LLM: dict[str, int] = {
    "block_size": 4,
    "kv_cache_bytes": 1 << 20,
    "max_model_len": 256,
    "max_num_seqs": 3,
    "max_num_batched_tokens": 16,
}


def make_request(
    request_id: int,
    input_ids: list[int],
    max_new_tokens: int,
    params: SamplingParams = GREEDY,
    **fields: object,
) -> pb.Request:
    chooser, stopping = params.to_proto(max_new_tokens)
    return pb.Request(
        id=request_id,
        input_ids=input_ids,
        parameters=chooser,
        stopping_parameters=stopping,
        **fields,
    )


@dataclass
class Arrival:
    step: int
    request: pb.Request


def staggered_arrivals(
    steps: list[int], prompts: list[list[int]], max_new_tokens: list[int]
) -> list[Arrival]:
    """Greedy request i (prompt i, at most max_new_tokens[i] tokens) joining at steps[i]."""
    return [
        Arrival(step, make_request(i, prompt, n))
        for i, (step, prompt, n) in enumerate(zip(steps, prompts, max_new_tokens, strict=True))
    ]


@dataclass
class ScheduleResult:
    tokens: dict[int, list[int]] = field(default_factory=dict)
    finish_reasons: dict[int, int] = field(default_factory=dict)
    max_batch_size: int = 0


def run_schedule(
    prefill: Callable[[pb.PrefillRequest], pb.PrefillResponse],
    decode: Callable[[pb.DecodeRequest], pb.DecodeResponse],
    arrivals: list[Arrival],
    launch_next: bool = False,
    mixed: bool = False,
    chunk: int = 0,
) -> ScheduleResult:
    """Continuous batching as the router does it: new requests join the running batch by a
    prefill at their arrival step, then every cached batch decodes together. `launch_next` asks
    every Prefill and Decode to launch the next step ahead, joins or not (the shard must stay
    exact); with
    `mixed`, a joining prefill carries the running batch, which decodes in the same pass. With
    `chunk`, the joining prompts are prefilled `chunk` tokens a pass (chunked prefill), each
    pass carrying the running batch when `mixed`."""
    result = ScheduleResult()
    pending = sorted(arrivals, key=lambda a: a.step)
    cached: pb.CachedBatch | None = None
    batch_ids = itertools.count(1)
    for step in itertools.count():
        joining = [a.request for a in pending if a.step <= step]
        pending = [a for a in pending if a.step > step]
        batches = [cached] if cached is not None else []
        for requests in prompt_passes(joining, chunk):
            batch = pb.Batch(id=next(batch_ids), requests=requests)
            carried = batches if mixed else []
            request = pb.PrefillRequest(batch=batch, cached_batches=carried)
            request.launch_next = launch_next
            answer = prefill(request)
            _record(result, answer.generations)
            batches = [] if mixed else batches
            if answer.HasField("batch"):
                batches.append(answer.batch)
                result.max_batch_size = max(result.max_batch_size, answer.batch.size)
        if joining and mixed:
            cached = batches[0] if batches else None
            continue
        if batches:
            result.max_batch_size = max(result.max_batch_size, sum(b.size for b in batches))
            answer = decode(pb.DecodeRequest(batches=batches, launch_next=launch_next))
            _record(result, answer.generations)
            cached = answer.batch if answer.HasField("batch") else None
        else:
            cached = None
        if cached is None and not pending:
            return result
    raise AssertionError("unreachable")


def prompt_passes(requests: list[pb.Request], chunk: int) -> list[list[pb.Request]]:
    """The requests of each prefill pass that prefills `requests`, `chunk` prompt tokens of
    each a pass (0: whole prompts in one pass)."""
    if not requests:
        return []
    if not chunk:
        return [requests]
    longest = max(len(request.input_ids) for request in requests)
    passes = []
    for start in range(0, longest, chunk):
        part = [_chunk_of(r, start, chunk) for r in requests if start < len(r.input_ids)]
        passes.append(part)
    return passes


def _chunk_of(request: pb.Request, start: int, chunk: int) -> pb.Request:
    piece = pb.Request()
    piece.CopyFrom(request)
    piece.prefix_len = start
    piece.chunk_len = chunk
    return piece


def _record(result: ScheduleResult, generations) -> None:
    for generation in generations:
        result.tokens.setdefault(generation.request_id, []).extend(generation.tokens.ids)
        if generation.finish_reason != pb.FINISH_REASON_NONE:
            result.finish_reasons[generation.request_id] = generation.finish_reason


def random_prompts(
    count: int, vocab_size: int, seed: int, min_len: int = 3, max_len: int = 40
) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (count,), generator=generator).tolist()
    # Ids below 3 are the tokenizer's special tokens.
    return [torch.randint(3, vocab_size, (n,), generator=generator).tolist() for n in lengths]


def transformers_greedy(
    model_dir: Path, prompts: list[list[int]], max_new_tokens: list[int]
) -> list[list[int]]:
    """transformers' own greedy generate, one prompt at a time, up to and including EOS."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **EXACT_ATTENTION)
    outputs = []
    for prompt, new_tokens in zip(prompts, max_new_tokens, strict=True):
        ids = torch.tensor([prompt])
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False
        )
        outputs.append(out[0, len(prompt) :].tolist())
    eos = set(_as_list(model.generation_config.eos_token_id))
    return [_cut_after_eos(tokens, eos) for tokens in outputs]


def llm_greedy(
    model_dir: Path, prompts: list[list[int]], max_new_tokens: list[int], **llm_args: object
) -> list[list[int]]:
    """Each prompt's greedy tokens from an offline LLM(model_dir, **llm_args) started for this
    call alone and shut down after."""
    from shardline import LLM

    llm = LLM(model=str(model_dir), **llm_args)
    try:
        params = [SamplingParams(temperature=0, max_tokens=n) for n in max_new_tokens]
        outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    finally:
        llm.shutdown()
    return [output.outputs[0].token_ids for output in outputs]


def _as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _cut_after_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    return tokens


def start_shards(
    model_dir: Path, uds_prefix: str, world_size: int, extra_args: list[str] = ()
) -> list[subprocess.Popen]:
    port = unused_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "shardline.shards.cli",
                "serve",
                str(model_dir),
                "--rank",
                str(rank),
                "--world-size",
                str(world_size),
                "--master-port",
                str(port),
                "--uds-path",
                uds_prefix,
                "--kv-cache-bytes",
                str(64 << 20),
                "--block-size",
                "4",
                *extra_args,
            ],
            env=env,
        )
        for rank in range(world_size)
    ]


def wait_for_sockets(
    uds_prefix: str, world_size: int, processes: list[subprocess.Popen], timeout: float = 120
) -> None:
    deadline = time.monotonic() + timeout
    paths = [Path(f"{uds_prefix}-{rank}") for rank in range(world_size)]
    while not all(path.exists() for path in paths):
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"shard exited with {process.returncode} before serving")
        if time.monotonic() > deadline:
            raise TimeoutError("shards did not start serving in time")
        time.sleep(0.2)


def stop_shards(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def leave_process_group() -> None:
    """A spawned test rank's last step: wait for every rank, then tear the group down. A rank
    tearing gloo down while another still closes its side can abort it ("terminate called
    without an active exception", SIGABRT; seen once in CI in test_fp8's two ranks)."""
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
