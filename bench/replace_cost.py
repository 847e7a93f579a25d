"""What putting a new state file in place of the old one costs, two ways.

    python bench/replace_cost.py [--dir /tmp] [--n 200]

Each round writes a fresh 37 KB file (a 6,001-port state's size) beside an
existing one, then either renames it over the old one, or exchanges the two
(`renameat2(RENAME_EXCHANGE)`) and removes the old one from under the
temporary name, which is what the store does (`fsutil::put_in_place`). The
old file keeps a second link, as a backup does. Prints the median cost of the
replacing step alone. On ext4, a rename over an existing file makes the kernel
start writing the new file out at once (`auto_da_alloc`); an exchange does not.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import tempfile
import time

AT_FDCWD = -100
RENAME_EXCHANGE = 2
LIBC = ctypes.CDLL(None, use_errno=True)


def exchange(a: str, b: str) -> None:
    if LIBC.renameat2(AT_FDCWD, a.encode(), AT_FDCWD, b.encode(), RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def write_new(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", default=None, help="where the files go")
    parser.add_argument("--n", type=int, default=200, help="replacements per way and round")
    args = parser.parse_args()
    data = b"x" * 37_000
    times: dict[str, list[float]] = {"rename over": [], "exchange + remove": []}
    with tempfile.TemporaryDirectory(prefix="dpm-replace-", dir=args.dir) as tmp:
        for i in range(args.n):
            write_new(f"{tmp}/s{i}", data)
        serial = 0
        # Rounds take turns, so a slow spell of the machine hits both ways.
        for _ in range(3):
            for way, samples in times.items():
                for i in range(args.n):
                    serial += 1
                    state, new = f"{tmp}/s{i}", f"{tmp}/.s{i}.tmp"
                    os.link(state, f"{tmp}/backup{serial}")
                    write_new(new, data)
                    t0 = time.perf_counter()
                    if way == "rename over":
                        os.rename(new, state)
                    else:
                        exchange(new, state)
                        os.unlink(new)
                    samples.append(time.perf_counter() - t0)
    print(f"folder: {args.dir or tempfile.gettempdir()}, {args.n} x 3 replacements per way")
    for way, samples in times.items():
        print(f"{way:18s} median {statistics.median(samples) * 1e6:6.1f} us")


if __name__ == "__main__":
    main()
