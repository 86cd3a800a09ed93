"""How long the device waited for the host between the engine's passes, read from CUDA events,
in any run (no profiler): whether a run is paced by the GPU or by the host's Python.

Each pass the model runner launches (a decode step, launched ahead or not, or a prompt pass) is
bracketed by two timed events on its stream. The one before it completes when the stream
reaches it: when the host enqueued the pass, or when the device finished the work before it,
whichever is later. The one after it completes when the pass's kernels (and its sampling) are
done. So from one pass's end to the next pass's start the device had nothing of the engine's to
run: it waited for the host. A pass launched op by op (an eager prompt pass) counts as busy
throughout, its own launch gaps included.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks.offline_floor import Call, Ceilings, ModelShape, rows_band

PASSES = ("decode", "prefill")  # the model runner's methods, each a pass on the device
LONG_GAP_MS = 1.0
PROMPT_PASSES = "prompt passes"  # prefill passes (a mixed call's decode rows ride in them)


@dataclass(frozen=True)
class Interval:
    kind: str
    start_ms: float
    end_ms: float
    rows: int = 0  # a decode pass's batch rows


def pass_group(prompt: bool, decode_rows: int) -> str:
    """The group a pass (or the engine call that launched it) is measured in: the prompt passes,
    or the decode passes of its band of rows."""
    return PROMPT_PASSES if prompt else f"decode {rows_band(decode_rows)}"


def idle_summary(intervals: list[Interval]) -> dict:
    """Busy and idle seconds over passes in stream order: busy by kind of pass, and the idle
    before each kind."""
    kinds = sorted({i.kind for i in intervals})
    busy: dict[str, float] = dict.fromkeys(kinds, 0.0)
    by_group: dict[str, list[float]] = {}
    for interval in intervals:
        took = max(0.0, interval.end_ms - interval.start_ms)
        busy[interval.kind] += took
        group = by_group.setdefault(pass_group(interval.kind != "decode", interval.rows), [0, 0.0])
        group[0] += 1
        group[1] += took
    before: dict[str, float] = dict.fromkeys(kinds, 0.0)
    long_gaps = 0
    for previous, current in zip(intervals, intervals[1:]):
        gap = max(0.0, current.start_ms - previous.end_ms)
        before[current.kind] += gap
        long_gaps += gap > LONG_GAP_MS
    return {
        "passes": len(intervals),
        "busy_s": round(sum(busy.values()) / 1e3, 3),
        "busy_by_kind_s": {kind: round(ms / 1e3, 3) for kind, ms in busy.items()},
        "busy_by_group": {
            group: {"passes": passes, "busy_s": round(ms / 1e3, 3)}
            for group, (passes, ms) in sorted(by_group.items())
        },
        "idle_s": round(sum(before.values()) / 1e3, 3),
        "idle_before_s": {kind: round(ms / 1e3, 3) for kind, ms in before.items()},
        f"gaps_over_{LONG_GAP_MS:g}_ms": long_gaps,
    }


@dataclass
class DeviceIdle:
    """The events of every pass `runner` launched while attached (CUDA only; else nothing)."""

    runner: Any = None
    _events: list[tuple[str, int, torch.cuda.Event, torch.cuda.Event]] = field(default_factory=list)

    @classmethod
    @contextmanager
    def attached(cls, engine: Any) -> Iterator[DeviceIdle]:
        """Brackets the passes of `engine`'s runner (None, or not on CUDA: records nothing)."""
        runner = getattr(engine, "runner", None)
        meter = cls(runner if runner is not None and runner.device.type == "cuda" else None)
        if meter.runner is None:
            yield meter
            return
        for kind in PASSES:
            setattr(meter.runner, kind, meter._bracketed(kind, getattr(meter.runner, kind)))
        try:
            yield meter
        finally:
            for kind in PASSES:
                delattr(meter.runner, kind)

    def _bracketed(self, kind: str, launch: Any) -> Any:
        def bracketed(*args: Any, **kwargs: Any) -> Any:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                return launch(*args, **kwargs)
            finally:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                rows = args[0].size if kind == "decode" else 0  # decode(batch, ...)
                self._events.append((kind, rows, start, end))

        return bracketed

    def summary(self) -> dict | None:
        """None where nothing was recorded (not on CUDA)."""
        if not self._events:
            return None
        torch.cuda.synchronize()
        origin = self._events[0][2]
        return idle_summary(
            [
                Interval(kind, origin.elapsed_time(start), origin.elapsed_time(end), rows)
                for kind, rows, start, end in self._events
            ]
        )


def busy_against_floors(
    summary: dict | None, calls: list[Call], shape: ModelShape, ceil: Ceilings
) -> dict | None:
    """Each group of passes' device-busy seconds against the floor (at `ceil`) of the engine
    calls of that group: the prompt passes against the prefill and mixed calls, the decode
    passes band by band of rows against the decode calls of that band. A pass launched ahead
    and then cut to the rows a smaller call kept counts in its launch's band."""
    if summary is None or not calls:
        return None
    floors: dict[str, list[float]] = {}
    for call in calls:
        group = pass_group(call.prompt_tokens > 0, call.decode_rows)
        floor = floors.setdefault(group, [0, 0.0])
        floor[0] += 1
        floor[1] += call.floor_s(shape, ceil)
    against = {}
    for group, busy in summary["busy_by_group"].items():
        calls_in_group, floor_s = floors.get(group, (0, 0.0))
        against[group] = {**busy, "calls": calls_in_group, "floor_s": round(floor_s, 3)}
    return against


def busy_rows(against: dict | None, priced: str) -> list[tuple[str, str, str]]:
    """`busy_against_floors` as report rows (none without it); `priced`: at which clock."""
    if against is None:
        return []
    rows = [("device busy against the floor s", "", f"by group of passes; floors {priced}")]
    for group, entry in against.items():
        share = f"{100 * entry['floor_s'] / entry['busy_s']:.0f} %" if entry["busy_s"] else "-"
        note = f"{entry['passes']} passes; floor {entry['floor_s']:.2f} s of {entry['calls']} calls ({share})"
        rows.append((f"  {group}", f"{entry['busy_s']:.2f}", note))
    return rows


def idle_rows(summary: dict | None) -> list[tuple[str, str, str]]:
    """The summary as report rows (none without one)."""
    if summary is None:
        return []
    busy = ", ".join(f"{kind} {s:.2f}" for kind, s in summary["busy_by_kind_s"].items())
    before = ", ".join(f"{kind} {s:.2f} s" for kind, s in summary["idle_before_s"].items())
    long_gaps = summary[f"gaps_over_{LONG_GAP_MS:g}_ms"]
    return [
        (
            "device idle between passes s",
            f"{summary['idle_s']:.2f}",
            f"{summary['passes']} passes busy {summary['busy_s']:.2f} s ({busy}); idle before: "
            f"{before}; {long_gaps} gaps over {LONG_GAP_MS:g} ms",
        )
    ]
