"""``prism serve``: the HTTP port (Granian, Hypercorn or pyvoy) and the embedded gRPC port, one
process per worker. Options become ``PRISM_*`` variables so every worker process reads the same
settings; the settings are validated here first, so a bad configuration exits at once with
the key that is wrong."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

from app import logs
from app.settings import Settings, SettingsError, load_settings

SERVERS = ("hypercorn", "granian", "pyvoy")
DEFAULT_SERVER = "granian"  # by measurement: see README, Performance
TRAILER_SERVERS = ("pyvoy", "hypercorn")  # HTTP/2 trailers, so native gRPC through the ASGI app


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prism", description="Prism data access gateway")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="YAML server configuration (default: embedded defaults)")
    serve.add_argument(
        "--host", help="HTTP bind address (default 127.0.0.1; the gRPC port's is grpc.host, PRISM_GRPC__HOST)"
    )
    serve.add_argument("--port", type=int, help="HTTP port (default 8080)")
    serve.add_argument("--grpc-port", type=int, help="native gRPC port (default 8980)")
    serve.add_argument("--data-dir", help="directory for the embedded SQLite file (default ./data)")
    serve.add_argument("--certfile", help="TLS certificate (PEM) for both ports")
    serve.add_argument("--keyfile", help="TLS private key (PEM) for both ports")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    serve.add_argument("--server", choices=SERVERS, default=os.environ.get("PRISM_SERVER", DEFAULT_SERVER))
    serve.add_argument("--log-level", default="info")
    serve.add_argument(
        "--log-format", choices=("json", "text"), default=None, help="json lines or text (default: text at a terminal, else json)"
    )
    listener = commands.add_parser(
        "listener", help="run the Transact mailbox listener alone (`serve` runs it too, unless mailbox_listener.in_gateway is false)"
    )
    listener.add_argument("--config", help="YAML server configuration: the one the gateway reads")
    listener.add_argument("--data-dir", help="directory of the embedded SQLite file (default ./data)")
    listener.add_argument("--log-level", default="info")
    listener.add_argument(
        "--log-format", choices=("json", "text"), default=None, help="json lines or text (default: text at a terminal, else json)"
    )
    pseudonym = commands.add_parser(
        "pseudonym", help="the pseudonym logs, traces and audit records carry for an identity (app/pii.py)"
    )
    pseudonym.add_argument("identity")
    pseudonym.add_argument("--config", help="YAML server configuration: the one the gateway reads")
    pseudonym.add_argument("--data-dir", help="the gateway's data directory (its secret key, without secret_key)")
    return parser


def print_pseudonym(args: argparse.Namespace) -> int:
    """``prism pseudonym NAME``: find a named caller's lines, the key staying with the operator."""
    from app import pii
    from app.settings import SettingsError, load_settings

    environ = dict(os.environ) | ({"PRISM_DATA_DIR": args.data_dir} if args.data_dir else {})
    try:
        settings = load_settings(args.config, environ)
    except SettingsError as exc:
        print(f"prism: {exc}", file=sys.stderr)
        return 2
    if settings.secret_key is None and not (settings.data_dir / "secret.key").exists():
        print(f"prism: no secret key in {settings.data_dir}: name the gateway's --data-dir or --config", file=sys.stderr)
        return 2
    pii.configure(settings.signing_key() if settings.mask_pii else None)
    print(pii.identity(args.identity))
    return 0


def listen(args: argparse.Namespace) -> int:
    """``prism listener``: the mailbox listener alone, until SIGTERM or SIGINT (app/listener.py).
    It opens only the backends its routes need; its destinations must be shared ones."""
    import asyncio  # only this command runs a loop of its own

    import uvloop

    from app.listener import run_alone
    from prism.errors import PrismError

    for name, value in {"PRISM_CONFIG": args.config, "PRISM_DATA_DIR": args.data_dir}.items():
        if value is not None:
            os.environ[name] = str(value)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"prism: {exc}", file=sys.stderr)
        return 2

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await run_alone(settings, stop)

    print("prism: mailbox listener starting", file=sys.stderr)
    try:
        uvloop.run(run())
    except SettingsError as exc:
        print(f"prism: {exc}", file=sys.stderr)
        return 2
    except PrismError as exc:  # a backend unreachable at start-up
        print(f"prism: {exc.message}", file=sys.stderr)
        return 1
    return 0


def _export(args: argparse.Namespace) -> None:
    pairs = {
        "PRISM_CONFIG": args.config,
        "PRISM_HTTP__HOST": args.host,
        "PRISM_HTTP__PORT": args.port,
        "PRISM_GRPC__PORT": args.grpc_port,
        "PRISM_DATA_DIR": args.data_dir,
        "PRISM_TLS__CERTFILE": args.certfile,
        "PRISM_TLS__KEYFILE": args.keyfile,
    }
    for name, value in pairs.items():
        if value is not None:
            os.environ[name] = str(value)
    os.environ["PRISM_WORKERS"] = str(args.workers)
    os.environ["PRISM_LOG_FORMAT"] = args.log_format  # each worker configures its logging from these
    os.environ["PRISM_LOG_LEVEL"] = args.log_level
    os.environ["PRISM_SERVER"] = args.server  # app.asgi adapts to the server in each worker


