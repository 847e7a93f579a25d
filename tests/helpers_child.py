"""Child interpreters for the logging tests (imported, not a conftest): run
code in a fresh interpreter, read its lines with a deadline, interrupt it."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys

import pytest


def run_child(
    code: str, *args: object, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Runs ``code`` in a fresh interpreter; a hang fails the test after ``timeout``."""
    try:
        return subprocess.run(
            [sys.executable, "-c", code, *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the child process hung (deadlock?); stderr so far: {e.stderr!r}")


def child_env(**changes: str | None) -> dict[str, str]:
    """This process's environment without NO_COLOR, with ``changes`` (None: unset)."""
    env = dict(os.environ)
    env.pop("NO_COLOR", None)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def read_line(child: subprocess.Popen[str], timeout: float) -> str:
    """The child's next stdout line, or fail after ``timeout`` seconds."""
    assert child.stdout is not None
    # poll, not select: the test process may hold descriptors past 1024.
    waiter = select.poll()
    waiter.register(child.stdout, select.POLLIN)
    if not waiter.poll(timeout * 1000):
        child.kill()
        pytest.fail(f"no output from the child within {timeout}s: {child.communicate()[1]!r}")
    line = child.stdout.readline().strip()
    if not line:
        child.wait(timeout)
        pytest.fail(f"the child ended early: {child.communicate()[1]!r}")
    return line


def interrupt_when(
    argv: list[str], line: str, env: dict[str, str] | None = None, timeout: float = 60
) -> tuple[int, str, str]:
    """Starts ``argv``, sends it SIGINT (Ctrl-C) once it has printed ``line``,
    and returns its exit code, stdout and stderr; it must end in ``timeout``."""
    child = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        assert read_line(child, timeout) == line
        child.send_signal(signal.SIGINT)
        try:
            stdout, stderr = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            pytest.fail(f"{argv}: the child did not end after Ctrl-C")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return child.returncode, stdout, stderr
