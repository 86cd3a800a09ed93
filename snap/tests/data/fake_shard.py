"""A stand-in for `shardline-shard serve` in the launcher's tests: answers gRPC Health on
`{uds-path}-{rank}` and records what it was started with and when it stopped.

FAKE_RECORD_DIR: where `shard-{rank}.json` goes. FAKE_SHARD_CRASH_RANK: that rank prints a few
log lines and exits 3 before serving. FAKE_SHARD_LOAD_S: seconds of "loading" before serving.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc

from shardline.proto import generate_pb2, generate_pb2_grpc


class HealthOnly(generate_pb2_grpc.TextGenerationServiceServicer):
    def Health(self, request, context):
        return generate_pb2.HealthResponse()


def record(path: Path, **fields: object) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(fields)
    path.write_text(json.dumps(data))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    parser.add_argument("model_dir")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--uds-path", required=True)
    args, _ = parser.parse_known_args()
    record_file = Path(os.environ["FAKE_RECORD_DIR"]) / f"shard-{args.rank}.json"
    record(record_file, argv=sys.argv[1:], env=dict(os.environ), pid=os.getpid())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"loading weights rank={args.rank}", flush=True)
    if os.environ.get("FAKE_SHARD_CRASH_RANK") == str(args.rank):
        print("allocating the KV cache", flush=True)
        print("RuntimeError: CUDA out of memory (fake)", flush=True)
        sys.exit(3)
    if stop.wait(float(os.environ.get("FAKE_SHARD_LOAD_S", "0"))):
        return
    socket_path = f"{args.uds_path}-{args.rank}"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    generate_pb2_grpc.add_TextGenerationServiceServicer_to_server(HealthOnly(), server)
    server.add_insecure_port(f"unix://{socket_path}")
    server.start()
    print(f"serving on {socket_path}", flush=True)
    stop.wait()
    server.stop(grace=0).wait()
    Path(socket_path).unlink(missing_ok=True)
    record(record_file, stopped_at=time.time())


if __name__ == "__main__":
    main()
