"""A port in use stops the launcher before the model loads, with one error line and no traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from shardline.launcher.args import parse_args
from shardline.launcher.commands import LauncherError
from shardline.launcher.ports import Binding, bindings, check_bindable, check_ports_free
from tests.shard_harness import free_port

CPU = {"CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port something listens on, on 127.0.0.1 only."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def test_a_free_port_passes_and_the_check_leaves_it_free() -> None:
    port = free_port()
    check_bindable(Binding("--port", "127.0.0.1", port))
    check_bindable(Binding("--port", "127.0.0.1", port))
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "localhost", None])
def test_a_port_in_use_is_found_on_every_host_that_covers_it(busy_port: int, host) -> None:
    with pytest.raises(LauncherError, match=rf"--port: .*:{busy_port} is already in use"):
        check_bindable(Binding("--port", host, busy_port))


def test_an_unknown_hostname_is_one_clear_error() -> None:
    with pytest.raises(LauncherError, match=r"--port: cannot resolve no-such-host\.invalid:"):
        check_bindable(Binding("--port", "no-such-host.invalid", free_port()))


def test_the_rendezvous_port_is_checked_only_with_several_shards(busy_port: int) -> None:
    port = str(free_port())
    one = parse_args(["--port", port, "--master-port", str(busy_port)], CPU)
    assert [b.flag for b in bindings(one)] == ["--port"]
    check_ports_free(one)
    two = parse_args(["--port", port, "--master-port", str(busy_port), "--num-shard", "2"], CPU)
    with pytest.raises(LauncherError, match=rf"--master-port: \*:{busy_port} is already in use"):
        check_ports_free(two)
    same = parse_args(["--port", port, "--master-port", port, "--num-shard", "2"], CPU)
    with pytest.raises(LauncherError, match="--port and --master-port are the same port"):
        check_ports_free(same)


def test_the_launcher_stops_at_once_with_one_line_before_loading_the_model(busy_port) -> None:
    """The model id does not exist: had the model been looked up first, its error would show."""
    command = [sys.executable, "-m", "shardline.launcher.cli", "--hostname", "127.0.0.1"]
    command += ["--port", str(busy_port), "--model-id", "/no/such/model"]
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"--port: 127.0.0.1:{busy_port} is already in use" in lines[0]
    assert "/no/such/model" not in result.stderr
    assert time.monotonic() - started < 60
