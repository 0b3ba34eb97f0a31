"""Who may see the dashboard: loopback by default, a token or TLS client certificates otherwise.

- Bound to a loopback address (the default ``127.0.0.1``) only this machine can
  connect; no token is needed (one may still be set).
- Bound elsewhere, the dashboard refuses to start unless it has a token, or TLS
  with client certificates (``--tls-client-ca``: only browsers holding a
  certificate signed by that CA, e.g. one from ``python -m server certs
  --client NAME``, complete the handshake).
- With a token every request must carry it: ``Authorization: Bearer TOKEN``, or
  the cookie the page sets after the first visit to ``/?token=TOKEN``. A missing
  or wrong token gets 401. Tokens are compared in constant time.

The checks use Starlette's authentication middleware; the TLS handshake is uvicorn's (Python's ``ssl``).
"""

from __future__ import annotations

import hmac
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.authentication import AuthCredentials, AuthenticationBackend, AuthenticationError, SimpleUser
from starlette.requests import HTTPConnection
from starlette.responses import PlainTextResponse

from shared.errors import ConfigError

TOKEN_COOKIE = "fedseg_dashboard_token"
TOKEN_QUERY = "token"
MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class TlsFiles:
    """The dashboard's HTTPS certificate and key, and optionally the CA its clients' certificates must chain to."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def uvicorn_options(self) -> dict[str, Any]:
        """Keyword arguments of ``uvicorn.Config`` for these files."""
        for path in (self.cert, self.key, self.client_ca):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"TLS file {path} does not exist")
        options: dict[str, Any] = {"ssl_certfile": str(self.cert), "ssl_keyfile": str(self.key)}
        if self.client_ca is not None:
            options.update(ssl_ca_certs=str(self.client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
        return options


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(*, host: str, token: str | None, tls: TlsFiles | None) -> None:
    """Refuse a bind that anyone on the network could read: off loopback, a token or client certificates."""
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"the dashboard token must have at least {MIN_TOKEN_CHARS} characters "
                          "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    if is_loopback(host) or token is not None or (tls is not None and tls.client_ca is not None):
        return
    raise ConfigError(f"'--host {host}' is not loopback: anyone who reaches it could read every run. Give a "
                      "token (--token-file FILE or FEDSEG_DASHBOARD_TOKEN) or require TLS client certificates "
                      "(--tls-cert, --tls-key, --tls-client-ca), or bind to 127.0.0.1")


def read_token_file(path: Path) -> str:
    """The token in ``path`` (its first line, stripped)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"'--token-file': cannot read {path} ({exc.strerror})") from None
    token = lines[0].strip() if lines else ""
    if not token:
        raise ConfigError(f"'--token-file': {path} is empty")
    return token


class TokenBackend(AuthenticationBackend):
    """Every request must carry the token (header, cookie or ``?token=``); otherwise 401."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser]:
        offered = offered_token(conn)
        if offered is None:
            raise AuthenticationError("this dashboard needs a token: open the address it printed at start "
                                      "(…/?token=…) or send 'Authorization: Bearer TOKEN'")
        if not hmac.compare_digest(offered.encode(), self._token):
            raise AuthenticationError("wrong token")
        return AuthCredentials(["authenticated"]), SimpleUser("operator")


def offered_token(conn: HTTPConnection) -> str | None:
    """The token a request carries, from the Authorization header, the cookie or the query."""
    scheme, _, value = conn.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value:
        return value.strip()
    return conn.cookies.get(TOKEN_COOKIE) or conn.query_params.get(TOKEN_QUERY)


def unauthorized(_conn: HTTPConnection, exc: AuthenticationError) -> PlainTextResponse:
    return PlainTextResponse(f"401 Unauthorized: {exc}", status_code=401, headers={"WWW-Authenticate": "Bearer"})
