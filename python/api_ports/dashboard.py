"""The dashboard: one HTML page, its stylesheet and script, all shipped in the wheel.

The page is static: its script polls the router's JSON endpoints (``state``,
``backup/list``, ``owners`` when the app has it) and draws everything in the
browser, so it costs the server nothing between polls. Every URL in the page
is relative, so it works wherever the router is mounted, behind a proxy's
path prefix too, and nothing is loaded from any other host. The
``Content-Security-Policy`` header makes the browser hold the page to that.
"""

from __future__ import annotations

import html
from functools import cache
from importlib.resources import files

from dynamic_port_manager import __version__
from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import HTMLResponse

#: The files a browser may ask for, and their types: nothing else is served.
ASSETS = {
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
}

#: Only this server: scripts, styles and requests alike; no inline script.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

#: Seconds between two polls of the page.
POLL_SECONDS = 3


@cache
def _static(name: str) -> str:
    return (files("api_ports") / "static" / name).read_text(encoding="utf-8")


def render_page(api: str, assets: str, docs: str | None) -> str:
    """The page, with ``api`` (the router's ``port/`` folder) and ``assets``
    as URL prefixes relative to the page, and a link to ``docs`` if given."""
    values = {
        "api": api,
        "assets": assets,
        "docs": docs or "",
        "docs_hidden": "" if docs else "hidden",
        "version": __version__,
        "poll": str(POLL_SECONDS),
    }
    page = _static("dashboard.html")
    for key, value in values.items():
        page = page.replace("{{" + key + "}}", html.escape(value, quote=True))
    return page


def page_response(api: str, assets: str, docs: str | None) -> HTMLResponse:
    return HTMLResponse(
        render_page(api, assets, docs),
        headers={
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-cache",
        },
    )


def docs_path(request: Request) -> str | None:
    """The app's Swagger UI page as a path on this server, if it has one."""
    docs_url: str | None = getattr(request.app, "docs_url", None)
    if not docs_url:
        return None
    return str(request.scope.get("root_path", "")).rstrip("/") + docs_url


def add_dashboard(router: APIRouter) -> None:
    """``GET /port/dashboard`` and its two files on ``router``, outside the API schema."""

    @router.get("/port/dashboard", include_in_schema=False, response_class=HTMLResponse)
    def dashboard(request: Request) -> HTMLResponse:
        # The page's folder is the router's `port/`: the endpoints are siblings.
        return page_response(api="", assets="dashboard/", docs=docs_path(request))

    @router.get("/port/dashboard/{name}", include_in_schema=False)
    def dashboard_asset(name: str) -> Response:
        media_type = ASSETS.get(name)
        if media_type is None:
            raise HTTPException(404, "no such dashboard file")
        return Response(
            _static(name),
            media_type=media_type,
            headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"},
        )
