"""The router's listen address and metrics flags: a container's own hostname, the launcher passing
the metrics flags on, and the Prometheus port serving metrics (a taken one costs only itself)."""

from __future__ import annotations

import socket

import aiohttp
from aiohttp.test_utils import unused_port

from shardline.launcher.args import parse_args
from shardline.launcher.commands import router_spec
from shardline.router import cli as router_cli
from shardline.router.cli import build_parser as build_router_parser
from tests.fake_shard import router_client


def test_a_containers_own_hostname_is_not_taken_as_the_listen_address():
    own = {"HOSTNAME": socket.gethostname()}
    assert parse_args(["--num-shard", "1"], own).hostname == "0.0.0.0"
    assert parse_args(["--num-shard", "1"], {"HOSTNAME": "127.0.0.1"}).hostname == "127.0.0.1"
    flagged = ["--num-shard", "1", "--hostname", socket.gethostname()]
    assert parse_args(flagged, own).hostname == socket.gethostname()


def test_the_router_gets_the_metrics_flags(tmp_path):
    args = parse_args(["--num-shard", "1", "--metrics-without-auth"], {"PROMETHEUS_PORT": "9123"})
    argv = router_spec(args, tmp_path, str(tmp_path / "s"), {}).argv
    assert argv[argv.index("--prometheus-port") + 1] == "9123"
    assert "--metrics-without-auth" in argv
    router_args = build_router_parser().parse_args([*argv[1:]])
    assert router_args.prometheus_port == 9123 and router_args.metrics_without_auth
    assert build_router_parser().parse_args(["--tokenizer-name", "m"]).prometheus_port == 9000


async def test_the_prometheus_port_serves_metrics_and_a_taken_one_costs_only_itself(
    tokenizer, fake, caplog
):
    client, ctx = await router_client(fake, tokenizer, max_total_tokens=128, api_key="s3cret")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    free_port = unused_port()
    try:
        assert await router_cli._serve_metrics(ctx, "127.0.0.1", taken.getsockname()[1]) is None
        assert "/metrics not served on port" in caplog.text
        runner = await router_cli._serve_metrics(ctx, "127.0.0.1", free_port)
        assert runner is not None
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{free_port}/metrics") as answer,
        ):
            assert answer.status == 200
            assert "tgi_request_count" in await answer.text()
        await runner.cleanup()
    finally:
        taken.close()
        await client.close()
        await ctx.batcher.stop()
