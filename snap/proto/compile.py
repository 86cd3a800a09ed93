"""Regenerate the committed gRPC stubs from generate.proto (`make proto`).

protoc is run over a copy laid out as `shardline/proto/generate.proto`, so the generated
modules import each other as `shardline.proto.*` inside the installed package.
"""

import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILE = "generate.proto"
GENERATED = ("generate_pb2.py", "generate_pb2.pyi", "generate_pb2_grpc.py")


def compile_stubs(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        package_dir = Path(tmp) / "shardline" / "proto"
        package_dir.mkdir(parents=True)
        shutil.copy(PROTO_DIR / PROTO_FILE, package_dir / PROTO_FILE)
        args = [
            "grpc_tools.protoc",
            f"-I{tmp}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"shardline/proto/{PROTO_FILE}",
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on " + PROTO_FILE)
        out_dir.mkdir(parents=True, exist_ok=True)
        return [Path(shutil.copy(package_dir / name, out_dir / name)) for name in GENERATED]


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR
    for path in compile_stubs(target):
        print(f"wrote {path}")
