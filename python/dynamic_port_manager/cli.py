"""The ``dynamic-port-manager`` command line: pick, run, inspect, who, release, serve.

Exit status: 0 success, 1 the operation failed (no free port, unusable
registry, nothing to release), 2 bad usage or input; ``run`` exits with its
command's status (128+N if a signal N ended it, 127/126 if it cannot start).
Errors go to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import signal
import socket
import sys
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

from . import (
    DynamicPortManager,
    __version__,
    list_backups,
    lookup,
    port_owners,
    read_state,
    release_lease,
)
from .settings import ManagerSettings

PROG = "dynamic-port-manager"

# Signals `run` passes on to its command. SIGCHLD tells it the command ended.
FORWARDED = (
    signal.SIGHUP,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTERM,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


class UsageError(Exception):
    """Bad input from the user: exit status 2."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        status = handler(args)
        sys.stdout.flush()  # here, where a closed pipe can still be caught
        return status
    except BrokenPipeError:
        return _reader_gone()
    except (UsageError, ValueError) as e:
        # ValueError: the core's checks of range, pid and the DPM_* variables.
        return _fail(f"error: {e}", 2)
    except (RuntimeError, OSError) as e:
        # NoFreePortError, ManagerStoppedError, RegistryError, file errors.
        return _fail(f"error: {e}", 1)
    except KeyboardInterrupt:
        return 130


