"""Load from random word prompts of varied length, through `shardline_client.loadgen`.

    python -m benchmarks.http_load --url http://127.0.0.1:8080 --concurrency 32 --requests 256

`shardline-loadgen` sends one fixed prompt; this sends prompts of 16-256 words (by default) so
prefill lengths vary. Metrics and the printed summary are the library's (vLLM's definitions).
"""

from __future__ import annotations

import argparse
import asyncio
import random

from shardline_client import AsyncClient
from shardline_client.loadgen import LoadReport, print_report, run_load

_WORDS = ["the", "model", "server", "batch", "cache", "token", "stream", "river", "city", "north",
          "south", "paris"]  # fmt: skip


def make_prompts(rng: random.Random, count: int, min_words: int, max_words: int) -> list[str]:
    return [
        " ".join(rng.choice(_WORDS) for _ in range(rng.randint(min_words, max_words)))
        for _ in range(count)
    ]


async def run(args: argparse.Namespace) -> LoadReport:
    rng = random.Random(args.seed)
    prompts = make_prompts(rng, args.requests, args.min_prompt_words, args.max_prompt_words)
    async with AsyncClient(args.url, timeout=args.timeout, max_retries=0) as client:
        return await run_load(
            client,
            prompts,
            args.concurrency,
            max_new_tokens=args.max_new_tokens,
            ignore_eos=args.ignore_eos or None,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--min-prompt-words", type=int, default=16)
    parser.add_argument("--max-prompt-words", type=int, default=256)
    parser.add_argument("--ignore-eos", action="store_true", help="always generate max tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600, help="longest wait for a token, s")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args()
    print_report(asyncio.run(run(args)), args.json)


if __name__ == "__main__":
    main()
