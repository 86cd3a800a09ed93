"""`--distributed-executor-backend ray`: the shard processes placed by an existing Ray cluster.

The launcher joins the cluster (`RAY_ADDRESS`, else the one `ray start` left on this machine),
reserves one bundle per rank (one GPU each; one CPU each on a cluster without GPUs) in a
placement group, and starts one `ShardActor` per bundle. Each actor runs the ordinary
`shardline-shard serve` command line as its child (so the shard is the same process as under the
launcher) and dies with it; the actor of rank 0 gives the torch.distributed rendezvous address.
Shards may sit on any node, so each serves gRPC on a TCP port of its node and the router calls
them there with the cluster token (`SHARDLINE_CLUSTER_TOKEN`; one is made for the run when
unset). The actors belong to the launcher's Ray job: they end with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Mapping

from shardline.cluster_token import TOKEN_ENV
from shardline.launcher.commands import ChildSpec, LauncherError
from shardline.launcher.readiness import shard_answers
from shardline.launcher.shards import ShardLaunch, shard_spec
from shardline.shard_config import ShardConfig

logger = logging.getLogger("shardline.launcher")

_PROBE_TIMEOUT_S = 2.0


class ShardActor:
    """Runs one shard command line on the node Ray placed it on (a Ray actor class)."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.socket_dir: str | None = None

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        with socket.socket() as probe:
            probe.bind(("", 0))
            return probe.getsockname()[1]

    def start(self, argv: list[str], env: dict[str, str]) -> int:
        """Starts the shard (Ray's CUDA_VISIBLE_DEVICES kept); its pid."""
        self.socket_dir = os.path.dirname(argv[argv.index("--uds-path") + 1])
        os.makedirs(self.socket_dir, mode=0o700)
        self.process = subprocess.Popen(
            argv, env={**os.environ, **env}, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent
        )
        return self.process.pid

    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def wait(self) -> int | None:
        code = None if self.process is None else self.process.wait()
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
        return code


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class RayShard:
    """One rank's actor, watched and stopped as the launcher's children are."""

    def __init__(self, actor: object, spec: ChildSpec, url: str, token: str) -> None:
        self.actor = actor
        self.spec = spec
        self.name = spec.name
        self.url = url
        self.token = token
        self.tail: deque[str] = deque()
        self._code: int | None = None

    def returncode(self) -> int | None:
        import ray

        if self._code is None:
            try:
                self._code = ray.get(self.actor.returncode.remote(), timeout=_PROBE_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                return None
            except ray.exceptions.RayError:
                self._code = -int(signal.SIGKILL)  # the actor (its node) is gone
        return self._code

    def describe_exit(self) -> str:
        code = self.returncode()
        if code is None:
            return "is still running"
        return f"exited with code {code}" if code >= 0 else f"was killed by signal {-code}"

    def signal(self, sig: signal.Signals) -> None:
        if self.returncode() is None:
            self.actor.signal.remote(int(sig))

    def wait(self) -> None:
        import ray

        with contextlib.suppress(ray.exceptions.RayError):
            ray.get(self.actor.wait.remote())
        ray.kill(self.actor)

    def finish_output(self) -> None:
        """Ray streams the actor's output to the launcher's."""

    def is_serving(self) -> bool:
        return shard_answers(self.url.removeprefix("tcp://"), self.token)


def cluster_token_for_ray(environ: Mapping[str, str]) -> str:
    return environ.get(TOKEN_ENV) or secrets.token_hex(32)


def start_ray_shards(
    config: ShardConfig, launch: ShardLaunch, environ: Mapping[str, str], token: str
) -> list[RayShard]:
    """One actor per rank of `config.world_size`, placed by the Ray cluster; each starts its
    shard. Wait for them with `RayShard.is_serving`."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        ray.init(address=environ.get("RAY_ADDRESS", "auto"), log_to_driver=True)
    except (ConnectionError, RuntimeError) as error:
        raise LauncherError(
            "--distributed-executor-backend ray needs a running Ray cluster (`ray start --head` "
            f"on this node, or RAY_ADDRESS): {error}"
        ) from None
    finally:
        for sig, handler in handlers.items():  # Ray's own would end the launcher at once
            signal.signal(sig, handler)
    resource = "GPU" if ray.cluster_resources().get("GPU", 0) >= 1 else "CPU"
    group = placement_group([{resource: 1}] * config.world_size)
    if not group.wait(launch.rendezvous_timeout or 300):
        raise LauncherError(
            f"the Ray cluster cannot place {config.world_size} shards with one {resource} each"
        )
    actor_class = ray.remote(ShardActor)
    actors = [
        actor_class.options(
            num_cpus=1 if resource == "CPU" else 0,
            num_gpus=1 if resource == "GPU" else 0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=rank
            ),
        ).remote()
        for rank in range(config.world_size)
    ]
    master_addr = ray.get(actors[0].node_ip.remote())
    master_port, *ports = ray.get(
        [actors[0].free_port.remote()] + [actor.free_port.remote() for actor in actors]
    )
    placed = dataclasses.replace(launch, master_addr=master_addr, master_port=master_port)
    shards = []
    for rank, (actor, port) in enumerate(zip(actors, ports, strict=True)):
        spec = _actor_spec(config, placed, rank, port, {**environ, TOKEN_ENV: token})
        pid = ray.get(actor.start.remote(spec.argv, spec.env))
        url = f"tcp://{ray.get(actor.node_ip.remote())}:{port}"
        shards.append(RayShard(actor, spec, url, token))
        logger.info("%s started", spec.name, extra={"pid": pid, "url": url})
    return shards


def _actor_spec(
    config: ShardConfig, launch: ShardLaunch, rank: int, port: int, environ: Mapping[str, str]
) -> ChildSpec:
    """The shard's command line with its own TCP port and socket folder, and the variables it
    needs beyond the actor's environment (whose CUDA_VISIBLE_DEVICES Ray set)."""
    prefix = f"/tmp/shardline-ray-{secrets.token_hex(6)}/shard"
    spec = shard_spec(config, dataclasses.replace(launch, uds_prefix=prefix), rank, environ)
    env = {name: value for name, value in spec.env.items() if name != "CUDA_VISIBLE_DEVICES"}
    env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"] = "0", "1"  # one device per actor
    return dataclasses.replace(spec, argv=[*spec.argv, "--grpc-port", str(port)], env=env)


def router_for_ray_shards(router: ChildSpec, master: RayShard) -> ChildSpec:
    """The router's command line calling rank 0 at its TCP address, with the token."""
    argv = list(router.argv)
    argv[argv.index("--master-shard-uds-path") + 1] = master.url
    return dataclasses.replace(router, argv=argv, env={**router.env, TOKEN_ENV: master.token})
