"""One sequence's sampling settings (`RowConfig`, from the request's proto messages) and a batch's
settings as device tensors (`RowTensors`), one value per row, for the sampler's batched ops."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shardline.proto import generate_pb2
from shardline.sampling_params import GREEDY_TEMPERATURE
from shardline.shards.sampling.counter_hash import MASK_32
from shardline.shards.sampling.watermark import WatermarkSettings
from shardline.shards.utils.transfer import to_device


@dataclass(frozen=True)
class RowConfig:
    """One sequence's settings as the sampler applies them; a greedy row keeps neutral warpers.

    min_new_tokens is 0 when the row has no id to mask (ignore_eos and no stop_token_ids).
    A row without a watermark has watermark_delta 0."""

    sample: bool
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int = 0
    min_new_tokens: int = 0
    min_tokens_ids: tuple[int, ...] = ()
    top_n_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()
    watermark_gamma: float = 0.5
    watermark_delta: float = 0.0

    @classmethod
    def from_proto(
        cls,
        params: generate_pb2.NextTokenChooserParameters,
        stopping: generate_pb2.StoppingCriteriaParameters,
        eos_token_ids: Sequence[int],
        top_n_tokens: int,
        vocab_size: int,
        watermark: WatermarkSettings | None = None,
    ) -> RowConfig:
        """`watermark`: the shard's settings (read from its environment when None)."""
        sample = params.do_sample and params.temperature >= GREEDY_TEMPERATURE
        warpers = {}
        if sample:
            warpers = {
                "temperature": params.temperature,
                "top_k": min(params.top_k, vocab_size),
                "top_p": _unset_as(params.top_p, 1.0),
                "min_p": params.min_p,
                "typical_p": _unset_as(params.typical_p, 1.0),
            }
        masked = [*stopping.stop_token_ids, *([] if stopping.ignore_eos_token else eos_token_ids)]
        masked_ids = tuple(dict.fromkeys(t for t in masked if 0 <= t < vocab_size))
        return cls(
            sample=sample,
            **warpers,
            repetition_penalty=_unset_as(params.repetition_penalty, 1.0),
            frequency_penalty=params.frequency_penalty,
            presence_penalty=params.presence_penalty,
            seed=params.seed,
            min_new_tokens=stopping.min_new_tokens if masked_ids else 0,
            min_tokens_ids=masked_ids,
            top_n_tokens=min(top_n_tokens, vocab_size),
            logit_bias=tuple(sorted(params.logit_bias.items())),
            **_watermark_fields(params, watermark),
        )

    @property
    def repetition(self) -> bool:
        return self.repetition_penalty != 1.0

    @property
    def frequency_presence(self) -> bool:
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def watermark(self) -> bool:
        return self.watermark_delta != 0.0


def _watermark_fields(
    params: generate_pb2.NextTokenChooserParameters, settings: WatermarkSettings | None
) -> dict[str, float]:
    if not params.watermark:
        return {}
    settings = settings or WatermarkSettings.from_env()
    return {"watermark_gamma": settings.gamma, "watermark_delta": settings.delta}


def _unset_as(value: float, neutral: float) -> float:
    """proto3 sends an unset float as 0, never a valid top_p, typical_p or repetition penalty."""
    return value if value != 0.0 else neutral


@dataclass(frozen=True)
class RowTensors:
    """The per-row settings of a batch on the device, one contiguous [B] tensor each."""

    sample: torch.Tensor
    temperature: torch.Tensor
    top_k: torch.Tensor  # in [1, V]; V when off
    top_p_tail: torch.Tensor  # 1 - top_p, computed in double precision as transformers does
    min_p: torch.Tensor
    typical_p: torch.Tensor
    repetition_penalty: torch.Tensor
    frequency_penalty: torch.Tensor
    presence_penalty: torch.Tensor
    seed_low: torch.Tensor  # the seed's two 32-bit halves, so the hash never overflows int64
    seed_high: torch.Tensor
    min_new_tokens: torch.Tensor
    min_tokens_ids: torch.Tensor  # [B, S], padded by repeating the row's own ids
    watermark_gamma: torch.Tensor
    watermark_delta: torch.Tensor
    # [B, S] each, only when some row has a logit_bias; a short row is padded with bias 0
    logit_bias_ids: torch.Tensor | None
    logit_bias_values: torch.Tensor | None

    @classmethod
    def build(cls, rows: Sequence[RowConfig], vocab_size: int, device: torch.device) -> RowTensors:
        floats = torch.tensor(
            [
                [
                    r.temperature,
                    1.0 - r.top_p,
                    r.min_p,
                    r.typical_p,
                    r.repetition_penalty,
                    r.frequency_penalty,
                    r.presence_penalty,
                    r.watermark_gamma,
                    r.watermark_delta,
                ]
                for r in rows
            ],
            dtype=torch.float32,
        ).reshape(len(rows), 9)
        ints = torch.tensor(
            [
                [
                    r.sample,
                    r.top_k or vocab_size,
                    r.seed & MASK_32,
                    r.seed >> 32,
                    r.min_new_tokens,
                ]
                for r in rows
            ],
            dtype=torch.int64,
        ).reshape(len(rows), 5)
        # one copy each, transposed first so that every [B] setting is contiguous (Triton reads it)
        floats, ints = (
            to_device(floats.T.contiguous(), device),
            to_device(ints.T.contiguous(), device),
        )
        temperature, top_p_tail, min_p, typical_p, repetition, frequency, presence = floats[:7]
        bias_ids, bias_values = _logit_bias([r.logit_bias for r in rows], device)
        sample, top_k, seed_low, seed_high, min_new_tokens = ints
        return cls(
            sample=sample.bool(),
            temperature=temperature,
            top_k=top_k,
            top_p_tail=top_p_tail,
            min_p=min_p,
            typical_p=typical_p,
            repetition_penalty=repetition,
            frequency_penalty=frequency,
            presence_penalty=presence,
            seed_low=seed_low,
            seed_high=seed_high,
            min_new_tokens=min_new_tokens,
            min_tokens_ids=to_device(_padded_ids([r.min_tokens_ids for r in rows]), device),
            watermark_gamma=floats[7],
            watermark_delta=floats[8],
            logit_bias_ids=bias_ids,
            logit_bias_values=bias_values,
        )


def _logit_bias(
    biases: Sequence[tuple[tuple[int, float], ...]], device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The biased ids [B, S] and their biases [B, S] of a batch; None, None when no row has any."""
    if not any(biases):
        return None, None
    ids = _padded_ids([[token_id for token_id, _ in bias] for bias in biases])
    width = ids.shape[1]
    values = torch.tensor(
        [[value for _, value in bias] + [0.0] * (width - len(bias)) for bias in biases],
        dtype=torch.float32,
    )
    return to_device(ids, device), to_device(values, device)


def _padded_ids(ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """[B, S] int64; a short row repeats its first id (0 for an empty row)."""
    width = max((len(row) for row in ids), default=0) or 1
    padded = [list(row) + [row[0] if row else 0] * (width - len(row)) for row in ids]
    return torch.tensor(padded, dtype=torch.int64).reshape(len(ids), width)
