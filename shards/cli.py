"""`shardline-shard serve MODEL --rank R --world-size N --uds-path PREFIX`: one shard process.

Its settings are ShardConfig's fields (shardline/shard_config.py), one flag each; the rest says
where this process sits: its rank, socket, rendezvous and logging.
"""

from __future__ import annotations

import argparse
import asyncio
import os

from shardline.cluster_token import cluster_token
from shardline.log import configure_logging
from shardline.shard_config import add_config_flags, config_from_flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardline-shard")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve one shard of a model over gRPC")
    add_config_flags(serve)
    # torchrun's variables, when the flags are not given
    serve.set_defaults(world_size=int(os.environ.get("WORLD_SIZE", 1)))
    serve.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)))
    serve.add_argument("--master-addr", default=os.environ.get("MASTER_ADDR", "127.0.0.1"))
    serve.add_argument("--master-port", type=int, default=int(os.environ.get("MASTER_PORT", 29500)))
    serve.add_argument("--uds-path", default="/tmp/text-generation-server")
    serve.add_argument(
        "--grpc-port",
        type=int,
        help="also serve on this TCP port, for a router on another node (needs "
        "SHARDLINE_CLUSTER_TOKEN, which every call must carry)",
    )
    serve.add_argument(
        "--rendezvous-timeout", type=float, help="seconds to wait for the group's other ranks"
    )
    serve.add_argument("--json-output", action="store_true")
    serve.add_argument("--logger-level", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure_logging(args.json_output, args.logger_level, rank=args.rank)
    from shardline.shards.bootstrap import create_engine
    from shardline.shards.server import Listen, serve

    config = config_from_flags(args)
    listen = Listen(args.uds_path, args.rank, args.grpc_port, cluster_token(os.environ))
    listen.check()
    engine = create_engine(
        config, args.rank, args.master_addr, args.master_port, args.rendezvous_timeout
    )
    urls = engine.tp.stage.gather(listen.url(args.master_addr))
    asyncio.run(serve(engine, listen, urls))


if __name__ == "__main__":
    main()
