"""The GPU-idle arithmetic of benchmarks/kernel_profile.py on synthetic kernel intervals, and
(on CUDA) a host pause in a profiled run found as the largest gap."""

import contextlib
import time
from types import SimpleNamespace

import pytest
import torch

from benchmarks import kernel_profile as kernel_profile_module
from benchmarks.call_marks import LAUNCHED_AHEAD, OUTSIDE, CallMarks, engine_call, idle_by_call
from benchmarks.gpu_idle import Gap, gap_buckets, gpu_idle, merged_gaps
from benchmarks.kernel_profile import device_kernels, kernel_profile, time_by_call


def test_overlapping_and_touching_kernels_merge_into_one_busy_stretch():
    kernels = [
        (100.0, 150.0, "b"),  # inside a
        (0.0, 200.0, "a"),
        (200.0, 260.0, "c"),  # touches a: no gap
        (250.0, 300.0, "d"),  # overlaps c, ends later
        (1300.0, 1310.0, "e"),
    ]
    busy, span, gaps = merged_gaps(kernels)
    assert busy == 310.0
    assert span == 1310.0
    assert gaps == [Gap(1000.0, 300.0, "d", "e")]


def test_the_kernel_before_a_gap_is_the_one_that_ended_last():
    # "long" starts first and ends after "short", which started later: the gap follows "long".
    busy, span, gaps = merged_gaps([(0, 100, "long"), (10, 20, "short"), (130, 140, "next")])
    assert (busy, span) == (110, 140)
    assert gaps == [Gap(30, 100, "long", "next")]


def test_no_kernels():
    assert merged_gaps([]) == (0.0, 0.0, [])
    idle = gpu_idle([], 2.0)
    assert idle["idle_s"] == 2.0 and idle["busy_union_s"] == 0.0 and idle["largest_gaps"] == []


def test_gaps_fall_in_their_size_class():
    gaps = [Gap(us, 0.0, "x", "y") for us in (5, 19.9, 20, 150, 1999, 2000, 2500, 7500)]
    assert gap_buckets(gaps) == {
        "<20us": {"count": 2, "s": pytest.approx(24.9e-6, abs=1e-4)},
        "20-200us": {"count": 2, "s": 0.0002},
        "0.2-2ms": {"count": 1, "s": 0.002},
        ">2ms": {"count": 3, "s": 0.012},
    }


def test_idle_of_a_region_splits_into_between_and_around_the_kernels():
    # 1 s region: kernels from 0.1 s to 0.9 s, busy 0.6 s, a 0.15 s and a 0.05 s gap.
    kernels = [(100_000, 400_000, "gemm"), (550_000, 750_000, "attn"), (800_000, 900_000, "sample")]
    idle = gpu_idle(kernels, 1.0)
    assert idle["region_s"] == 1.0
    assert idle["busy_union_s"] == 0.6
    assert idle["idle_s"] == 0.4
    assert idle["idle_between_kernels_s"] == 0.2
    assert idle["idle_before_first_after_last_s"] == 0.2
    assert idle["gaps"][">2ms"] == {"count": 2, "s": 0.2}
    assert idle["largest_gaps"] == [
        {"us": 150_000.0, "at_s": 0.3, "before": "gemm", "after": "attn"},
        {"us": 50_000.0, "at_s": 0.65, "before": "attn", "after": "sample"},
    ]


def test_the_largest_gaps_come_first_with_names_cut():
    long_name = "k" * 200
    # kernel i ends i us before kernel i + 1 starts: gaps of 1 ... 28 us (0: they touch)
    kernels = [(i * 100.0, i * 100.0 + 100 - i, long_name) for i in range(30)]
    idle = gpu_idle(kernels, 0.01, top=3)
    assert [gap["us"] for gap in idle["largest_gaps"]] == [28.0, 27.0, 26.0]
    assert idle["largest_gaps"][0]["before"] == "k" * 60
    assert idle["gaps"]["<20us"]["count"] == 19 and idle["gaps"]["20-200us"]["count"] == 9


CUDA, CPU = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU


