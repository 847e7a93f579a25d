"""``GET /port/services`` and ``/port/services/{name}``: who serves what.

From this host's lease registry (the manager's), or, when discovery is
configured (the manager's ``discovery=``, else ``$DPM_DISCOVERY``), from etcd
for every host. The registry answer reads no state file.
"""

from typing import Annotated, Any, Callable, Optional

from dynamic_port_manager import DiscoveryError, DynamicPortManager
from dynamic_port_manager.lookup import check_name, find
from fastapi import APIRouter, HTTPException, Path
from pydantic import BaseModel, Field

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"


class Instance(BaseModel):
    service: str
    host: str = Field(description="This host's name, or the announcing host's.")
    port: int
    pid: int
    state_file: str
    since: str = Field(description="ISO-8601 time the port was taken.")
    command: Optional[list[str]] = Field(description="The holder's command line (local only).")
    source: str = Field(description="`local` (this host's registry) or `etcd`.")


class Services(BaseModel):
    instances: list[Instance] = Field(description="By service, host and port.")


class Service(BaseModel):
    service: str
    instances: list[Instance] = Field(description="By host and port; never empty.")


def add_services(router: APIRouter, manager: Callable[[], DynamicPortManager]) -> None:
    """Adds the two endpoints; ``manager()`` names the registry and discovery."""

    def instances(name: Optional[str]) -> list[dict[str, Any]]:
        m = manager()
        try:
            return find(name, m.discovery or None, registry_dir=m.registry_dir)
        except DiscoveryError as e:
            raise HTTPException(503, str(e)) from None
        except OSError as e:  # the registry
            raise HTTPException(503, f"the port manager cannot serve: {e}") from None

    @router.get("/port/services", response_model=Services, summary="Every named service's ports")
    def services() -> Services:
        return Services.model_validate({"instances": instances(None)})

    @router.get(
        "/port/services/{name}",
        response_model=Service,
        summary="Where a service listens",
        responses={404: {"description": "No live instance of that service."}},
    )
    def service(
        name: Annotated[str, Path(pattern=NAME_PATTERN, description="The service's name.")],
    ) -> Service:
        check_name(name)
        found = instances(name)
        if not found:
            raise HTTPException(404, f"no live instance of service {name!r}")
        return Service.model_validate({"service": name, "instances": found})
