"""The dashboard: served by the router and by `serve`, and read in a real headless Chromium.

The browser tests start a real ``dynamic-port-manager serve``, pick ports over
HTTP, load ``/`` once and read the DOM after the page's script has drawn it;
later changes must show up without a reload. They skip, saying why, where no
Chromium is installed. Set ``DPM_DASHBOARD_PNG`` to also copy the screenshot
there (this is how ``docs/dashboard.png`` is made).
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin

import api_ports
import httpx
import pytest
from api_ports.dashboard import CONTENT_SECURITY_POLICY
from browser import Page, chromium, serve
from dynamic_port_manager import DynamicPortManager
from dynamic_port_manager.server import create_app
from fastapi.testclient import TestClient
from router_helpers import app_with, cli, new_manager, port_block

pytestmark = pytest.mark.usefixtures("cli_env")


@pytest.fixture
def manager(state_path: Path) -> Iterator[DynamicPortManager]:
    m = new_manager(state_path, *port_block())
    yield m
    m.stop()


class Links(HTMLParser):
    """The URLs a page's markup points at."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("href", "src") and value is not None:
                self.urls.append(value)


def links_of(html: str) -> list[str]:
    parser = Links()
    parser.feed(html)
    return parser.urls


# ---- without a browser: where the page is, and what it points at ------------


@pytest.mark.parametrize("where", ["router", "serve"])
def test_the_page_and_every_file_and_endpoint_it_names_are_served(
    manager: DynamicPortManager, where: str
) -> None:
    if where == "router":
        client = TestClient(app_with(api_ports.create_router(manager)))
        page_url = "http://testserver/api/v1/port/dashboard"
    else:
        client = TestClient(create_app(manager))
        page_url = "http://testserver/"
    page = client.get(page_url)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    urls = [url for url in links_of(page.text) if not url.startswith("data:")]
    # The stylesheet, the script, the state JSON and the docs: all relative,
    # so they resolve under whatever prefix the router is mounted at.
    assert {u.rsplit("/", 1)[-1] for u in urls} >= {"dashboard.css", "dashboard.js", "state"}
    for url in urls:
        assert "//" not in url, url
        response = client.get(urljoin(page_url, url))
        assert response.status_code == 200, url
    # The script asks for these, relative to the API folder the page names.
    api = page.text.split('data-api="', 1)[1].split('"', 1)[0]
    for endpoint in ("state", "backup/list", "owners"):
        assert client.get(urljoin(page_url, api + endpoint)).status_code == 200


def test_dashboard_files_have_their_types_and_nothing_else_is_served(
    manager: DynamicPortManager,
) -> None:
    client = TestClient(app_with(api_ports.create_router(manager)))
    css = client.get("/api/v1/port/dashboard/dashboard.css")
    js = client.get("/api/v1/port/dashboard/dashboard.js")
    assert css.headers["content-type"].startswith("text/css") and "prefers-color-scheme" in css.text
    assert js.headers["content-type"].startswith("text/javascript") and "textContent" in js.text
    for name in ("dashboard.html", "..%2Fdashboard.py", "__init__.py", "nope.js"):
        assert client.get(f"/api/v1/port/dashboard/{name}").status_code == 404
    # A page, not an API operation: the schema (and its clients) never see it.
    paths = client.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if "dashboard" in p]


def test_the_page_loads_nothing_from_another_host(manager: DynamicPortManager) -> None:
    client = TestClient(create_app(manager))
    page = client.get("/").text
    assert "http:" not in page and "https:" not in page and "//" not in page.replace("://", "")
    for name in ("dashboard.css", "dashboard.js"):
        text = client.get(f"/api/v1/port/dashboard/{name}").text
        # The script names the SVG namespace, an identifier that is never fetched.
        assert text.replace("http://www.w3.org/2000/svg", "").count("http") == 0, name
        assert "@import" not in text and "@font-face" not in text


# ---- in a real browser ------------------------------------------------------


def _listen_in(start: int, end: int) -> socket.socket:
    """A socket of this test listening on some port of the range (another program)."""
    for _ in range(50):
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", random.randint((start + end) // 2, end)))
        except OSError:
            sock.close()
            continue
        sock.listen(1)
        return sock
    raise AssertionError(f"no port of {start}-{end} could be bound")


def _row(page: Page, table: str, port: int) -> dict[str, str] | None:
    """The cells of the row of ``port`` in table ``table``, by column title."""
    value = page.evaluate(
        f"""(() => {{
            const row = document.querySelector('#{table} tbody tr[data-port="{port}"]');
            if (!row) return null;
            const heads = [...document.querySelectorAll('#{table} thead th')];
            return Object.fromEntries(
                heads.map((th, i) => [th.textContent, row.cells[i].textContent]));
        }})()"""
    )
    return value if value is None else dict(value)


