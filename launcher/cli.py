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

from shardline.cluster_token import TOKEN_ENV, cluster_token
from shardline.launcher.args import log_level, parse_args
from shardline.launcher.commands import ChildSpec, LauncherError, router_spec, shard_socket
from shardline.launcher.download_weights import download_weights, prepare_model
from shardline.launcher.env_report import runtime_environment
from shardline.launcher.nodes import NodeLink, join, lead, link_port
from shardline.launcher.output import ChildOutput
from shardline.launcher.ports import check_ports_free
from shardline.launcher.readiness import router_is_healthy
from shardline.launcher.shards import ShardLaunch, shard_config, shard_environment, start_shards
from shardline.launcher.supervisor import (
    Child,
    ChildDied,
    Watched,
    stop_children,
    wait_until_ready,
    watch,
)
from shardline.log import configure_logging
from shardline.model_files import ModelNotFoundError
from shardline.shard_config import ShardConfig

logger = logging.getLogger("shardline.launcher")

SHARD_STOP_TIMEOUT_S = 10.0
ROUTER_EXIT_MARGIN_S = 10.0  # past its own drain timeout, for the router to close and exit
TEARDOWN_TIMEOUT_S = 3.0
_MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the terminating NUL


class ShardSockets:
    """The shards' unix socket prefix; by default inside a private (0700) folder made for this run.

    `cleanup` removes every socket file left behind and the private folder.
    """

    def __init__(self, requested_prefix: str | None, ranks: range) -> None:
        self._private_dir: Path | None = None
        if requested_prefix is None:
            self._private_dir = Path(tempfile.mkdtemp(prefix="shardline-"))
            requested_prefix = str(self._private_dir / "shard")
        else:
            Path(requested_prefix).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.prefix = requested_prefix
        self.paths = [shard_socket(self.prefix, rank) for rank in ranks]
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
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["download-weights"]:
        return download_weights(argv[1:], environ)
    args = parse_args(argv, environ)
    configure_logging(json_output=args.json_output, level=log_level(environ))
    if args.env:
        logger.info("runtime environment", extra=runtime_environment(environ))
    if args.trust_remote_code:
        logger.warning("--trust-remote-code has no effect: Shardline runs its own model code only")
    if args.max_input_length is not None:
        logger.warning(
            "--max-input-length (MAX_INPUT_LENGTH) is deprecated: use --max-input-tokens"
        )
    try:
        if args.node_rank == 0:
            check_ports_free(args)
        token = _cluster_token(args, environ)
        model_dir = prepare_model(args)
        first = args.node_rank * args.num_shard
        sockets = ShardSockets(args.shard_uds_path, range(first, first + args.num_shard))
    except (ModelNotFoundError, LauncherError) as error:
        logger.error("%s", error)
        return 1
    except KeyboardInterrupt:
        return 130
    try:
        return _serve(args, model_dir, sockets, environ, token)
    except LauncherError as error:
        logger.error("%s", error)
        return 1
    finally:
        sockets.cleanup()


def _cluster_token(args: argparse.Namespace, environ: Mapping[str, str]) -> str | None:
    token = cluster_token(environ)
    if args.nnodes > 1 and args.distributed_executor_backend == "ray":
        raise LauncherError("with Ray, start one launcher: the Ray cluster places every shard")
    if args.nnodes > 1 and token is None:
        raise LauncherError(
            f"--nnodes {args.nnodes} needs a shared secret in {TOKEN_ENV} on every node (e.g. "
            "from a Kubernetes Secret): the nodes authenticate each other and the router's calls"
        )
    return token


def _serve(
    args: argparse.Namespace,
    model_dir: Path,
    sockets: ShardSockets,
    environ: dict[str, str],
    token: str | None,
) -> int:
    logger.info("model resolved", extra={"model_dir": str(model_dir), "num_shard": args.num_shard})
    config = shard_config(args, model_dir)
    router = router_spec(args, model_dir, sockets.prefix, environ)
    launch = Launch(args, config, router, sockets, shard_environment(args, environ))
    return launch.run(token)


