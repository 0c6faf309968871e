"""HTTP routes of ``/v1/routes`` (the logic is in ``service``). ``PUT`` writes the whole route: moving an alias
to a new model is one call, read by the next request (no restart, no cache to expire)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from afina.core.routing import RouteSpec
from afina.gateway.deps import RuntimeDep, TenantDep, require
from afina.gateway.error_protocol import error_responses
from afina.gateway.params import MODEL_NAME_PATH, refuse_nul_params
from afina.gateway.routes import service
from afina.gateway.routes.protocol import RouteDeleted, RouteList, RouteObject

router = APIRouter(prefix="/v1/routes", tags=["routes"], dependencies=[Depends(refuse_nul_params)])
NAME = f"/{{name:{MODEL_NAME_PATH}}}"  # a route's name may hold a slash, as model names do


@router.get("", responses=error_responses())
def list_routes(runtime: RuntimeDep, tenant: TenantDep) -> RouteList:
    return service.list_routes(runtime, tenant)


@router.put(NAME, dependencies=[Depends(require("admin"))], responses=error_responses(404))
def put_route(name: str, body: RouteSpec, runtime: RuntimeDep, tenant: TenantDep) -> RouteObject:
    """Create the route or replace it whole."""
    return service.put_route(runtime, tenant, name, body)


@router.get(NAME, responses=error_responses(404))
def get_route(name: str, runtime: RuntimeDep, tenant: TenantDep) -> RouteObject:
    return service.get_route(runtime, tenant, name)


@router.delete(NAME, dependencies=[Depends(require("admin"))], responses=error_responses(404))
def delete_route(name: str, runtime: RuntimeDep, tenant: TenantDep) -> RouteDeleted:
    return service.delete_route(runtime, tenant, name)
