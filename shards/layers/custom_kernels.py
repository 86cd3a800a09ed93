"""Whether a tensor takes this repository's Triton kernels (norms, SiLU * up, rotary, the one-row
GEMVs and their fused batch-1 path, the sampler's fused choice): on CUDA, unless TGI's
`--disable-custom-kernels` asks for the plain torch path everywhere. The launcher hands that
choice to the shards as TGI does, in the environment variable DISABLE_CUSTOM_KERNELS."""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the launcher reads DISABLE_VARIABLE without importing torch
    import torch

DISABLE_VARIABLE = "DISABLE_CUSTOM_KERNELS"


@functools.cache
def disabled() -> bool:
    return os.environ.get(DISABLE_VARIABLE, "").strip().lower() in ("1", "true")


def applies(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and not disabled()
