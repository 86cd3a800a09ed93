"""`text-generation-launcher`: resolves the model, starts the shards, waits until each answers
Health, starts the router, then supervises them until a signal (graceful stop, exit 0) or the death
of any of them (everything torn down, exit 1)."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from shardline.launcher.args import log_level, parse_args
from shardline.launcher.commands import (
    ChildSpec,
    LauncherError,
    router_spec,
    shard_socket,
    shard_spec,
)
from shardline.launcher.env_report import runtime_environment
from shardline.launcher.output import ChildOutput
from shardline.launcher.ports import check_ports_free
from shardline.launcher.readiness import router_is_healthy, shard_is_healthy
from shardline.launcher.supervisor import (
    Child,
    ChildDied,
    stop_children,
    wait_until_ready,
    watch,
)
from shardline.log import configure_logging
from shardline.model_files import ModelNotFoundError, resolve_model

logger = logging.getLogger("shardline.launcher")

SHARD_STOP_TIMEOUT_S = 10.0
ROUTER_EXIT_MARGIN_S = 10.0  # past its own drain timeout, for the router to close and exit
TEARDOWN_TIMEOUT_S = 3.0
_MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the terminating NUL


class ShardSockets:
    """The shards' unix socket prefix; by default inside a private (0700) folder made for this run.

    `cleanup` removes every socket file left behind and the private folder.
    """

    def __init__(self, requested_prefix: str | None, num_shard: int) -> None:
        self._private_dir: Path | None = None
        if requested_prefix is None:
            self._private_dir = Path(tempfile.mkdtemp(prefix="shardline-"))
            requested_prefix = str(self._private_dir / "shard")
        else:
            Path(requested_prefix).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.prefix = requested_prefix
        self.paths = [shard_socket(self.prefix, rank) for rank in range(num_shard)]
        if len(self.paths[-1].encode()) > _MAX_SOCKET_PATH:
            self.cleanup()
            raise LauncherError(
                f"unix socket path {self.paths[-1]!r} is too long; pass a shorter --shard-uds-path"
            )

    def cleanup(self) -> None:
        for path in self.paths:
            Path(path).unlink(missing_ok=True)
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)


class StopSignals:
    """SIGTERM/SIGINT set `stop`; a second one also sets `force`, which cuts the grace periods."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.force = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.stop.is_set():
            self.force.set()
        self.stop.set()


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(argv))


def run(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = dict(os.environ if environ is None else environ)
    args = parse_args(argv, environ)
    configure_logging(json_output=args.json_output, level=log_level(environ))
    if args.env:
        logger.info("runtime environment", extra=runtime_environment(environ))
    if args.trust_remote_code:
        logger.warning("--trust-remote-code has no effect: Shardline runs its own model code only")
    if args.max_input_length is not None:
        logger.warning("--max-input-length (MAX_INPUT_LENGTH) is deprecated: use --max-input-tokens")
    try:
        check_ports_free(args)
        model_dir = resolve_model(args.model_id, args.revision, dtype=args.dtype)
        sockets = ShardSockets(args.shard_uds_path, args.num_shard)
    except (ModelNotFoundError, LauncherError) as error:
        logger.error("%s", error)
        return 1
    except KeyboardInterrupt:
        return 130
    try:
        return _serve(args, model_dir, sockets, environ)
    except LauncherError as error:
        logger.error("%s", error)
        return 1
    finally:
        sockets.cleanup()


def _serve(
    args: argparse.Namespace, model_dir: Path, sockets: ShardSockets, environ: dict[str, str]
) -> int:
    logger.info("model resolved", extra={"model_dir": str(model_dir), "num_shard": args.num_shard})
    shard_specs = [
        shard_spec(args, model_dir, sockets.prefix, rank, environ) for rank in range(args.num_shard)
    ]
    return Launch(
        args, shard_specs, router_spec(args, model_dir, sockets.prefix, environ), sockets
    ).run()


class Launch:
    """One run of the shards and the router, from start to the last child reaped."""

    def __init__(
        self,
        args: argparse.Namespace,
        shard_specs: list[ChildSpec],
        router: ChildSpec,
        sockets: ShardSockets,
    ) -> None:
        self.args = args
        self.shard_specs = shard_specs
        self.router_spec = router
        self.sockets = sockets
        self.signals = StopSignals()
        self.output = ChildOutput(args.json_output)
        self.children: list[Child] = []

    def run(self) -> int:
        """0 after a stop signal; 1 when a child exited on its own (everything is torn down)."""
        try:
            self._serve_until_stopped()
        except ChildDied as died:
            _report_death(died.child)
            return 1
        finally:
            stop_children(self.children, TEARDOWN_TIMEOUT_S, self.signals.force)
        logger.info("shut down")
        return 0

    def _serve_until_stopped(self) -> None:
        shards = self._start(self.shard_specs)
        if self._wait_ready(shards, lambda c: shard_is_healthy(self.sockets.paths[c.spec.rank])):
            logger.info("all %d shards answer Health", len(shards))
            router = self._start([self.router_spec])
            if self._wait_ready(
                router, lambda _: router_is_healthy(self.args.hostname, self.args.port)
            ):
                logger.info(f"Shardline is ready on http://{self.args.hostname}:{self.args.port}")
                dead = watch(self.children, self.signals.stop)
                if dead is not None:
                    raise ChildDied(dead)
            logger.info("stopping: the router finishes in-flight requests first")
            timeout = self.args.graceful_termination_timeout + ROUTER_EXIT_MARGIN_S
            stop_children(router, timeout, self.signals.force)
        logger.info("stopping the shards")
        stop_children(shards, SHARD_STOP_TIMEOUT_S, self.signals.force)

    def _start(self, specs: list[ChildSpec]) -> list[Child]:
        started = [Child(spec, self.output) for spec in specs]
        self.children.extend(started)
        return started

    def _wait_ready(self, pending: list[Child], is_ready: Callable[[Child], bool]) -> bool:
        return wait_until_ready(pending, is_ready, self.children, self.signals.stop)


def _report_death(child: Child) -> None:
    child.finish_output()
    last_lines = " | ".join(child.tail) or "(no output)"
    logger.error(
        f"{child.name} {child.describe_exit()}; shutting down. Its last log lines: {last_lines}",
        extra={"child": child.name, "rank": child.spec.rank},
    )


if __name__ == "__main__":
    main()
