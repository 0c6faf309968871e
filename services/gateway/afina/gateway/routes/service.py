"""Writing and reading a tenant's routes. A route is checked when written: every target must be a model
the tenant can call (or a configured upstream), and its name must not hide a model, so a typo is a 400
now rather than a 404 for every app that calls the alias later."""

from __future__ import annotations

from afina.core.catalog import catalog_model
from afina.core.db import repository as repo
from afina.core.errors import InvalidRequest, NotFound
from afina.core.routing import RouteSpec, RouteTarget, check_route_name
from afina.core.runtime import Runtime
from afina.gateway.captures import retrain
from afina.gateway.routes.protocol import RouteDeleted, RouteList, RouteObject


def _object(row: object) -> RouteObject:
    spec = RouteSpec.from_row(row.spec)  # type: ignore[attr-defined]
    return RouteObject(name=row.name, created_at=row.created_at, updated_at=row.updated_at,  # type: ignore[attr-defined]
                       **spec.model_dump())


def _route_not_found(name: str) -> NotFound:
    return NotFound(f"No route named '{name}'.", param="name", code="route_not_found")


def _check_target(runtime: Runtime, tenant_id: str, target: RouteTarget, field: str) -> None:
    if target.upstream is not None:
        if target.upstream not in runtime.settings.upstreams:
            raise InvalidRequest(f"{field}: no upstream named '{target.upstream}' is configured on this gateway "
                                 f"(configured: {sorted(runtime.settings.upstreams) or 'none'})", param=field)
        return
    if catalog_model(target.model) is not None:
        return
    with runtime.db.session() as session:
        if repo.get_model(session, tenant_id, target.model) is None:
            raise InvalidRequest(f"{field}: the model '{target.model}' does not exist or you do not have access "
                                 "to it (a target is a model, not another route)", param=field)


def _check_capture(runtime: Runtime, tenant_id: str, spec: RouteSpec) -> None:
    """A retraining must be possible when it comes due: a first target afina trains, a training file of the
    tenant's that captured examples can be appended to (another tenant's file answers like a missing one)."""
    capture = spec.capture
    if capture is None:
        return
    if capture.retrain_after is not None and spec.targets[0].upstream is not None:
        raise InvalidRequest("capture.retrain_after: the first target is a model of an upstream, which afina cannot "
                             "retrain; put a fine-tune or a catalog base model first", param="capture.retrain_after")
    if capture.training_file is not None:
        retrain.check_training_file(runtime, tenant_id, capture.training_file)


def put_route(runtime: Runtime, tenant_id: str, name: str, spec: RouteSpec) -> RouteObject:
    try:
        check_route_name(name)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="name") from None
    if catalog_model(name) is not None:
        raise InvalidRequest(f"'{name}' is a base model's name; a route cannot hide it", param="name")
    for field, targets in (("targets", spec.targets), ("fallbacks", spec.fallbacks)):
        for index, target in enumerate(targets):
            _check_target(runtime, tenant_id, target, f"{field}.{index}.model")
    _check_capture(runtime, tenant_id, spec)
    with runtime.db.session() as session:
        row, _created = repo.put_route(session, tenant_id, name, spec.to_row())
        session.flush()
        return _object(row)


def get_route(runtime: Runtime, tenant_id: str, name: str) -> RouteObject:
    with runtime.db.session() as session:
        row = repo.get_route(session, tenant_id, name)
        if row is None:
            raise _route_not_found(name)
        return _object(row)


def list_routes(runtime: Runtime, tenant_id: str) -> RouteList:
    with runtime.db.session() as session:
        return RouteList(data=[_object(row) for row in repo.list_routes(session, tenant_id)])


def delete_route(runtime: Runtime, tenant_id: str, name: str) -> RouteDeleted:
    with runtime.db.session() as session:
        if not repo.delete_route(session, tenant_id, name):
            raise _route_not_found(name)
    return RouteDeleted(name=name)
