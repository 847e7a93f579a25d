"""Response bodies of the port endpoints, so ``/openapi.json`` documents each one.

Field for field the original module's JSON. pydantic evaluates these
annotations at runtime, so ``Optional[X]`` (not ``X | None``, which Python 3.9
cannot evaluate) and no ``from __future__ import annotations``.

Every field is required (``Field(...)``, no default): every response carries
every key, ``null`` where a value is absent. A default would make a key
optional in one pydantic release's schema and required in another's (they
disagree on defaults in the serialization schema), so the published contract
would move with the installed version.
"""

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


class HistoryEntry(BaseModel):
    time: str = Field(..., description="Local Jalali time, `YYYY/MM/DD HH:MM weekday`.")
    prev: Optional[int] = Field(..., description="The active port before the change.")
    new: Optional[int] = Field(..., description="The active port after it (null: released).")


class Settings(BaseModel):
    port_range: list[int] = Field(..., min_length=2, max_length=2, description="[start, end].")
    json_path: str
    history_max: int
    service: str = Field(default="", description="The name `lookup` finds it by.")


class EphemeralOverlap(BaseModel):
    ephemeral_range: list[int] = Field(..., description="net.ipv4.ip_local_port_range")
    first: int
    last: int
    count: int = Field(..., description="Ports of the range inside it and not reserved.")


class Lease(BaseModel):
    port: int
    pid: int
    owner: str
    since: str = Field(..., description="ISO-8601 time the lease was taken.")


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
    port_usage: dict[str, int] = Field(..., description="Picks per port (keys are port numbers).")
    history: list[HistoryEntry]
    last_checked: Optional[str]
    change_count: int
    last_error: Optional[str]
    last_error_time: Optional[str]
    settings: Settings
    schema_version: int
    last_checked_unix: Optional[float] = Field(
        ..., description="`last_checked` as seconds since the Unix epoch."
    )
    error_active: bool = Field(
        ...,
        description="Whether `last_error` is still in effect (cleared by the next "
        "save that met no problem).",
    )
    skipped_ports: list[int] = Field(
        ...,
        description="Free ports never handed out because web browsers refuse to open them.",
    )
    ephemeral_overlap: Optional[EphemeralOverlap] = Field(
        ...,
        description="Where the range lies in the kernel's ephemeral port range (null: "
        "it does not).",
    )
    leases: list[Lease]
    stats: Stats
    options: Options


class PickResponse(BaseModel):
    status: Literal["success"] = Field(..., description="Always `success`.")
    port: int


class SuccessResponse(BaseModel):
    status: Literal["success"] = Field(..., description="Always `success`.")


class OkResponse(BaseModel):
    status: Literal["ok"] = Field(..., description="Always `ok`.")


class FreePorts(BaseModel):
    free_ports: list[int]


class UsedPorts(BaseModel):
    used_ports: list[int]


class History(BaseModel):
    history: list[HistoryEntry]


class BackupList(BaseModel):
    backups: list[str] = Field(..., description="File names, oldest first.")


class OwnerProcess(BaseModel):
    pid: int
    name: Optional[str] = Field(
        ...,
        description="The program's name: the file name of the program it runs, in full "
        "(`/proc/<pid>/cmdline`), else the kernel's `comm` (at most 15 bytes); null "
        "where neither can be read.",
    )
    cmdline: Optional[list[str]] = Field(..., description="Its arguments; null where unreadable.")
    uid: int = Field(..., description="The uid that owns the socket.")


class OwnerLease(BaseModel):
    pid: int
    state_file: str = Field(..., description="The state file of the manager that leased it.")
    owner: str
    since: str = Field(..., description="ISO-8601 time the lease was taken.")
    alive: bool = Field(..., description="False: its process is gone; the next pick reclaims it.")


class PortOwner(BaseModel):
    port: int
    listening: bool = Field(..., description="A socket listens on the port.")
    sockets: int = Field(..., description="TCP sockets on the port (TIME_WAIT not counted).")
    processes: list[OwnerProcess] = Field(..., description="The processes holding them.")
    unknown_uids: list[int] = Field(
        ..., description="Uids of sockets whose process this server's user cannot see."
    )
    lease: Optional[OwnerLease] = Field(
        ..., description="The registry's lease on the port, if any."
    )


class Owners(BaseModel):
    owners: list[PortOwner] = Field(..., description="Used ports only, in port order.")


class ErrorResponse(BaseModel):
    """FastAPI's error convention."""

    detail: str
