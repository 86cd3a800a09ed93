from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shardline import LLM
from tests.model_factory import ARCHITECTURES, TinyModelSpec, build_tiny_model

pytest_plugins = ["tests.router_fixtures"]


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny random model folder per architecture, built once per test session."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {
        arch: build_tiny_model(root / arch, TinyModelSpec(architecture=arch, seed=i))
        for i, arch in enumerate(ARCHITECTURES)
    }


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path) -> Iterator[LLM]:
    """The offline LLM on the tiny llama, one per test module; float32 on a GPU too, as the
    transformers references it is compared with."""
    llm = LLM(
        model=str(tiny_llama_dir),
        dtype="float32",
        block_size=4,
        kv_cache_bytes=1 << 20,
        max_model_len=256,
    )
    yield llm
    llm.shutdown()
