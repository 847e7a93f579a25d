"""Ports a browser will not open are never handed out; a range inside the
kernel's ephemeral range is warned about (issue 9, part 4)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from dynamic_port_manager import DynamicPortManager, NoFreePortError

UNSAFE_IN_RANGE = [6665, 6666, 6667, 6668, 6669, 6679, 6697]


def test_browser_unsafe_ports_are_skipped_and_listed(tmp_path: Path, registry: Path) -> None:
    with DynamicPortManager(6665, 6698, tmp_path / "s.json", console_log=False) as pm:
        picked = [pm.pick_port(pid=os.getpid()) for _ in range(3)]
        assert picked == [6670, 6671, 6672]
        state = pm.get_state()
        assert state["skipped_ports"] == UNSAFE_IN_RANGE
        for port in UNSAFE_IN_RANGE:
            assert port not in state["free_ports"]
            assert port not in state["used_ports"]
        assert len(state["free_ports"]) + len(state["used_ports"]) + len(UNSAFE_IN_RANGE) == 34


def test_a_range_of_only_unsafe_ports_is_exhausted_unless_told_otherwise(
    tmp_path: Path, registry: Path
) -> None:
    with DynamicPortManager(6665, 6666, tmp_path / "a.json", console_log=False) as pm:
        with pytest.raises(NoFreePortError):
            pm.pick_port()
    with DynamicPortManager(
        6665, 6666, tmp_path / "b.json", console_log=False, skip_unsafe=False
    ) as pm:
        assert pm.pick_port() == 6665
        assert pm.get_state()["skipped_ports"] == []


def ephemeral_range() -> tuple[int, int]:
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(low), int(high)


def test_a_range_in_the_kernels_ephemeral_range_is_warned_about(
    tmp_path: Path, registry: Path, caplog: pytest.LogCaptureFixture
) -> None:
    low, high = ephemeral_range()
    reserved = Path("/proc/sys/net/ipv4/ip_local_reserved_ports").read_text().strip()
    if reserved:
        pytest.skip(f"this host reserves ports ({reserved}); the count below would differ")
    caplog.set_level(logging.INFO, logger="dynamic_port_manager")
    with DynamicPortManager(low - 5, low + 4, tmp_path / "e.json", console_log=False) as pm:
        overlap = pm.get_state()["ephemeral_overlap"]
    assert overlap == {"ephemeral_range": [low, high], "first": low, "last": low + 4, "count": 5}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert f"{low}-{high}" in message and "ip_local_reserved_ports" in message
    caplog.clear()
    if low > 1100:
        with DynamicPortManager(1024, 1030, tmp_path / "f.json", console_log=False) as pm:
            assert pm.get_state()["ephemeral_overlap"] is None
        assert not [r for r in caplog.records if r.levelno == logging.WARNING]
