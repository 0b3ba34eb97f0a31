"""``python -m server dashboard --runs runs/``: serve the consortium dashboard (uvicorn).

:func:`serve_dashboard` runs it in the foreground (the command);
:func:`running_dashboard` in a background thread for as long as a ``with``
block lasts (tests, scripts). Both refuse a bind that anyone on the network
could read (:func:`server.dashboard.security.check_exposure`).
"""

from __future__ import annotations

import argparse
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn

from server.dashboard.app import create_app
from server.dashboard.security import TlsFiles, check_exposure, is_loopback, read_token_file

TOKEN_ENV = "FEDSEG_DASHBOARD_TOKEN"
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8050
START_TIMEOUT = 15.0


def _uvicorn_config(*, runs: Path, host: str, port: int, token: str | None, tls: TlsFiles | None,
                    refresh_seconds: float) -> uvicorn.Config:
    check_exposure(host=host, token=token, tls=tls)
    app = create_app(runs_dir=Path(runs), token=token, refresh_seconds=refresh_seconds)
    return uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off",
                          **(tls.uvicorn_options() if tls else {}))


def dashboard_url(*, host: str, port: int, tls: TlsFiles | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{shown}:{port}/"


def serve_dashboard(*, runs: Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, token: str | None = None,
                    tls: TlsFiles | None = None, refresh_seconds: float = 2.0,
                    say: Callable[[str], Any] = print) -> None:
    """Serve the dashboard over ``runs`` until interrupted (Ctrl-C or SIGTERM).

    Parameters
    ----------
    runs : Path
        The folder of run folders (``runs/``); read, never written.
    host, port : str, int
        Where to listen; loopback by default. Anything else needs ``token`` or client certificates.
    token : str, optional
        Required on every request when set.
    tls : TlsFiles, optional
        HTTPS certificate and key, and optionally the CA that clients' certificates must chain to.
    refresh_seconds : float
        How often open pages ask for changes.
    say : callable
        Where the start-up lines go.
    """
    config = _uvicorn_config(runs=runs, host=host, port=port, token=token, tls=tls,
                             refresh_seconds=refresh_seconds)
    say(f"[fedseg] dashboard of {Path(runs).resolve()} at {dashboard_url(host=host, port=port, tls=tls)}")
    if token is not None:
        say("[fedseg] a token is required: open the address once with ?token=<your token> (kept in a cookie), "
            "or send 'Authorization: Bearer <token>'")
    if not is_loopback(host) and tls is None:
        say("[fedseg] WARNING: plain HTTP off loopback: the token crosses the network readable; "
            "add --tls-cert/--tls-key")
    uvicorn.Server(config).run()


@contextmanager
def running_dashboard(*, runs: Path, host: str = DEFAULT_HOST, port: int = 0, token: str | None = None,
                      tls: TlsFiles | None = None, refresh_seconds: float = 2.0) -> Iterator[str]:
    """Serve the dashboard in a background thread while the block runs; yield its base URL.

    ``port=0`` takes a free port. Same parameters as :func:`serve_dashboard`.
    """
    config = _uvicorn_config(runs=runs, host=host, port=port, token=token, tls=tls,
                             refresh_seconds=refresh_seconds)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, port), family=family)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, name="fedseg-dashboard",
                              daemon=True)
    thread.start()
    try:
        _wait_started(server, thread)
        yield dashboard_url(host=host, port=listener.getsockname()[1], tls=tls)
    finally:
        server.should_exit = True
        thread.join(timeout=START_TIMEOUT)
        listener.close()


def _wait_started(server: uvicorn.Server, thread: threading.Thread) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the dashboard server did not start (see the log above)")
        time.sleep(0.02)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m server dashboard``."""
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="folder of run folders (default: runs)")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on (default: 127.0.0.1; others need a token or client certificates)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument("--token-file", type=Path,
                        help=f"file whose first line is the access token (or set {TOKEN_ENV})")
    parser.add_argument("--tls-cert", type=Path, help="HTTPS certificate (e.g. server.pem from 'server certs')")
    parser.add_argument("--tls-key", type=Path, help="its private key (e.g. server.key)")
    parser.add_argument("--tls-client-ca", type=Path,
                        help="require client certificates signed by this CA (e.g. ca.crt from 'server certs')")
    parser.add_argument("--refresh", type=float, default=2.0, help="seconds between a page's checks (default: 2)")


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted."""
    from shared.errors import ConfigError

    token = read_token_file(args.token_file) if args.token_file else os.environ.get(TOKEN_ENV) or None
    if (args.tls_cert is None) != (args.tls_key is None) or (args.tls_client_ca and not args.tls_cert):
        raise ConfigError("'--tls-cert' and '--tls-key' go together ('--tls-client-ca' needs both)")
    tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    if args.refresh <= 0:
        raise ConfigError(f"'--refresh' must be > 0 seconds, got {args.refresh}")
    serve_dashboard(runs=args.runs, host=args.host, port=args.port, token=token, tls=tls,
                    refresh_seconds=args.refresh)
    return 0
