"""Role-based authorization per namespace (RFC §9.2).

An operation is ``PATTERN.Method`` for data services (``KEY_VALUE.Get``) and ``SERVICE.Method``
for the others (``SESSION.CreateSession``, ``CONFIG.RegisterConfig``). A policy grants a role
some operations (exact, ``PATTERN.*`` or ``*``) in some namespaces (a name or ``*``).
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from app.auth.identity import Identity
from app.methods import Method
from app.settings import Policy
from prism.errors import PrismError
from prism.v1 import config_pb2

EVERYTHING = "*"  # the dev-mode role: every operation in every namespace


def operation_name(method: Method) -> str:
    if method.pattern:
        pattern = config_pb2.AccessPattern.Name(method.pattern).removeprefix("ACCESS_PATTERN_")
        return f"{pattern}.{method.name}"
    service = method.service.rsplit(".", 1)[-1].removesuffix("Service").upper()
    return f"{service}.{method.name}"


class Authorizer:
    def __init__(self, policies: Iterable[Policy]) -> None:
        # role → list of (namespaces, operations), precomputed as sets for the hot path.
        self.grants: dict[str, list[tuple[frozenset[str], frozenset[str]]]] = {}
        for policy in policies:
            self.grants.setdefault(policy.role, []).append((frozenset(policy.namespaces), frozenset(policy.operations)))

    def allowed(self, identity: Identity, operation: str, namespace: str) -> bool:
        if EVERYTHING in identity.roles:
            return True
        pattern = operation.split(".", 1)[0] + ".*"
        for role in identity.roles:
            for namespaces, operations in self.grants.get(role, ()):
                if (namespace in namespaces or EVERYTHING in namespaces) and (
                    operation in operations or pattern in operations or EVERYTHING in operations
                ):
                    return True
        return False

    def allowed_somewhere(self, identity: Identity, operation: str) -> bool:
        """Granted in at least one namespace: enough to ask for a listing the service filters."""
        if EVERYTHING in identity.roles:
            return True
        pattern = operation.split(".", 1)[0] + ".*"
        return any(
            operation in operations or pattern in operations or EVERYTHING in operations
            for role in identity.roles
            for _, operations in self.grants.get(role, ())
        )

    def check(self, identity: Identity, operation: str, namespace: str) -> None:
        if not self.allowed(identity, operation, namespace):
            raise PrismError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{identity.name!r} may not {operation} in namespace {namespace!r}",
            )
