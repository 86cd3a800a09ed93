"""A py-spy raw profile (`py-spy record --format raw`) summed by function: for each thread, the
samples it held and its functions by own samples and by samples under them.

    python -m benchmarks.spy_summary PROFILE [TOP]
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict


def read_stacks(path: str) -> list[tuple[list[str], int]]:
    """Each sampled stack (outermost frame first) with its count."""
    stacks = []
    with open(path) as lines:
        for line in lines:
            stack, _, count = line.rstrip().rpartition(" ")
            if stack:
                stacks.append((stack.split(";"), int(count)))
    return stacks


def summarize(stacks: list[tuple[list[str], int]]) -> dict[str, tuple[int, Counter, Counter]]:
    """Per thread (its outermost frame): samples, own samples and samples under each function."""
    threads: dict[str, tuple[list[int], Counter, Counter]] = defaultdict(
        lambda: ([0], Counter(), Counter())
    )
    for frames, count in stacks:
        total, own, under = threads[frames[0]]
        total[0] += count
        own[frames[-1]] += count
        for frame in set(frames):
            under[frame] += count
    return {name: (total[0], own, under) for name, (total, own, under) in threads.items()}


def main() -> None:
    path, top = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 30
    summary = summarize(read_stacks(path))
    for thread, (total, own, under) in sorted(summary.items(), key=lambda kv: -kv[1][0]):
        print(f"== {thread}: {total} samples")
        for title, counter in (("own", own), ("under", under)):
            print(f"  -- by {title} samples")
            for frame, count in counter.most_common(top):
                print(f"  {count:7d} {100 * count / total:5.1f} %  {frame[:150]}")


if __name__ == "__main__":
    main()
