"""`--env`: the runtime facts a bug report needs (versions, devices, relevant variables)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Mapping
from importlib import metadata

from shardline import __version__

_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "grpcio", "aiohttp", "gguf")
_ENV_PREFIXES = ("CUDA_", "NCCL_", "NVSHMEM_", "TORCH_", "HF_", "OMP_", "SHARDLINE_")
_SECRET_MARKERS = ("TOKEN", "KEY", "SECRET", "PASSWORD")


def runtime_environment(environ: Mapping[str, str] | None = None) -> dict[str, object]:
    environ = os.environ if environ is None else environ
    return {
        "shardline": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "gpus": _gpus(),
        "env": {
            name: "<redacted>" if any(m in name for m in _SECRET_MARKERS) else value
            for name, value in sorted(environ.items())
            if name.startswith(_ENV_PREFIXES)
        },
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _gpus() -> list[str]:
    """One `name, memory, driver` line per GPU that nvidia-smi sees; none without it."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    query = "--query-gpu=name,memory.total,driver_version"
    try:
        result = subprocess.run(
            [smi, query, "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return [f"nvidia-smi failed: {error}"]
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]
