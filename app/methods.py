"""The method table: every RPC of the proto contract, described once for all transports.

Transports never name an RPC. They iterate this table — built from the generated
descriptors and their options (``google.api.http``, ``prism.v1.access_pattern``,
``prism.v1.requires_session``) — and call ``Method.handler``.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from google.api import annotations_pb2, field_behavior_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from prism.errors import invalid_argument
from prism.v1 import (
    config_pb2,
    keyvalue_pb2,
    options_pb2,
    plugin_pb2,
    pubsub_pb2,
    queue_pb2,
    reader_pb2,
    session_pb2,
    transact_pb2,
)

PROTO_MODULES = (
    session_pb2,
    config_pb2,
    keyvalue_pb2,
    queue_pb2,
    pubsub_pb2,
    reader_pb2,
    transact_pb2,
    plugin_pb2,
)

Handler = Callable[[Any, Any], Awaitable[Message] | AsyncIterator[Message]]
# The namespace a call outside a session touches, resolved from its request: what authorization
# checks the operation against. ANY_NAMESPACE: allowed if granted anywhere (a listing, which
# the service then filters); GLOBAL_NAMESPACE: only a grant covering every namespace.
Scope = Callable[[Any, Any], Awaitable[str | None]]
ANY_NAMESPACE = None
GLOBAL_NAMESPACE = "*"


@dataclass(frozen=True, slots=True)
class HttpRule:
    """One ``google.api.http`` binding: verb, path template and which fields the body holds."""

    verb: str  # upper-case: GET, PUT, POST, DELETE, PATCH
    template: str  # e.g. "/v1/kv/{key=**}"
    body: str  # "" (no body), "*" (the whole request) or one field name
    regex: re.Pattern[str]
    path_fields: tuple[str, ...]

    @classmethod
    def parse(cls, verb: str, template: str, body: str) -> HttpRule:
        fields: list[str] = []
        parts: list[str] = []
        for literal, capture in re.findall(r"([^{]*)(?:\{([^}]+)\})?", template):
            parts.append(re.escape(literal))
            if capture:
                name, _, segment = capture.partition("=")
                fields.append(name)
                # A one-segment variable that ends a template without a verb never takes a
                # ":verb": "/v1/topics/x:publish" is the publish route, not topic "x:publish".
                last = template.endswith("{" + capture + "}")
                one_segment = "[^/:]+" if last else "[^/]+"
                parts.append(f"(?P<{name}>.+)" if segment == "**" else f"(?P<{name}>{one_segment})")
        pattern = "".join(parts)
        return cls(verb, template, body, re.compile(f"^{pattern}$"), tuple(fields))

    @property
    def openapi_path(self) -> str:
        return re.sub(r"\{([^}=]+)(=[^}]*)?\}", r"{\1}", self.template)


@dataclass(slots=True)
class Method:
    service: str  # "prism.v1.KeyValueService"
    name: str  # "Get"
    request_type: type[Message]
    response_type: type[Message]
    client_streaming: bool
    server_streaming: bool
    http: HttpRule | None
    pattern: int  # prism.v1.AccessPattern; 0 for non-data services
    requires_session: bool
    doc: str
    required_fields: RequiredFields | None = None  # None: nothing in the request is REQUIRED
    handler: Handler | None = None  # None: not implemented yet (UNIMPLEMENTED naming the RPC)
    scope: Scope | None = None  # for methods outside a session: see Scope
    # The gRPC path, also the gRPC-Web URL: ``/prism.v1.KeyValueService/Get``. Made once: every
    # call looks things up by it several times.
    path: str = field(init=False)

    def __post_init__(self) -> None:
        self.path = f"/{self.service}/{self.name}"

    @property
    def unary(self) -> bool:
        return not (self.client_streaming or self.server_streaming)


def is_required(field: FieldDescriptor) -> bool:
    """Marked ``(google.api.field_behavior) = REQUIRED`` in the proto."""
    return field_behavior_pb2.REQUIRED in field.GetOptions().Extensions[field_behavior_pb2.field_behavior]


_LIST, _MESSAGE, _SCALAR = range(3)  # how a REQUIRED field's presence is told


class RequiredFields:
    """The REQUIRED fields (``google.api.field_behavior``) of a message type, and the singular
    message fields that lead to more: what a request is checked against, worked out from the
    descriptors once, so a call asks its message only about fields that can fail it.

    Elements of a repeated message field are the service's to check one by one: a batch entry
    succeeds or fails on its own (its result's status), never the whole call."""

    __slots__ = ("nested", "own")

    def __init__(self) -> None:
        self.own: tuple[tuple[str, str, int], ...] = ()  # name, JSON name, how presence is told
        self.nested: tuple[tuple[str, str, RequiredFields], ...] = ()  # name, JSON name, its type's

    @classmethod
    def of(cls, descriptor: Descriptor) -> RequiredFields | None:
        """The check for messages of ``descriptor``; None when nothing in them is REQUIRED."""
        made: dict[str, RequiredFields] = {}
        leads: dict[str, list[tuple[FieldDescriptor, str]]] = {}  # type → its singular message fields
        pending = [descriptor]
        while pending:  # every message type reachable through singular message fields, once
            message = pending.pop()
            check = made[message.full_name] = cls()
            own, leads[message.full_name] = [], []
            for f in message.fields:
                if is_required(f):
                    kind = _LIST if f.is_repeated else _MESSAGE if f.type == FieldDescriptor.TYPE_MESSAGE else _SCALAR
                    own.append((f.name, f.json_name, kind))
                if f.type == FieldDescriptor.TYPE_MESSAGE and not f.is_repeated:
                    leads[message.full_name].append((f, f.message_type.full_name))
                    if f.message_type.full_name not in made and f.message_type not in pending:
                        pending.append(f.message_type)
            check.own = tuple(own)
        # Which types hold a REQUIRED field at any depth: grown until nothing changes (types
        # may nest themselves).
        holding = {name for name, check in made.items() if check.own}
        while grown := {name for name, fields in leads.items() if name not in holding and any(t in holding for _, t in fields)}:
            holding |= grown
        for name, fields in leads.items():
            made[name].nested = tuple((f.name, f.json_name, made[t]) for f, t in fields if t in holding)
        return made[descriptor.full_name] if descriptor.full_name in holding else None

    def check(self, message: Message, prefix: str = "") -> None:
        """INVALID_ARGUMENT naming the first REQUIRED field left empty."""
        for name, json_name, kind in self.own:
            if kind == _LIST:
                present = len(getattr(message, name)) > 0
            elif kind == _MESSAGE:
                present = message.HasField(name)
            else:
                present = bool(getattr(message, name))
            if not present:
                raise invalid_argument(prefix + json_name, "is required")
        for name, json_name, nested in self.nested:
            if message.HasField(name):
                nested.check(getattr(message, name), f"{prefix}{json_name}.")


def _http_rule(options: Any) -> HttpRule | None:
    if not options.HasExtension(annotations_pb2.http):
        return None
    rule = options.Extensions[annotations_pb2.http]
    verb = rule.WhichOneof("pattern")
    return HttpRule.parse(verb.upper(), getattr(rule, verb), rule.body)


def _service_methods(service: ServiceDescriptor, docs: dict[str, str]) -> Iterable[Method]:
    pattern = service.GetOptions().Extensions[options_pb2.access_pattern]
    for m in service.methods:
        opts = m.GetOptions()
        yield Method(
            service=service.full_name,
            name=m.name,
            request_type=GetMessageClass(m.input_type),
            response_type=GetMessageClass(m.output_type),
            client_streaming=m.client_streaming,
            server_streaming=m.server_streaming,
            http=_http_rule(opts),
            pattern=pattern,
            requires_session=bool(pattern) or opts.Extensions[options_pb2.requires_session],
            doc=docs.get(f"{service.full_name}.{m.name}", ""),
            required_fields=RequiredFields.of(m.input_type),
        )


def _comments(module: Any) -> dict[str, str]:
    """RPC full name → its leading proto comment (descriptors keep no comments at run time)."""
    import pathlib

    source = pathlib.Path(module.__file__).with_name(module.DESCRIPTOR.name.rsplit("/", 1)[-1])
    docs: dict[str, str] = {}
    if not source.exists():
        return docs
    service = ""
    comment: list[str] = []
    for line in source.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("//"):
            comment.append(stripped[2:].strip())
            continue
        if m := re.match(r"service (\w+)", stripped):
            service = f"{module.DESCRIPTOR.package}.{m.group(1)}"
        elif m := re.match(r"rpc (\w+)", stripped):
            docs[f"{service}.{m.group(1)}"] = " ".join(comment)
        comment = []
    return docs


def all_methods() -> list[Method]:
    """Every RPC of the contract, handlers unbound."""
    methods: list[Method] = []
    for module in PROTO_MODULES:
        docs = _comments(module)
        for service in module.DESCRIPTOR.services_by_name.values():
            methods.extend(_service_methods(service, docs))
    return methods


def bind(methods: list[Method], services: Iterable[object]) -> list[Method]:
    """Attach each service object's coroutine named like the RPC; the rest stay None.

    A service object declares the proto service it implements as ``SERVICE = "prism.v1.X"``,
    and the authorization scope of its session-less methods in ``scopes`` (method name → Scope).
    """
    by_service = {s.SERVICE: s for s in services}
    for method in methods:
        impl = by_service.get(method.service)
        method.handler = getattr(impl, method.name, None)
        method.scope = getattr(impl, "scopes", {}).get(method.name)
    return methods


async def global_scope(request: Any, call: Any) -> str:
    """For operator methods (metrics, plugin info): a grant must cover every namespace."""
    return GLOBAL_NAMESPACE
