"""Response bodies of the port endpoints, so ``/openapi.json`` documents each one.

Field for field the original module's JSON. pydantic evaluates these
annotations at runtime, so ``Optional[X]`` (not ``X | None``, which Python 3.9
cannot evaluate) and no ``from __future__ import annotations``.
"""

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


class HistoryEntry(BaseModel):
    time: str = Field(description="Local Jalali time, `YYYY/MM/DD HH:MM weekday`.")
    prev: Optional[int] = Field(description="The active port before the change.")
    new: Optional[int] = Field(description="The active port after it (null: released).")


class Settings(BaseModel):
    port_range: list[int] = Field(min_length=2, max_length=2, description="[start, end].")
    json_path: str
    history_max: int


class EphemeralOverlap(BaseModel):
    ephemeral_range: list[int] = Field(description="net.ipv4.ip_local_port_range")
    first: int
    last: int
    count: int = Field(description="Ports of the range inside it and not reserved.")


class Lease(BaseModel):
    port: int
    pid: int
    owner: str
    since: str = Field(description="ISO-8601 time the lease was taken.")


class Stats(BaseModel):
    picks: int
    releases: int
    errors: int


class Options(BaseModel):
    refresh_interval: float
    backup_max: int
    durable: bool
    registry_dir: str


class PortState(BaseModel):
    """The state object: the original module's keys, then this package's extras."""

    # A key the core adds later still reaches the client: this is the full state.
    model_config = ConfigDict(extra="allow")

    current_port: Optional[int]
    free_ports: list[int]
    used_ports: list[int]
    port_usage: dict[str, int] = Field(description="Picks per port (keys are port numbers).")
    history: list[HistoryEntry]
    last_checked: Optional[str]
    change_count: int
    last_error: Optional[str]
    last_error_time: Optional[str]
    settings: Settings
    schema_version: int
    last_checked_unix: Optional[float] = Field(
        description="`last_checked` as seconds since the Unix epoch."
    )
    error_active: bool = Field(
        default=False,
        description="Whether `last_error` is still in effect (cleared by the next "
        "save that met no problem).",
    )
    skipped_ports: list[int] = Field(
        default_factory=list,
        description="Free ports never handed out because web browsers refuse to open them.",
    )
    ephemeral_overlap: Optional[EphemeralOverlap] = Field(
        default=None,
        description="Where the range lies in the kernel's ephemeral port range, if it does.",
    )
    leases: list[Lease]
    stats: Stats
    options: Options


class PickResponse(BaseModel):
    status: Literal["success"] = "success"
    port: int


class SuccessResponse(BaseModel):
    status: Literal["success"] = "success"


class OkResponse(BaseModel):
    status: Literal["ok"] = "ok"


class FreePorts(BaseModel):
    free_ports: list[int]


class UsedPorts(BaseModel):
    used_ports: list[int]


class History(BaseModel):
    history: list[HistoryEntry]


class BackupList(BaseModel):
    backups: list[str] = Field(description="File names, oldest first.")


class ErrorResponse(BaseModel):
    """FastAPI's error convention."""

    detail: str
