"""``dynamic-port-manager serve``: the port API, the dashboard and ``/metrics``.

Where it listens, in order of precedence:

- a socket it is handed: ``--fd N``, or systemd's socket activation
  (``LISTEN_FDS=1`` with ``LISTEN_PID`` equal to this process's pid: fd 3);
- ``--port N`` (with ``--host``): a fixed port outside the managed range, for
  a service manager, a proxy or a Prometheus scrape target;
- neither: a port the manager picks itself, leased to this process
  (``pick_socket(pid=...)``) and released at exit.

The API's ``pick``/``release`` move the manager's active port; they never hand
out the port the server listens on. When ``$NOTIFY_SOCKET`` is set (systemd's
``Type=notify``), ``READY=1`` is sent once the server accepts connections and
``STOPPING=1`` when it begins to shut down.
"""

from __future__ import annotations

import functools
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import fastapi_offline
import uvicorn
from api_ports import create_router
from api_ports.dashboard import page_response
from api_ports.metrics import server_registry
from api_ports.routes import METRICS_OPERATION, http_errors, metrics_response
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html
from fastapi.responses import HTMLResponse, Response
from fastapi_offline import FastAPIOffline

from . import DynamicPortManager, __version__, release_lease
from .service import Listener, notify, open_listener


def create_app(manager: DynamicPortManager) -> FastAPI:
    """The monitoring app: the dashboard at ``/``, the port router at ``/api/v1``,
    docs at ``/docs`` and ``/redoc``, every asset served from installed packages."""
    # FastAPIOffline serves Swagger UI and ReDoc from files its wheel ships,
    # where FastAPI's own pages load them from a CDN (a blank page offline).
    app = FastAPIOffline(
        title="dynamic-port-manager",
        version=__version__,
        description=f"Ports {manager.start}-{manager.end}, state file `{manager.state_path}`.",
        # Swagger UI would otherwise load a badge from its online validator.
        swagger_ui_parameters={"validatorUrl": None},
        redoc_url=None,  # served below, from a bundle that asks no CDN for its logo
    )
    app.include_router(create_router(manager), prefix="/api/v1")

    def state() -> dict[str, Any]:
        with http_errors():
            return manager.get_state()

    metrics_registry = server_registry(state)

    @app.get("/metrics", operation_id="get_server_metrics", **METRICS_OPERATION)
    def metrics(request: Request) -> Response:
        # `/api/v1/port/metrics` and this process's `process_*` and `python_*`.
        return metrics_response(metrics_registry, request)

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}/redoc.standalone.js",
            redoc_favicon_url=f"{root}/static-offline-docs/favicon.png",
            with_google_fonts=False,
        )

    @app.get("/redoc.standalone.js", include_in_schema=False)
    def redoc_bundle() -> Response:
        return Response(offline_redoc_bundle(), media_type="application/javascript")

    @app.get("/", include_in_schema=False, response_class=HTMLResponse)
    def root() -> HTMLResponse:
        return page_response(api="api/v1/port/", assets="api/v1/port/dashboard/", docs="docs")

    return app


#: ReDoc's attribution draws its logo from this CDN address, whatever the page.
REDOC_CDN_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"


@functools.lru_cache(maxsize=1)
def offline_redoc_bundle() -> bytes:
    """fastapi-offline's ReDoc bundle, its CDN logo address emptied: an image
    with no source asks nothing of anyone, and ReDoc hides it on the error."""
    bundle = Path(fastapi_offline.__file__).parent / "static" / "redoc.standalone.js"
    return bundle.read_bytes().replace(REDOC_CDN_LOGO, b"")


class _Server(uvicorn.Server):
    """Announces the URL once the app has started and the server accepts."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and not self.should_exit:
            self._on_started()


class _Stop(Exception):
    """SIGINT or SIGTERM, after uvicorn's graceful shutdown."""


@contextmanager
def _stop_on_signals() -> Iterator[None]:
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the
    # signal to the handler it found: this one, so the lease is released and
    # the manager stopped before the process exits (status 0).
    def stop(signum: int, frame: Any) -> None:
        # Once: a second signal must not cut the clean-up short.
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        raise _Stop(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except _Stop:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(
    manager: DynamicPortManager,
    host: str | None = None,
    log_level: str = "info",
    *,
    port: int | None = None,
    fd: int | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM, then stop ``manager`` (and give back the
    server's own port if it was picked). ``fd``, ``port``: see the module's doc."""
    with _stop_on_signals():
        listener = open_listener(manager, host=host, port=port, fd=fd)
        try:
            url = listener.url

            def announce() -> None:
                try:
                    print(f"Serving on {url}", flush=True)
                    print(
                        f"Dashboard: {url}/  API: {url}/api/v1/port/state  "
                        f"Metrics: {url}/metrics  Docs: {url}/docs",
                        flush=True,
                    )
                except OSError:
                    pass  # stdout closed (`serve | head -1`): keep serving regardless
                notify(f"READY=1\nSTATUS=Serving on {url}")

            config = uvicorn.Config(create_app(manager), log_level=log_level, lifespan="on")
            try:
                _Server(config, announce).run(sockets=[listener.sock])
            except SystemExit as e:  # uvicorn's exit when the app fails to start
                raise RuntimeError(f"the server failed to start (status {e.code})") from None
        finally:
            notify("STOPPING=1")
            _close(listener, manager)


def _close(listener: Listener, manager: DynamicPortManager) -> None:
    listener.sock.close()
    if listener.leased:
        release_lease(listener.port, registry_dir=manager.registry_dir)
    manager.stop()
