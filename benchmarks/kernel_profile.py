"""GPU time of a run by kernel class (GEMM, attention, sampling, ...), by kernel and by engine
call kind (prefill, mixed, decode: the calls `StepLog` marks, call_marks.py), from the torch profiler's CUDA
activity (kernels inside CUDA graphs included), and where the GPU sat idle between its kernels
(benchmarks/gpu_idle.py)."""

from __future__ import annotations

import collections
import re
import time
from collections.abc import Callable, Iterable

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.call_marks import (
    MARKER_KERNEL,
    CallMarks,
    idle_by_call,
    kernels_by_call,
    recording,
)
from benchmarks.gpu_idle import gpu_idle

# First match wins; names are cuBLAS/CUTLASS GEMMs, this repository's Triton kernels, torch ops.
KERNEL_CLASSES: tuple[tuple[str, re.Pattern], ...] = (
    (
        "attention",
        re.compile(
            r"paged_decode|balanced_decode|merge_(splits|parts)|varlen_causal|flash|attn", re.I
        ),
    ),
    ("gemm", re.compile(r"gemm|gemv|nvjet|cutlass|xmma|cublas|matmul|sm90_", re.I)),
    (
        "sampling",
        re.compile(r"_chunk_kernel|_merge_kernel|sort|topk|softmax|argmax|multinom", re.I),
    ),
    ("kv write + rotary", re.compile(r"rotate_write_kv|rotary", re.I)),
    ("norm + activation", re.compile(r"rms_norm|silu|norm|act_and_mul|quantize_rows", re.I)),
    ("copies", re.compile(r"memcpy|memset|copy|cat|index|gather|scatter", re.I)),
)


def kernel_class(name: str) -> str:
    return next((label for label, pattern in KERNEL_CLASSES if pattern.search(name)), "other")


def device_kernels(events: Iterable) -> list[tuple[float, float, str]]:
    """(start_us, end_us, name) of the profiler's device events (kernels, copies, memsets),
    not its user-annotation ranges that span them."""
    return [
        (event.time_range.start, event.time_range.end, event.name)
        for event in events
        if event.device_type == torch.autograd.DeviceType.CUDA
        and not getattr(event, "is_user_annotation", False)
    ]


def time_by_call(kernels: list[tuple[float, float, str]], marks: CallMarks) -> dict[str, dict]:
    """Per call kind: the calls, their kernels' GPU seconds and those by kernel class; a kernel
    counts for the call whose marker precedes it (call_marks.py), a decode launched ahead inside
    a call for itself. `markers` says whether every marker launched reached the timeline."""
    kinds: dict[str, dict] = collections.defaultdict(
        lambda: {"calls": 0, "gpu_s": 0.0, "classes_s": {}}
    )
    for kind, calls in marks.calls.items():
        kinds[kind]["calls"] = calls
    for kind, (start, end, name) in kernels_by_call(kernels, marks):
        entry = kinds[kind]
        seconds = (end - start) / 1e6
        entry["gpu_s"] += seconds
        label = kernel_class(name)
        entry["classes_s"][label] = entry["classes_s"].get(label, 0.0) + seconds
    by_call = {
        kind: {
            "calls": entry["calls"],
            "gpu_s": round(entry["gpu_s"], 3),
            "classes_s": {k: round(v, 3) for k, v in sorted(entry["classes_s"].items())},
        }
        for kind, entry in sorted(kinds.items())
    }
    seen = sum(MARKER_KERNEL in name for _, _, name in kernels)
    by_call["markers"] = {"launched": len(marks.kinds), "seen": seen}
    return by_call


def kernel_profile(run: Callable[[], object], top: int = 25) -> dict:
    """Runs `run` under the profiler; GPU seconds per class, the `top` kernels by time, the
    time by engine call kind (time_by_call), and where the GPU sat idle (gpu_idle; by call
    kind: idle_by_call)."""
    torch.cuda.synchronize()
    started = time.perf_counter()
    with recording() as marks, profile(activities=[ProfilerActivity.CUDA]) as prof:
        region_started = time.perf_counter()
        run()
        torch.cuda.synchronize()
        region = time.perf_counter() - region_started
    wall = time.perf_counter() - started
    events = prof.events()
    intervals = device_kernels(events)
    kernels: dict[str, list[float]] = {}
    for start, end, name in intervals:
        if MARKER_KERNEL in name:
            continue
        entry = kernels.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += (end - start) / 1e6  # microseconds
    classes: dict[str, float] = {}
    for name, (_, seconds) in kernels.items():
        label = kernel_class(name)
        classes[label] = classes.get(label, 0.0) + seconds
    busy = sum(classes.values())
    ranked = sorted(kernels.items(), key=lambda item: -item[1][1])[:top]
    return {
        "wall_s": round(wall, 3),
        "gpu_busy_s": round(busy, 3),
        "classes_s": {k: round(v, 3) for k, v in sorted(classes.items(), key=lambda i: -i[1])},
        "top_kernels": [
            {"name": name[:120], "class": kernel_class(name), "calls": n, "s": round(s, 4)}
            for name, (n, s) in ranked
        ],
        "by_call": time_by_call(intervals, marks),
        "gpu_idle": gpu_idle(intervals, region),
        "idle_by_call": idle_by_call(intervals, marks),
    }
