"""The rotary embedding's angles and cos/sin scale for every rope scaling kind transformers reads
(`rope_type`: default, linear, dynamic, yarn, llama3, longrope), one row per position.
`scaling` is config.rope_parameters' normalized dict: it names `original_max_position_embeddings`
for every kind but linear, and YaRN's and LongRoPE's `factor`.

Dynamic NTK's frequencies depend on the sequence's length in transformers (the base grows once
a sequence passes its original length): a row takes that length from its own position, as
transformers rotates a token generated one at a time. LongRoPE switches from its short to its
long factors for a sequence longer than `original_max_position_embeddings`, prompt included:
its table holds a row per position with the short factors, then one with the long factors,
and `RotaryEmbedding.rows` picks each token's by its sequence's length in the pass.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


def rope_cos_sin(
    head_dim: int, max_positions: int, base: float, scaling: dict | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_positions, head_dim / 2] (float32) of each position's angles, times
    the kind's attention factor (YaRN, LongRoPE); LongRoPE's are [2 * max_positions, ...], the
    short factors' rows then the long factors'."""
    scaling = scaling or {}
    rope_type = scaling.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope scaling {rope_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    positions = torch.arange(max_positions, dtype=torch.float32)
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    if rope_type == "dynamic":
        inv_freq = _dynamic_frequencies(positions, exponents, base, scaling)
        angles = positions[:, None] * inv_freq
    else:
        inv_freq = _frequencies(rope_type, exponents, base, scaling)
        angles = torch.outer(positions, inv_freq)
    if rope_type == "longrope":
        long = torch.outer(
            positions, _longrope_frequencies(exponents, base, scaling["long_factor"])
        )
        angles = torch.cat([angles, long])
    factor = _attention_factor(rope_type, scaling)
    return angles.cos() * factor, angles.sin() * factor


def scaled_context(max_position_embeddings: int, scaling: dict | None) -> int:
    """The context a scaled rope reaches: linear and dynamic stretch the checkpoint's positions
    by their factor, YaRN its original length by its factor; Llama 3 and LongRoPE checkpoints
    already state theirs."""
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type in ("linear", "dynamic"):
        return int(max_position_embeddings * scaling["factor"])
    if rope_type == "yarn" and scaling.get("factor"):
        original = scaling["original_max_position_embeddings"]
        return max(max_position_embeddings, int(original * scaling["factor"]))
    return max_position_embeddings


def _frequencies(
    rope_type: str, exponents: torch.Tensor, base: float, scaling: dict
) -> torch.Tensor:
    inv_freq = 1.0 / (base**exponents)
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_frequencies(inv_freq, scaling)
    if rope_type == "yarn":
        return _yarn_frequencies(exponents, base, scaling)
    if rope_type == "longrope":
        return _longrope_frequencies(exponents, base, scaling["short_factor"])
    return inv_freq


def _llama3_frequencies(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    ramp = ((original_len / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - ramp) * inv_freq / factor + ramp * inv_freq


def _dynamic_frequencies(
    positions: torch.Tensor, exponents: torch.Tensor, base: float, scaling: dict
) -> torch.Tensor:
    """[positions, head_dim / 2]: NTK-aware base growth once the sequence (position + 1) passes
    the original length."""
    factor = scaling["factor"]
    original = scaling["original_max_position_embeddings"]
    dim = 2 * exponents.shape[0]
    seq_lens = (positions.double() + 1).clamp(min=original)
    bases = base * ((factor * seq_lens / original) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (bases.float()[:, None] ** exponents)


def _yarn_frequencies(exponents: torch.Tensor, base: float, scaling: dict) -> torch.Tensor:
    """YaRN: interpolated (slowed by `factor`) below the low-rotation dimension bound,
    extrapolated (kept) above the high one, a linear ramp between."""
    factor = scaling["factor"]
    dim = 2 * exponents.shape[0]
    original = scaling["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = correction_dim(scaling.get("beta_fast") or 32)
    high = correction_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base**exponents
    extrapolated = 1 - ramp
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolated) + (1.0 / pos_freqs) * extrapolated


def _longrope_frequencies(
    exponents: torch.Tensor, base: float, factors: list[float]
) -> torch.Tensor:
    return 1.0 / (torch.tensor(factors, dtype=torch.float32) * base**exponents)


def _attention_factor(rope_type: str, scaling: dict) -> float:
    """The scale of cos and sin: YaRN's and LongRoPE's softmax temperature, 1 for the rest."""
    if scaling.get("attention_factor") is not None or rope_type not in ("yarn", "longrope"):
        return scaling.get("attention_factor") or 1.0
    if rope_type == "yarn":
        factor = scaling["factor"]
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            return _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        return _yarn_mscale(factor, 1.0)
    factor = scaling["factor"]
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(scaling["original_max_position_embeddings"]))


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0