def _cell_js(port: int) -> str:
    return f"document.querySelector('#grid [data-port=\"{port}\"]')"


def _cell_state(page: Page, port: int) -> str | None:
    state: str | None = page.evaluate(f"{_cell_js(port)}?.dataset.state ?? null")
    return state


def _comm(pid: int) -> str:
    """A process's full name, as the owners data shows it: the kernel's name
    (cut at 15 bytes) completed from the command line's program or script."""
    comm = Path(f"/proc/{pid}/comm").read_text().strip()
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    for arg in argv[:2]:
        name = os.path.basename(arg.decode(errors="replace"))
        if len(comm) == 15 and name.startswith(comm):
            return name
    return comm


def _minutes_around(before: float, after: float) -> set[str]:
    """ISO minutes (with this host's UTC offset) between two times."""
    found = set()
    t = before - 60
    while t <= after + 60:
        stamp = time.strftime("%Y-%m-%dT%H:%M%z", time.localtime(t))
        found.add(stamp[:-2] + ":" + stamp[-2:])
        t += 30
    return found


@pytest.mark.slow
def test_dashboard_shows_each_lease_with_its_pid_and_follows_a_new_pick_without_reload(
    tmp_path: Path,
) -> None:
    start, end = port_block(6001)  # the size of the original's 3000-9000
    state_file = tmp_path / "port_state" / "dynamic_ports.json"
    worker_state = tmp_path / "port_state" / "worker.json"
    # A program holding a port of the range without asking the manager, and a
    # port the command line leases to another process through another state
    # file (the owners endpoint names that lease; the state has its own only).
    other = _listen_in(start, end)
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with ExitStack() as stack:
        # The browser first: without one, the test skips before starting anything.
        browser = stack.enter_context(chromium(tmp_path / "profile"))
        server = stack.enter_context(
            serve(
                tmp_path,
                "--range",
                f"{start}-{end}",
                "--state",
                str(state_file),
                env={"DPM_REFRESH_INTERVAL": "1"},
            )
        )
        http = stack.enter_context(httpx.Client(base_url=server.url, timeout=30))
        picked = cli(
            "pick",
            "--pid",
            str(worker.pid),
            "--range",
            f"{start}-{end}",
            "--state",
            str(worker_state),
        )
        assert picked.returncode == 0, picked.stderr
        worker_port = int(picked.stdout)
        before = time.time()
        first = http.post("/api/v1/port/pick").json()["port"]
        after = time.time()

        page = browser.new_page()
        page.navigate(server.url + "/")
        page.wait_for("Number(document.body.dataset.updates) >= 1")

        # The port picked over HTTP, leased to the server's process, named
        # (from the owners data: it holds a socket on its own port).
        page.wait_for(f"!!document.querySelector('#leases tr[data-port=\"{first}\"]')")
        row = _row(page, "leases", first)
        assert row is not None
        assert row["PID"] == str(server.proc.pid)
        assert row["Process"] == _comm(server.proc.pid)
        assert row["State file"] == str(state_file)
        assert row["Port"].startswith(str(first)) and "active" in row["Port"]
        assert _cell_state(page, first) == "leased"
        # The other process's lease, with its own pid and state file; it holds
        # no socket, so its name is not known.
        row = _row(page, "leases", worker_port)
        assert row is not None and row["PID"] == str(worker.pid)
        assert row["State file"] == str(worker_state)
        assert row["Process"] == "unknown"
        assert _cell_state(page, worker_port) == "leased"
        # The port bound without a lease: in use by another program, once a
        # refresh (every second here) has seen it.
        other_port = other.getsockname()[1]
        page.wait_for(f"{_cell_js(other_port)}?.dataset.state === 'other'")
        row = _row(page, "others", other_port)
        assert row == {
            "Port": str(other_port),
            "PID": str(os.getpid()),
            "Process": _comm(os.getpid()),
        }
        # The counts are the range's, and the cells agree with them.
        counts = page.evaluate(
            "Object.fromEntries(['free', 'leased', 'other', 'skipped', 'total'].map(k => [k,"
            " Number(document.getElementById('count-' + k).textContent.replace(/,/g, ''))]))"
        )
        assert counts["total"] == 6001
        assert counts["free"] + counts["leased"] + counts["other"] + counts["skipped"] == 6001
        assert counts["leased"] == page.evaluate(
            "document.querySelectorAll('#grid .cell-leased').length"
        )
        assert counts["leased"] >= 3  # the server's own port, the pick, the worker's
        # Pointing at a cell names its port and holder.
        x, y = page.evaluate(
            f"(() => {{ const r = {_cell_js(first)}.getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        page.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        caption = page.evaluate("document.getElementById('grid-hover').textContent")
        assert caption == f"Port {first}: leased (pid {server.proc.pid} {_comm(server.proc.pid)})"
        # History: Jalali as the state file has it, ISO (this host's offset) on hover.
        entry = page.evaluate(
            f"(() => {{ const li = document.querySelector('#history li[data-new=\"{first}\"]');"
            " const t = li.querySelector('time');"
            " return {text: t.textContent, iso: t.dateTime, title: t.title}; })()"
        )
        state = http.get("/api/v1/port/state").json()
        assert entry["text"] in [h["time"] for h in state["history"] if h["new"] == first]
        assert entry["iso"] in _minutes_around(before, after), entry
        assert entry["title"].startswith(entry["iso"])
        # A backup link downloads through the router's endpoint.
        status = page.evaluate(
            "fetch(document.querySelector('#backups a').href).then(r => r.status)"
        )
        assert status == 200

        # A second pick while the page is open: it shows at the next poll.
        page.evaluate("window.notReloaded = true")
        updates = page.evaluate("Number(document.body.dataset.updates)")
        second = http.post("/api/v1/port/pick").json()["port"]
        assert second != first
        page.wait_for(f"!!document.querySelector('#leases tr[data-port=\"{second}\"]')")
        assert page.evaluate("window.notReloaded === true")
        assert page.evaluate("Number(document.body.dataset.updates)") > updates
        row = _row(page, "leases", second)
        assert row is not None and row["PID"] == str(server.proc.pid)
        assert _cell_state(page, second) == "leased"
        # The API's pick moved the active port: the first is no longer leased.
        assert _row(page, "leases", first) is None
        moved = f'#history li.move[data-prev="{first}"][data-new="{second}"]'
        assert page.evaluate(f"!!document.querySelector('{moved}')")
        assert page.evaluate(f"!!document.querySelector('#usage .bar[data-port=\"{second}\"]')")
        assert page.evaluate("document.getElementById('error-banner').hidden")

        shot = page.screenshot(tmp_path / "dashboard.png")
        print(f"dashboard screenshot: {shot}")
        if os.environ.get("DPM_DASHBOARD_PNG"):
            shutil.copyfile(shot, os.environ["DPM_DASHBOARD_PNG"])
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        # Nothing but this server was asked for anything; no script error.
        assert page.foreign_urls(server.url) == []
        assert page.errors() == []
    worker.kill()
    worker.wait()
    other.close()


@pytest.mark.slow
def test_dashboard_shows_paths_as_text_errors_while_in_effect_skipped_ports_and_a_lost_server(
    tmp_path: Path,
) -> None:
    # A folder name that is markup, if anything treats it as such; it is in
    # the state file's path and so in the error message too.
    folder = tmp_path / '<img id=injected src=x onerror="window.pwned=1">&amp;'
    folder.mkdir()
    state_file = folder / "ports.json"
    # A file where the backup folder goes: every save reports it, so the
    # error stays in effect.
    (folder / "backups").write_text("")
    # A block holding 10080, a port browsers refuse: skipped, never handed out.
    start = random.randint(10073, 10080)
    end = start + 7
    with ExitStack() as stack:
        # The browser first: without one, the test skips before starting anything.
        browser = stack.enter_context(chromium(tmp_path / "profile"))
        server = stack.enter_context(
            serve(tmp_path, "--range", f"{start}-{end}", "--state", str(state_file))
        )
        http = stack.enter_context(httpx.Client(base_url=server.url, timeout=30))
        page = browser.new_page()
        page.navigate(server.url + "/")
        page.wait_for("Number(document.body.dataset.updates) >= 1")
        assert page.evaluate("document.getElementById('state-file').textContent") == str(state_file)
        paths = page.evaluate(
            "[...document.querySelectorAll('#leases td.path')].map(td => td.textContent)"
        )
        assert paths == [str(state_file)]

        state = http.get("/api/v1/port/state").json()
        assert state["error_active"] and str(folder) in state["last_error"]
        page.wait_for("!document.getElementById('error-banner').hidden")
        shown = page.evaluate("document.getElementById('error-text').textContent")
        assert shown == state["last_error"]
        # Nothing of the path became markup, nor ran.
        assert page.evaluate("document.getElementById('injected') === null")
        assert page.evaluate("window.pwned === undefined")

        assert state["skipped_ports"] == [10080]
        assert _cell_state(page, 10080) == "skipped"
        assert page.evaluate("document.getElementById('count-skipped').textContent") == "1"
        assert page.errors() == []

        # The server goes away: the page says so and keeps what it last saw.
        server.proc.terminate()
        assert server.proc.wait(timeout=30) == 0
        page.wait_for("!document.getElementById('conn-banner').hidden")
        assert page.evaluate("document.getElementById('state-file').textContent") == str(state_file)
