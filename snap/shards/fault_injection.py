"""Test-only faults: `SHARDLINE_FAULT_INJECT="decode:3"` makes the 3rd Decode raise.

Several faults are comma-separated (`"decode:3,decode:7"`). Without the variable nothing ever
fails and `maybe_fail` costs one dictionary lookup.
"""

from __future__ import annotations

import os
from collections import Counter

ENV_VAR = "SHARDLINE_FAULT_INJECT"


class InjectedFault(RuntimeError):
    """Raised where `SHARDLINE_FAULT_INJECT` asked for a failure."""


def parse_plan(spec: str) -> dict[str, frozenset[int]]:
    """`"decode:3,prefill:1"` -> {"decode": {3}, "prefill": {1}}; a malformed entry is an error."""
    plan: dict[str, set[int]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        method, _, call = item.partition(":")
        if not method or not call.isdigit() or int(call) < 1:
            raise ValueError(f"{ENV_VAR}: expected METHOD:N with N >= 1, got {item!r}")
        plan.setdefault(method, set()).add(int(call))
    return {method: frozenset(calls) for method, calls in plan.items()}


_PLAN = parse_plan(os.environ.get(ENV_VAR, ""))
_calls: Counter[str] = Counter()


def maybe_fail(method: str) -> None:
    """Counts one call of `method`; raises `InjectedFault` on the calls the plan names."""
    failing = _PLAN.get(method)
    if failing is None:
        return
    _calls[method] += 1
    if _calls[method] in failing:
        raise InjectedFault(f"injected fault in {method} call {_calls[method]}")
