import sys
sys.path.insert(0, "/tmp/mine")
from stage import stage
work = open("launcher/args.py").read()
helper = work[work.index("def _without_own_hostname"):work.index("def _add_flag(")]
args = [
('''    Flag(("--hostname",), "HOSTNAME", "address the HTTP server listens on", default="0.0.0.0"),
    Flag(("-p", "--port"), "PORT", "port the HTTP server listens on", type=int, default=3000),
''','''    Flag(("--hostname",), "HOSTNAME", "address the HTTP server listens on (0.0.0.0: every "
         "interface); HOSTNAME is ignored when it is this machine's own name, as containers "
         "set it", default="0.0.0.0"),
    Flag(("-p", "--port"), "PORT", "port the HTTP server listens on", type=int, default=3000),
    Flag(("--prometheus-port",), "PROMETHEUS_PORT", "port that serves /metrics without the "
         "API key, on --hostname (0: none; a port already taken is skipped with a warning)",
         type=int, default=9000),
'''),
('''    Flag(("--api-key",), "API_KEY", "bearer token every request must carry"),
''','''    Flag(("--api-key",), "API_KEY", "bearer token every request must carry"),
    Flag(("--metrics-without-auth",), "METRICS_WITHOUT_AUTH", "serve /metrics on --port "
         "without --api-key too, as TGI does", switch=True),
'''),
('''    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(''','''    environ = _without_own_hostname(os.environ if environ is None else environ)
    parser = argparse.ArgumentParser('''),
('''def _add_flag(parser: argparse.ArgumentParser, flag: Flag, environ: Mapping[str, str]) -> None:''',
helper + '''def _add_flag(parser: argparse.ArgumentParser, flag: Flag, environ: Mapping[str, str]) -> None:'''),
('''import os
''','''import os
import socket
'''),
]
commands = [
('''                ("--port", args.port),
''','''                ("--port", args.port),
                ("--prometheus-port", args.prometheus_port),
'''),
('''                ("--api-key", args.api_key),
''','''                ("--api-key", args.api_key),
                ("--metrics-without-auth", args.metrics_without_auth),
'''),
]
stage("launcher/args.py", args)
stage("launcher/commands.py", commands)
