"""Benchmark: what ``lookup(name)`` costs among 1,000 leases, and what a pick
pays with etcd discovery off, on with etcd up, and on with etcd down.

Run against the installed package:  python bench/bench_lookup.py [--leases 1000]

Prints medians and percentiles; asserts nothing. Uses a private registry and
state folder under a temporary directory and the range --start..--end. The
discovery lines need Debian's ``etcd`` binary (etcd-server); without it they
are skipped with a note. etcd listens on two ports this script picks itself.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

import dynamic_port_manager as dpm


def summary(label: str, seconds: list[float]) -> None:
    us = sorted(s * 1e6 for s in seconds)
    q = statistics.quantiles(us, n=100)
    print(
        f"{label:<52} n={len(us):>5}  median={statistics.median(us):8.1f} us"
        f"  p90={q[89]:8.1f} us  p99={q[98]:8.1f} us"
    )


def timed(call: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        out.append(time.perf_counter() - t)
    return out


def start_etcd(binary: str, folder: Path, client: int, peer: int) -> subprocess.Popen[bytes]:
    c, p = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
    log = (folder / "etcd.log").open("ab")
    proc = subprocess.Popen(
        [
            binary,
            "--name=bench",
            f"--data-dir={folder / 'data'}",
            f"--listen-client-urls={c}",
            f"--advertise-client-urls={c}",
            f"--listen-peer-urls={p}",
            f"--initial-advertise-peer-urls={p}",
            f"--initial-cluster=bench={p}",
            "--log-level=warn",
        ],
        stdout=log,
        stderr=log,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        conn = http.client.HTTPConnection("127.0.0.1", client, timeout=1)
        try:
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.05)
        finally:
            conn.close()
    raise SystemExit("etcd did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--start", type=int, default=40000)
    parser.add_argument("--end", type=int, default=44999)
    parser.add_argument("--leases", type=int, default=1000)
    parser.add_argument("--n", type=int, default=2000, help="timed calls per line")
    args = parser.parse_args()
    os.environ.pop("DPM_DISCOVERY", None)
    folder = Path(tempfile.mkdtemp(prefix="dpm-bench-lookup-"))
    registry = folder / "registry"
    opts = {"console_log": False, "registry_dir": registry, "refresh_interval": 60}
    half = args.start + 2 * args.leases - 1  # room for ports other programs use
    filler = dpm.DynamicPortManager(args.start, half, folder / "filler.json", **opts)
    for _ in range(args.leases - 1):
        filler.pick_port(pid=os.getpid())
    orders = dpm.DynamicPortManager(
        half + 1, args.end, folder / "dynamic_ports_orders.json", **opts
    )
    orders.pick_port()
    total = len(dpm.list_leases(registry_dir=registry))
    print(f"{total} leases in the registry, 1 of them service 'orders'")
    assert [i["port"] for i in dpm.lookup("orders", registry_dir=registry)] == [orders.active_port]
    summary(
        f"lookup('orders') among {total} leases",
        timed(lambda: dpm.lookup("orders", registry_dir=registry), args.n),
    )
    summary(
        f"lookup('filler') ({total - 1} live instances)",
        timed(lambda: dpm.lookup("filler", registry_dir=registry), max(20, args.n // 50)),
    )
    summary(
        f"list_leases() of {total} (for comparison)",
        timed(lambda: dpm.list_leases(registry_dir=registry), max(20, args.n // 50)),
    )
    filler.stop()
    orders.stop()

    def picks(label: str, **extra: object) -> None:
        with dpm.DynamicPortManager(half + 1, args.end, folder / "p.json", **opts, **extra) as m:  # type: ignore[arg-type]
            m.pick_port()
            summary(label, timed(m.pick_port, args.n))

    picks("pick (a move), discovery off")
    binary = shutil.which("etcd")
    if binary is None:
        print("no etcd binary (apt-get install etcd-server): discovery lines skipped")
        return
    with dpm.DynamicPortManager(half + 1, args.end, folder / "ports.json", **opts) as ports:
        client, peer = ports.pick_port(pid=os.getpid()), ports.pick_port(pid=os.getpid())
    etcd = start_etcd(binary, folder, client, peer)
    url = f"etcd://127.0.0.1:{client}/bench"
    try:
        picks("pick (a move), discovery on, etcd up", discovery=url, advertise_host="bench")
    finally:
        etcd.terminate()
        etcd.wait(30)
    picks("pick (a move), discovery on, etcd down", discovery=url, advertise_host="bench")
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
