"""The gRPC contract between router and shards: generated stubs of generate.proto."""

from shardline.proto import generate_pb2, generate_pb2_grpc

__all__ = ["generate_pb2", "generate_pb2_grpc"]
