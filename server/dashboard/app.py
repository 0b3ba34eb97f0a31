"""The dashboard's web app (Starlette): pages, the JSON the pages poll, run files and static assets.

Routes (all GET; nothing writes):

- ``/``: the runs list; ``/api/runs`` its live panel.
- ``/runs/{id}``: one run; ``/api/runs/{id}?since=SIGNATURE`` its panels and
  figures, or ``{"unchanged": true}`` when nothing changed since the page's last poll.
- ``/runs/{id}/files/{name}``: the report, its plots, the model and the run's JSON files (a fixed list).
- ``/static/...``: the page's script and style; ``/vendor/plotly.min.js``: Plotly.js from the
  installed ``plotly`` package. No page loads anything from another origin (the
  Content-Security-Policy header forbids it too).
"""

from __future__ import annotations

import functools
import gzip
import time
from collections.abc import Callable
from pathlib import Path

from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.dashboard import formatting
from server.dashboard.pages import (
    UnknownRunError,
    run_dir_of,
    run_entries,
    run_page,
    runs_signature,
    served_file,
)
from server.dashboard.security import TOKEN_COOKIE, TOKEN_QUERY, TokenBackend, unauthorized

HERE = Path(__file__).resolve().parent
#: Panels of a run page, each a macro of ``templates/panels.html`` and a ``<section id="panel-NAME">``.
RUN_PANELS = ("status", "rounds", "sites", "baselines", "plan", "artifacts", "config")
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
       "connect-src 'self'; font-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


class SecurityHeaders:
    """Adds the Content-Security-Policy and related headers to every response (pure ASGI middleware)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["Content-Security-Policy"] = CSP
                headers["X-Content-Type-Options"] = "nosniff"
                headers["Referrer-Policy"] = "no-referrer"  # a ?token= URL must not leak through links
                headers.setdefault("Cache-Control", "no-store")
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(*, runs_dir: Path, token: str | None = None, refresh_seconds: float = 2.0,
               clock: Callable[[], float] = time.time) -> Starlette:
    """The dashboard app over the run folders in ``runs_dir``.

    Parameters
    ----------
    runs_dir : Path
        Folder whose subfolders are run folders (``runs/``).
    token : str, optional
        Required on every request when set (see :mod:`server.dashboard.security`).
    refresh_seconds : float
        How often an open page asks whether its run changed.
    clock : callable
        Unix time now (tests pass a fixed clock).
    """
    runs_dir = Path(runs_dir)
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters.update(formatting.FILTERS)
    panels = templates.env.get_template("panels.html").module
    shared = {"refresh_ms": int(refresh_seconds * 1000), "runs_dir": str(runs_dir)}

    def index(request: Request) -> Response:
        entries = run_entries(runs_dir, now=clock())
        context = {**shared, "entries": entries, "signature": runs_signature(entries)}
        return _remember_token(request) or templates.TemplateResponse(request, "runs.html", context)

    def index_state(request: Request) -> Response:
        entries = run_entries(runs_dir, now=clock())
        signature = runs_signature(entries)
        if request.query_params.get("since") == signature:
            return JSONResponse({"signature": signature, "unchanged": True})
        return JSONResponse({"signature": signature, "panels": {"runs": str(panels.runs(entries, **shared))}})

    def run(request: Request) -> Response:
        page = run_page(run_dir_of(runs_dir, run_id=request.path_params["run_id"]), now=clock())
        context = {**shared, "page": page, "panels": RUN_PANELS, "signature": ""}
        return _remember_token(request) or templates.TemplateResponse(request, "run.html", context)

    def run_state(request: Request) -> Response:
        page = run_page(run_dir_of(runs_dir, run_id=request.path_params["run_id"]), now=clock())
        if request.query_params.get("since") == page.signature:
            return JSONResponse({"signature": page.signature, "unchanged": True})
        return JSONResponse({"signature": page.signature, "figures": page.figures(),
                             "panels": {name: str(getattr(panels, name)(page)) for name in RUN_PANELS}})

    def run_file(request: Request) -> Response:
        run_id, name = request.path_params["run_id"], request.path_params["name"]
        path = served_file(run_dir_of(runs_dir, run_id=run_id), name=name)
        if path is None:
            return PlainTextResponse(f"404: {name} is not in run {run_id}, or not served", status_code=404)
        download = f"{run_id}-{path.name}" if path.suffix == ".pt" else None
        return FileResponse(path, filename=download)

    routes = [Route("/", index), Route("/api/runs", index_state), Route("/runs/{run_id}", run),
              Route("/api/runs/{run_id}", run_state), Route("/runs/{run_id}/files/{name:path}", run_file),
              Route("/vendor/plotly.min.js", plotly_js),
              Mount("/static", StaticFiles(directory=HERE / "static"), name="static")]
    middleware = [Middleware(SecurityHeaders), Middleware(GZipMiddleware, minimum_size=1024)]
    if token is not None:
        middleware.append(Middleware(AuthenticationMiddleware, backend=TokenBackend(token), on_error=unauthorized))
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={UnknownRunError: _unknown_run, Exception: _server_error})


def _remember_token(request: Request) -> Response | None:
    """After ``/?token=...`` (already checked by the middleware): keep it in a cookie, drop it from the URL."""
    token = request.query_params.get(TOKEN_QUERY)
    if token is None or "auth" not in request.scope:
        return None
    response = RedirectResponse(str(request.url.remove_query_params(TOKEN_QUERY)), status_code=303)
    response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https")
    return response


def plotly_js(request: Request) -> Response:
    """Plotly.js as shipped inside the installed ``plotly`` package (4.8 MB; compressed once, not per request)."""
    gzipped = "gzip" in request.headers.get("accept-encoding", "")
    headers = {"Cache-Control": "max-age=86400", "Vary": "Accept-Encoding"}
    if gzipped:
        headers["Content-Encoding"] = "gzip"  # the GZip middleware passes an encoded body through
    return Response(_plotly_js(gzipped=gzipped), media_type="text/javascript", headers=headers)


@functools.cache
def _plotly_js(*, gzipped: bool) -> bytes:
    from plotly.offline import get_plotlyjs

    text = get_plotlyjs().encode()
    return gzip.compress(text, compresslevel=6) if gzipped else text


def _unknown_run(_request: Request, exc: Exception) -> Response:
    return PlainTextResponse(f"404: {exc}", status_code=404)


def _server_error(_request: Request, exc: Exception) -> Response:
    """A bug shows its type and message, never a stack trace (uvicorn logs the trace)."""
    return PlainTextResponse(f"500: the dashboard could not build this page ({type(exc).__name__}: {exc})",
                             status_code=500)
