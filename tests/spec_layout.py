"""The state layout of SPEC Part 1, in the original's key order, shared by the suites."""

from __future__ import annotations

SPEC_KEYS = [
    "current_port",
    "free_ports",
    "used_ports",
    "port_usage",
    "history",
    "last_checked",
    "change_count",
    "last_error",
    "last_error_time",
    "settings",
]
#: What this package adds, under keys of its own.
EXTRA_KEYS = [
    "schema_version",
    "last_checked_unix",
    "error_active",
    "skipped_ports",
    "ephemeral_overlap",
    "leases",
    "stats",
    "options",
]
