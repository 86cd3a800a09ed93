"""The counters in which a decode call's programs that share a (row, KV head) count themselves
in, so that the last of them merges their partial results (triton_decode.py splits a row's keys,
triton_decode_balanced.py deals a run of tiles that cuts rows): one zeroed buffer per device,
which each merging program resets for the next call. Calls sharing it must not overlap: the
engine runs its passes one after another on one stream (two streams decoding at once on one
device would need a buffer each)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Enough for any decode call the CUDA graphs take (512 rows x their KV heads, with room); a
# larger one merges in a second kernel.
COUNTERS = 1 << 16
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def merge_counters(device: torch.device, needed: int) -> torch.Tensor | None:
    """Zeroed int32 counters, one for each (row, KV head) of a call, the last of its programs
    merging and resetting it: one buffer per device for the process (a captured graph keeps its
    address), made outside a CUDA graph capture; None where `needed` exceeds it or a capture
    comes first."""
    counters = _COUNTERS.get(device)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        counters = _COUNTERS[device] = torch.zeros(COUNTERS, dtype=torch.int32, device=device)
    return counters if needed <= COUNTERS else None


@triton.jit
def last_to_arrive(counter, arrivals):
    """Counts this program in; true for the last of the `arrivals` programs sharing `counter`,
    which resets it for the next call. The barrier, then one release-acquire increment, orders
    every thread's stores before the last program's loads of them."""
    tl.debug_barrier()
    last = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == arrivals - 1
    if last:
        tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
    return last
