"""Workload files: JSON lines of {"input_len": ..., "output_len": ...} (the ShareGPT-shaped
1,000 requests), read without the engine's imports (benchmarks/attention_kernels.py needs none)."""

from __future__ import annotations

import json
from pathlib import Path


def load_workload(path: Path, limit: int | None) -> list[tuple[int, int]]:
    pairs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    pairs = [(int(p["input_len"]), int(p["output_len"])) for p in pairs]
    return pairs[:limit] if limit else pairs