def _reader_gone() -> int:
    """The reader of stdout went away (``| head``): stop quietly, as ``cat`` does.

    Python ignores SIGPIPE, so a write to a closed pipe raises instead of ending
    the process; the status is the one a shell shows for a command that SIGPIPE
    ended (128 + 13). stdout is pointed at /dev/null first, so the interpreter's
    last flush at exit finds nothing to write and prints no second error.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
    return 128 + signal.SIGPIPE


def _fail(message: str, status: int) -> int:
    print(f"{PROG}: {_visible(message)}", file=sys.stderr)
    return status


def _visible(text: str) -> str:
    """Control characters written out (``\\n``, ``\\x1b``, ``\\u2028``), as the core
    does in its log lines: a file name in an error must not forge a line."""
    return "".join(
        repr(c)[1:-1] if unicodedata.category(c) in ("Cc", "Zl", "Zp") else c for c in text
    )


# ---- arguments -------------------------------------------------------------


def _port_range(text: str) -> tuple[int, int]:
    start, sep, end = text.partition("-")
    try:
        first = int(start)
        last = int(end) if sep else first
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected START-END (e.g. 3000-9000) or one port, got {text!r}"
        ) from None
    if not 1 <= first <= last <= 65535:
        raise argparse.ArgumentTypeError(f"expected 1 <= START <= END <= 65535, got {text!r}")
    return first, last


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _port(text: str) -> int:
    value = _positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port (1-65535), got {text!r}")
    return value


def _fd(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a file descriptor number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    # Common options are accepted before or after the subcommand; SUPPRESS keeps
    # a subcommand's unset copy from overwriting the value given before it.
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("manager options")
    group.add_argument(
        "--range",
        metavar="START-END",
        type=_port_range,
        default=argparse.SUPPRESS,
        help="port range, inclusive (default: $DPM_START-$DPM_END, else 3000-9000)",
    )
    group.add_argument(
        "--state",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="state file (default: $DPM_JSON_PATH, else "
        "$XDG_STATE_HOME/dynamic-port-manager/dynamic_ports.json)",
    )
    group.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print the manager's event lines on stderr",
    )

    parser = argparse.ArgumentParser(
        prog=PROG,
        parents=[common],
        description="Hands out free TCP ports of one host, never the same port twice.",
        epilog="Environment: DPM_START, DPM_END, DPM_JSON_PATH, DPM_REFRESH_INTERVAL, "
        "DPM_HISTORY_MAX, DPM_REGISTRY_DIR, DPM_DISCOVERY.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Callable[[argparse.Namespace], int], text: str) -> Any:
        p = sub.add_parser(name, parents=[common], help=text, description=text)
        p.set_defaults(handler=handler)
        return p

    p = command(
        "pick",
        cmd_pick,
        "Print a free port, held for as long as a process lives "
        "(default: the calling shell), so PORT=$(dynamic-port-manager pick) is safe.",
    )
    p.add_argument(
        "--pid",
        type=_positive,
        help="the process that holds the port (default: the parent process)",
    )

    p = command(
        "run",
        cmd_run,
        "Run a command with a free port in $PORT and in place of {port} in its "
        "arguments, held while it runs; signals are passed on, its exit status returned.",
    )
    p.add_argument(
        "--fd",
        action="store_true",
        help="hand the command a socket already listening on the port as fd 3 "
        "(LISTEN_FDS=1, LISTEN_PID, $PORT_FD, {fd}), so no one can take the port first",
    )
    p.add_argument("--host", help="with --fd: address to listen on (default: [::] and 0.0.0.0)")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")

    for name, key, text in (
        ("state", None, "Print the full state as JSON."),
        ("free", "free_ports", "Print the free ports as JSON."),
        ("used", "used_ports", "Print the used ports as JSON."),
        ("history", "history", "Print the active-port history as JSON."),
    ):
        command(name, _state_printer(key), text)
    command("backups", cmd_backups, "Print the state file's backups as JSON.")

    p = command(
        "who",
        cmd_who,
        "Show who holds each used port of the range, or PORTs: processes (pid, name, "
        "command line) and leases, as a table (the same rows on a terminal and in a pipe).",
    )
    p.add_argument("ports", type=_port, nargs="*", metavar="PORT")
    p.add_argument(
        "--json", action="store_true", help="print the rows as JSON (as GET /port/owners)"
    )

    p = command(
        "lookup",
        cmd_lookup,
        "Show where the service NAME listens: its live instances on this host (from "
        "the lease registry), or on every host with --discovery (etcd). Exit 1 when "
        "there is none. A table on a terminal, JSON with --json or in a pipe.",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument(
        "--discovery",
        metavar="URL",
        help="ask etcd at URL (etcd://HOST:PORT/PREFIX) instead of this host's registry "
        "(default: $DPM_DISCOVERY)",
    )
    p.add_argument("--json", action="store_true", help="print JSON even on a terminal")

    p = command("release", cmd_release, "Release the lease on PORT (whoever holds it).")
    p.add_argument("port", type=_port, metavar="PORT")

    p = command(
        "serve",
        cmd_serve,
        "Serve the port API (/api/v1/port/...), the dashboard (/), Prometheus metrics "
        "(/metrics) and docs (/docs): on --port, on a socket it is handed (--fd, systemd "
        "socket activation), else on a port it picks itself. Tells systemd it is ready "
        "when $NOTIFY_SOCKET is set.",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--port",
        type=_port,
        help="a fixed port to listen on, outside the managed range (for a service, "
        "a proxy or a scrape target)",
    )
    where.add_argument(
        "--fd",
        type=_fd,
        help="listen on this already-listening socket (e.g. 3); without --fd and "
        "--port, systemd's socket (LISTEN_FDS=1 with LISTEN_PID) is taken when passed",
    )
    p.add_argument("--host", help="address for --port or the picked port (default: 127.0.0.1)")
    p.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug", "trace"),
        help="uvicorn's log level (default: %(default)s)",
    )
    return parser


def default_state_path() -> Path:
    """Per user, not per directory: a CLI call must not litter the current folder."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "dynamic-port-manager" / "dynamic_ports.json"


def settings_for(args: argparse.Namespace) -> ManagerSettings:
    env = ManagerSettings.from_env()
    start, end = getattr(args, "range", (env.start, env.end))
    json_path = getattr(args, "state", None) or env.json_path or str(default_state_path())
    return ManagerSettings(start, end, json_path, env.refresh_interval, env.history_max)


