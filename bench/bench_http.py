"""`GET /api/v1/port/state` under uvicorn, beside FastAPI's own floor.

    python bench/bench_http.py [--duration 2] [--rounds 10] [--connections 8] [--client wrk|python]

Starts one uvicorn server (one process, on 127.0.0.1, its port leased from
this package's own manager and handed over as a listening socket) serving,
for a 6,001-port range (3000-9000, the default) and an 11-port one:

- ``ours``: the router's ``/api/v1/port/state`` (the core's JSON bytes,
  answered on the event loop when the core can without waiting);
- ``floor``: a plain ``async def`` route returning the same bytes from
  memory as a ``Response`` (what FastAPI itself costs for that body);
- ``floor, def``: the same as a plain ``def`` (run in FastAPI's threadpool,
  as the router's other endpoints are);
- ``get_state + model``: a ``def`` route returning ``get_state()`` with
  ``response_model=PortState`` (parsed into Python, validated by pydantic,
  serialized again: how the router answered before it served the core's bytes).

Each is loaded in turn with the same client and 8 keep-alive connections
(``wrk`` if installed, else an asyncio client in this script), the targets
interleaved round by round; the table gives the median req/s of the rounds,
the server process's CPU time per request, and each one's ratio to the floor
run of the same round. Then, in this process, what a read costs when nothing
changed: ``get_state()``, ``state_json()`` and the router's own work for
``/port/state`` (the endpoint's coroutine, run to its end, before FastAPI), medians.
Only ratios measured in one run mean anything on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from importlib.util import find_spec
from typing import Any, Callable

RANGES = {"6001": (3000, 9000), "11": (43000, 43010)}
# name, path (format with the range's name)
TARGETS = [
    ("ours", "/r{r}/api/v1/port/state"),
    ("floor", "/floor/{r}"),
    ("floor, def", "/floor-def/{r}"),
    ("get_state + model", "/model/{r}"),
]


def build_app(work: str) -> Any:
    """The server's app: the router and the comparison routes, per range."""
    from api_ports import create_router
    from api_ports.models import PortState
    from dynamic_port_manager import DynamicPortManager
    from fastapi import FastAPI, Response

    app = FastAPI()
    for name, (start, end) in RANGES.items():
        path = os.path.join(work, f"state{name}.json")
        m = DynamicPortManager(start, end, path, console_log=False)
        m.pick_port()
        app.include_router(create_router(m), prefix=f"/r{name}/api/v1")
        body = m.state_json()

        def floor(body: bytes = body) -> Response:
            return Response(body, media_type="application/json")

        async def floor_async(body: bytes = body) -> Response:
            return Response(body, media_type="application/json")

        def model(m: DynamicPortManager = m) -> dict[str, Any]:
            return m.get_state()

        # The defaults are not parameters FastAPI sees: wrap them.
        app.get(f"/floor/{name}")(_no_args(floor_async))
        app.get(f"/floor-def/{name}")(_no_args(floor))
        app.get(f"/model/{name}", response_model=PortState)(_no_args(model))
    return app


def _no_args(f: Callable[..., Any]) -> Callable[..., Any]:
    if asyncio.iscoroutinefunction(f):

        async def endpoint_async() -> Any:
            return await f()

        return endpoint_async

    def endpoint() -> Any:
        return f()

    return endpoint


def serve(work: str, fd: int) -> None:
    import uvicorn

    app = build_app(work)
    # As a socket object, not `fd=`: uvicorn takes an fd for a Unix socket and
    # then leaves Nagle on, which stalls every keep-alive answer ~40 ms.
    listener = socket.socket(fileno=fd)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    uvicorn.Server(config).run(sockets=[listener])


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        body: bytes = r.read()
        return body


def wait_up(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}")
        try:
            fetch(url)
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"the server did not answer {url} in {timeout} s")


def run_wrk(url: str, seconds: float, connections: int) -> tuple[float, int, int]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    done = re.search(r"(\d+) requests in", out)
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    if rps is None or done is None:
        sys.exit(f"wrk printed no Requests/sec:\n{out}")
    failed = int(bad.group(1)) if bad else (1 if errors else 0)
    return float(rps.group(1)), failed, int(done.group(1))