class Launch:
    """One run of the shards and the router, from start to the last child reaped."""

    def __init__(
        self,
        args: argparse.Namespace,
        config: ShardConfig,
        router: ChildSpec,
        sockets: ShardSockets,
        shard_environ: dict[str, str],
    ) -> None:
        self.args = args
        self.config = config
        self.shard_launch = ShardLaunch.from_args(args, sockets.prefix)
        self.shard_environ = shard_environ
        self.router_spec = router
        self.sockets = sockets
        self.signals = StopSignals()
        self.output = ChildOutput(args.json_output)
        self.children: list[Child] = []
        self.nodes: list[NodeLink] = []

    def run(self, token: str | None = None) -> int:
        """0 after a stop signal; 1 when a child exited on its own or another node left (every
        node's launcher tears everything down)."""
        try:
            self.nodes = self._join_nodes(token)
            self._serve_until_stopped()
        except ChildDied as died:
            _report_death(died.child)
            return 1
        finally:
            for node in self.nodes:
                node.close()
            stop_children(self.children, TEARDOWN_TIMEOUT_S, self.signals.force)
        logger.info("shut down")
        return 0

    def _join_nodes(self, token: str | None) -> list[NodeLink]:
        """The links to the other nodes' launchers (none on one node), once all have joined."""
        args = self.args
        if args.nnodes == 1 or token is None:
            return []
        port, timeout = link_port(args.master_port), args.rendezvous_timeout
        if args.node_rank == 0:
            return lead(port, args.nnodes, token, timeout, self.signals.stop)
        stop = self.signals.stop
        return [join(args.master_addr, port, args.node_rank, token, timeout, stop)]

    def _start_shards(self) -> tuple[list, Callable[[Watched], bool]]:
        """This node's shard processes (or, with Ray, the cluster's) and their readiness."""
        if self.args.distributed_executor_backend == "mp":
            shards = start_shards(self.config, self.shard_launch, self.shard_environ, self.output)
            return shards, self.shard_launch.is_serving
        from shardline.launcher import ray_shards

        token = ray_shards.cluster_token_for_ray(self.shard_environ)
        shards = ray_shards.start_ray_shards(
            self.config, self.shard_launch, self.shard_environ, token
        )
        self.router_spec = ray_shards.router_for_ray_shards(self.router_spec, shards[0])
        return shards, lambda shard: shard.is_serving()

    def _serve_until_stopped(self) -> None:
        shards, is_serving = self._start_shards()
        self.children.extend(shards)
        if self.args.node_rank > 0:
            self._serve_as_worker(shards)
        elif self._wait_ready(shards, is_serving) and self._wait_ready(
            self.nodes, lambda node: node.ready.is_set()
        ):
            logger.info("all %d shards answer Health", len(shards) * self.args.nnodes)
            router = [Child(self.router_spec, self.output)]
            self.children.extend(router)
            if self._wait_ready(
                router, lambda _: router_is_healthy(self.args.hostname, self.args.port)
            ):
                logger.info(f"Shardline is ready on http://{self.args.hostname}:{self.args.port}")
                dead = watch([*self.children, *self.nodes], self.signals.stop)
                if dead is not None:
                    raise ChildDied(dead)
            logger.info("stopping: the router finishes in-flight requests first")
            timeout = self.args.graceful_termination_timeout + ROUTER_EXIT_MARGIN_S
            stop_children(router, timeout, self.signals.force)
        logger.info("stopping the shards")
        stop_children(shards, SHARD_STOP_TIMEOUT_S, self.signals.force)

    def _serve_as_worker(self, shards: list[Child]) -> None:
        """A node other than 0: its shards serve node 0's router until a signal or a death."""
        if self._wait_ready(shards, self.shard_launch.is_serving):
            logger.info("all %d shards of this node answer Health", len(shards))
            self.nodes[0].send({"ready": True})
            dead = watch([*self.children, *self.nodes], self.signals.stop)
            if dead is not None:
                raise ChildDied(dead)

    def _wait_ready(self, pending: list[Watched], is_ready: Callable[[Watched], bool]) -> bool:
        watched = [*self.children, *self.nodes]
        return wait_until_ready(pending, is_ready, watched, self.signals.stop)


def _report_death(child: Watched) -> None:
    if not isinstance(child, Child):
        logger.error(f"{child.name} {child.describe_exit()}; shutting down")
        return
    child.finish_output()
    last_lines = " | ".join(child.tail) or "(no output)"
    logger.error(
        f"{child.name} {child.describe_exit()}; shutting down. Its last log lines: {last_lines}",
        extra={"child": child.name, "rank": child.spec.rank},
    )


if __name__ == "__main__":
    main()
