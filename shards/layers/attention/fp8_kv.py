"""The FP8 KV cache (`--kv-cache-dtype fp8_e4m3fn|fp8_e5m2`): its dtype and per-layer scales.

The cache holds k / k_scale and v / v_scale in FP8, with per-tensor scales from the checkpoint
(`<attention>.k_scale` and `.v_scale` as llm-compressor writes them, or AutoFP8's
`<attention>.k_proj.output_scale` and `.v_proj.output_scale`) or 1.0, as TGI takes them. The attention kernels only convert what they read to the query's dtype: the scales
are applied around them, exactly (q k = (q k_scale)(k / k_scale); p v = v_scale (p (v / v_scale))):
the query is multiplied by k_scale, the new keys and values are divided before they are written
(and used by the prefill) and the output is multiplied by v_scale. With scales of 1.0, or a
cache in the model's dtype, nothing is added to the forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shardline.shards.utils.weights import Weights

FP8_KV_DTYPES = {
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache's dtype for ShardConfig.kv_cache_dtype `name` ("auto": the model's)."""
    return model_dtype if name == "auto" else FP8_KV_DTYPES[name]


@dataclass(frozen=True)
class KVScales:
    k: float = 1.0
    v: float = 1.0

    @classmethod
    def load(cls, weights: Weights, prefix: str) -> KVScales:
        """The checkpoint's per-tensor scales of one attention layer, 1.0 where it has none."""
        return cls(_scale(weights, prefix, "k"), _scale(weights, prefix, "v"))

    def applies(self, k_cache: torch.Tensor) -> bool:
        return k_cache.element_size() == 1 and (self.k != 1.0 or self.v != 1.0)

    def into_cache(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k and v as attention over the scaled cache takes them (check `applies` first)."""
        return q * self.k, k / self.k, v / self.v

    def out_of_cache(self, out: torch.Tensor) -> torch.Tensor:
        return out * self.v


def _scale(weights: Weights, prefix: str, kind: str) -> float:
    names = (f"{prefix}.{kind}_scale", f"{prefix}.{kind}_proj.output_scale")
    name = next((name for name in names if name in weights), None)
    if name is None:
        return 1.0
    value = float(weights.get_stored(name).float().flatten()[0])
    if not value > 0.0:
        raise ValueError(f"{name} must be a positive scale (got {value})")
    return value
