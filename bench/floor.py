"""Benchmark: ours beside the floor, what the file system and the kernel must do.

    python bench/floor.py [--dirs /dev/shm,/tmp] [--n 300] [--rounds 3]

Builds bench/floor (a small Rust program, its own cargo project, never
shipped; needs cargo) into ``--target-dir`` (default: $CARGO_TARGET_DIR/floor,
else bench/floor/target), then for each folder of ``--dirs``, in the same
run, in alternating rounds so load from elsewhere hits both alike:

- the floor program in a temporary folder there: a save of a file the size
  of our state file by the exchange scheme and by create + write + rename, a
  new file of that size, a bind probe on 127.0.0.1 and ::1 (two sockets) and
  on [::] by one dual-stack socket, an OFD lock + unlock. Its floors: a pick +
  release cycle is two saves, one probe and two locks; a new manager + first
  pick is one new file, one probe and one lock (the probe: the cheaper of
  the two).
- ours (``DynamicPortManager``, state files and registry in a temporary
  folder there): a pick + release cycle on a manager made before (timed after
  ``backup_max`` cycles, so backups are recycled as in a long run), and a new
  manager + its first pick (each its own state file, one registry).
- portpicker's portserver held pick (bench/peers.py's helpers), where
  portpicker is installed (``pip install .[bench]``).

Prints medians, the ratios of ours to the floor and to portserver, the
machine's load average and what an empty file cost to make in each folder
(on ext4 this swings from tens to hundreds of microseconds). With
``--markdown``, also prints them as the table docs/speed.md shows. Asserts
nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import (  # noqa: E402
    create_cost_us,
    file_system,
    ours_options,
    portserver_pick,
    quantile,
    running_portserver,
    timed,
)

FLOOR = Path(__file__).resolve().parent / "floor"


def build_floor(target_dir: Path) -> Path:
    subprocess.run(
        [
            "cargo",
            "build",
            "--release",
            "--quiet",
            "--locked",
            "--manifest-path",
            str(FLOOR / "Cargo.toml"),
            "--target-dir",
            str(target_dir),
        ],
        check=True,
    )
    return target_dir / "release" / "dpm-floor"


def run_floor(binary: Path, folder: Path, size: int, n: int, port: int) -> dict[str, Any]:
    folder.mkdir(exist_ok=True)
    out = subprocess.run(
        [
            str(binary),
            str(folder),
            "--json",
            "--n",
            str(n),
            "--size",
            str(size),
            "--port",
            str(port),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def have_portpicker() -> bool:
    try:
        import portpicker  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return False
    return True


def median_us(samples: list[float]) -> float:
    return quantile(samples, 0.5) * 1e6


def one_folder(
    base: Path, binary: Path, args: argparse.Namespace, portserver: bool
) -> dict[str, Any]:
    from dynamic_port_manager import DynamicPortManager

    with tempfile.TemporaryDirectory(prefix="dpm-floor-", dir=base) as tmp:
        root = Path(tmp)
        info: dict[str, Any] = {"fs": file_system(root), "empty_file_us": create_cost_us(root)}
        opts = ours_options(root / "reg")
        cycler = DynamicPortManager(args.start, args.end, json_path=root / "cycle.json", **opts)
        for _ in range(25):  # past backup_max (20): backups are recycled
            cycler.pick_port()
            cycler.release_port()
        size = os.path.getsize(cycler.state_path)

        def cycle() -> None:
            cycler.pick_port()
            cycler.release_port()

        cycles: list[float] = []
        news: list[float] = []
        held_ps: list[float] = []
        floors: list[dict[str, Any]] = []
        held: list[Any] = []
        per_round = max(1, args.n // args.rounds)
        count = 0
        for _ in range(args.rounds):
            floors.append(run_floor(binary, root / "floor", size, args.floor_n, args.end))
            for _ in range(per_round):
                cycles.append(timed(cycle)[0])
            for _ in range(per_round):
                path = root / f"new{count}.json"
                count += 1
                t0 = time.perf_counter()
                m = DynamicPortManager(args.start, args.end, json_path=path, **opts)
                m.pick_port()
                news.append(time.perf_counter() - t0)
                held.append(m)
            if portserver:
                for _ in range(per_round):
                    held_ps.append(timed(lambda: portserver_pick(args.start, args.end))[0])
        for m in held:
            m.stop()
        cycler.stop()

        def floor_of(key: str) -> float:
            values = [f[key] if isinstance(f[key], float) else f[key][0] for f in floors]
            return statistics.median(values)

        info.update(
            size=size,
            ours_cycle=median_us(cycles),
            ours_new=median_us(news),
            portserver=median_us(held_ps) if held_ps else None,
            floor={
                key: floor_of(key)
                for key in (
                    "save_exchange",
                    "save_create_rename",
                    "new_file",
                    "empty_file",
                    "probe",
                    "probe_dual_stack",
                    "lock_unlock",
                    "cycle_floor_exchange",
                    "cycle_floor_create_rename",
                    "new_manager_floor",
                )
            },
        )
        return info


def report(folder: str, r: dict[str, Any], args: argparse.Namespace) -> None:
    f = r["floor"]
    print(f"\n== {folder}: {r['fs']}")
    print(
        f"state file {r['size']:,} bytes; making an empty file here cost "
        f"{r['empty_file_us']:.0f} us (floor program: {f['empty_file']:.1f} us)"
    )
    print(
        f"floor parts (medians, us): save by exchange {f['save_exchange']:.1f}, "
        f"save by create+write+rename {f['save_create_rename']:.1f}, new file "
        f"{f['new_file']:.1f}, probe 127.0.0.1+::1 {f['probe']:.1f}, probe [::] dual-stack "
        f"{f['probe_dual_stack']:.1f} (floors use the cheaper), OFD lock+unlock "
        f"{f['lock_unlock']:.1f}"
    )
    cyc_x, cyc_r = f["cycle_floor_exchange"], f["cycle_floor_create_rename"]
    new_floor = f["new_manager_floor"]
    cycle, new = r["ours_cycle"], r["ours_new"]
    ps = r["portserver"]
    cycle_floor = f"{cyc_x:.0f} / {cyc_r:.0f}"
    cycle_ratio = f"{cycle / cyc_x:.1f}x / {cycle / cyc_r:.1f}x"
    new_ratio = f"{new / new_floor:.1f}x"
    ps_text = f"{ps:.0f} ({new / ps:.2f}x)" if ps else "n/a"
    print(f"{'median, us':<26}{'floor':>16}{'ours':>8}{'ours/floor':>16}{'portserver':>18}")
    print(f"{'pick + release cycle':<26}{cycle_floor:>16}{cycle:>8.0f}{cycle_ratio:>16}")
    print(
        f"{'new manager + first pick':<26}{new_floor:>16.0f}{new:>8.0f}{new_ratio:>16}{ps_text:>18}"
    )


def markdown(results: dict[str, dict[str, Any]], load: tuple[float, ...]) -> None:
    """The table of docs/speed.md: one row per operation and folder."""
    print(
        f"\nLoad average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; medians in us.\n\n"
        "| operation | folder (file system; an empty file cost) | floor | ours | "
        "ours / floor | portserver's held pick (ours / it) |\n| --- | --- | --- | --- | --- | --- |"
    )
    for folder, r in results.items():
        f = r["floor"]
        where = f"{folder} ({r['fs'].split()[0]}; {r['empty_file_us']:.0f} us)"
        cycle, new, ps = r["ours_cycle"], r["ours_new"], r["portserver"]
        floor_x = f["cycle_floor_exchange"]
        print(
            f"| pick + release cycle | {where} | {floor_x:.0f} | {cycle:.0f} | "
            f"{cycle / floor_x:.1f}x | |"
        )
        ps_text = f"{ps:.0f} ({new / ps:.2f}x)" if ps else "n/a"
        print(
            f"| new manager + first pick | {where} | {f['new_manager_floor']:.0f} | "
            f"{new:.0f} | {new / f['new_manager_floor']:.1f}x | {ps_text} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dirs", default="/dev/shm,/tmp", help="folders, comma-separated")
    parser.add_argument("--n", type=int, default=300, help="samples of ours per case")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--floor-n", type=int, default=500, help="samples per floor op and round")
    parser.add_argument("--start", type=int, default=20000)
    parser.add_argument("--end", type=int, default=26000, help="6,001 ports by default")
    parser.add_argument("--target-dir", default=None, help="cargo target folder for bench/floor")
    parser.add_argument("--markdown", action="store_true", help="also print docs/speed.md's table")
    args = parser.parse_args()
    if args.end - args.start + 1 < args.n + 10:
        parser.error("the range is too small for --n held picks")
    target = args.target_dir or (
        Path(os.environ["CARGO_TARGET_DIR"]) / "floor"
        if os.environ.get("CARGO_TARGET_DIR")
        else FLOOR / "target"
    )
    binary = build_floor(Path(target))
    import dynamic_port_manager

    portserver = have_portpicker()
    load = os.getloadavg()
    print(
        f"{platform.node()}: {os.cpu_count()} cores, Linux {platform.release()}, "
        f"Python {platform.python_version()}; dynamic-port-manager "
        f"{dynamic_port_manager.__version__}; load average {load[0]:.2f} {load[1]:.2f} "
        f"{load[2]:.2f}\nrange {args.start}-{args.end}; "
        + ("portserver serving the same range" if portserver else "portpicker not installed")
    )
    results = {}
    with ExitStack() as stack:
        if portserver:
            stack.enter_context(running_portserver(args.start, args.end))
        for folder in args.dirs.split(","):
            results[folder] = one_folder(Path(folder), binary, args, portserver)
    for folder, r in results.items():
        report(folder, r, args)
    load = os.getloadavg()
    print(
        f"\ncycle floor: with saves by exchange / by create+write+rename; portserver: its "
        f"held pick (ours' new manager + first pick over it). Medians of {args.n} "
        f"(ours) and {args.rounds} x {args.floor_n} (floor) samples; "
        f"load average now {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    if args.markdown:
        markdown(results, load)


if __name__ == "__main__":
    main()
