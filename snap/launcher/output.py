"""The children's output on the launcher's stderr: `[shard 0] line`, or JSON lines that name the
process and its rank with `--json-output` (a child's own JSON events are kept and tagged)."""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import TextIO

from shardline.launcher.commands import ChildSpec


class ChildOutput:
    def __init__(self, json_output: bool, stream: TextIO | None = None) -> None:
        self.json_output = json_output
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()

    def write(self, spec: ChildSpec, line: str) -> None:
        text = self._json_line(spec, line) if self.json_output else f"[{spec.name}] {line}"
        with self._lock:
            self.stream.write(text + "\n")
            self.stream.flush()

    @staticmethod
    def _json_line(spec: ChildSpec, line: str) -> str:
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            event = {"timestamp": _now(), "level": "INFO", "message": line}
        event.setdefault("process", spec.name.split()[0])
        if spec.rank is not None:
            event.setdefault("rank", spec.rank)
        return json.dumps(event)


def _now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
