"""`shardline-shard serve MODEL --rank R --world-size N --uds-path PREFIX`: one shard process."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from shardline.log import configure_logging


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardline-shard")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve one shard of a model over gRPC")
    serve.add_argument("model_id", help="model folder, hub id in the local cache, or GGUF file")
    serve.add_argument("--revision", default=None)
    serve.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)))
    serve.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    serve.add_argument("--master-addr", default=os.environ.get("MASTER_ADDR", "127.0.0.1"))
    serve.add_argument("--master-port", type=int, default=int(os.environ.get("MASTER_PORT", 29500)))
    serve.add_argument("--uds-path", default="/tmp/text-generation-server")
    serve.add_argument(
        "--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"]
    )
    serve.add_argument("--block-size", type=int, default=16)
    serve.add_argument("--kv-cache-bytes", type=int, default=None, help="KV cache size on CPU")
    serve.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    serve.add_argument("--attention", default="auto", help="attention backend: auto, torch, triton")
    serve.add_argument(
        "--cuda-graphs", default=None, help="decode batch sizes to capture, e.g. 1,2,4,8; 0 = off"
    )
    serve.add_argument("--device", default=None, help="override the device, e.g. cpu or cuda:1")
    serve.add_argument("--json-output", action="store_true")
    serve.add_argument("--logger-level", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    configure_logging(args.json_output, args.logger_level, rank=args.rank)
    from shardline.model_files import resolve_model
    from shardline.shards.bootstrap import ShardArgs, create_engine
    from shardline.shards.server import serve

    shard_args = ShardArgs(
        model_dir=Path(resolve_model(args.model_id, args.revision)),
        rank=args.rank,
        world_size=args.world_size,
        master_addr=args.master_addr,
        master_port=args.master_port,
        dtype=args.dtype,
        block_size=args.block_size,
        kv_cache_bytes=args.kv_cache_bytes,
        gpu_memory_utilization=args.gpu_memory_utilization,
        attention=args.attention,
        device=args.device,
        cuda_graphs=args.cuda_graphs,
    )
    engine = create_engine(shard_args)
    asyncio.run(serve(engine, args.uds_path, args.rank))


if __name__ == "__main__":
    main()
