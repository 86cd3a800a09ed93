"""Programmatic dependent launch (PDL, Hopper and later) for the Triton kernels of a forward pass.

A kernel launched with PDL may start while the kernel before it on the stream still runs: it
first lets its own dependents launch (`allow_dependents`), loads what does not depend on the
kernels before it (weights), then waits for them (`wait_for_inputs`) before it reads its inputs
or writes anything. Under a CUDA graph the weight reads of one kernel thus overlap the tail of
the previous one, which is most of a small decode step's time. Every kernel launched with PDL
must wait before touching activations; without the launch attribute both calls do nothing.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@functools.cache
def _supported(device_index: int) -> bool:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


# PDL pays where kernels are short and launch-bound: the steps of a few rows. Larger launches
# keep plain stream order (the large-batch steps were measured without it).
PDL_MAX_ROWS = 8


def pdl_launch(device: torch.device, rows: int) -> dict[str, bool]:
    """The launch arguments of a kernel taking `USE_PDL` over `rows` tokens (or sequences): PDL
    on where the device has it and the launch is small."""
    if device.type != "cuda" or rows > PDL_MAX_ROWS:
        return {"USE_PDL": False}
    index = device.index if device.index is not None else torch.cuda.current_device()
    if _supported(index):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}


@triton.jit
def allow_dependents(USE_PDL: tl.constexpr):
    if USE_PDL:
        gdc_launch_dependents()


@triton.jit
def wait_for_inputs(USE_PDL: tl.constexpr):
    if USE_PDL:
        gdc_wait()
