"""ALiBi (attention with linear biases, BLOOM and some Falcons): no position embedding; each
head adds slope * (key position - query position) to its attention scores.

The slopes are the geometric series of the ALiBi paper (Press et al.), extended for head counts
that are not powers of two as transformers' BLOOM computes them. A rank holds the slopes of its
own heads.
"""

from __future__ import annotations

import math

import torch

from shardline.shards.utils.dist import TPGroup


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """float32 [num_heads]: 2^(-8/n), 2^(-16/n), ... for the largest power of two n <= num_heads,
    then every other slope of the series for 2n for the heads beyond n."""
    power = 2 ** math.floor(math.log2(num_heads))
    slopes = _geometric(power, range(1, power + 1))
    if power != num_heads:
        remaining = min(power, num_heads - power)
        slopes = torch.cat([slopes, _geometric(2 * power, range(1, 1 + 2 * remaining, 2))])
    return slopes


def _geometric(n: int, powers: range) -> torch.Tensor:
    base = torch.tensor(2 ** (-(2 ** -(math.log2(n) - 3))), dtype=torch.float32)
    return torch.pow(base, torch.tensor(list(powers), dtype=torch.int32))


def rank_slopes(slopes: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """This rank's heads' slopes: heads are split evenly and in order over the ranks."""
    per_rank = slopes.shape[0] // tp.world_size
    return slopes[tp.rank * per_rank : (tp.rank + 1) * per_rank].contiguous()
