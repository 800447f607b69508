"""Typed dependencies: the runtime, and the authenticated, authorized principal (denials are audited)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request

from service import metrics
from service.api import auth
from service.errors import Forbidden, Unauthenticated
from service.flows.runtime import Runtime, get_runtime
from service.schemas import Principal
from service.store import audit


def runtime_dep() -> Runtime:
    return get_runtime()


RuntimeDep = Annotated[Runtime, Depends(runtime_dep)]


def _route_template(request: Request) -> str:
    route = request.scope.get("route")
    return getattr(route, "path", None) or "unmatched"


def audit_denial(runtime: Runtime, request: Request, principal: Principal, error: Unauthenticated | Forbidden) -> None:
    with runtime.sessions.begin() as session:
        audit.append(
            session=session,
            principal=principal,
            event_type="access.denied",
            action="E",
            outcome=audit.MINOR_FAILURE,
            entity_type="Route",
            entity_ref=f"{request.method} {_route_template(request)}",
            detail={"reason": error.code, "message": error.message, "path": request.url.path},
        )
    metrics.AUTH_DENIALS.labels(error.code).inc()


def authenticated(request: Request, runtime: RuntimeDep) -> Principal:
    source = request.client.host if request.client else None
    try:
        return auth.authenticate(runtime.settings, request.headers.get("authorization"), source_address=source)
    except Unauthenticated as e:
        audit_denial(runtime, request, Principal(subject="unauthenticated", source_address=source), e)
        raise


AuthenticatedDep = Annotated[Principal, Depends(authenticated)]


def require(resource: str, permission: str) -> Callable[..., Principal]:
    """A dependency that admits principals whose scopes cover ``permission`` on ``resource``."""

    def dependency(request: Request, runtime: RuntimeDep, principal: AuthenticatedDep) -> Principal:
        try:
            auth.authorize(principal, resource, permission)
        except Forbidden as e:
            audit_denial(runtime, request, principal, e)
            raise
        return principal

    return dependency


def check(request: Request, runtime: Runtime, principal: Principal, resource: str, permission: str) -> None:
    """The same check inside a route, for permissions that depend on the body (a Bundle's resource types)."""
    try:
        auth.authorize(principal, resource, permission)
    except Forbidden as e:
        audit_denial(runtime, request, principal, e)
        raise
