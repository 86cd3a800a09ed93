"""The shared secret of a multi-node group (`SHARDLINE_CLUSTER_TOKEN`, e.g. from a Kubernetes
Secret): the launchers prove it to each other when a node joins (an HMAC of a fresh challenge,
both ways, so the token never crosses the network), and the router sends it with every gRPC call
to the shards of the other nodes, which refuse a call without it."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping

TOKEN_ENV = "SHARDLINE_CLUSTER_TOKEN"
METADATA_KEY = "x-shardline-cluster-token"


def cluster_token(environ: Mapping[str, str]) -> str | None:
    return environ.get(TOKEN_ENV) or None


def challenge() -> str:
    return secrets.token_hex(16)


def sign(token: str, nonce: str, who: str) -> str:
    """Proof that `who` holds `token`, bound to the peer's fresh `nonce`."""
    return hmac.new(token.encode(), f"{nonce}:{who}".encode(), hashlib.sha256).hexdigest()


def verify(token: str, nonce: str, who: str, mac: object) -> bool:
    return isinstance(mac, str) and hmac.compare_digest(sign(token, nonce, who), mac)


def same_token(token: str, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(token.encode(), given.encode())
