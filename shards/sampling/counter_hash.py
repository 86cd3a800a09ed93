"""A counter-based 32-bit hash on integer tensors: the sampler's seeded noise and the watermark's
green lists are pure functions of (seed, step, token) built from it, on any device."""

from __future__ import annotations

import torch

MASK_32 = 0xFFFFFFFF


def pcg_hash(values: torch.Tensor) -> torch.Tensor:
    """The PCG RXS-M-XS 32-bit hash (Jarzynski and Olano, "Hash Functions for GPU Rendering") of
    int64 tensors holding values in [0, 2^32). Both multipliers are below 2^31, so no product
    reaches 2^63: int64 arithmetic is exact, on every device."""
    state = (values * 747796405).add_(2891336453).bitwise_and_(MASK_32)
    word = (state >> (state >> 28).add_(4)).bitwise_xor_(state)
    word.mul_(277803737).bitwise_and_(MASK_32)
    return (word >> 22).bitwise_xor_(word)
