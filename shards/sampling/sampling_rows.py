"""One sequence's sampling settings (`RowConfig`, from the request's proto messages) and a batch's
settings as device tensors (`RowTensors`), one value per row, for the sampler's batched ops."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
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


# The settings RowTensors packs, in the order of their rows in `floats` and `ints`, each with
# its value for a row (given the vocabulary size); each reads as a [B] view (`top_p_tail` is
# 1 - top_p, computed in double precision as transformers does; `top_k` is in [1, V], V when off;
# the seed's two 32-bit halves keep the hash in int64).
SettingValue = Callable[[RowConfig, int], float]
FLOAT_SETTINGS: dict[str, SettingValue] = {
    "temperature": lambda r, _: r.temperature,
    "top_p_tail": lambda r, _: 1.0 - r.top_p,
    "min_p": lambda r, _: r.min_p,
    "typical_p": lambda r, _: r.typical_p,
    "repetition_penalty": lambda r, _: r.repetition_penalty,
    "frequency_penalty": lambda r, _: r.frequency_penalty,
    "presence_penalty": lambda r, _: r.presence_penalty,
    "watermark_gamma": lambda r, _: r.watermark_gamma,
    "watermark_delta": lambda r, _: r.watermark_delta,
}
INT_SETTINGS: dict[str, SettingValue] = {
    "sample_flag": lambda r, _: r.sample,
    "top_k": lambda r, vocab_size: r.top_k or vocab_size,
    "seed_low": lambda r, _: r.seed & MASK_32,
    "seed_high": lambda r, _: r.seed >> 32,
    "min_new_tokens": lambda r, _: r.min_new_tokens,
}


class _PackedSetting:
    """A [B] setting: row `index` of the packed tensor `packed`, a view made once an instance
    (kept in its __dict__, which a non-data descriptor defers to, as functools.cached_property)."""

    def __init__(self, name: str, packed: str, index: int) -> None:
        self.name, self.packed, self.index = name, packed, index

    def __get__(self, tensors: RowTensors, owner: type) -> torch.Tensor:
        view = getattr(tensors, self.packed)[self.index]
        tensors.__dict__[self.name] = view
        return view


@dataclass(frozen=True)
class RowTensors:
    """The per-row settings of a batch on the device, one contiguous [B] tensor each: views of
    two packed tensors (`floats` [9, B], `ints` [5, B]), so that a batch's filter and
    concatenation gather and join them on the device instead of rebuilding them from the rows
    (~0.5 ms of host Python for 300 rows)."""

    floats: torch.Tensor  # FLOAT_SETTINGS
    ints: torch.Tensor  # INT_SETTINGS
    min_tokens_ids: torch.Tensor  # [B, S], padded by repeating the row's own first id
    # [B, S] each, only when some row has a logit_bias; a short row is padded with bias 0
    logit_bias_ids: torch.Tensor | None
    logit_bias_values: torch.Tensor | None

    @functools.cached_property
    def sample(self) -> torch.Tensor:
        """[B] bool: the rows that sample (read every step: converted once)."""
        return self.sample_flag.bool()

    @classmethod
    def build(cls, rows: Sequence[RowConfig], vocab_size: int, device: torch.device) -> RowTensors:
        floats, ints = _packed(rows, vocab_size)
        bias_ids, bias_values = _logit_bias([r.logit_bias for r in rows], device)
        return cls(
            # one copy each, transposed first so that every [B] setting is contiguous (Triton reads it)
            floats=to_device(floats.T.contiguous(), device),
            ints=to_device(ints.T.contiguous(), device),
            min_tokens_ids=to_device(_padded_ids([r.min_tokens_ids for r in rows]), device),
            logit_bias_ids=bias_ids,
            logit_bias_values=bias_values,
        )

    def select(self, index: torch.Tensor) -> RowTensors:
        """The rows at `index` (int64, on the device), in that order."""
        has_bias = self.logit_bias_ids is not None
        return RowTensors(
            floats=self.floats.index_select(1, index),
            ints=self.ints.index_select(1, index),
            min_tokens_ids=self.min_tokens_ids.index_select(0, index),
            logit_bias_ids=self.logit_bias_ids.index_select(0, index) if has_bias else None,
            logit_bias_values=self.logit_bias_values.index_select(0, index) if has_bias else None,
        )

    @classmethod
    def concatenate(cls, parts: Sequence[RowTensors]) -> RowTensors:
        """The rows of `parts` end to end (the [B, S] tensors widened to the widest part as
        `build` pads them)."""
        with_bias = [part for part in parts if part.logit_bias_ids is not None]
        bias_ids = bias_values = None
        if with_bias:
            width = max(part.logit_bias_ids.shape[1] for part in with_bias)
            bias_ids = torch.cat([_widened(_bias_ids(part), width) for part in parts])
            bias_values = torch.cat([_zero_widened(_bias_values(part), width) for part in parts])
        width = max(part.min_tokens_ids.shape[1] for part in parts)
        return cls(
            floats=torch.cat([part.floats for part in parts], dim=1),
            ints=torch.cat([part.ints for part in parts], dim=1),
            min_tokens_ids=torch.cat([_widened(part.min_tokens_ids, width) for part in parts]),
            logit_bias_ids=bias_ids,
            logit_bias_values=bias_values,
        )


def _packed(rows: Sequence[RowConfig], vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' float and int settings, [B, 9] and [B, 5] on the host, in FLOAT_SETTINGS' and
    INT_SETTINGS' order."""
    return tuple(
        torch.tensor(
            [[value(r, vocab_size) for value in settings.values()] for r in rows], dtype=dtype
        ).reshape(len(rows), len(settings))
        for settings, dtype in ((FLOAT_SETTINGS, torch.float32), (INT_SETTINGS, torch.int64))
    )


def _declare_settings() -> None:
    """RowTensors.NAME for every name of FLOAT_SETTINGS and INT_SETTINGS."""
    for packed, names in (("floats", FLOAT_SETTINGS), ("ints", INT_SETTINGS)):
        for index, name in enumerate(names):
            setattr(RowTensors, name, _PackedSetting(name, packed, index))


_declare_settings()


def _widened(ids: torch.Tensor, width: int) -> torch.Tensor:
    """[B, S] ids padded to `width` columns as `_padded_ids` pads them: each row's first id."""
    extra = width - ids.shape[1]
    return ids if extra == 0 else torch.cat([ids, ids[:, :1].expand(-1, extra)], dim=1)


def _zero_widened(values: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(values, (0, width - values.shape[1]))


def _bias_ids(part: RowTensors) -> torch.Tensor:
    """A part's biased ids, [B, 1] zeros (as `_padded_ids` gives empty rows) when it has none."""
    if part.logit_bias_ids is not None:
        return part.logit_bias_ids
    return part.ints.new_zeros((part.ints.shape[1], 1))


def _bias_values(part: RowTensors) -> torch.Tensor:
    if part.logit_bias_values is not None:
        return part.logit_bias_values
    return part.floats.new_zeros((part.floats.shape[1], 1))


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
