"""The benchmark's GPU clock sampling (nvidia-smi stood in for by a script on PATH) and the
floors priced at the run's mean clock."""

import os
import stat
import time

import pytest

from benchmarks.gpu_clocks import (
    ClockSampler,
    clock_rows,
    floors_at_run_clock,
    parse_sample,
    scaled_ceilings,
)
from benchmarks.offline_floor import Call, Ceilings, phase_breakdown, workload_floor
from tests.test_offline_floor import SHAPE_8B, UNIT

HALF_CLOCK = {"mean_sm_mhz": 990, "max_sm_mhz": 1980.0, "min_sm_mhz": 900.0, "samples": 3,
              "mean_power_w": 650, "power_capped_share": 0.5}  # fmt: skip


def test_a_sample_line_parses_and_na_fields_do_not():
    assert parse_sample("1830, 1980, 650.12, Active\n") == parse_sample("1830,1980,650.12,Active")
    sample = parse_sample("1830, 1980, 650.12, Active")
    assert (sample.sm_mhz, sample.max_sm_mhz, sample.power_w, sample.power_capped) == (
        1830.0,
        1980.0,
        650.12,
        True,
    )
    assert not parse_sample("1980, 1980, 120.5, Not Active").power_capped
    assert parse_sample("[N/A], 1980, 70.0, Not Active") is None
    assert parse_sample("Failed to initialize NVML") is None


@pytest.fixture
def fake_smi(tmp_path, monkeypatch):
    """An `nvidia-smi` that prints an idle sample, two busy ones, then waits to be stopped."""
    script = tmp_path / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        "echo '345, 1980, 70.1, Not Active'\n"
        "echo '1980, 1980, 600, Not Active'\n"
        "echo '1500, 1980, 700, Active'\n"
        "echo '[N/A], 1980, 700, Active'\n"
        "exec sleep 30\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")


def test_sampler_summarizes_the_busy_samples(fake_smi):
    with ClockSampler(period_ms=50) as clocks:
        for _ in range(200):  # until the script's lines are read
            if len(clocks.samples) == 3:
                break
            time.sleep(0.01)
    assert clocks.summary() == {
        "samples": 2,  # the idle (parked) sample left out
        "mean_sm_mhz": 1740,
        "min_sm_mhz": 1500.0,
        "max_sm_mhz": 1980.0,
        "mean_power_w": 650,
        "power_capped_share": 0.5,
    }


def test_sampler_without_nvidia_smi_samples_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with ClockSampler() as clocks:
        pass
    assert clocks.summary() is None
    assert clock_rows(None, 1.0)[0][1] == "n/a"


def test_floors_at_half_clock_double_compute_and_keep_bytes():
    assert scaled_ceilings(UNIT, HALF_CLOCK) == Ceilings(matmul_flops=0.5e12, bytes_s=1e12)
    fp8 = Ceilings(matmul_flops=1e12, bytes_s=1e12, linear_flops=2e12)
    assert scaled_ceilings(fp8, HALF_CLOCK).linear_flops == 1e12
    decode = Call("decode", decode_rows=4, prompt_tokens=0, context_tokens=100, prompt_pairs=0,
                  seconds=1.0)  # fmt: skip
    prefill = Call("prefill", decode_rows=0, prompt_tokens=8192, context_tokens=0,
                   prompt_pairs=8192 * 8193 // 2, seconds=1.0)  # fmt: skip
    pairs = [(8192, 5)]
    at_clock = floors_at_run_clock(HALF_CLOCK, SHAPE_8B, pairs, [decode, prefill], 3.0, UNIT)
    full = phase_breakdown([decode, prefill], 3.0, SHAPE_8B, UNIT)
    # the decode step is bound by its weight read (unchanged), the prefill by its FLOPs (x2)
    expected = decode.floor_s(SHAPE_8B, UNIT) + 2 * full["prefill and mixed calls"]["floor_s"]
    assert at_clock["schedule_floor_s"] == pytest.approx(expected, rel=1e-3)
    assert at_clock["workload_floor_s"] > workload_floor(SHAPE_8B, pairs, UNIT)["floor_s"]
    assert "50 % of 3 samples" in clock_rows(at_clock, 3.0)[0][2]