def open_manager(args: argparse.Namespace, *, console_log: bool = False) -> DynamicPortManager:
    verbose: bool = getattr(args, "verbose", False)
    return settings_for(args).create(console_log=console_log or verbose)


def print_json(value: Any) -> None:
    """Pretty for a person at a terminal, one line for a pipe."""
    print(json.dumps(value, indent=2 if sys.stdout.isatty() else None))


# ---- commands --------------------------------------------------------------


def cmd_pick(args: argparse.Namespace) -> int:
    pid: int = args.pid if args.pid is not None else os.getppid()
    with open_manager(args) as manager:
        port = manager.pick_port(pid=pid)
    print(port)
    return 0


def _state_printer(key: str | None) -> Callable[[argparse.Namespace], int]:
    def show(args: argparse.Namespace) -> int:
        # Looking must not write: no save, no backup, no lease.
        s = settings_for(args)
        state = read_state(s.start, s.end, s.json_path, s.history_max)
        print_json(state if key is None else {key: state[key]})
        return 0

    return show


def cmd_backups(args: argparse.Namespace) -> int:
    print_json({"backups": list_backups(settings_for(args).json_path)})
    return 0


def cmd_who(args: argparse.Namespace) -> int:
    s = settings_for(args)
    asked: list[int] = args.ports
    owners = port_owners(asked or range(s.start, s.end + 1))
    if args.json:
        print_json(owners)
        return 0
    rows = [line for row in owners for line in _who_lines(row)]
    rows += [
        (str(port), "-", "(free)", "-", "")
        for port in sorted(set(asked) - {row["port"] for row in owners})
    ]
    if not rows:
        print(f"no port of {s.start}-{s.end} is in use or leased")
        return 0
    rows.insert(0, ("PORT", "PID", "NAME", "LEASED BY", "COMMAND"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    # The same text on a terminal and in a pipe: a script sees what a person sees.
    for r in rows:
        cells = [r[0].rjust(widths[0]), r[1].rjust(widths[1]), r[2].ljust(widths[2])]
        print("  ".join([*cells, r[3].ljust(widths[3]), r[4]]).rstrip())
    return 0


def _who_lines(row: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """One line per holding process, one per unseen uid, at least one per port."""
    lease = row["lease"]
    leased = "-"
    if lease is not None:
        dead = "" if lease["alive"] else ", dead"
        named = f"{lease['service']}, " if lease.get("service") else ""
        leased = f"pid {lease['pid']} ({named}{Path(lease['state_file']).name}{dead})"
    holders = [
        (str(p["pid"]), _printable(p["name"] or "?"), _printable(" ".join(p["cmdline"] or [])))
        for p in row["processes"]
    ]
    holders += [
        ("?", "unknown", f"(a process of uid {uid} that you cannot see)")
        for uid in row["unknown_uids"]
    ]
    if not holders:
        holders = [("-", "(no socket)", "")]
    return [(str(row["port"]), pid, name, leased, cmd) for pid, name, cmd in holders]


def _printable(text: str) -> str:
    """One table cell: a newline or escape code in a command line is shown, not obeyed."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text) or "?"


def cmd_lookup(args: argparse.Namespace) -> int:
    found = lookup(args.name, args.discovery)
    if args.json or not sys.stdout.isatty():
        print(json.dumps(found))
    else:
        for i in found:
            command = _printable(" ".join(i["command"] or [])) if i["command"] else ""
            print(f"{i['host']}:{i['port']}  pid {i['pid']}  {i['state_file']}  {command}".rstrip())
    if not found:
        return _fail(f"no live instance of service {args.name!r}", 1)
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    if not release_lease(args.port):
        return _fail(f"no lease on port {args.port}", 1)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve  # FastAPI and uvicorn load only for this command

    s = settings_for(args)
    if args.port is not None and s.start <= args.port <= s.end:
        # Before the manager starts: nothing to undo (the server checks it again).
        raise UsageError(
            f"serve: --port {args.port} is inside the managed range {s.start}-{s.end}: the "
            "server's own port must lie outside it (choose another port or narrow --range)"
        )
    with open_manager(args, console_log=True) as manager:
        serve(manager, host=args.host, log_level=args.log_level, port=args.port, fd=args.fd)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    argv: list[str] = list(args.argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise UsageError("run: no command given (usage: run -- CMD [ARGS...])")
    if args.host is not None and not args.fd:
        raise UsageError("run: --host is the address of the --fd socket; add --fd")
    # Blocked before the manager starts its threads, which inherit the mask:
    # every forwarded signal then waits for sigwaitinfo below, in this thread.
    watched: set[int] = {*FORWARDED, signal.SIGCHLD}
    unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    try:
        manager = open_manager(args)
        sock = None
        try:
            if args.fd:
                sock = manager.pick_socket(host=args.host)
                port = sock.getsockname()[1]
            else:
                port = manager.pick_port()
            env = {**os.environ, "PORT": str(port)}
            argv = [arg.replace("{port}", str(port)) for arg in argv]
            return _run_child(argv, env, unblocked, watched, sock)
        finally:
            if sock is not None:
                sock.close()
            manager.stop()  # releases the port once the command has ended
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)


# The systemd socket-activation convention: LISTEN_PID must be the command's own
# pid, known only after the fork. posix_spawn runs no code in between (and
# preexec_fn is unsafe beside the manager's threads), so the command is started
# through sh, which sets it to its own pid ($$) and then execs the command: the
# same process, so the pid matches and signals reach the command itself.
_LISTEN_PID_SHIM = 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"'
LISTEN_FD = 3


def _with_socket(
    argv: list[str], env: dict[str, str], sock: socket.socket
) -> tuple[list[str], dict[str, str], int]:
    """The shim's argv and env, and a copy of the socket's fd to put at fd 3."""
    found = shutil.which(argv[0], path=env.get("PATH", os.defpath))
    if found is None:  # the error `run` gives without --fd, not sh's
        raise FileNotFoundError(argv[0])
    argv = [found, *(arg.replace("{fd}", str(LISTEN_FD)) for arg in argv[1:])]
    env = {**env, "PORT_FD": str(LISTEN_FD), "LISTEN_FDS": "1"}
    env.pop("LISTEN_FDNAMES", None)
    # A copy above fd 3, so the dup2 to 3 never maps an fd onto itself (which
    # would leave it close-on-exec on older C libraries).
    source = fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, LISTEN_FD + 1)
    return ["/bin/sh", "-c", _LISTEN_PID_SHIM, PROG, *argv], env, source


def _run_child(
    argv: list[str],
    env: dict[str, str],
    child_mask: set[int],
    watched: set[int],
    sock: socket.socket | None = None,
) -> int:
    command = argv[0]
    source = None
    try:
        actions = []
        if sock is not None:
            argv, env, source = _with_socket(argv, env, sock)
            actions = [(os.POSIX_SPAWN_DUP2, source, LISTEN_FD)]
        # Python ignores SIGPIPE and SIGXFSZ; the command gets the defaults back.
        pid = os.posix_spawnp(
            argv[0],
            argv,
            env,
            file_actions=actions,
            setsigmask=child_mask,
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
        )
    except FileNotFoundError:
        return _fail(f"run: command not found: {command}", 127)
    except PermissionError:
        return _fail(f"run: permission denied: {command}", 126)
    finally:
        if source is not None:
            os.close(source)
    if sock is not None:
        sock.close()  # the command's copy alone holds the port bound from now on
    while True:
        info = signal.sigwaitinfo(watched)
        if info.si_signo == signal.SIGCHLD:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                return code if code >= 0 else 128 - code
        elif info.si_code <= 0:
            # Sent by a process (kill, a supervisor): pass it on. A positive
            # code means the kernel sent it (a terminal's ^C or hangup) to the
            # whole foreground process group, the command included.
            os.kill(pid, info.si_signo)
