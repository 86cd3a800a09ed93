"""Is a child ready: a shard answers gRPC `Health` on its socket, the router `GET /health`."""

from __future__ import annotations

import http.client
import os

import grpc

from shardline.cluster_token import METADATA_KEY
from shardline.proto import generate_pb2, generate_pb2_grpc

_PROBE_TIMEOUT_S = 2.0
_WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def shard_is_healthy(socket_path: str) -> bool:
    return os.path.exists(socket_path) and shard_answers(f"unix://{socket_path}")


def shard_answers(target: str, token: str | None = None) -> bool:
    """Whether the shard at gRPC `target` answers Health (with the cluster token, over TCP)."""
    metadata = () if token is None else ((METADATA_KEY, token),)
    with grpc.insecure_channel(target) as channel:
        stub = generate_pb2_grpc.TextGenerationServiceStub(channel)
        try:
            stub.Health(generate_pb2.HealthRequest(), timeout=_PROBE_TIMEOUT_S, metadata=metadata)
        except grpc.RpcError:
            return False
    return True


def connect_host(hostname: str) -> str:
    """Where to reach a server listening on `hostname` from this machine."""
    return _WILDCARD_HOSTS.get(hostname, hostname)


def router_is_healthy(hostname: str, port: int) -> bool:
    connection = http.client.HTTPConnection(connect_host(hostname), port, timeout=_PROBE_TIMEOUT_S)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()
