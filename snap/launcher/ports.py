"""The TCP ports the launcher's children will listen on, checked before the model loads: a port in
use ends the launch at once with one line, not after the weights load with a traceback."""

from __future__ import annotations

import argparse
import errno
import socket
from dataclasses import dataclass

from shardline.launcher.commands import LauncherError


@dataclass(frozen=True)
class Binding:
    flag: str  # the launcher flag that sets the port, named in the error
    host: str | None  # None: every interface (torch.distributed's TCP store)
    port: int


def bindings(args: argparse.Namespace) -> list[Binding]:
    """The router's HTTP port; with several shards, rank 0's torch.distributed rendezvous port."""
    wanted = [Binding("--port", args.hostname, args.port)]
    if args.num_shard > 1:
        wanted.append(Binding("--master-port", None, args.master_port))
    return wanted


def check_ports_free(args: argparse.Namespace) -> None:
    wanted = bindings(args)
    ports = [binding.port for binding in wanted]
    if len(set(ports)) < len(ports):
        flags = " and ".join(binding.flag for binding in wanted)
        raise LauncherError(f"{flags} are the same port ({ports[0]}): give each its own")
    for binding in wanted:
        check_bindable(binding)


def check_bindable(binding: Binding) -> None:
    """Binds and closes every address the host resolves to, as asyncio's server would bind them
    (SO_REUSEADDR, IPv6 sockets v6-only, an address family the machine lacks skipped)."""
    shown = f"{binding.host or '*'}:{binding.port}"
    try:
        addresses = socket.getaddrinfo(
            binding.host, binding.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as error:
        raise LauncherError(f"{binding.flag}: cannot resolve {shown}: {error.strerror}") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as error:
                if error.errno == errno.EADDRNOTAVAIL:
                    continue
                raise LauncherError(_bind_error(binding, shown, error)) from None


def _bind_error(binding: Binding, shown: str, error: OSError) -> str:
    if error.errno == errno.EADDRINUSE:
        return f"{binding.flag}: {shown} is already in use: stop what listens there or pick another"
    if error.errno == errno.EACCES:
        return (
            f"{binding.flag}: {shown} is not allowed (ports below 1024 need root or "
            "CAP_NET_BIND_SERVICE): pick a higher port"
        )
    return f"{binding.flag}: cannot listen on {shown}: {error.strerror}"
