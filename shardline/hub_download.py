"""Downloads the files a model is served from (safetensors weights, config, tokenizer) from the
Hugging Face hub into its local cache, as TGI's `download-weights` step does.

`huggingface_hub` does the work and reads its usual environment: HF_ENDPOINT, HF_TOKEN (or the
older HUGGING_FACE_HUB_TOKEN), HF_HOME / HF_HUB_CACHE / HUGGINGFACE_HUB_CACHE, HF_HUB_OFFLINE. A
model already in the cache is served from it when the hub cannot be reached. Every failure becomes
one `HubDownloadError` whose message says what went wrong and what to do.
"""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path
from typing import Any

from huggingface_hub import constants, get_cached_repo_tree, snapshot_download
from huggingface_hub.errors import (
    CachedRepoTreeNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import tqdm as hub_tqdm

logger = logging.getLogger(__name__)

SERVING_FILES = [
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
]
_SUBFOLDERS = ["*/*"]  # the loader reads the top folder only (skips e.g. onnx/, original/)
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".msgpack", ".h5")
_TRANSFER_BAR = "huggingface_hub.snapshot_download.transfer"  # the same bytes as the main bar


class HubDownloadError(Exception):
    """The model could not be had from the hub; the message is one line."""


def download_model(
    repo_id: str,
    revision: str | None = None,
    *,
    cache_dir: str | Path | None = None,
    log_progress: bool = False,
) -> Path:
    """The cached snapshot folder of `repo_id`, downloaded first where files are missing.

    Progress shows as huggingface_hub's progress bars, or as log lines with `log_progress`.
    """
    where = constants.ENDPOINT
    logger.info("fetching model files", extra={"model_id": repo_id, "revision": revision or "main"})
    started = time.monotonic()
    try:
        snapshot = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=SERVING_FILES,
            ignore_patterns=_SUBFOLDERS,
            tqdm_class=LoggedProgress if log_progress else None,
        )
    except Exception as error:  # noqa: BLE001 - each hub failure is turned into one line
        raise HubDownloadError(_explain(error, repo_id, revision, where, cache_dir)) from error
    path = Path(snapshot)
    _check_safetensors(path, repo_id, revision, cache_dir)
    elapsed = round(time.monotonic() - started, 1)
    logger.info("model files ready", extra={"model_dir": str(path), "elapsed_s": elapsed})
    return path


def _explain(
    error: Exception, repo_id: str, revision: str | None, endpoint: str, cache_dir: object
) -> str:
    model = f"model {repo_id!r}"
    cache = cache_dir or constants.HF_HUB_CACHE
    if isinstance(error, HFValidationError):
        return f"{model} is neither a local folder, a .gguf file nor a valid hub id"
    if isinstance(error, GatedRepoError):
        return (
            f"{model} is gated on {endpoint} (HTTP {_status(error)}): accept its conditions on "
            f"{endpoint}/{repo_id} and set HF_TOKEN to a token of that account"
        )
    if isinstance(error, RepositoryNotFoundError):
        return (
            f"{model} was not found on {endpoint} (HTTP {_status(error)}): check the id; a private "
            "repository needs HF_TOKEN set to a token that can read it"
        )
    if isinstance(error, RevisionNotFoundError):
        return f"{model} has no revision {revision!r} on {endpoint} (no such branch, tag or commit)"
    if isinstance(error, (LocalEntryNotFoundError, IncompleteSnapshotError)):
        cached = "only partly" if isinstance(error, IncompleteSnapshotError) else "not"
        return (
            f"{model} (revision {revision or 'main'}) is {cached} in the local Hugging Face cache "
            f"{cache} and {_why_unreachable(endpoint, error)}: connect, or fetch it where there "
            f"is network (`hf download {repo_id}`) into that cache"
        )
    if isinstance(error, HfHubHTTPError):
        return f"downloading {model} from {endpoint} failed: HTTP {_status(error)}"
    return f"downloading {model} from {endpoint} failed: {_one_line(error)}"


def _status(error: Any) -> object:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", "error")


def _why_unreachable(endpoint: str, error: Exception) -> str:
    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    cause = f" ({type(error.__cause__).__name__})" if error.__cause__ else ""
    return f"{endpoint} could not be reached{cause}"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _check_safetensors(
    snapshot: Path, repo_id: str, revision: str | None, cache_dir: object
) -> None:
    """A repository without safetensors weights is named as such, with the weights it has."""
    if any(snapshot.glob("*.safetensors")):
        return
    others = sorted(
        name for name in _repo_files(repo_id, revision, cache_dir) if name.endswith(_OTHER_WEIGHTS)
    )
    found = f" (it has {', '.join(others[:4])})" if others else ""
    raise HubDownloadError(
        f"model {repo_id!r} has no safetensors weights{found}; Shardline loads safetensors only: "
        "pick a repository or revision that has them (often the refs/pr/ convert bot's), or a "
        ".gguf file"
    )


def _repo_files(repo_id: str, revision: str | None, cache_dir: object) -> list[str]:
    """The repository's file names as the download listed them (no network)."""
    try:
        tree = get_cached_repo_tree(repo_id, revision=revision, cache_dir=cache_dir)
    except CachedRepoTreeNotFoundError:
        return []
    return [entry.path for entry in tree]


class LoggedProgress(hub_tqdm):
    """A progress bar that draws nothing and logs `what: done/total` at most every few seconds.

    With `--json-output` each line is a JSON event with `done`, `total` and `unit` fields.
    """

    every_s = 2.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._silent = kwargs.get("name") == _TRANSFER_BAR
        self._logged = -1.0
        self._logged_at = time.monotonic()
        kwargs.update(file=io.StringIO(), disable=False, mininterval=self.every_s)
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        now = time.monotonic()
        finished = bool(self.total) and self.n >= self.total
        due = finished or now - self._logged_at >= self.every_s
        if self._silent or self.n == self._logged or not due:
            return True
        self._logged, self._logged_at = self.n, now
        what = "downloaded bytes" if self.unit == "B" else "downloaded files"
        total = int(self.total or 0)
        logger.info(
            "%s: %d/%d",
            what,
            self.n,
            total,
            extra={
                "done": int(self.n),
                "total": total,
                "unit": self.unit,
                "elapsed_s": round(self.format_dict["elapsed"], 1),
            },
        )
        return True
