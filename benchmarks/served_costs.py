"""Where a served run's time went, from outside the server: the CPU seconds each process under the
launcher spent (the router's one event loop, each shard) and the shard calls the router timed
(TGI's `tgi_batch_inference_duration` and `tgi_batch_forward_duration`, from /metrics).

A router near one CPU-second a second paces the run; the router's wait on its shard calls
against the run's wall says how much of the run the shards were working on a step it asked for.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

# The sums read from /metrics, by (metric, method label).
SHARD_CALL_METRICS = (
    "tgi_batch_inference_duration",
    "tgi_batch_forward_duration",
    "tgi_request_validation_duration",  # tokenization, waits for a tokenizer worker included
)


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _label(pid: int) -> str:
    """The program a process runs: its module (`python -m x`), script (`shardline-router`, run by
    its interpreter) or executable."""
    argv = [word.decode() for word in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    words = [word for word in argv if word]
    if "-m" in words[:-1]:
        return words[words.index("-m") + 1]
    if len(words) > 1 and Path(words[0]).name.startswith("python"):
        return Path(words[1]).name
    return Path(words[0]).name if words else str(pid)


def cpu_seconds(pid: int) -> float:
    """The CPU time of the process's live threads, in nanoseconds' resolution (schedstat; /proc's
    stat counts clock ticks of 10 ms, which a short round can fall within)."""
    total_ns = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total_ns += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):  # a thread that ended meanwhile
            continue
    return total_ns / 1e9


def tree_cpu(root: int) -> dict[str, float]:
    """CPU seconds so far of `root`'s descendants, by "label pid"."""
    seconds, pending = {}, _children(root)
    while pending:
        pid = pending.pop()
        try:
            seconds[f"{_label(pid)} {pid}"] = cpu_seconds(pid)
        except OSError:  # exited meanwhile
            continue
        pending += _children(pid)
    return seconds


async def shard_call_sums(url: str) -> dict[str, float]:
    """`metric method sum` and `metric method count` of SHARD_CALL_METRICS."""
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
        text = await response.text()
    sums = {}
    for family in text_string_to_metric_families(text):
        if family.name not in SHARD_CALL_METRICS:
            continue
        for sample in family.samples:
            kind = sample.name.rsplit("_", 1)[1]
            if kind in ("sum", "count"):
                sums[f"{family.name} {sample.labels.get('method', '')} {kind}"] = sample.value
    return sums


@dataclass
class ServedCosts:
    """Taken before a run; `since` gives what the run spent."""

    root: int
    url: str
    wall: float = 0.0
    cpu: dict[str, float] | None = None
    calls: dict[str, float] | None = None

    async def start(self) -> ServedCosts:
        self.cpu, self.calls = tree_cpu(self.root), await shard_call_sums(self.url)
        self.wall = time.monotonic()
        return self

    async def since(self) -> dict:
        wall = time.monotonic() - self.wall
        cpu_now, calls_now = tree_cpu(self.root), await shard_call_sums(self.url)
        cpu = {
            name: round(seconds - self.cpu.get(name, 0.0), 2) for name, seconds in cpu_now.items()
        }
        calls = {
            name: round(value - self.calls.get(name, 0.0), 3) for name, value in calls_now.items()
        }
        return {
            "wall_s": round(wall, 2),
            "cpu_s": cpu,
            "cpu_share_of_wall": {name: round(s / wall, 2) for name, s in cpu.items()},
            "shard_calls": calls,
        }
