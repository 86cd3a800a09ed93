"""`shardline-router`: TGI's router flags; serves the REST API in front of running shards."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from shardline.cluster_token import cluster_token
from shardline.event_loop import run_event_loop
from shardline.gc_pauses import freeze_long_lived_objects
from shardline.log import configure_logging
from shardline.router import tracing
from shardline.router.batcher import Batcher
from shardline.router.client import ShardDeadlines, ShardedClient
from shardline.router.grammar_compiler import GrammarBudget
from shardline.router.http import PAYLOAD_LIMIT, RouterContext, RouterRunner
from shardline.router.paced_admission import SCHEDULING_POLICIES, SERVER_SCHEDULING_POLICY
from shardline.router.server import create_app, create_metrics_app
from shardline.router.startup import RouterSettings, start_router

logger = logging.getLogger("shardline.router")

_CLOSE_GRACE_S = 2.0  # for the last responses to be written once the requests have ended


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardline-router", description=__doc__)
    add = parser.add_argument
    add("--max-concurrent-requests", type=int, default=128)
    add("--max-best-of", type=int, default=2)
    add("--max-stop-sequences", type=int, default=4)
    add("--max-top-n-tokens", type=int, default=5)
    add("--max-input-tokens", "--max-input-length", dest="max_input_tokens", type=int)
    add("--max-total-tokens", type=int)
    add("--waiting-served-ratio", type=float, default=0.3)
    add("--max-batch-prefill-tokens", type=int)
    add("--max-batch-total-tokens", type=int)
    add("--max-waiting-tokens", type=int, default=20)
    add("--max-batch-size", type=int)
    add("--scheduling-policy", choices=SCHEDULING_POLICIES, default=SERVER_SCHEDULING_POLICY)
    add("--hostname", default="0.0.0.0", help="address to listen on (0.0.0.0: every interface)")
    add("--port", type=int, default=3000)
    add(
        "--prometheus-port",
        type=int,
        default=9000,
        help="port that serves /metrics without the API key, on --hostname (0: none)",
    )
    add(
        "--metrics-without-auth",
        action="store_true",
        help="serve /metrics on --port without the API key too",
    )
    add("--master-shard-uds-path", default="/tmp/text-generation-server-0")
    add("--tokenizer-name", required=True, help="model folder or hub id of the tokenizer")
    add("--tokenizer-config-path", help="folder with the tokenizer files, if not the model's")
    add("--revision")
    add("--model-id", help="reported by /info; defaults to --tokenizer-name")
    add("--validation-workers", type=int, default=2)
    add("--max-client-batch-size", type=int, default=4)
    add("--payload-limit", type=int, default=PAYLOAD_LIMIT)
    add(
        "--api-key",
        help="require `Authorization: Bearer <key>` on every route but the health probes and "
        "/docs (and /metrics with --metrics-without-auth)",
    )
    add("--json-output", action="store_true", help="log JSON lines")
    add("--otlp-endpoint", help="OTLP/gRPC collector sent a trace of each request")
    add("--otlp-service-name", default=tracing.DEFAULT_SERVICE_NAME)
    add(
        "--cors-allow-origin",
        action="append",
        default=[],
        help="origin browsers may call the API from (repeat it; * for any)",
    )
    add(
        "--shutdown-timeout",
        type=float,
        default=60.0,
        help="on SIGTERM, seconds to let in-flight requests finish (new ones get 503)",
    )
    add(
        "--shard-step-timeout",
        type=float,
        default=60.0,
        help="seconds a Prefill, Decode, FilterBatch or ClearCache may take; past it a shard is "
        "taken as stuck: in-flight requests get 424 and the router exits 1 (0: no limit)",
    )
    add(
        "--grammar-compile-timeout",
        type=float,
        default=GrammarBudget.timeout_s,
        help="seconds one grammar (JSON schema or regex) may take to compile over the "
        "vocabulary, in a worker process killed past it; the request gets 422",
    )
    add(
        "--max-grammar-bytes",
        type=int,
        default=GrammarBudget.max_bytes,
        help="largest compiled grammar (its token automaton, in bytes) sent to the shards; "
        "a larger one gets 422",
    )
    add(
        "--disable-grammar-support",
        action="store_true",
        help="refuse requests with a grammar (422)",
    )
    add(
        "--shard-warmup-timeout",
        type=float,
        default=1800.0,
        help="seconds the shards' Warmup (KV cache sizing, CUDA graph capture) may take; past "
        "it the router exits 1 (0: no limit)",
    )
    return parser


def shard_deadlines(args: argparse.Namespace) -> ShardDeadlines:
    return ShardDeadlines(
        step=args.shard_step_timeout or None, warmup=args.shard_warmup_timeout or None
    )


def settings_from_args(args: argparse.Namespace) -> RouterSettings:
    return RouterSettings(
        model_id=args.model_id or args.tokenizer_name,
        max_concurrent_requests=args.max_concurrent_requests,
        max_best_of=args.max_best_of,
        max_stop_sequences=args.max_stop_sequences,
        max_top_n_tokens=args.max_top_n_tokens,
        max_input_tokens=args.max_input_tokens,
        max_total_tokens=args.max_total_tokens,
        waiting_served_ratio=args.waiting_served_ratio,
        max_batch_prefill_tokens=args.max_batch_prefill_tokens,
        max_batch_total_tokens=args.max_batch_total_tokens,
        max_waiting_tokens=args.max_waiting_tokens,
        max_batch_size=args.max_batch_size,
        scheduling_policy=args.scheduling_policy,
        validation_workers=args.validation_workers,
        max_client_batch_size=args.max_client_batch_size,
        api_key=args.api_key,
        metrics_without_auth=args.metrics_without_auth,
        payload_limit=args.payload_limit,
        shard_step_timeout=args.shard_step_timeout or None,
        grammar_budget=None
        if args.disable_grammar_support
        else GrammarBudget(
            timeout_s=args.grammar_compile_timeout,
            max_bytes=args.max_grammar_bytes,
            workers=args.validation_workers,
        ),
    )


def load_tokenizer(args: argparse.Namespace):
    from transformers import AutoTokenizer

    source = args.tokenizer_config_path or args.tokenizer_name
    return AutoTokenizer.from_pretrained(source, revision=args.revision)


async def serve(args: argparse.Namespace) -> int:
    """Serves until SIGTERM/SIGINT (drains, then 0) or until a shard is stuck (1: only a restart
    of every process recovers ranks stuck mid-step, so the launcher must tear everything down)."""
    tokenizer = load_tokenizer(args)
    client = await ShardedClient.connect(
        args.master_shard_uds_path, shard_deadlines(args), cluster_token(os.environ)
    )
    logger.info("connected to shards", extra={"world_size": client.world_size})
    ctx = await start_router(client, tokenizer, settings_from_args(args))
    tracing.configure(args.otlp_endpoint, args.otlp_service_name)
    runner = RouterRunner(
        create_app(ctx, args.cors_allow_origin),
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=_CLOSE_GRACE_S,
    )
    await runner.setup()
    await web.TCPSite(runner, args.hostname, args.port).start()
    metrics_runner = await _serve_metrics(ctx, args.hostname, args.prometheus_port)
    freeze_long_lived_objects()
    logger.info(
        f"router listening on http://{_url_host(args.hostname)}:{args.port}",
        extra={"hostname": args.hostname, "port": args.port},
    )
    stuck = await _until_stopped_or_stuck(ctx.batcher)
    # Stuck: every request already has its error; the drain only lets the answers go out.
    drain_s = _CLOSE_GRACE_S if stuck else args.shutdown_timeout
    logger.info("router draining", extra={"in_flight": ctx.in_flight})
    if not await ctx.drain(drain_s):
        logger.warning("shutdown timeout: cutting %d in-flight requests", ctx.in_flight)
    await runner.cleanup()
    if metrics_runner is not None:
        await metrics_runner.cleanup()
    await ctx.batcher.stop()
    ctx.validator.close()
    await client.close()
    tracing.shutdown()
    return 1 if stuck else 0


async def _serve_metrics(ctx: RouterContext, hostname: str, port: int) -> web.AppRunner | None:
    """/metrics on the Prometheus port. A port already taken (another server on this machine)
    costs the metrics port alone, never the router: a warning says so."""
    if not port:
        return None
    runner = RouterRunner(create_metrics_app(ctx), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, hostname, port).start()
    except OSError as error:
        logger.warning(f"/metrics not served on port {port}: {error}")
        await runner.cleanup()
        return None
    logger.info(f"metrics on http://{_url_host(hostname)}:{port}/metrics")
    return runner


def _url_host(hostname: str) -> str:
    return f"[{hostname}]" if ":" in hostname else hostname


async def _until_stopped_or_stuck(batcher: Batcher) -> bool:
    """Waits for SIGTERM/SIGINT (False) or for a shard call past its deadline (True)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(batcher.wait_stuck())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for wait in waits:
        wait.cancel()
    if batcher.stuck is None:
        return False
    logger.error("a shard is stuck; exiting so that every process is restarted")
    return True


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure_logging(json_output=args.json_output)
    sys.exit(run_event_loop(serve(args)))
