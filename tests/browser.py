"""A real headless Chromium, driven over the DevTools protocol, and a real `serve`.

The protocol runs over a pipe (``--remote-debugging-pipe``: commands in on the
browser's fd 3, replies out on fd 4, each a JSON text ended by a NUL byte), so
the browser opens no debugging port and the tests need no client library.
Host name resolution is switched off in the browser: a page that reached for
a CDN would fail to load it, and every request a page makes is recorded.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from router_helpers import Served, cli_path, running_server

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WIDTH = 1280

FLAGS = (
    "--headless",
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--mute-audio",
    "--hide-scrollbars",
    "--force-color-profile=srgb",
    "--lang=en-US",
    f"--window-size={WIDTH},900",
    # No host name resolves: only IP literals (the test server) can be reached.
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    "--remote-debugging-pipe",
)


def chromium_or_skip() -> str:
    """The browser to test with (``$DPM_CHROMIUM``, else one on ``PATH``), or a skip."""
    named = os.environ.get("DPM_CHROMIUM")
    found = shutil.which(named) if named else None
    for name in () if found else BROWSERS:
        found = shutil.which(name)
        if found:
            break
    if not found:
        pytest.skip(
            "no Chromium to test the pages in: install Debian's `chromium` package "
            "(`apt-get install -y chromium`, which .ci/run does when it runs as root), "
            "or point DPM_CHROMIUM at a Chromium or Chrome binary"
        )
    return found


class ProtocolError(Exception):
    pass


class Chromium:
    """One browser process and its DevTools pipe."""

    def __init__(self, binary: str, profile: Path) -> None:
        commands_r, self._commands = os.pipe()
        self._replies, replies_w = os.pipe()
        # The child must see these as fds 3 and 4: first move them above 9 so
        # that the dup2 calls below cannot overwrite one with the other.
        child_in = fcntl.fcntl(commands_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_out = fcntl.fcntl(replies_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(commands_r)
        os.close(replies_w)

        def wire() -> None:  # in the child, before exec: dup2 clears close-on-exec
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        self.log = profile / "chromium.log"
        profile.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                close_fds=False,  # fds 3 and 4 must survive; the rest are close-on-exec
                preexec_fn=wire,
            )
        os.close(child_in)
        os.close(child_out)
        self._next_id = 0
        self._lock = threading.Condition()
        self._results: dict[int, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._closed = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._replies, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            with self._lock:
                for raw in messages:
                    message = json.loads(raw)
                    if "id" in message:
                        self._results[message["id"]] = message
                    else:
                        self.events.append(message)
                self._lock.notify_all()
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    def send(
        self, method: str, session: str | None = None, timeout: float = 30, **params: Any
    ) -> dict[str, Any]:
        with self._lock:
            self._next_id += 1
            ident = self._next_id
        message: dict[str, Any] = {"id": ident, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._commands, data) :]
        deadline = time.monotonic() + timeout
        with self._lock:
            while ident not in self._results:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise ProtocolError(f"{method}: no answer ({self.tail_of_log()})")
                self._lock.wait(left)
            reply = self._results.pop(ident)
        if "error" in reply:
            raise ProtocolError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    def wait_event(self, method: str, session: str, timeout: float = 30) -> dict[str, Any]:
        """The first event ``method`` of ``session`` not yet waited for."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for i, event in enumerate(self.events):
                    if event.get("method") == method and event.get("sessionId") == session:
                        del self.events[i]
                        params: dict[str, Any] = event.get("params", {})
                        return params
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise ProtocolError(f"no {method} event in {timeout}s")
                self._lock.wait(left)

    def new_page(self) -> Page:
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        page = Page(self, session)
        for domain in ("Page", "Network", "Runtime", "Log"):
            page.call(f"{domain}.enable")
        return page

    def tail_of_log(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.send("Browser.close", timeout=10)
        except (ProtocolError, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=20)
        os.close(self._commands)
        os.close(self._replies)


class Page:
    """One tab: navigate, evaluate script in it, wait for a condition, screenshot."""

    def __init__(self, browser: Chromium, session: str) -> None:
        self.browser = browser
        self.session = session

    def call(self, method: str, timeout: float = 30, **params: Any) -> dict[str, Any]:
        return self.browser.send(method, self.session, timeout, **params)

    def navigate(self, url: str, timeout: float = 30) -> None:
        result = self.call("Page.navigate", url=url)
        if result.get("errorText"):
            raise ProtocolError(f"{url}: {result['errorText']}")
        self.browser.wait_event("Page.loadEventFired", self.session, timeout)

    def evaluate(self, expression: str) -> Any:
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise ProtocolError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30) -> Any:
        """The value of ``expression`` once it is truthy (evaluated every 0.1 s)."""
        deadline = time.monotonic() + timeout
        value = self.evaluate(expression)
        while not value and time.monotonic() < deadline:
            time.sleep(0.1)
            value = self.evaluate(expression)
        assert value, f"still {value!r} after {timeout}s: {expression}"
        return value

    def screenshot(self, path: Path) -> Path:
        """The whole page, not only the window, as a PNG at ``path``."""
        size = self.call("Page.getLayoutMetrics")["cssContentSize"]
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=WIDTH,
            height=int(size["height"]) + 1,
            deviceScaleFactor=1,
            mobile=False,
        )
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(data["data"]))
        return path

    def requested_urls(self) -> list[str]:
        """Every URL this tab has asked for so far."""
        with self.browser._lock:
            return [
                e["params"]["request"]["url"]
                for e in self.browser.events
                if e.get("sessionId") == self.session
                and e.get("method") == "Network.requestWillBeSent"
            ]

    def foreign_urls(self, origin: str) -> list[str]:
        """URLs this tab asked for elsewhere than ``origin`` (``data:``/``blob:`` are no host)."""
        urls = self.requested_urls()
        assert any(u.startswith(origin + "/") for u in urls), urls
        return [u for u in urls if not u.startswith((origin + "/", "data:", "blob:"))]

    def errors(self) -> list[str]:
        """Script exceptions, and console or browser errors other than HTTP statuses."""
        found = []
        with self.browser._lock:
            for e in self.browser.events:
                if e.get("sessionId") != self.session:
                    continue
                params = e.get("params", {})
                if e.get("method") == "Runtime.exceptionThrown":
                    found.append(json.dumps(params["exceptionDetails"])[:500])
                elif e.get("method") == "Log.entryAdded":
                    entry = params["entry"]
                    # A 404 of a probed endpoint is logged by the network layer.
                    if entry["level"] == "error" and entry.get("source") != "network":
                        found.append(entry["text"])
        return found


@contextmanager
def chromium(profile: Path) -> Iterator[Chromium]:
    browser = Chromium(chromium_or_skip(), profile)
    try:
        yield browser
    finally:
        browser.close()


@contextmanager
def serve(cwd: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[Served]:
    """``dynamic-port-manager serve ARGS`` until the block ends (killed then)."""
    with running_server([cli_path(), "serve", *args], cwd, env) as served:
        yield served
