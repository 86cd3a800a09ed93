"""The gRPC contract between router and shards: generated stubs of generate.proto."""

from shardline.proto import generate_pb2, generate_pb2_grpc

# gRPC metadata key: the router numbers every call that changes a shard's state, and each shard
# runs them in that order, so all ranks of a tensor-parallel group see the same order even when
# the router has two calls in flight (a Prefill sent while a Decode runs).
CALL_SEQUENCE_KEY = "shardline-call-sequence"

__all__ = ["CALL_SEQUENCE_KEY", "generate_pb2", "generate_pb2_grpc"]