@contextlib.contextmanager
def _metrics_dir(processes: int) -> Iterator[None]:
    """With several worker processes, one directory where each writes its metrics, so any
    worker's /metrics adds all of them up (app/metrics.py); removed when they have stopped. Set
    before anything here imports prometheus-client: it picks its value store at import."""
    if processes == 1 or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # or a supervisor's own
        yield
        return
    directory = tempfile.mkdtemp(prefix="prism-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    try:
        yield
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def serve(args: argparse.Namespace) -> int:
    _export(args)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"prism: {exc}", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("prism: --workers must be at least 1", file=sys.stderr)
        return 2
    http, grpc_port = settings.http, settings.grpc
    tls = settings.tls
    grpc_server = grpc_port.server
    if grpc_server == "asgi" and args.server not in TRAILER_SERVERS:
        print(
            f"prism: grpc.server asgi needs an HTTP server with HTTP/2 trailers ({', '.join(TRAILER_SERVERS)}), "
            f"not {args.server}: use --server pyvoy, or grpc.server grpc.aio",
            file=sys.stderr,
        )
        return 2
    print(
        f"prism: HTTP on {'https' if tls else 'http'}://{http.host}:{http.port} ({args.server}), "
        f"gRPC on {grpc_port.host}:{grpc_port.port} ({grpc_server if grpc_server == 'grpc.aio' else args.server}), "
        f"workers={args.workers}",
        file=sys.stderr,
    )
    pyvoy_ports = 2 if args.server == "pyvoy" and grpc_server == "asgi" else 1
    with _metrics_dir(args.workers * pyvoy_ports):
        return _run(args, settings)


def _run(args: argparse.Namespace, settings: Settings) -> int:
    http, grpc_port, tls = settings.http, settings.grpc, settings.tls
    mtls = settings.auth.mtls if settings.auth is not None else None
    if args.server == "granian":
        if mtls is not None and tls is not None and mtls.forwarded is None:
            print(
                "prism: warning: Granian cannot pass client certificates to the app: on the HTTP "
                "port they authenticate nobody (use --server hypercorn, or auth.mtls.forwarded "
                "behind a TLS-terminating proxy); the gRPC port requires them",
                file=sys.stderr,
            )
        from granian import Granian
        from granian.constants import HTTPModes, Interfaces, Loops

        Granian(
            "app.asgi:app",
            address=http.host,
            port=http.port,
            interface=Interfaces.ASGI,
            workers=args.workers,
            loop=Loops.uvloop,
            http=HTTPModes.auto,
            ssl_cert=tls.certfile if tls else None,
            ssl_key=tls.keyfile if tls else None,
            log_level=args.log_level,
        ).serve()
        return 0
    if args.server == "pyvoy":
        return _serve_pyvoy(args, settings)
    from hypercorn.config import Config
    from hypercorn.run import run

    config = Config()
    config.application_path = "app.asgi:app"
    config.bind = [f"{http.host}:{http.port}"]
    if grpc_port.server == "asgi":
        config.bind.append(f"{grpc_port.host}:{grpc_port.port}")
    config.workers = 0 if args.workers == 1 else args.workers  # 0 = serve in this process
    config.worker_class = "uvloop"
    config.keep_alive_max_requests = 2**31  # Hypercorn's default closes h2 connections after 1000
    config.loglevel = args.log_level.upper()
    if tls:
        config.certfile, config.keyfile = str(tls.certfile), str(tls.keyfile)
        if mtls is not None:
            # Optional, so callers with an API key or a token still connect; a certificate from
            # another CA fails the handshake, and app/hypercorn_tls.py hands a good one to the app.
            config.ca_certs, config.verify_mode = str(mtls.ca_file), ssl.CERT_OPTIONAL
    try:
        return run(config)
    except Exception as exc:
        print(f"prism: failed to start: {exc}", file=sys.stderr)
        return 1


# Envoy at "info" lists its extensions at start-up: one step quieter than the gateway.
PYVOY_LOG_LEVELS = {"debug": "info", "info": "warning", "warning": "warning", "error": "error", "critical": "critical"}


def _serve_pyvoy(args: argparse.Namespace, settings: Settings) -> int:
    """pyvoy (Envoy with the app as a dynamic module: HTTP/1.1, HTTP/2 with trailers, TLS,
    client certificates) runs one Python process per port; ``--workers N`` runs N of them on
    each port, which Envoy opens with SO_REUSEPORT so the kernel spreads connections over them.
    With grpc.server asgi the gRPC port gets N processes of its own: in-process backends are then
    per process, as with workers, which the gateway warns about."""
    tls = settings.tls
    listeners = [settings.http]
    if settings.grpc.server == "asgi":
        listeners.append(settings.grpc)
        os.environ["PRISM_WORKERS"] = str(args.workers * len(listeners))
    commands = []
    for listener in listeners:
        command = [
            sys.executable, "-c", "from pyvoy._cli import main; main()", "app.asgi:app",
            "--address", listener.host, "--port", str(listener.port),
            "--log-level", PYVOY_LOG_LEVELS.get(args.log_level.lower(), "warning"),
        ]  # fmt: skip
        if tls:
            command += ["--tls-cert", str(tls.certfile), "--tls-key", str(tls.keyfile), "--tls-disable-http3"]
            mtls = settings.auth.mtls if settings.auth is not None else None
            if mtls is not None:  # optional, as on Hypercorn: API keys and tokens still connect
                command += ["--tls-ca-cert", str(mtls.ca_file), "--no-tls-require-client-certificate"]
        commands.append(command)
    workers = [subprocess.Popen(command) for command in commands for _ in range(args.workers)]

    def forward(signum: int, _: object) -> None:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    try:  # until a signal stops them all, or one worker ends (it failed): then the others too
        while all(worker.poll() is None for worker in workers):
            time.sleep(0.2)
    finally:
        forward(signal.SIGTERM, None)
    codes = [worker.wait() for worker in workers]
    return max(codes, key=abs)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.log_format = getattr(args, "log_format", None) or logs.default_format()
    logs.configure(getattr(args, "log_level", "info"), args.log_format)
    if args.command == "listener":
        return listen(args)
    if args.command == "pseudonym":
        return print_pseudonym(args)
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
