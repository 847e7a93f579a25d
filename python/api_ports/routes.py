"""The endpoints of the original ``api_ports.py``, over any manager.

Every endpoint but one is a plain ``def``: FastAPI runs it in its threadpool,
so the manager's blocking calls (file locks, disk, port scans) never run on
the event loop. ``/port/state`` is ``async``: it answers on the loop only
when the core can without waiting (most reads: nothing changed), and from
the threadpool otherwise. Errors follow FastAPI's convention, ``{"detail":
...}``: 503 when no port is free or the manager cannot serve, 404 for an
unknown backup, 422 for a bad query; nothing a client sends can cause a 500. The dashboard page
(``port/dashboard``, see ``dashboard.py``) rides along, outside the schema.

Each operation has a fixed ``operationId`` (the manager's method names where
there is one: ``pick_port``, ``get_state``, ...), so a client generated from
the schema is the same wherever the app mounts the router.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional

from dynamic_port_manager import DynamicPortManager, ManagerStoppedError, NoFreePortError
from fastapi import APIRouter, HTTPException, Query, Request, Response
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from . import models
from .backup_file import NAME_MAX, NAME_PATTERN, attachment_header, read_backup
from .dashboard import add_dashboard
from .metrics import new_registry, render
from .services import add_services

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

ManagerSource = Callable[[], DynamicPortManager]

_UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {
        "model": models.ErrorResponse,
        "description": "No free port in the range, or the port manager cannot serve "
        "(stopped, misconfigured, or its lease registry is unusable).",
    }
}


# FastAPI evaluates this at runtime, where Python 3.9 has no `X | None`.
_Ports = Optional[list[Annotated[int, Field(ge=1, le=65535)]]]


def build_router(
    source: ManagerSource,
    *,
    lifespan: Any | None = None,
    peek: Callable[[], DynamicPortManager | None] | None = None,
) -> APIRouter:
    """A router whose endpoints use the manager ``source()`` returns.

    ``peek()``, if given, returns that manager without waiting, or None (none
    made yet): ``/port/state`` then answers on the event loop when the core
    can without waiting, and from the threadpool otherwise.
    """
    router = APIRouter(tags=["port"], responses=_UNAVAILABLE, lifespan=lifespan)

    def manager() -> DynamicPortManager:
        try:
            return source()
        except (ValueError, OSError) as e:  # bad DPM_* settings, unusable folders
            raise HTTPException(503, f"the port manager could not start: {e}") from None

    def state() -> dict[str, Any]:
        with http_errors():
            return manager().get_state()

    metrics_registry = new_registry(state)

    def state_body() -> Any:
        m = manager()
        if type(m).get_state is not DynamicPortManager.get_state:
            # A subclass's own get_state(): validated and serialized by FastAPI.
            return state()
        # The core's JSON, as the model would serialize it (same keys in the
        # same order, every field present): not parsed and written again.
        with http_errors():
            return Response(m.state_json(), media_type="application/json")

    @router.get(
        "/port/state",
        response_model=models.PortState,
        summary="Full state and settings",
        operation_id="get_state",
    )
    async def port_state() -> Any:
        # Most reads find the state as it was: the core answers those on the
        # loop without waiting (a few microseconds); any read that would wait
        # for a lock, the disk or a reclaim goes to the threadpool.
        m = peek() if peek is not None else None
        if m is not None and type(m).get_state is DynamicPortManager.get_state:
            body = m._state_json_nowait()
            if body is not None:
                return Response(body, media_type="application/json")
        return await run_in_threadpool(state_body)

    @router.post(
        "/port/pick",
        response_model=models.PickResponse,
        summary="Pick a free port",
        operation_id="pick_port",
    )
    def pick() -> models.PickResponse:
        with http_errors():
            return models.PickResponse(status="success", port=manager().pick_port())

    @router.post(
        "/port/release",
        response_model=models.SuccessResponse,
        summary="Free it",
        operation_id="release_port",
    )
    def release() -> models.SuccessResponse:
        with http_errors():
            manager().release_port()
        return models.SuccessResponse(status="success")

    @router.get(
        "/port/free",
        response_model=models.FreePorts,
        summary="Free ports",
        operation_id="get_free_ports",
    )
    def free() -> models.FreePorts:
        return models.FreePorts(free_ports=state()["free_ports"])

    @router.get(
        "/port/used",
        response_model=models.UsedPorts,
        summary="Used ports",
        operation_id="get_used_ports",
    )
    def used() -> models.UsedPorts:
        return models.UsedPorts(used_ports=state()["used_ports"])

    @router.get(
        "/port/history",
        response_model=models.History,
        summary="Active-port history",
        operation_id="get_history",
    )
    def history() -> models.History:
        return models.History.model_validate({"history": state()["history"]})

    @router.get(
        "/port/backup/list",
        response_model=models.BackupList,
        summary="The JSON backups",
        operation_id="list_backups",
    )
    def backup_list() -> models.BackupList:
        with http_errors():
            return models.BackupList(backups=manager().backups())

    @router.get(
        "/port/backup/download",
        response_class=Response,
        summary="Download one backup",
        operation_id="download_backup",
        responses={
            200: {
                "description": "The backup file, as an attachment.",
                "content": {"application/json": {"schema": {"type": "object"}}},
            },
            404: {"model": models.ErrorResponse, "description": "No backup of that name."},
        },
    )
    def backup_download(
        filename: Annotated[
            str,
            Query(
                max_length=NAME_MAX,
                pattern=NAME_PATTERN,
                description="A name from `backup/list`, e.g. `dynamic_ports_20240721_155445.json`.",
            ),
        ],
    ) -> Response:
        with http_errors():
            data = read_backup(manager(), filename)
        if data is None:
            raise HTTPException(404, f"no backup named {filename!r} for this state file")
        return Response(
            data,
            media_type="application/json",
            headers={
                "Content-Disposition": attachment_header(filename),
                "X-Content-Type-Options": "nosniff",
            },
        )

    @router.get(
        "/port/owners",
        response_model=models.Owners,
        summary="Who holds each used port",
        operation_id="get_owners",
    )
    def owners(
        port: Annotated[
            _Ports, Query(description="Ports to look at (repeat it); default: the whole range.")
        ] = None,
    ) -> models.Owners:
        with http_errors():
            return models.Owners.model_validate({"owners": manager().owners(port)})

    @router.get(
        "/port/log/json",
        response_model=models.OkResponse,
        summary="Log the state as JSON",
        operation_id="log_json",
    )
    def log_json() -> models.OkResponse:
        with http_errors():
            manager().log_json()
        return models.OkResponse(status="ok")

    @router.get("/port/metrics", operation_id="get_metrics", **METRICS_OPERATION)
    def metrics(request: Request) -> Response:
        return metrics_response(metrics_registry, request)

    add_dashboard(router)
    add_services(router, manager)
    return router


#: The metrics operation's documentation. The Accept header is read from the
#: request, not declared as a parameter: content negotiation is HTTP's, and a
#: declared `accept` would show in the schema as an argument of the operation.
METRICS_OPERATION: dict[str, Any] = {
    "response_class": Response,
    "summary": "Prometheus metrics",
    "description": "The Prometheus text format; OpenMetrics when the request's `Accept` "
    "header asks for `application/openmetrics-text` (any other value, a malformed one "
    "too, gets the text format).",
    "responses": {
        200: {
            "description": "Prometheus text format (OpenMetrics if the scraper asks).",
            "content": {
                "text/plain": {"schema": {"type": "string"}},
                "application/openmetrics-text": {"schema": {"type": "string"}},
            },
        }
    },
}


def metrics_response(registry: CollectorRegistry, request: Request) -> Response:
    """The scrape of ``registry``, in the format the request's Accept header asks for."""
    body, content_type = render(registry, request.headers.get("accept", ""))
    return Response(body, headers={"Content-Type": content_type})


@contextmanager
def http_errors() -> Iterator[None]:
    """The manager's exceptions as HTTP errors (never a 500)."""
    try:
        yield
    except NoFreePortError as e:
        raise HTTPException(503, str(e)) from None
    except ManagerStoppedError as e:
        raise HTTPException(503, str(e)) from None
    except OSError as e:  # RegistryError and file errors: nothing was handed out
        raise HTTPException(503, f"the port manager cannot serve: {e}") from None
