"""The committed gRPC stubs are what `make proto` generates from generate.proto now."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

PROTO_DIR = Path(__file__).resolve().parents[1] / "proto"


def _compile_module():
    spec = importlib.util.spec_from_file_location("proto_compile", PROTO_DIR / "compile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools missing")
def test_committed_stubs_are_current(tmp_path: Path):
    compile_module = _compile_module()
    for generated in compile_module.compile_stubs(tmp_path):
        committed = PROTO_DIR / generated.name
        assert committed.read_text() == generated.read_text(), (
            f"{committed.name} is stale: run `make proto` and commit the result"
        )


def test_stubs_import_as_package_modules():
    from shardline.proto import generate_pb2, generate_pb2_grpc

    assert generate_pb2_grpc.TextGenerationServiceStub
    assert generate_pb2.Request(id=1, input_ids=[1, 2]).input_ids == [1, 2]