async def _client(host: str, port: int, path: str, stop: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    ok = bad = 0
    try:
        while time.monotonic() < stop:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
            if head.startswith(b"HTTP/1.1 200"):
                ok += 1
            else:
                bad += 1
    finally:
        writer.close()
    counts[0] += ok
    counts[1] += bad


def run_python(url: str, seconds: float, connections: int) -> tuple[float, int, int]:
    m = re.match(r"http://([^:/]+):(\d+)(/.*)", url)
    assert m is not None
    host, port, path = m.group(1), int(m.group(2)), m.group(3)
    counts = [0, 0]

    async def main() -> float:
        t = time.monotonic()
        stop = t + seconds
        await asyncio.gather(*(_client(host, port, path, stop, counts) for _ in range(connections)))
        return time.monotonic() - t

    elapsed = asyncio.run(main())
    return (counts[0] + counts[1]) / elapsed, counts[1], counts[0] + counts[1]


def cpu_seconds(pid: int) -> float:
    """The CPU time (user + system) process ``pid`` has used, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def median_us(f: Callable[[], object], n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter_ns()
        f()
        times.append(time.perf_counter_ns() - t)
    return statistics.median(times) / 1000


def run_to_end(endpoint: Callable[[], Any]) -> Any:
    """The endpoint's coroutine run without a loop: it must answer without
    awaiting anything (a read that found nothing changed)."""
    coroutine = endpoint()
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    sys.exit("/port/state went to the threadpool for a read that found nothing changed")


def reads(work: str, n: int) -> None:
    """What a read that finds nothing changed costs, in this process."""
    from api_ports import create_router
    from dynamic_port_manager import DynamicPortManager
    from fastapi.routing import APIRoute

    print(f"\n# a read that finds nothing changed, in-process, median of {n} (us)")
    print("| range | get_state() | state_json() | router's /port/state work |")
    print("| --- | --- | --- | --- |")
    for name, (start, end) in RANGES.items():
        path = os.path.join(work, f"reads{name}.json")
        m = DynamicPortManager(start, end, path, console_log=False)
        m.pick_port()
        endpoint = next(
            r.endpoint
            for r in create_router(m).routes
            if isinstance(r, APIRoute) and r.path == "/port/state"
        )

        def route_work(endpoint: Callable[[], Any] = endpoint) -> Any:
            return run_to_end(endpoint)

        route_work()
        get = median_us(m.get_state, max(n // 10, 50))
        raw = median_us(m.state_json, n)
        route = median_us(route_work, n)
        print(f"| {name} ports | {get:.1f} | {raw:.1f} | {route:.1f} |")
        m.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=2.0, help="seconds per run")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--client", choices=["wrk", "python"], default=None)
    ap.add_argument("--reads", type=int, default=20000, help="calls per in-process median")
    ap.add_argument("--serve", nargs=2, metavar=("WORK", "FD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return

    work = tempfile.mkdtemp(prefix="dpm-bench-http-")
    os.environ.setdefault("DPM_REGISTRY_DIR", os.path.join(work, "registry"))
    from dynamic_port_manager import DynamicPortManager

    client = args.client or ("wrk" if shutil.which("wrk") else "python")
    load = run_wrk if client == "wrk" else run_python
    ports = DynamicPortManager(20000, 29999, os.path.join(work, "ports.json"), console_log=False)
    sock: socket.socket = ports.pick_socket(host="127.0.0.1")
    port = sock.getsockname()[1]
    load_before = os.getloadavg()
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", work, str(sock.fileno())],
        pass_fds=[sock.fileno()],
    )
    sock.close()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_up(base + "/floor/11", server)
        sizes = {r: len(fetch(base + f"/floor/{r}")) for r in RANGES}
        for r in RANGES:  # the same JSON value on every route
            values = {t: json.loads(fetch(base + p.format(r=r))) for t, p in TARGETS}
            assert all(v == values["ours"] for v in values.values()), f"{r}: bodies differ"
        results: dict[tuple[str, str], list[float]] = {}
        cpu: dict[tuple[str, str], list[float]] = {}
        failures = 0
        for _ in range(args.rounds):
            for r in RANGES:
                for name, path in TARGETS:
                    used = cpu_seconds(server.pid)
                    rps, bad, done = load(base + path.format(r=r), args.duration, args.connections)
                    used = cpu_seconds(server.pid) - used
                    results.setdefault((r, name), []).append(rps)
                    cpu.setdefault((r, name), []).append(used / max(done, 1) * 1e6)
                    failures += bad
    finally:
        server.terminate()
        server.wait(30)
    load_after = os.getloadavg()
    stack = "uvloop" if find_spec("uvloop") else "asyncio"
    stack += ", httptools" if find_spec("httptools") else ", h11"
    print(
        f"# uvicorn (one process, {stack}) on 127.0.0.1; client {client}, "
        f"{args.connections} connections, {args.duration:g} s per run, {args.rounds} rounds "
        f"(each round runs every route once); {os.cpu_count()} CPUs"
    )
    before, after = ("/".join(f"{x:.2f}" for x in lo) for lo in (load_before, load_after))
    print(f"# load average (1/5/15 min) before {before}, after {after}")
    print(f"# failed requests: {failures}")
    print("# ratios: per round (this route against the floor's run of the same round), median;")
    print("# server CPU: the server process's user + system time per request, all threads")
    print(
        "| range | route | body bytes | req/s, median (slowest-fastest) | floor / this "
        "| server CPU us/request | this / floor |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in RANGES:
        floor, floor_cpu = results[(r, "floor")], cpu[(r, "floor")]
        for name, _ in TARGETS:
            runs, spent = results[(r, name)], cpu[(r, name)]
            ratio = statistics.median(f / x for f, x in zip(floor, runs))
            cost = statistics.median(x / f for f, x in zip(floor_cpu, spent))
            print(
                f"| {r} ports | {name} | {sizes[r]:,} | {statistics.median(runs):,.0f} "
                f"({min(runs):,.0f}-{max(runs):,.0f}) | {ratio:.2f}x "
                f"| {statistics.median(spent):,.0f} | {cost:.2f}x |"
            )
    for r in RANGES:
        ours, model = results[(r, "ours")], results[(r, "get_state + model")]
        gain = statistics.median(o / m for o, m in zip(ours, model))
        print(f"# {r} ports: ours / get_state + model = {gain:.2f}x (median of rounds)")
    reads(work, args.reads)
    ports.stop()


if __name__ == "__main__":
    main()
