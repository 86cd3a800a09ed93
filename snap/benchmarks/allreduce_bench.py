"""All-reduce cost of one decode step's activations over NCCL, eager and inside a CUDA graph.

    python -m benchmarks.allreduce_bench --world-sizes 2,4 --hidden 4096

A Llama decode step all-reduces two [batch, hidden] bf16 tensors per layer (after o_proj and
after down_proj). Prints microseconds per all-reduce for each batch size, eager and replayed
from a captured graph (which also shows that NCCL calls can be captured).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPEATS = 200


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _time_us(fn, repeats: int = REPEATS) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return 1e3 * start.elapsed_time(end) / repeats


def _worker(rank: int, world: int, port: int, hidden: int, batches: list[int]) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    for batch in batches:
        tensor = torch.randn(batch, hidden, dtype=torch.bfloat16, device="cuda")
        eager = _time_us(lambda t=tensor: dist.all_reduce(t))
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            dist.all_reduce(tensor)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            for _ in range(10):
                dist.all_reduce(tensor)
        replay = _time_us(graph.replay, REPEATS // 10) / 10
        if rank == 0:
            print(
                f"world {world} batch {batch:4d} x {hidden}: eager {eager:7.1f} us, "
                f"in a CUDA graph {replay:7.1f} us per all-reduce",
                flush=True,
            )
    torch.cuda.synchronize()
    sys.stdout.flush()
    os._exit(0)  # destroy_process_group() hangs once NCCL calls were captured in a CUDA graph


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--world-sizes", default="2,4")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--batches", default="1,64,256")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    for world in (int(w) for w in args.world_sizes.split(",")):
        if world > torch.cuda.device_count():
            print(f"world {world}: only {torch.cuda.device_count()} GPUs, skipped")
            continue
        mp.spawn(_worker, args=(world, _free_port(), args.hidden, batches), nprocs=world)


if __name__ == "__main__":
    main()
