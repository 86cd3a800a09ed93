"""The launchers of a multi-node group watching each other: node 0's launcher listens on
`--master-port + 1`, every other node's launcher connects to it, and each side proves that it
holds the cluster token (shardline/cluster_token.py). A node that does not join within
`--rendezvous-timeout` fails the start; once joined, both ends send a heartbeat every second, and
a link that closes (its launcher died: the kernel closes its socket) or falls silent for
`SILENCE_LIMIT_S` counts as that node leaving, which brings the whole group down.

A `NodeLink` is watched beside the launcher's children (launcher/supervisor.py): `returncode()`
is None while the other node is there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time

from shardline.cluster_token import challenge, sign, verify
from shardline.launcher.commands import LauncherError

logger = logging.getLogger("shardline.launcher")

HEARTBEAT_S = 1.0
SILENCE_LIMIT_S = 5.0
_RETRY_S = 0.5
_HANDSHAKE_S = 5.0


def link_port(master_port: int) -> int:
    return master_port + 1


class NodeLink:
    """The connection to one other node's launcher."""

    def __init__(self, sock: socket.socket, node_rank: int) -> None:
        self.name = f"node {node_rank}"
        self.node_rank = node_rank
        self.ready = threading.Event()
        self._sock = sock
        self._lines = sock.makefile("rb")
        self._lock = threading.Lock()
        self._lost: str | None = None
        self._closed = threading.Event()
        sock.settimeout(SILENCE_LIMIT_S)
        for target in (self._read, self._beat):
            threading.Thread(target=target, name=f"link-{node_rank}", daemon=True).start()

    def returncode(self) -> int | None:
        return None if self._lost is None else 1

    def describe_exit(self) -> str:
        return f"left the group ({self._lost})"

    def send(self, message: dict) -> None:
        with self._lock, contextlib.suppress(OSError):
            self._sock.sendall(json.dumps(message).encode() + b"\n")

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def _read(self) -> None:
        try:
            while line := self._lines.readline():
                if json.loads(line).get("ready"):
                    self.ready.set()
            self._lost = "its launcher closed the connection"
        except TimeoutError:
            self._lost = f"no heartbeat for {SILENCE_LIMIT_S:g} s"
        except (OSError, ValueError) as error:
            self._lost = f"the connection failed: {error}"
        if not self._closed.is_set():
            logger.error("%s %s", self.name, self.describe_exit())

    def _beat(self) -> None:
        while not self._closed.wait(HEARTBEAT_S) and self._lost is None:
            self.send({"beat": True})


def lead(
    port: int, nnodes: int, token: str, timeout_s: float, stop: threading.Event
) -> list[NodeLink]:
    """Node 0: waits until every other node has joined (authenticated), at most `timeout_s`."""
    links: dict[int, NodeLink] = {}
    deadline = time.monotonic() + timeout_s
    with socket.create_server(("", port), reuse_port=False) as server:
        server.settimeout(_RETRY_S)
        logger.info("waiting for %d other nodes on port %d", nnodes - 1, port)
        while len(links) < nnodes - 1:
            if stop.is_set() or time.monotonic() > deadline:
                for link in links.values():
                    link.close()
                missing = ", ".join(map(str, sorted(set(range(1, nnodes)) - set(links))))
                if stop.is_set():
                    raise LauncherError(f"stopped while waiting for node(s) {missing} to join")
                raise LauncherError(
                    f"node(s) {missing} did not join within {timeout_s:g} s "
                    "(--rendezvous-timeout): check their launchers, --master-addr/--master-port "
                    "and SHARDLINE_CLUSTER_TOKEN"
                )
            with contextlib.suppress(TimeoutError):
                sock, address = server.accept()
                rank = _admit(sock, address, nnodes, token, links)
                if rank is not None:
                    links[rank] = NodeLink(sock, rank)
                    logger.info("node %d joined from %s", rank, address[0])
    return [links[rank] for rank in sorted(links)]


def _admit(
    sock: socket.socket, address: tuple, nnodes: int, token: str, links: dict[int, NodeLink]
) -> int | None:
    """The node rank a connection proves; None (the connection closed) when it proves none."""
    sock.settimeout(_HANDSHAKE_S)
    nonce = challenge()
    try:
        _send(sock, {"challenge": nonce})
        hello = _receive(sock)
        rank = hello.get("node_rank")
        if not isinstance(rank, int) or not 0 < rank < nnodes or rank in links:
            raise ValueError(f"node rank {rank!r} is not one this group waits for")
        if not verify(token, nonce, f"node {rank}", hello.get("mac")):
            raise ValueError("it does not hold the cluster token")
        _send(sock, {"joined": True, "mac": sign(token, str(hello.get("challenge")), "node 0")})
        return rank
    except (OSError, ValueError) as error:
        logger.warning("refused a node from %s: %s", address[0], error)
        sock.close()
        return None


def join(
    addr: str, port: int, node_rank: int, token: str, timeout_s: float, stop: threading.Event
) -> NodeLink:
    """Node `node_rank` > 0: joins node 0, retrying until `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            sock = socket.create_connection((addr, port), timeout=_HANDSHAKE_S)
            break
        except OSError as error:
            if stop.is_set() or time.monotonic() > deadline:
                raise LauncherError(
                    f"node 0 at {addr}:{port} could not be reached within {timeout_s:g} s "
                    f"(--rendezvous-timeout): {error}"
                ) from None
            time.sleep(_RETRY_S)
    try:
        nonce = challenge()
        offered = _receive(sock)["challenge"]
        mac = sign(token, offered, f"node {node_rank}")
        _send(sock, {"node_rank": node_rank, "mac": mac, "challenge": nonce})
        answer = _receive(sock)
        if not answer.get("joined") or not verify(token, nonce, "node 0", answer.get("mac")):
            raise ValueError("node 0 did not prove it holds the cluster token")
    except (OSError, ValueError, KeyError) as error:
        sock.close()
        raise LauncherError(
            f"node 0 at {addr}:{port} refused this node or failed the handshake ({error}): "
            "check SHARDLINE_CLUSTER_TOKEN and --node-rank"
        ) from None
    logger.info("joined node 0 at %s:%d", addr, port)
    return NodeLink(sock, 0)


def _send(sock: socket.socket, message: dict) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")


def _receive(sock: socket.socket) -> dict:
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ValueError("the connection closed during the handshake")
        line += chunk
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError("not a handshake message")
    return message
