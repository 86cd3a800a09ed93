"""Grammar worker processes with a deadline: a compile past its time is killed, not waited for.

A thread cannot be stopped, and outlines-core's build (which releases the GIL) would keep a core
and its memory until it ends, minutes later for a hostile regex; a process can be killed. Each
worker is `python -m shardline.router.grammar_worker` (not multiprocessing, which would import
the caller's `__main__` in the child), started on first use and again after a kill.
"""

from __future__ import annotations

import logging
import pickle
import queue
import select
import subprocess
import sys
import time

from shardline.router.grammar_worker import READY, InvalidGrammarError

logger = logging.getLogger(__name__)

_START_TIMEOUT_S = 120.0  # python, outlines-core and the vocabulary (not the grammar's budget)


class GrammarTimeoutError(InvalidGrammarError):
    """The compile ran past its time budget and was killed."""


class _Worker:
    def __init__(self, vocabulary: bytes) -> None:
        self._vocabulary = vocabulary
        self._process: subprocess.Popen | None = None

    def compile(self, request: tuple[int, str, int], timeout_s: float) -> bytes:
        process = self._running()
        try:
            pickle.dump(request, process.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            process.stdin.flush()
        except BrokenPipeError:
            self.stop()
            raise InvalidGrammarError("the grammar compiler process died") from None
        status, payload = self._answer(timeout_s)
        if status == "refused":
            raise InvalidGrammarError(payload)
        return payload

    def _running(self) -> subprocess.Popen:
        if self._process is not None and self._process.poll() is None:
            return self._process
        self.stop()
        command = [sys.executable, "-m", "shardline.router.grammar_worker"]
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            pickle.dump(self._vocabulary, self._process.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self._process.stdin.flush()
            started = self._answer(_START_TIMEOUT_S) == READY
        except (BrokenPipeError, InvalidGrammarError):
            started = False
        if not started:
            self.stop()
            raise RuntimeError("the grammar compiler process did not start")
        return self._process

    def _answer(self, timeout_s: float) -> object:
        """The next answer; kills the worker when none comes within `timeout_s`."""
        stdout = self._process.stdout
        ready, _, _ = select.select([stdout], [], [], timeout_s)
        if not ready:
            self.stop()
            raise GrammarTimeoutError(f"no answer within {timeout_s:g} s")
        try:
            return pickle.load(stdout)
        except EOFError:
            self.stop()
            raise InvalidGrammarError(
                "the grammar compiler process died while compiling it (out of memory?)"
            ) from None

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.kill()
        self._process.wait()
        for pipe in (self._process.stdin, self._process.stdout):
            pipe.close()
        self._process = None


class GrammarWorkers:
    """`count` worker processes over one vocabulary; `compile` blocks (call it from a thread,
    at most `count` at once, each then has a worker of its own)."""

    def __init__(self, vocabulary: bytes, count: int) -> None:
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._workers = [_Worker(vocabulary) for _ in range(count)]
        for worker in self._workers:
            self._idle.put(worker)

    def compile(self, grammar_type: int, value: str, max_bytes: int, timeout_s: float) -> bytes:
        worker = self._idle.get()
        started = time.monotonic()
        try:
            return worker.compile((grammar_type, value, max_bytes), timeout_s)
        except GrammarTimeoutError:
            logger.warning(
                "grammar compile killed at its deadline",
                extra={"grammar_type": grammar_type, "seconds": time.monotonic() - started},
            )
            raise
        finally:
            self._idle.put(worker)

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
