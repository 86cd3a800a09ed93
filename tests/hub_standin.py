"""A stand-in for the Hugging Face hub on 127.0.0.1: the endpoints `huggingface_hub` calls to
download a snapshot, with the headers it reads, gated repositories, and a dropped connection.

Endpoints (as huggingface_hub 2.x requests them):
- GET /api/models/{repo}/revision/{rev}: the commit sha and siblings (`repo_info`);
- GET /api/models/{repo}/tree/{rev}?recursive=...: the file listing (`list_repo_tree`);
- HEAD / GET /{repo}/resolve/{rev}/{file}: X-Repo-Commit, ETag, Content-Length and, for weights,
  X-Linked-Etag / X-Linked-Size as the hub sends for LFS files; GET honours `Range: bytes=N-`.
Errors carry the hub's X-Error-Code (RepoNotFound, RevisionNotFound, GatedRepo, EntryNotFound).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

_LFS_SUFFIXES = (".safetensors", ".bin", ".onnx", ".pth")


@dataclass
class Commit:
    sha: str
    files: dict[str, bytes]


@dataclass
class Repo:
    revisions: dict[str, Commit]  # branch or tag name -> commit
    gated_token: str | None = None  # files need `Authorization: Bearer <this>` when set

    def commit(self, revision: str) -> Commit | None:
        if revision in self.revisions:
            return self.revisions[revision]
        return next((c for c in self.revisions.values() if c.sha == revision), None)


@dataclass(frozen=True)
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class HubStandIn:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[SeenRequest] = field(default_factory=list)
    drop_once: set[str] = field(default_factory=set)  # "repo/file": first GET stops half-way
    url: str = ""

    def add_repo(self, repo_id: str, revisions: dict[str, dict[str, bytes]], **kwargs) -> Repo:
        commits = {
            name: Commit(hashlib.sha1(f"{repo_id}@{name}".encode()).hexdigest(), files)
            for name, files in revisions.items()
        }
        self.repos[repo_id] = Repo(commits, **kwargs)
        return self.repos[repo_id]

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/api/models/{org}/{name}/revision/{rev}", self._repo_info)
        app.router.add_get("/api/models/{org}/{name}/tree/{rev}", self._tree)
        app.router.add_route("*", "/{org}/{name}/resolve/{rev}/{file:.+}", self._resolve)
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler):
        self.requests.append(SeenRequest(request.method, request.path, dict(request.headers)))
        return await handler(request)

    def _find(self, request: web.Request) -> tuple[str, Repo, Commit]:
        repo_id = f"{request.match_info['org']}/{request.match_info['name']}"
        repo = self.repos.get(repo_id)
        if repo is None:
            raise _hub_error(404, "RepoNotFound", "Repository not found")
        commit = repo.commit(request.match_info["rev"])
        if commit is None:
            raise _hub_error(404, "RevisionNotFound", "Invalid rev id")
        return repo_id, repo, commit

    async def _repo_info(self, request: web.Request) -> web.Response:
        repo_id, repo, commit = self._find(request)
        siblings = [{"rfilename": name} for name in commit.files]
        gated = "manual" if repo.gated_token else False
        return web.json_response(
            {
                "id": repo_id,
                "modelId": repo_id,
                "sha": commit.sha,
                "siblings": siblings,
                "gated": gated,
            }
        )

    async def _tree(self, request: web.Request) -> web.Response:
        _, _, commit = self._find(request)
        entries = [
            {"type": "file", "path": name, "size": len(data), "oid": _git_oid(data)}
            for name, data in commit.files.items()
        ]
        return web.json_response(entries)

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        repo_id, repo, commit = self._find(request)
        if (
            repo.gated_token
            and request.headers.get("Authorization") != f"Bearer {repo.gated_token}"
        ):
            message = f"Access to model {repo_id} is restricted. You must be authenticated."
            raise _hub_error(401, "GatedRepo", message)
        name = request.match_info["file"]
        if name not in commit.files:
            raise _hub_error(404, "EntryNotFound", "Entry not found")
        data = commit.files[name]
        headers = _file_headers(commit.sha, name, data)
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(len(data))})
        start = _range_start(request.headers.get("Range"))
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        key = f"{repo_id}/{name}"
        if key in self.drop_once and not start:
            self.drop_once.discard(key)
            return await _drop_half_way(request, headers, data)
        return web.Response(body=data[start:], status=206 if start else 200, headers=headers)


def _hub_error(status: int, code: str, message: str) -> web.HTTPException:
    headers = {"X-Error-Code": code, "X-Error-Message": message}
    error_class = {401: web.HTTPUnauthorized, 404: web.HTTPNotFound}[status]
    return error_class(headers=headers, text=f'{{"error": "{message}"}}')


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _file_headers(sha: str, name: str, data: bytes) -> dict[str, str]:
    headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
    if name.endswith(_LFS_SUFFIXES):
        etag = f'"{hashlib.sha256(data).hexdigest()}"'
        headers.update({"ETag": etag, "X-Linked-Etag": etag, "X-Linked-Size": str(len(data))})
    else:
        headers["ETag"] = f'"{_git_oid(data)}"'
    return headers


def _range_start(header: str | None) -> int:
    if not header:
        return 0
    first = header.removeprefix("bytes=").split(",")[0]
    return int(first.split("-")[0] or 0)


async def _drop_half_way(
    request: web.Request, headers: dict[str, str], data: bytes
) -> web.StreamResponse:
    """Announces the whole file, sends half of it, then closes the connection."""
    response = web.StreamResponse(headers=headers)
    response.content_length = len(data)
    await response.prepare(request)
    await response.write(data[: len(data) // 2])
    await asyncio.sleep(0.05)
    request.transport.close()
    return response


class RunningHub:
    """The stand-in served from a background thread; `stop()` closes its port."""

    def __init__(self, hub: HubStandIn) -> None:
        self.hub = hub
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._runner = web.AppRunner(hub.app())
        self._call(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._call(site.start())
        port = self._runner.addresses[0][1]
        hub.url = f"http://127.0.0.1:{port}"

    def _call(self, coroutine) -> object:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    def stop(self) -> None:
        self._call(self._runner.cleanup())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file of a model folder, by its name, as a repo to serve."""
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}
