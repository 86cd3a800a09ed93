"""Reads a model folder's safetensors so that each rank loads only its slice of each tensor."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from shardline.shards.utils.dist import TPGroup
from shardline.shards.utils.quantization import UnsupportedQuantizationError, WeightFormat

INDEX_FILE = "model.safetensors.index.json"


class Weights:
    def __init__(
        self,
        model_dir: Path,
        *,
        dtype: torch.dtype,
        device: torch.device,
        tp: TPGroup,
        quantization: WeightFormat | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.dtype = dtype
        self.device = device
        self.tp = tp
        self.quantization = quantization  # the linear layers' FP8 format (fp8_weights.py)
        self._file_of = _tensor_files(self.model_dir)
        self._stored_names: dict[str, str] = {}  # a name served under another (serve_as)
        self._handles: dict[Path, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> list[int]:
        return list(self._slice(name).get_shape())

    def get_stored(
        self, name: str, dim: int = 0, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        """Rows [start, stop) along `dim` (default: all of it, a scalar too) in the dtype they
        are stored in, on the device."""
        whole = start == 0 and stop is None
        index = () if whole else (slice(None),) * dim + (slice(start, stop),)
        return self._slice(name)[index].to(self.device).contiguous()

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._cast(name, self._slice(name)[:])

    def get_range(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) along `dim`; only those bytes are read."""
        index = (slice(None),) * dim + (slice(start, stop),)
        return self._cast(name, self._slice(name)[index])

    def get_sharded(self, name: str, dim: int, *, pad: bool = False) -> torch.Tensor:
        """This rank's equal part of `name` along `dim`.

        A size not divisible by the world size is refused, or with `pad` split in parts of
        ceil(size / world_size) with the last ones zero-padded to that size.
        """
        start, stop = self.shard_bounds(name, dim, pad=pad)
        part = self.get_range(name, dim, start, stop)
        missing = -(-self.shape(name)[dim] // self.tp.world_size) - (stop - start)
        if missing:
            pad_shape = list(part.shape)
            pad_shape[dim] = missing
            part = torch.cat([part, part.new_zeros(pad_shape)], dim=dim)
        return part

    def shard_bounds(self, name: str, dim: int, *, pad: bool = False) -> tuple[int, int]:
        """This rank's [start, stop) of `name` along `dim` (see `get_sharded`)."""
        size = self.shape(name)[dim]
        world, rank = self.tp.world_size, self.tp.rank
        if size % world and not pad:
            raise ValueError(
                f"cannot shard {name!r}: dimension {dim} has size {size}, "
                f"not divisible by the tensor-parallel world size {world}"
            )
        block = -(-size // world)
        return min(rank * block, size), min((rank + 1) * block, size)

    def serve_as(self, stored_prefix: str, prefix: str) -> None:
        """Serves every tensor stored under `stored_prefix` under `prefix` too (a multimodal
        checkpoint's language model read as a causal LM's)."""
        for name, path in list(self._file_of.items()):
            if name.startswith(stored_prefix):
                alias = prefix + name.removeprefix(stored_prefix)
                self._file_of[alias] = path
                self._stored_names[alias] = name

    def get_sharded_concat(self, names: Sequence[str], dim: int) -> torch.Tensor:
        """Each tensor's shard, concatenated along `dim` (e.g. gate and up stacked)."""
        return torch.cat([self.get_sharded(name, dim) for name in names], dim=dim)

    def _slice(self, name: str) -> Any:
        path = self._file_of.get(name)
        if path is None:
            raise KeyError(f"tensor {name!r} is missing from the safetensors in {self.model_dir}")
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
        return self._handles[path].get_slice(self._stored_names.get(name, name))

    def _cast(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """`t` in the model's dtype; an FP8 tensor means nothing without its scales, which only
        fp8_weights.read_linear applies."""
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise UnsupportedQuantizationError(
                f"{name} is stored in FP8 but its layer does not load FP8 checkpoints yet"
            )
        dtype = self.dtype if t.is_floating_point() else t.dtype
        return t.to(device=self.device, dtype=dtype).contiguous()


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    index = model_dir / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    file_of: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            file_of.update(dict.fromkeys(f.keys(), path))
    return file_of
