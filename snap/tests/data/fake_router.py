"""A stand-in for `shardline-router` in the launcher's tests: `GET /health` answers 200.

On SIGTERM it "drains" for FAKE_ROUTER_DRAIN_S seconds, records when it stopped in
`$FAKE_RECORD_DIR/router.json`, and exits 0. FAKE_ROUTER_EXIT_AFTER_S: exits 5 on its own then.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hostname", required=True)
    parser.add_argument("--port", type=int, required=True)
    args, _ = parser.parse_known_args()
    record_file = Path(os.environ["FAKE_RECORD_DIR"]) / "router.json"
    record_file.write_text(json.dumps({"argv": sys.argv[1:], "pid": os.getpid()}))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server = ThreadingHTTPServer((args.hostname, args.port), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print("router listening", flush=True)
    if stop.wait(float(os.environ.get("FAKE_ROUTER_EXIT_AFTER_S", "1e9"))):
        time.sleep(float(os.environ.get("FAKE_ROUTER_DRAIN_S", "0")))
        data = json.loads(record_file.read_text())
        record_file.write_text(json.dumps({**data, "stopped_at": time.time()}))
        server.shutdown()
        return
    print("router: lost the shards (fake)", flush=True)
    sys.exit(5)


if __name__ == "__main__":
    main()