def event(name, device, start, end, annotation=False):
    span = SimpleNamespace(start=start, end=end)
    return SimpleNamespace(
        name=name, device_type=device, time_range=span, is_user_annotation=annotation
    )


def test_device_kernels_keeps_device_events_only():
    events = [
        event("gemm", CUDA, 1.0, 2.0),
        event("cudaLaunchKernel", CPU, 0.5, 0.6),
        event("step", CUDA, 0.0, 9.0, annotation=True),
        event("Memcpy HtoD", CUDA, 3.0, 4.0),
    ]
    assert device_kernels(events) == [(1.0, 2.0, "gemm"), (3.0, 4.0, "Memcpy HtoD")]


def test_kernel_profile_reports_classes_kernels_and_idle(monkeypatch):
    events = [
        event("nvjet_gemm", CUDA, 0.0, 3000.0),
        event("_paged_decode_kernel", CUDA, 3000.0, 4000.0),
        event("nvjet_gemm", CUDA, 9000.0, 12000.0),
        event("cudaGraphLaunch", CPU, 10.0, 20.0),
    ]

    @contextlib.contextmanager
    def fake_profile(activities):
        yield SimpleNamespace(events=lambda: events)

    monkeypatch.setattr(kernel_profile_module, "profile", fake_profile)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    result = kernel_profile(lambda: time.sleep(0.05))
    assert result["gpu_busy_s"] == 0.007
    assert result["classes_s"] == {"gemm": 0.006, "attention": 0.001}
    assert result["top_kernels"][0] == {
        "name": "nvjet_gemm",
        "class": "gemm",
        "calls": 2,
        "s": 0.006,
    }
    idle = result["gpu_idle"]
    assert idle["busy_union_s"] == 0.007 and idle["idle_between_kernels_s"] == 0.005
    assert 0.05 <= idle["region_s"] <= result["wall_s"]
    assert idle["largest_gaps"] == [
        {"us": 5000.0, "at_s": 0.004, "before": "_paged_decode_kernel", "after": "nvjet_gemm"}
    ]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_host_pause_in_a_profiled_run_is_its_largest_gap():
    a = torch.randn((2048, 2048), device="cuda")

    def run() -> None:
        for _ in range(3):
            a @ a
        torch.cuda.synchronize()
        time.sleep(0.02)
        a @ a
        torch.cuda.synchronize()

    profile = kernel_profile(run)
    idle = profile["gpu_idle"]
    gap = idle["largest_gaps"][0]
    assert 19_000 < gap["us"] < 200_000  # microseconds, as the profiler's time ranges
    assert 0 < gap["at_s"] < idle["region_s"] <= profile["wall_s"]
    assert idle["gaps"][">2ms"]["count"] == 1
    assert 0 < idle["busy_union_s"] <= profile["gpu_busy_s"] + 0.001  # kernels of one stream
    assert idle["idle_s"] >= 0.019
    assert idle["idle_s"] == pytest.approx(
        idle["idle_between_kernels_s"] + idle["idle_before_first_after_last_s"], abs=0.002
    )


def test_gap_sites_rank_kernel_pairs_by_idle_time_within_each_size():
    # per step: a 50 us wait graph -> sampler, a 10 us one sampler -> graph; one 3 ms stall
    kernels, t = [], 0.0
    for _ in range(4):
        kernels += [(t, t + 100, "graph_tail"), (t + 150, t + 160, "sampler")]
        t += 170
    kernels.append((t + 3000, t + 3100, "graph_tail"))
    sites = gpu_idle(kernels, 0.1)["gap_sites"]
    assert sites["20-200us"] == [
        {"before": "graph_tail", "after": "sampler", "count": 4, "s": 0.0002}
    ]
    assert sites["<20us"] == [
        {"before": "sampler", "after": "graph_tail", "count": 3, "s": 0.00003}
    ]
    assert sites[">2ms"][0]["count"] == 1 and sites["0.2-2ms"] == []


