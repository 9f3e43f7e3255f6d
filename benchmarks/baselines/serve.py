"""Serve a baseline ASGI app the way ``prism serve`` serves the gateway (app/cli.py): one
worker, uvloop, HTTP/1.1 + h2c; Hypercorn in-process with keep_alive_max_requests raised,
Granian with HTTPModes.auto, pyvoy (its launcher and Envoy, uvloop, one worker thread) as
``prism serve --server pyvoy`` starts it.

    python -m benchmarks.baselines.serve --server granian --port 8081 benchmarks.baselines.raw_asgi:app
"""

from __future__ import annotations

import argparse
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("app", help="module:attribute of the ASGI app")
    parser.add_argument("--server", choices=("hypercorn", "granian", "pyvoy"), required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()
    if args.server == "pyvoy":
        from pyvoy._cli import main as pyvoy_main

        sys.argv = ["pyvoy", args.app, "--address", args.host, "--port", str(args.port), "--log-level", "warning"]
        pyvoy_main()
        return 0
    if args.server == "granian":
        from granian import Granian
        from granian.constants import HTTPModes, Interfaces, Loops

        Granian(
            args.app,
            address=args.host,
            port=args.port,
            interface=Interfaces.ASGI,
            workers=1,
            loop=Loops.uvloop,
            http=HTTPModes.auto,
            log_level=args.log_level,
        ).serve()
        return 0
    from hypercorn.config import Config
    from hypercorn.run import run

    config = Config()
    config.application_path = args.app
    config.bind = [f"{args.host}:{args.port}"]
    config.workers = 0  # serve in this process, as prism serve does with one worker
    config.worker_class = "uvloop"
    config.keep_alive_max_requests = 2**31
    config.loglevel = args.log_level.upper()
    return run(config)


if __name__ == "__main__":
    sys.exit(main())
