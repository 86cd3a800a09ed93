"""Host-to-device copies that never wait for the device's queued work.

A plain `tensor.to("cuda")` from pageable memory synchronizes with the stream, which would stall
the host behind a decode step launched ahead; staging through pinned memory lets the copy queue
behind that step instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    if tensor.device.type != "cpu" or torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def index_on(rows: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """Row indices as an int64 tensor on `device`."""
    return to_device(torch.tensor(rows, dtype=torch.long), device)
