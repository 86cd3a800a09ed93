"""The offline run's batch occupancy over time (issue 27): each engine call's decode rows and
prompt tokens, drawn as an SVG and summarized.

    python -m benchmarks.occupancy --json OFFLINE.json --svg occupancy.svg
        # the calls an `engine_bench --modes offline --json` run on a GPU logged, over wall time
    python -m benchmarks.occupancy --cpu --workload .wheels/sharegpt-shaped-1000.jsonl --svg F
        # the same schedule played on the CPU through LLM's real batcher with a tiny model
        # whose KV cache holds what the 8B's holds on an H100 (--kv-tokens), over step number

The schedule hardly depends on the device: exact output lengths, admission by tokens and steps
(router/paced_admission.py, TGI's join rule), never by time. Only when a request ends relative to the steps
(the pacing looks again as each request's reader wakes) can differ: on the CPU the 1,000
ShareGPT-shaped requests made the same calls of 128 rows and more, band by band, as an H100
run did, and a few dozen calls fewer and more below that.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path

from benchmarks.offline_floor import TAIL_ROWS, Call

PANEL_H, WIDTH, MARGIN = 150, 960, 50


def call_columns(calls: list[Call]) -> dict[str, list]:
    """What the occupancy needs of each call, as columns (for the benchmark's JSON)."""
    return {
        "kind": [c.kind for c in calls],
        "decode_rows": [c.decode_rows for c in calls],
        "prompt_tokens": [c.prompt_tokens for c in calls],
        "seconds": [round(c.seconds, 6) for c in calls],
        "gap_before_s": [round(c.gap_before_s, 6) for c in calls],
    }


def starts(columns: dict[str, list]) -> list[float]:
    """Each call's start, seconds from the first call's."""
    times, now = [], 0.0
    for index, (seconds, gap) in enumerate(zip(columns["seconds"], columns["gap_before_s"])):
        now += gap if index else 0.0
        times.append(now)
        now += seconds
    return times


def summary(columns: dict[str, list], timed: bool) -> dict:
    rows, weights = columns["decode_rows"], columns["seconds"] if timed else None
    weights = weights or [1.0] * len(rows)
    total = sum(weights)

    def share(test) -> float:
        return round(sum(w for r, w in zip(rows, weights) if test(r)) / total, 3)

    return {
        "calls": len(rows),
        "weighted_by": "call seconds" if timed else "calls",
        "mean_decode_rows": round(sum(r * w for r, w in zip(rows, weights)) / total, 1),
        "max_decode_rows": max(rows),
        f"share_under_{TAIL_ROWS}_rows": share(lambda r: r < TAIL_ROWS),
        "share_under_128_rows": share(lambda r: r < 128),
        "prompt_calls": sum(1 for p in columns["prompt_tokens"] if p),
        "prompt_tokens": sum(columns["prompt_tokens"]),
    }


def svg(columns: dict[str, list], x: list[float], x_label: str, title: str) -> str:
    """Two panels over `x`: decode rows per call, then prompt tokens per call."""
    span = max(x[-1], 1e-9)
    panels = [("decode rows", columns["decode_rows"]), ("prompt tokens", columns["prompt_tokens"])]
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" '
        f'height="{2 * PANEL_H + 3 * MARGIN}" font-family="sans-serif" font-size="11">',
        f'<text x="{MARGIN}" y="16">{title}</text>',
    ]
    for panel, (label, values) in enumerate(panels):
        top = MARGIN + panel * (PANEL_H + MARGIN)
        peak = max(max(values), 1)
        points = " ".join(
            f"{MARGIN + (WIDTH - 2 * MARGIN) * t / span:.1f},{top + PANEL_H * (1 - v / peak):.1f}"
            for t, v in zip(x, values)
        )
        parts += [
            f'<rect x="{MARGIN}" y="{top}" width="{WIDTH - 2 * MARGIN}" height="{PANEL_H}" '
            'fill="none" stroke="#999"/>',
            f'<polyline points="{points}" fill="none" stroke="#1f77b4" stroke-width="0.8"/>',
            f'<text x="{MARGIN}" y="{top - 4}">{label} (max {peak})</text>',
        ]
    parts.append(f'<text x="{WIDTH - MARGIN - 160}" y="{2 * PANEL_H + 2 * MARGIN + 20}">'
                 f"{x_label}: 0 to {span:.2f}</text></svg>")  # fmt: skip
    return "\n".join(parts)


def cpu_schedule(workload: Path, kv_tokens: int, max_num_seqs: int) -> dict[str, list]:
    """The offline run's calls, played on the CPU with a tiny Llama (fp32, 512 bytes of KV per
    token) through `timed_run` under the paced scheduling policy, as `engine_bench --modes offline` plays it."""
    from benchmarks.timed_requests import load_workload, make_requests, timed_run
    from shardline import LLM
    from tests.model_factory import TinyModelSpec, build_tiny_model

    spec = TinyModelSpec(num_heads=8, num_kv_heads=4, max_position_embeddings=8192 + 64)
    kv_bytes_per_token = spec.num_layers * 2 * spec.num_kv_heads * 8 * 4
    with tempfile.TemporaryDirectory() as folder:
        model = build_tiny_model(Path(folder) / "tiny", spec)
        llm = LLM(
            model=str(model),
            dtype="float32",
            block_size=16,
            kv_cache_bytes=kv_tokens * kv_bytes_per_token,
            max_model_len=8192 + 64,
            max_num_batched_tokens=8192 + 64,
            max_num_seqs=max_num_seqs,
        )
        try:
            pairs = load_workload(workload, None)
            requests = make_requests(llm, pairs, llm.vocab_size)
            _, _, calls = asyncio.run(timed_run(llm, requests, policy="paced"))
        finally:
            llm.shutdown()
    return call_columns(calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--json", type=Path, help="an engine_bench offline run's --json")
    source.add_argument("--cpu", action="store_true", help="play the schedule on the CPU")
    parser.add_argument("--workload", type=Path)
    parser.add_argument("--kv-tokens", type=int, default=419_000, help="the 8B's on an H100")
    parser.add_argument("--max-num-seqs", type=int, default=512)
    parser.add_argument("--svg", type=Path, required=True)
    args = parser.parse_args()
    if args.cpu:
        columns = cpu_schedule(args.workload, args.kv_tokens, args.max_num_seqs)
        x, x_label, title = list(range(len(columns["kind"]))), "engine call", "CPU schedule"
    else:
        columns = json.loads(args.json.read_text())["offline"]["calls"]
        x, x_label, title = starts(columns), "wall seconds", f"{args.json.name}"
    report = summary(columns, timed=not args.cpu)
    args.svg.write_text(svg(columns, x, x_label, f"{title}: {json.dumps(report)}"))
    print(json.dumps({"occupancy": report}), flush=True)


if __name__ == "__main__":
    main()
