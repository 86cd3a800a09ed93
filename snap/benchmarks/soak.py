"""Bounded soak of a running server (loopback only): thousands of mixed requests (generate and
stream, varied lengths and parameters) with random client disconnects and random bad inputs.

At the end it checks that every valid request got a complete answer, every bad one a 4xx with
TGI's error JSON, greedy requests repeated with the same body got the same text, the shards'
free KV blocks equal their total (`shardline_kv_blocks_*` on /metrics), and reports the RSS
growth of the given processes after warm-up and the GPUs' memory in use (nvidia-smi). Prints
one JSON report; exits 1 if a check failed.

    python -m benchmarks.soak --url http://127.0.0.1:3000 --requests 3000 --duration 600 \
        --pids "$(pgrep -d, -f shardline)"
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import aiohttp

WORDS = [
    "the",
    "city",
    "river",
    "model",
    "server",
    "cache",
    "tensor",
    "paged",
    "attention",
    "north",
    "shard",
    "token",
    "batch",
]
JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class SoakConfig:
    url: str
    requests: int = 2000
    duration_s: float = 300.0
    concurrency: int = 16
    disconnect_rate: float = 0.1
    bad_rate: float = 0.1
    max_prompt_words: int = 60
    max_new_tokens: int = 32
    seed: int = 0
    pids: tuple[int, ...] = ()
    warmup_fraction: float = 0.1


@dataclass
class SoakReport:
    sent: int = 0
    valid: int = 0
    complete: int = 0
    bad_inputs: int = 0
    bad_rejected_4xx: int = 0
    disconnects: int = 0
    greedy_mismatches: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    kv_blocks_total: float | None = None
    kv_blocks_free: float | None = None
    kv_blocks_leaked: float | None = None
    rss_mib_after_warmup: dict[int, float] = field(default_factory=dict)
    rss_mib_at_end: dict[int, float] = field(default_factory=dict)
    rss_growth_mib: dict[int, float] = field(default_factory=dict)
    gpu_mib_after_warmup: list[int] = field(default_factory=list)
    gpu_mib_at_end: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            not self.failures
            and self.complete == self.valid
            and self.bad_rejected_4xx == self.bad_inputs
            and self.greedy_mismatches == 0
            and self.kv_blocks_leaked == 0
        )


# ---- what to send ------------------------------------------------------------------------------


def valid_body(rng: random.Random, config: SoakConfig, max_words: int) -> dict:
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, max_words))]
    parameters: dict = {"max_new_tokens": rng.randint(1, config.max_new_tokens)}
    if rng.random() < 0.5:
        parameters.update(do_sample=True, seed=rng.randrange(2**32))
        parameters.update(rng.choice([{}, {"top_k": 5}, {"top_p": 0.9}, {"temperature": 0.7}]))
    if rng.random() < 0.2:
        parameters["repetition_penalty"] = 1.2
    if rng.random() < 0.2:
        parameters["stop"] = [rng.choice(WORDS)]
    parameters["details"] = rng.random() < 0.7
    return {"inputs": " ".join(words), "parameters": parameters}


def bad_request(rng: random.Random, max_input_tokens: int) -> tuple[str, bytes, dict[str, str]]:
    """(path, body, headers) of a request the server must refuse with a 4xx."""
    choices: list[Callable[[], tuple[str, bytes, dict[str, str]]]] = [
        lambda: ("/generate", b'{"inputs": "a", ', JSON),
        lambda: ("/generate", b'{"inputs": "\xff\xfe"}', JSON),
        lambda: ("/generate", json.dumps({"inputs": 3}).encode(), JSON),
        lambda: ("/generate", json.dumps({"inputs": ""}).encode(), JSON),
        lambda: ("/generate", b'{"inputs": "a", "parameters": {"temperature": NaN}}', JSON),
        lambda: ("/generate_stream", _params({"max_new_tokens": -1}), JSON),
        lambda: ("/generate", _params({"top_p": 1.5}), JSON),
        lambda: ("/generate", _params({"stop": ["x"] * 1000}), JSON),
        lambda: ("/generate", _params({"top_k": 2**40}), JSON),
        lambda: ("/generate", json.dumps({"inputs": "a " * (max_input_tokens + 8)}).encode(), JSON),
        lambda: ("/generate", json.dumps({"inputs": "a" * 2_000_100}).encode(), JSON),
        lambda: ("/generate", b"inputs=a", {"Content-Type": "application/x-www-form-urlencoded"}),
        lambda: ("/generate_stream", b"[1, 2]", JSON),
    ]
    return rng.choice(choices)()


def _params(parameters: dict) -> bytes:
    return json.dumps({"inputs": "the city", "parameters": parameters}).encode()


# ---- sending and checking ----------------------------------------------------------------------


class Soak:
    def __init__(self, config: SoakConfig, max_input_tokens: int) -> None:
        self.config = config
        self.max_input_tokens = max_input_tokens
        # a word is at most 4 tokens for the tokenizers soaked so far; long prompts stay valid
        self.max_words = max(1, min(config.max_prompt_words, max_input_tokens // 4))
        self.report = SoakReport()
        self.greedy_texts: dict[str, str] = {}

    async def one(self, session: aiohttp.ClientSession, rng: random.Random) -> None:
        self.report.sent += 1
        roll = rng.random()
        if roll < self.config.bad_rate:
            await self._bad(session, *bad_request(rng, self.max_input_tokens))
        elif roll < self.config.bad_rate + self.config.disconnect_rate:
            await self._disconnect(session, rng, valid_body(rng, self.config, self.max_words))
        else:
            await self._valid(
                session, rng.random() < 0.5, valid_body(rng, self.config, self.max_words)
            )

    async def _bad(self, session, path: str, body: bytes, headers: dict[str, str]) -> None:
        self.report.bad_inputs += 1
        async with session.post(self._url(path), data=body, headers=headers) as answer:
            self._count(answer.status)
            error = await answer.json(content_type=None)
            if 400 <= answer.status < 500 and set(error) == {"error", "error_type"}:
                self.report.bad_rejected_4xx += 1
            else:
                self._fail(f"bad input to {path} got {answer.status}: {error}")

    async def _disconnect(self, session, rng: random.Random, body: dict) -> None:
        self.report.disconnects += 1
        path = rng.choice(["/generate", "/generate_stream"])
        try:
            async with session.post(self._url(path), json=body) as answer:
                if path == "/generate_stream":
                    await answer.content.readuntil(b"\n\n")
                answer.close()
        except asyncio.TimeoutError:
            return
        except aiohttp.ClientError:
            return

    async def _valid(self, session, stream: bool, body: dict) -> None:
        self.report.valid += 1
        path = "/generate_stream" if stream else "/generate"
        async with session.post(self._url(path), json=body) as answer:
            self._count(answer.status)
            if answer.status != 200:
                self._fail(f"{path} got {answer.status}: {await answer.text()}")
                return
            raw = await answer.read()
        text = _stream_text(raw) if stream else json.loads(raw).get("generated_text")
        if not isinstance(text, str):
            self._fail(f"{path} gave an incomplete answer: {raw[-300:]!r}")
            return
        self.report.complete += 1
        if not body["parameters"].get("do_sample"):
            self._check_greedy(body, text)

    def _check_greedy(self, body: dict, text: str) -> None:
        parameters = {k: v for k, v in body["parameters"].items() if k != "details"}
        key = json.dumps([body["inputs"], parameters], sort_keys=True)
        if self.greedy_texts.setdefault(key, text) != text:
            self.report.greedy_mismatches += 1

    def _url(self, path: str) -> str:
        return self.config.url.rstrip("/") + path

    def _count(self, status: int) -> None:
        self.report.statuses[str(status)] = self.report.statuses.get(str(status), 0) + 1

    def _fail(self, message: str) -> None:
        if len(self.report.failures) < 20:
            self.report.failures.append(message)


def _stream_text(raw: bytes) -> str | None:
    """The final `generated_text` of an SSE answer; None if it was cut or ended in an error."""
    events = [json.loads(chunk[5:]) for chunk in raw.split(b"\n\n") if chunk.startswith(b"data:")]
    if not events or "error" in events[-1]:
        return None
    indexes = [event["index"] for event in events]
    if indexes != list(range(1, len(events) + 1)):
        return None
    return events[-1]["generated_text"]


# ---- the run -----------------------------------------------------------------------------------


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    address = ipaddress.ip_address(socket.gethostbyname(host))
    if not address.is_loopback:
        raise SystemExit(f"soak only runs against a loopback server, not {host} ({address})")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def gpu_used_mib() -> list[int]:
    """Memory in use on each GPU (nvidia-smi), empty where there is none."""
    if shutil.which("nvidia-smi") is None:
        return []
    query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
    answer = subprocess.run(query, capture_output=True, text=True, check=False)
    return [int(line) for line in answer.stdout.split() if line.strip().isdigit()]


async def metrics(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(url.rstrip("/") + "/metrics") as answer:
        text = await answer.text()
    samples = (line.rsplit(" ", 1) for line in text.splitlines() if line and line[0] != "#")
    return {name: float(value) for name, value in samples}


async def wait_for_free_blocks(session, config: SoakConfig, report: SoakReport) -> None:
    """Polls /metrics until nothing runs or waits and every block is free (30 s at most)."""
    deadline = time.monotonic() + 30
    while True:
        sample = await metrics(session, config.url)
        total, free = sample["shardline_kv_blocks_total"], sample["shardline_kv_blocks_free"]
        idle = sample["tgi_batch_current_size"] == 0 and sample["tgi_queue_size"] == 0
        if (idle and free == total) or time.monotonic() > deadline:
            report.kv_blocks_total, report.kv_blocks_free = total, free
            report.kv_blocks_leaked = total - free
            return
        await asyncio.sleep(0.2)


async def soak(config: SoakConfig) -> SoakReport:
    check_loopback(config.url)
    rng = random.Random(config.seed)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(config.url.rstrip("/") + "/info") as answer:
            info = await answer.json()
        run = Soak(config, info["max_input_tokens"])
        started = time.monotonic()
        await _send_all(session, run, rng, started)
        await wait_for_free_blocks(session, config, run.report)
    report = run.report
    report.seconds = round(time.monotonic() - started, 1)
    report.rss_mib_at_end = {pid: rss_mib(pid) for pid in config.pids}
    report.gpu_mib_at_end = gpu_used_mib()
    report.rss_growth_mib = {
        pid: round(report.rss_mib_at_end[pid] - report.rss_mib_after_warmup.get(pid, 0.0), 1)
        for pid in config.pids
    }
    return report


async def _send_all(session, run: Soak, rng: random.Random, started: float) -> None:
    config = run.config
    seeds = iter(range(config.requests))
    warmup_after = max(1, int(config.requests * config.warmup_fraction))

    async def worker() -> None:
        for index in seeds:
            if time.monotonic() - started > config.duration_s:
                return
            await run.one(session, random.Random(rng.random() + index))
            if index == warmup_after:
                run.report.rss_mib_after_warmup = {pid: rss_mib(pid) for pid in config.pids}
                run.report.gpu_mib_after_warmup = gpu_used_mib()

    await asyncio.gather(*(worker() for _ in range(config.concurrency)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--duration", type=float, default=300.0, help="seconds, at most")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--disconnect-rate", type=float, default=0.1)
    parser.add_argument("--bad-rate", type=float, default=0.1)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pids", default="", help="comma-separated pids whose RSS is tracked")
    args = parser.parse_args(argv)
    config = SoakConfig(
        url=args.url,
        requests=args.requests,
        duration_s=args.duration,
        concurrency=args.concurrency,
        disconnect_rate=args.disconnect_rate,
        bad_rate=args.bad_rate,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        pids=tuple(int(pid) for pid in args.pids.split(",") if pid),
    )
    report = asyncio.run(soak(config))
    print(json.dumps({**asdict(report), "ok": report.ok}, indent=2))
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
