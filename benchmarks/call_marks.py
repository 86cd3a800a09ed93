"""Which engine call launched a kernel, read off the GPU's own timeline.

While a kernel profile records (kernel_profile.py), each engine call, and each decode launched
ahead inside one, launches a one-thread marker kernel where it begins and where it ends
(`StepLog` wraps them in `engine_call`). The stream runs kernels in launch order, so the kernels
between two markers belong to the call the first marker names. (A profiler range around the call
does not reach the GPU's timeline unless the profiler also records the CPU, every operator of
the run: a first try on the H100 found no range there.)
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from contextlib import contextmanager

import torch

MARKER_KERNEL = "spin_kernel"  # torch.cuda._sleep's kernel: one thread, here zero cycles
OUTSIDE = "outside calls"
LAUNCHED_AHEAD = "decode launched ahead"


class CallMarks:
    """The marker kernels one profiled run launched: per marker, the call kind whose kernels
    follow it (the call it opens, or the one a nested call returns to), and the calls per kind."""

    def __init__(self) -> None:
        self.kinds: list[str] = []
        self.calls: collections.Counter[str] = collections.Counter()
        self._open: list[str] = []

    def enter(self, kind: str) -> None:
        self.calls[kind] += 1
        self._open.append(kind)
        self._mark(kind)

    def leave(self) -> None:
        self._open.pop()
        self._mark(self._open[-1] if self._open else OUTSIDE)

    def _mark(self, kind: str) -> None:
        self.kinds.append(kind)
        torch.cuda._sleep(0)


_recording: CallMarks | None = None


@contextmanager
def recording() -> Iterator[CallMarks]:
    """Engine calls inside this launch markers, recorded in the CallMarks it yields (CUDA only)."""
    global _recording
    _recording = CallMarks() if torch.cuda.is_available() else None
    try:
        yield _recording or CallMarks()
    finally:
        _recording = None


@contextmanager
def engine_call(kind: str) -> Iterator[None]:
    """An engine call of `kind`: marked on the GPU's timeline while `recording`, else nothing."""
    marks = _recording
    if marks is None:
        yield
        return
    marks.enter(kind)
    try:
        yield
    finally:
        marks.leave()


def kernels_by_call(
    kernels: list[tuple[float, float, str]], marks: CallMarks
) -> Iterator[tuple[str, tuple[float, float, str]]]:
    """(call kind, kernel) for every kernel but the markers, in the order the GPU ran them."""
    kinds = iter(marks.kinds)
    current = OUTSIDE
    for kernel in sorted(kernels):
        if MARKER_KERNEL in kernel[2]:
            current = next(kinds, current)
        else:
            yield current, kernel


def idle_by_call(
    kernels: list[tuple[float, float, str]], marks: CallMarks
) -> dict[str, dict[str, float]]:
    """Per call kind, the GPU's idle seconds between kernels: `host_s` where the gap ends at a
    call's marker or at its first kernel after one (the device had run out of queued work while
    the host was between calls or preparing one), `within_s` where it falls between two of a
    call's own kernels (launches slower than the kernels, or a wait inside the call); each gap
    counts for the call whose kernel ends it."""
    split: dict[str, dict[str, float]] = collections.defaultdict(
        lambda: {"host_s": 0.0, "within_s": 0.0}
    )
    kinds = iter(marks.kinds)
    current, end, after_marker = OUTSIDE, None, True
    for start, stop, name in sorted(kernels):
        is_marker = MARKER_KERNEL in name
        if is_marker:
            current = next(kinds, current)
        if end is not None and start > end:
            key = "host_s" if is_marker or after_marker else "within_s"
            split[current][key] += (start - end) / 1e6
        after_marker = is_marker
        end = stop if end is None else max(end, stop)
    return {
        kind: {key: round(seconds, 3) for key, seconds in entry.items()}
        for kind, entry in sorted(split.items())
    }
