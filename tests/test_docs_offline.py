"""`serve`'s `/`, `/docs` and `/redoc` need nothing but the server itself.

FastAPI's own docs pages load Swagger UI and ReDoc from a CDN: a blank page on
a host without internet access. `serve` takes them from the `fastapi-offline`
wheel instead. Checked twice: the pages' markup names no other host and every
file it names is served; and a real Chromium that cannot resolve any host
name draws them, asking nothing of anyone but the server.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import pytest
from browser import chromium, serve
from dynamic_port_manager import DynamicPortManager
from dynamic_port_manager.server import create_app
from fastapi.testclient import TestClient
from router_helpers import new_manager

PAGES = ("/", "/docs", "/redoc")
# Attribute values and `url: '...'` in the pages' inline script.
URL_IN_PAGE = re.compile(r"""(?:\b(?:href|src|spec-url)=|\burl:\s*)["']([^"']*)["']""")
# A reference to a host: `//name`, with or without a scheme before it.
HOST = re.compile(r"(?:[a-z][a-z0-9+.-]*:)?//[^/\s\"'<>]+", re.I)
# ReDoc's "API docs by Redocly" link is drawn and the logo image in it is gone.
REDOC_LOGO_SETTLED = """(() => {
    const credit = document.querySelector('a[href*="redocly.com"]');
    return credit !== null && credit.querySelector('img') === null;
})()"""


pytestmark = pytest.mark.usefixtures("cli_env")


@pytest.fixture
def manager(
    state_path: Path, free_port_range: Callable[[int], range]
) -> Iterator[DynamicPortManager]:
    block = free_port_range(8)
    m = new_manager(state_path, block.start, block[-1])
    yield m
    m.stop()


@pytest.mark.parametrize("path", PAGES)
def test_page_names_no_other_host_and_every_file_it_names_is_served(
    manager: DynamicPortManager, path: str
) -> None:
    client = TestClient(create_app(manager))
    page = client.get(path)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert HOST.findall(page.text) == []
    urls = [u for u in URL_IN_PAGE.findall(page.text) if not u.startswith("data:")]
    assert urls, "the page names its files"
    base = "/" if path == "/" else "/docs"  # the folder relative URLs resolve in
    for url in urls:
        target = url if url.startswith("/") else base.rstrip("/") + "/" + url
        assert client.get(target).status_code == 200, url


@pytest.mark.slow
def test_docs_and_redoc_draw_the_api_in_chromium_with_no_other_host_reachable(
    tmp_path: Path, free_port_range: Callable[[int], range]
) -> None:
    block = free_port_range(8)
    with ExitStack() as stack:
        # The browser first: without one, the test skips before starting anything.
        browser = stack.enter_context(chromium(tmp_path / "profile"))
        server = stack.enter_context(serve(tmp_path, "--range", f"{block.start}-{block[-1]}"))

        docs = browser.new_page()
        docs.navigate(server.url + "/docs")
        # Swagger UI has drawn an operation block per endpoint.
        assert docs.wait_for("document.querySelectorAll('.opblock').length") >= 10
        text = docs.evaluate("document.body.innerText")
        assert "/api/v1/port/pick" in text and "/api/v1/port/state" in text

        redoc = browser.new_page()
        redoc.navigate(server.url + "/redoc")
        redoc.wait_for("document.body.innerText.includes('Pick a free port')")

        # ReDoc's attribution draws its logo and removes the image once its
        # load has failed: by then the logo has been asked for wherever its
        # bundle says (the bundle served here names no CDN for it).
        redoc.wait_for(REDOC_LOGO_SETTLED)
        for page in (docs, redoc):
            assert page.foreign_urls(server.url) == []
            assert page.errors() == []


def test_the_redoc_bundle_served_names_no_other_host(manager: DynamicPortManager) -> None:
    with TestClient(create_app(manager)) as client:
        page = client.get("/redoc").text
        bundle = client.get("/redoc.standalone.js")
    assert bundle.status_code == 200
    assert "/redoc.standalone.js" in page
    assert "fonts.googleapis.com" not in page
    assert b"cdn.redoc.ly/redoc/logo" not in bundle.content
