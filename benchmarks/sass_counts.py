"""Counts read from a kernel's SASS (`cuobjdump -sass`): the instructions of its key loop and its
register spills. benchmarks/kernel_resources.py prints them for the decode kernels."""

from __future__ import annotations

import re

INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
BRANCH_TARGET = re.compile(r"\bBRA (0x[0-9a-f]+)")


def loop_instructions(sass: str) -> int:
    """The instructions of the widest loop (a backward branch back to its target), which in a
    decode kernel is the key loop; 0 without a loop."""
    lines = [(int(address, 16), text) for address, text in INSTRUCTION.findall(sass)]
    loops = [
        (int(target, 16), address)
        for address, text in lines
        for target in BRANCH_TARGET.findall(text)
        if int(target, 16) < address
    ]
    if not loops:
        return 0
    first, last = max(loops, key=lambda loop: loop[1] - loop[0])
    return sum(first <= address <= last for address, _ in lines)


def spills(sass: str) -> int:
    """Stores to local memory: registers ptxas spilled."""
    return len(re.findall(r"\bSTL(?:\.\w+)*\s", sass))
