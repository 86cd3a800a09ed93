"""Checks of one generation parameter's value, each naming it in its error: what
`SamplingParams` validates with, within the shard protocol's widths (float32, UTF-8 text)."""

from __future__ import annotations

import math
import struct

_MAX_FLOAT32 = struct.unpack("f", struct.pack("I", 0x7F7FFFFF))[0]


class SamplingParamsError(ValueError):
    """A generation parameter is out of range; the message names it."""


def check(ok: bool, name: str, value: object, requirement: str) -> None:
    if not ok:
        raise SamplingParamsError(f"`{name}` {requirement} (got {value!r})")


def as_list(value: object) -> object:
    """None and tuples become lists; anything else is left for validation to judge."""
    if value is None:
        return []
    return list(value) if isinstance(value, tuple) else value


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(
    name: str,
    value: object,
    minimum: int,
    maximum: int | None = None,
    requirement: str | None = None,
) -> None:
    check(is_int(value), name, value, "must be an integer")
    in_range = value >= minimum and (maximum is None or value <= maximum)
    bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    check(in_range, name, value, requirement or f"must be {bounds}")


def as_float32(value: float) -> float:
    """The value the shards receive (a proto float), e.g. 1e300 becomes inf and 1e-300 zero."""
    return struct.unpack("f", struct.pack("f", value))[0]


def check_finite(name: str, value: object) -> None:
    """Finite as a Python number and as the float32 the shards receive."""
    finite = is_number(value) and math.isfinite(value) and abs(value) <= _MAX_FLOAT32
    check(finite, name, value, "must be a finite number (within float32's range)")


def check_text(name: str, text: str) -> None:
    """Text the shard protocol can carry: UTF-8, so no lone surrogate (JSON's "\\ud800")."""
    try:
        text.encode()
    except UnicodeEncodeError as error:
        raise SamplingParamsError(
            f"`{name}` is not valid Unicode: it holds a lone surrogate at position {error.start}"
        ) from error


def check_range(name: str, value: object, low: float, high: float) -> None:
    check_finite(name, value)
    check(low <= value <= high, name, value, f"must be in [{low:g}, {high:g}]")
