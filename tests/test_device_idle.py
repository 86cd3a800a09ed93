"""The device-idle meter: its arithmetic over passes in stream order, and how it brackets a
runner's passes (CUDA events stood in for by a clock that the fake passes advance)."""

from types import SimpleNamespace

import torch

from benchmarks import device_idle
from benchmarks.device_idle import (
    DeviceIdle,
    Interval,
    busy_against_floors,
    busy_rows,
    idle_rows,
    idle_summary,
)
from benchmarks.offline_floor import Call, Ceilings, ModelShape, rows_band


def test_idle_is_the_time_from_one_pass_end_to_the_next_pass_start():
    intervals = [
        Interval("decode", 0.0, 5.0),
        Interval("decode", 5.2, 10.0),  # waited 0.2 ms for the host
        Interval("prefill", 12.0, 20.0),  # waited 2 ms
        Interval("decode", 19.0, 25.0),  # queued before the prompt pass ended: no wait
    ]
    summary = idle_summary(intervals)
    assert summary["passes"] == 4
    assert summary["busy_s"] == round((5.0 + 4.8 + 8.0 + 6.0) / 1e3, 3)
    assert summary["busy_by_kind_s"] == {"decode": round(15.8 / 1e3, 3), "prefill": 0.008}
    assert summary["idle_s"] == round(2.2 / 1e3, 3)
    assert summary["idle_before_s"] == {"decode": 0.0, "prefill": 0.002}
    assert summary["gaps_over_1_ms"] == 1
    assert idle_rows(summary)[0][:2] == ("device idle between passes s", "0.00")


class _Clock:
    now_ms = 0.0


class _FakeEvent:
    """A timed CUDA event whose time is the fake clock's when recorded."""

    def __init__(self, enable_timing: bool) -> None:
        assert enable_timing
        self.at_ms = None

    def record(self) -> None:
        self.at_ms = _Clock.now_ms

    def elapsed_time(self, other: "_FakeEvent") -> float:
        return other.at_ms - self.at_ms


class _Runner:
    device = torch.device("cuda")

    def decode(self, batch: SimpleNamespace, took_ms: float) -> str:
        _Clock.now_ms += took_ms
        return "decoded"

    def prefill(self, took_ms: float) -> str:
        _Clock.now_ms += took_ms
        return "prefilled"


def test_attached_brackets_each_pass_and_detaches(monkeypatch):
    monkeypatch.setattr(device_idle.torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(device_idle.torch.cuda, "synchronize", lambda: None)
    runner = _Runner()
    with DeviceIdle.attached(SimpleNamespace(runner=runner)) as meter:
        assert runner.prefill(8.0) == "prefilled"
        _Clock.now_ms += 3.0  # the host's turn: the device waits
        assert runner.decode(SimpleNamespace(size=300), 5.0) == "decoded"
        assert runner.decode(SimpleNamespace(size=20), 5.0) == "decoded"
    assert "decode" not in vars(runner) and "prefill" not in vars(runner)  # the class's again
    summary = meter.summary()
    assert summary["passes"] == 3
    assert summary["idle_before_s"] == {"decode": 0.003, "prefill": 0.0}
    assert summary["busy_s"] == 0.018
    assert summary["busy_by_kind_s"] == {"decode": 0.01, "prefill": 0.008}
    assert summary["busy_by_group"] == {
        "decode 256-383": {"passes": 1, "busy_s": 0.005},
        "decode < 32": {"passes": 1, "busy_s": 0.005},
        "prompt passes": {"passes": 1, "busy_s": 0.008},
    }


def test_nothing_is_recorded_off_cuda():
    runner = SimpleNamespace(device=torch.device("cpu"), decode=None, prefill=None)
    with DeviceIdle.attached(SimpleNamespace(runner=runner)) as meter:
        assert runner.decode is None
    assert meter.summary() is None
    with DeviceIdle.attached(None) as meter:  # the shard in its own process
        pass
    assert meter.summary() is None
    assert idle_rows(None) == []


def test_rows_fall_in_bands_whose_edges_start_them():
    bands = [rows_band(rows) for rows in (1, 31, 32, 127, 128, 255, 256, 383, 384, 512)]
    assert bands == [
        "< 32", "< 32", "32-127", "32-127", "128-255", "128-255", "256-383", "256-383",
        "384+", "384+",
    ]  # fmt: skip


def test_each_group_of_passes_meets_the_floor_of_its_calls():
    # one weight read (1 s at 1e12 B/s) is every decode call's floor here: no KV, tiny GEMMs
    shape = ModelShape(1, 1, 1, 1, 0, 10**12, 0)
    unit = Ceilings(matmul_flops=1e15, bytes_s=1e12)
    calls = [
        Call("decode", 100, 0, 0, 0, 0.5),
        Call("decode", 120, 0, 0, 0, 0.5),
        Call("decode", 10, 0, 0, 0, 0.5),
        Call("mixed", 100, 500, 0, 0, 0.5),
    ]
    summary = idle_summary(
        [
            Interval("prefill", 0.0, 1500.0),
            Interval("decode", 1500.0, 2500.0, rows=100),
            Interval("decode", 2500.0, 4500.0, rows=120),  # twice its floor
            Interval("decode", 4500.0, 5500.0, rows=10),
        ]
    )
    against = busy_against_floors(summary, calls, shape, unit)
    assert against["decode 32-127"] == {"passes": 2, "busy_s": 3.0, "calls": 2, "floor_s": 2.0}
    assert against["decode < 32"] == {"passes": 1, "busy_s": 1.0, "calls": 1, "floor_s": 1.0}
    assert against["prompt passes"]["calls"] == 1 and against["prompt passes"]["busy_s"] == 1.5
    rows = dict((name, (value, note)) for name, value, note in busy_rows(against, "here"))
    assert rows["  decode 32-127"] == ("3.00", "2 passes; floor 2.00 s of 2 calls (67 %)")
    assert busy_against_floors(None, calls, shape, unit) is None
    assert busy_rows(None, "here") == []
