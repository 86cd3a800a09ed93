"""Child processes of the launcher: started in their own process group, their output streamed with
their name, their last lines kept, stopped with SIGTERM then SIGKILL.

Every child asks the kernel to SIGKILL it when the launcher dies, so even a SIGKILLed launcher
leaves no orphans (Linux).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

from shardline.launcher.commands import ChildSpec
from shardline.launcher.output import ChildOutput

logger = logging.getLogger("shardline.launcher")

TAIL_LINES = 20
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_launcher() -> None:  # runs in the child between fork and exec: no locks, no imports
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Child:
    def __init__(self, spec: ChildSpec, output: ChildOutput) -> None:
        self.spec = spec
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.process = subprocess.Popen(
            spec.argv,
            env=spec.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
            preexec_fn=_die_with_launcher,
        )
        self._pump = threading.Thread(
            target=self._stream, args=(output,), name=f"logs-{spec.name}", daemon=True
        )
        self._pump.start()
        logger.info("%s started", spec.name, extra={"pid": self.process.pid})

    @property
    def name(self) -> str:
        return self.spec.name

    def _stream(self, output: ChildOutput) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            line = line.rstrip("\n")
            if line:
                self.tail.append(line)
                output.write(self.spec, line)

    def returncode(self) -> int | None:
        return self.process.poll()

    def signal(self, sig: signal.Signals) -> None:
        """Signals the child's whole process group (it and anything it started)."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)

    def wait(self) -> None:
        self.process.wait()

    def finish_output(self) -> None:
        self._pump.join(timeout=2)

    def describe_exit(self) -> str:
        code = self.process.returncode
        if code is None:
            return "is still running"
        if code < 0:
            return f"was killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"


def stop_children(children: Iterable[Child], timeout_s: float, abort: threading.Event) -> None:
    """SIGTERM, up to `timeout_s` (cut short by `abort`) to exit, then SIGKILL; reaps them all."""
    children = [child for child in children if child.returncode() is None]
    for child in children:
        child.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while any(c.returncode() is None for c in children) and time.monotonic() < deadline:
        if abort.wait(0.05):
            break
    for child in children:
        if child.returncode() is None:
            logger.warning("%s did not stop in time: SIGKILL", child.name)
            child.signal(signal.SIGKILL)
    for child in children:
        child.wait()
        child.finish_output()


class Watched(Protocol):
    """What the launcher watches: a child process, or another node (launcher/nodes.py)."""

    name: str

    def returncode(self) -> int | None: ...

    def describe_exit(self) -> str: ...


class ChildDied(Exception):
    def __init__(self, child: Watched) -> None:
        super().__init__(f"{child.name} {child.describe_exit()}")
        self.child = child


def first_dead(children: Iterable[Watched]) -> Watched | None:
    return next((child for child in children if child.returncode() is not None), None)


def wait_until_ready(
    pending: list[Watched],
    is_ready: Callable[[Watched], bool],
    watched: list[Watched],
    stop: threading.Event,
    progress_every_s: float = 5.0,
) -> bool:
    """Polls until `is_ready` holds for every `pending` child: True; False when `stop` is set first.

    Raises ChildDied as soon as any `watched` child exits.
    """
    ready: set[str] = set()
    started = last_report = time.monotonic()
    while not stop.is_set():
        dead = first_dead(watched)
        if dead is not None:
            raise ChildDied(dead)
        ready.update(child.name for child in pending if child.name not in ready and is_ready(child))
        if len(ready) == len(pending):
            return True
        now = time.monotonic()
        if now - last_report >= progress_every_s:
            last_report = now
            waiting = ", ".join(child.name for child in pending if child.name not in ready)
            logger.info("waiting for %s (%.0fs)", waiting, now - started)
        stop.wait(0.2)
    return False


def watch(children: list[Watched], stop: threading.Event) -> Watched | None:
    """Blocks until a child exits (returned) or `stop` is set (None)."""
    while not stop.wait(0.1):
        dead = first_dead(children)
        if dead is not None:
            return dead
    return None