def test_idle_by_call_tells_the_host_between_calls_from_gaps_inside_one():
    ms = 1000.0
    marks = CallMarks()
    marks.kinds = ["mixed", OUTSIDE, "decode", OUTSIDE]
    spin = "void spin_kernel(long)"
    kernels = [
        (0.0, 1.0, spin),  # a mixed call opens: the host prepares it for ~50 ms
        (50 * ms, 100 * ms, "nvjet_gemm"),
        (130 * ms, 200 * ms, "_varlen_causal_kernel"),  # 30 ms between two of its launches
        (200 * ms, 201 * ms, spin),
        (260 * ms, 261 * ms, spin),  # the decode call opens 59 ms after the device ran dry
        (261 * ms, 300 * ms, "nvjet_gemm"),
        (300 * ms, 301 * ms, spin),
    ]
    assert idle_by_call(list(reversed(kernels)), marks) == {
        "decode": {"host_s": 0.059, "within_s": 0.0},
        "mixed": {"host_s": 0.05, "within_s": 0.03},
    }


def test_time_by_call_counts_each_kernel_for_the_call_whose_marker_precedes_it():
    ms = 1000.0  # the profiler's microseconds
    marks = CallMarks()
    marks.calls.update(["mixed", LAUNCHED_AHEAD, "decode"])
    # a mixed call opens, a decode launched inside it opens and returns to it; a decode call
    marks.kinds = ["mixed", LAUNCHED_AHEAD, "mixed", OUTSIDE, "decode", OUTSIDE]
    kernels = [
        (0.0, 1.0, "void spin_kernel(long)"),
        (0.0, 400 * ms, "nvjet_gemm"),
        (400 * ms, 600 * ms, "_varlen_causal_kernel"),
        (600 * ms, 601 * ms, "void spin_kernel(long)"),
        (601 * ms, 800 * ms, "nvjet_gemm"),
        (800 * ms, 900 * ms, "_paged_decode_kernel"),
        (900 * ms, 901 * ms, "void spin_kernel(long)"),
        (901 * ms, 951 * ms, "_rms_norm_kernel"),  # after the inner call, still the mixed one's
        (960 * ms, 961 * ms, "void spin_kernel(long)"),
        (1000 * ms, 1001 * ms, "void spin_kernel(long)"),
        (1001 * ms, 1301 * ms, "nvjet_gemm"),
        (1400 * ms, 1401 * ms, "void spin_kernel(long)"),
        (2000 * ms, 2100 * ms, "Memcpy DtoH"),  # no call around it
    ]
    by_call = time_by_call(list(reversed(kernels)), marks)  # any order: sorted by start
    assert by_call["mixed"] == {
        "calls": 1,
        "gpu_s": 0.65,
        "classes_s": {"attention": 0.2, "gemm": 0.4, "norm + activation": 0.05},
    }
    assert by_call[LAUNCHED_AHEAD]["classes_s"] == {"attention": 0.1, "gemm": 0.199}
    assert by_call["decode"] == {"calls": 1, "gpu_s": 0.3, "classes_s": {"gemm": 0.3}}
    assert by_call[OUTSIDE] == {"calls": 0, "gpu_s": 0.1, "classes_s": {"copies": 0.1}}
    assert by_call["markers"] == {"launched": 6, "seen": 6}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_an_engine_calls_markers_hold_its_kernels_on_the_gpu_timeline():
    a = torch.randn((8192, 8192), device="cuda")  # ~0.1 s a product: seen at the ms rounding

    def run() -> None:
        with engine_call("prefill"):
            a @ a
            with engine_call(LAUNCHED_AHEAD):
                a @ a
            a @ a
        a @ a
        torch.cuda.synchronize()

    by_call = kernel_profile(run)["by_call"]
    assert by_call["markers"] == {"launched": 4, "seen": 4}
    assert by_call["prefill"]["calls"] == 1 and by_call[LAUNCHED_AHEAD]["calls"] == 1
    assert by_call["prefill"]["classes_s"]["gemm"] > by_call[LAUNCHED_AHEAD]["classes_s"]["gemm"]
    assert by_call[OUTSIDE]["gpu_s"] > 0
