"""Where a GPU sat idle during a profiled region, from its kernels' intervals
(benchmarks/kernel_profile.py): the busy union of kernels that may overlap (several streams),
the idle time between them by gap size, the largest gaps with the kernels either side, and the
kernel pairs around which most idle time of each size class sits."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

# Gap sizes the idle time is split by (upper bounds, microseconds): launch latency between
# queued kernels, host work between a step's kernels, gaps between steps, stalls.
GAP_BUCKETS_US: tuple[tuple[str, float], ...] = (
    ("<20us", 20.0),
    ("20-200us", 200.0),
    ("0.2-2ms", 2000.0),
    (">2ms", math.inf),
)
NAME_CHARS = 60


@dataclass(frozen=True)
class Gap:
    us: float
    at_us: float  # from the first kernel's start
    before: str  # the kernel that ended last before the gap
    after: str  # the kernel that starts it


def merged_gaps(kernels: Iterable[tuple[float, float, str]]) -> tuple[float, float, list[Gap]]:
    """The kernels' (start_us, end_us, name), in any order, merged where they overlap or touch:
    the busy union (us), the span from the first start to the last end (us), and the gaps."""
    ordered = sorted(kernels)
    if not ordered:
        return 0.0, 0.0, []
    first, end, last = ordered[0]
    start, busy, gaps = first, 0.0, []
    for k_start, k_end, name in ordered[1:]:
        if k_start > end:
            busy += end - start
            gaps.append(Gap(k_start - end, end - first, last, name))
            start = k_start
        if k_end > end:
            end, last = k_end, name
    return busy + end - start, end - first, gaps


def gap_buckets(gaps: list[Gap]) -> dict[str, dict[str, float]]:
    """Count and seconds of the gaps in each GAP_BUCKETS_US size class."""
    buckets = {label: {"count": 0, "s": 0.0} for label, _ in GAP_BUCKETS_US}
    for gap in gaps:
        label = next(label for label, upper in GAP_BUCKETS_US if gap.us < upper)
        buckets[label]["count"] += 1
        buckets[label]["s"] += gap.us / 1e6
    return {label: {"count": b["count"], "s": round(b["s"], 4)} for label, b in buckets.items()}


def gap_sites(gaps: list[Gap], top: int = 5) -> dict[str, list[dict]]:
    """Per size class, the `top` (kernel before, kernel after) pairs by idle seconds: where in
    a step the GPU waits (between a graph's last kernel and the sampler's first, say)."""
    sites: dict[str, dict[tuple[str, str], list[float]]] = {
        label: {} for label, _ in GAP_BUCKETS_US
    }
    for gap in gaps:
        label = next(label for label, upper in GAP_BUCKETS_US if gap.us < upper)
        pair = (gap.before[:NAME_CHARS], gap.after[:NAME_CHARS])
        entry = sites[label].setdefault(pair, [0, 0.0])
        entry[0] += 1
        entry[1] += gap.us / 1e6
    return {
        label: [
            {"before": before, "after": after, "count": count, "s": round(seconds, 6)}
            for (before, after), (count, seconds) in sorted(pairs.items(), key=lambda i: -i[1][1])[
                :top
            ]
        ]
        for label, pairs in sites.items()
    }


def gpu_idle(kernels: Iterable[tuple[float, float, str]], region_s: float, top: int = 10) -> dict:
    """The idle time of a region of `region_s` seconds whose device work was `kernels`
    (start_us, end_us, name): in all (the region less the busy union), between kernels (by gap
    size, and where: gap_sites), and before the first kernel plus after the last; the `top`
    largest gaps."""
    busy_us, span_us, gaps = merged_gaps(kernels)
    largest = sorted(gaps, key=lambda gap: -gap.us)[:top]
    return {
        "region_s": round(region_s, 3),
        "busy_union_s": round(busy_us / 1e6, 3),
        "idle_s": round(region_s - busy_us / 1e6, 3),
        "idle_between_kernels_s": round((span_us - busy_us) / 1e6, 3),
        "idle_before_first_after_last_s": round(region_s - span_us / 1e6, 3),
        "gaps": gap_buckets(gaps),
        "gap_sites": gap_sites(gaps),
        "largest_gaps": [
            {
                "us": round(gap.us, 1),
                "at_s": round(gap.at_us / 1e6, 3),
                "before": gap.before[:NAME_CHARS],
                "after": gap.after[:NAME_CHARS],
            }
            for gap in largest
        ],
    }
