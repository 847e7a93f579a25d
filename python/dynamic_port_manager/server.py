"""``dynamic-port-manager serve``: the port API on a port the manager picks itself.

The server's own port is leased to this process (``pick_socket(pid=...)``),
so the API's ``pick``/``release`` move the manager's active port without ever
touching the port the server listens on. The socket is bound by the pick,
before uvicorn starts, so no other program can take the port in between.
"""

from __future__ import annotations

import functools
import os
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
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html
from fastapi.responses import HTMLResponse, Response
from fastapi_offline import FastAPIOffline

from . import DynamicPortManager, __version__, release_lease


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


def listen(manager: DynamicPortManager, host: str) -> tuple[socket.socket, int]:
    """A listening socket on ``host`` and a port leased to this process."""
    try:
        sock = manager.pick_socket(pid=os.getpid(), host=host)
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r}: {e.strerror}") from None
    except OSError as e:
        raise OSError(e.errno, f"cannot listen on {host}: {e.strerror or e}") from None
    return sock, sock.getsockname()[1]


def url_of(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


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


def serve(manager: DynamicPortManager, host: str = "127.0.0.1", log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM, then release the port and stop ``manager``."""
    with _stop_on_signals():
        sock, port = listen(manager, host)
        try:
            url = url_of(host, port)

            def announce() -> None:
                try:
                    print(f"Serving on {url}", flush=True)
                    print(
                        f"Dashboard: {url}/  API: {url}/api/v1/port/state  Docs: {url}/docs",
                        flush=True,
                    )
                except OSError:
                    pass  # stdout closed (`serve | head -1`): keep serving regardless

            config = uvicorn.Config(create_app(manager), log_level=log_level, lifespan="on")
            try:
                _Server(config, announce).run(sockets=[sock])
            except SystemExit as e:  # uvicorn's exit when the app fails to start
                raise RuntimeError(f"the server failed to start (status {e.code})") from None
        finally:
            sock.close()
            release_lease(port, registry_dir=manager.registry_dir)
            manager.stop()
