"""The GPU's SM clock and power while a run goes, from `nvidia-smi` polling in the background:
an H100 running the offline workload sits at its power cap and lowers its clock (session 11:
a mean of 1,825 of 1,980 MHz in the bf16 run), so a floor priced at a burst's matmul rate
(roofline.device_ceilings, at full clock) asks more of the run than the card then gives;
`scaled_ceilings` prices it at the run's own mean clock instead."""

from __future__ import annotations

import shutil
import statistics
import subprocess
import threading
from dataclasses import dataclass

from benchmarks.offline_floor import Ceilings, ModelShape, phase_breakdown, workload_floor

QUERY = "clocks.sm,clocks.max.sm,power.draw,clocks_throttle_reasons.sw_power_cap"


@dataclass(frozen=True)
class ClockSample:
    sm_mhz: float
    max_sm_mhz: float
    power_w: float
    power_capped: bool


def parse_sample(line: str) -> ClockSample | None:
    """One `--format=csv,noheader,nounits` line of QUERY; None for what does not parse (a
    field nvidia-smi reports as N/A, a warning)."""
    fields = [field.strip() for field in line.split(",")]
    if len(fields) != 4:
        return None
    try:
        sm, max_sm, power = (float(field) for field in fields[:3])
    except ValueError:
        return None
    return ClockSample(sm, max_sm, power, fields[3].lower() == "active")


class ClockSampler:
    """`with ClockSampler() as clocks:` samples device `index` every `period_ms` until the
    block ends; `clocks.summary()` then. Without nvidia-smi it samples nothing."""

    def __init__(self, index: int = 0, period_ms: int = 200) -> None:
        self.samples: list[ClockSample] = []
        self._command = [
            "nvidia-smi",
            f"--query-gpu={QUERY}",
            "--format=csv,noheader,nounits",
            f"--id={index}",
            f"--loop-ms={period_ms}",
        ]
        self._process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> ClockSampler:
        if shutil.which(self._command[0]) is not None:
            self._process = subprocess.Popen(
                self._command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
            )
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=5)
        if self._reader is not None:
            self._reader.join(timeout=5)

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            if (sample := parse_sample(line)) is not None:
                self.samples.append(sample)

    def summary(self) -> dict | None:
        """Mean SM clock and power and the share of samples at the power cap, over the samples
        of a busy GPU (above a quarter of its maximum clock: an idle card parks far lower)."""
        busy = [s for s in self.samples if s.sm_mhz > s.max_sm_mhz / 4]
        if not busy:
            return None
        return {
            "samples": len(busy),
            "mean_sm_mhz": round(statistics.fmean(s.sm_mhz for s in busy)),
            "min_sm_mhz": min(s.sm_mhz for s in busy),
            "max_sm_mhz": busy[0].max_sm_mhz,
            "mean_power_w": round(statistics.fmean(s.power_w for s in busy)),
            "power_capped_share": round(sum(s.power_capped for s in busy) / len(busy), 3),
        }


def scaled_ceilings(ceil: Ceilings, clocks: dict) -> Ceilings:
    """The matmul ceilings at the run's mean SM clock (the burst that measured them ran at the
    maximum); the copy ceiling as it was (HBM keeps its clock under the power cap)."""
    share = clocks["mean_sm_mhz"] / clocks["max_sm_mhz"]
    linear = None if ceil.linear_flops is None else ceil.linear_flops * share
    return Ceilings(ceil.matmul_flops * share, ceil.bytes_s, linear)


def floors_at_run_clock(
    clocks: dict | None, shape: ModelShape, pairs: list, calls: list, wall_s: float, ceil: Ceilings
) -> dict | None:
    """The workload's and the schedule's floors (offline_floor) priced at the run's mean clock."""
    if clocks is None or not calls:
        return None
    at_clock = scaled_ceilings(ceil, clocks)
    phases = phase_breakdown(calls, wall_s, shape, at_clock)
    return {
        "clocks": clocks,
        "workload_floor_s": workload_floor(shape, pairs, at_clock)["floor_s"],
        "schedule_floor_s": round(sum(phase["floor_s"] for phase in phases.values()), 3),
    }


def clock_rows(at_clock: dict | None, wall_s: float) -> list[tuple[str, str, str]]:
    """The table rows of `floors_at_run_clock`: the clock, and each floor against the run."""
    if at_clock is None:
        return [("mean SM clock MHz", "n/a", "no nvidia-smi samples, or no engine calls logged")]
    clocks = at_clock["clocks"]
    schedule = at_clock["schedule_floor_s"]
    return [
        (
            "mean SM clock MHz",
            f"{clocks['mean_sm_mhz']}",
            f"of {clocks['max_sm_mhz']:.0f} (min {clocks['min_sm_mhz']:.0f}); "
            f"{clocks['mean_power_w']} W mean, power-capped in "
            f"{100 * clocks['power_capped_share']:.0f} % of {clocks['samples']} samples",
        ),
        (
            "floors at that clock s",
            f"{schedule:.2f}",
            f"this schedule's (run at {100 * schedule / wall_s:.0f} % of it); the workload's "
            f"{at_clock['workload_floor_s']:.2f}",
        ),
    ]
