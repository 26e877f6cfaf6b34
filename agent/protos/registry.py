"""Method table of the agent API, derived from the generated service descriptors.

ttRPC names a call by its service's full name and the method name
(``"grpc.AgentService"``, ``"CreateContainer"``); the server and clients need the request and
response classes for that pair. The table is built from the descriptors in the generated
modules, so a regenerated ``.proto`` can never drift from it.

The protobuf modules are imported on first use of ``METHODS``/``SERVICES``/``lookup`` (PEP 562
module ``__getattr__``), so importing this module costs next to nothing.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from google.protobuf.descriptor import FileDescriptor
    from google.protobuf.message import Message

__all__ = ["MethodInfo", "METHODS", "SERVICES", "lookup", "methods_of"]

# Services we serve, in the order their modules are searched.
_SERVICE_MODULES = (
    ("agent.protos.agent_pb2", "AgentService"),
    ("agent.protos.health_pb2", "Health"),
)


@dataclass(frozen=True, slots=True)
class MethodInfo:
    """One unary RPC: where it lives and which messages it carries."""

    service: str  # full service name, e.g. "grpc.AgentService"
    name: str  # method name, e.g. "CreateContainer"
    request_cls: type[Message]
    response_cls: type[Message]

    @property
    def path(self) -> str:
        """The gRPC-style path "/service/method", handy in logs and errors."""
        return f"/{self.service}/{self.name}"


@dataclass(frozen=True, slots=True)
class _Table:
    methods: Mapping[tuple[str, str], MethodInfo]
    services: tuple[str, ...]


_table: _Table | None = None
_lock = threading.Lock()


def _methods_from_file(file: FileDescriptor, service_name: str) -> list[MethodInfo]:
    from google.protobuf import message_factory

    try:
        service = file.services_by_name[service_name]
    except KeyError:
        raise RuntimeError(
            f"generated module for {file.name!r} declares no service {service_name!r}; "
            "regenerate with scripts/gen-protos.sh"
        ) from None
    infos = []
    for method in service.methods:
        # ttRPC has no streaming RPCs; a streaming declaration would be a .proto mistake.
        if method.client_streaming or method.server_streaming:
            raise RuntimeError(f"{method.full_name} is a streaming RPC; ttRPC unary only")
        infos.append(
            MethodInfo(
                service=service.full_name,
                name=method.name,
                # Same class objects as the generated modules export: the factory caches per
                # descriptor, so isinstance checks against agent_pb2.X keep working.
                request_cls=message_factory.GetMessageClass(method.input_type),
                response_cls=message_factory.GetMessageClass(method.output_type),
            )
        )
    return infos


def _build() -> _Table:
    import importlib

    methods: dict[tuple[str, str], MethodInfo] = {}
    services: list[str] = []
    for module_name, service_name in _SERVICE_MODULES:
        module = importlib.import_module(module_name)
        for info in _methods_from_file(module.DESCRIPTOR, service_name):
            methods[(info.service, info.name)] = info
        services.append(module.DESCRIPTOR.services_by_name[service_name].full_name)
    return _Table(methods=MappingProxyType(methods), services=tuple(services))


def _get() -> _Table:
    global _table
    if _table is None:
        with _lock:
            if _table is None:
                _table = _build()
    return _table


def lookup(service: str, method: str) -> MethodInfo | None:
    """The RPC named by a ttRPC request, or None if this API has no such method."""
    return _get().methods.get((service, method))


def methods_of(service: str) -> list[MethodInfo]:
    """All methods of one service, in declaration order (empty for an unknown service)."""
    return [info for (svc, _), info in _get().methods.items() if svc == service]


def __getattr__(name: str) -> object:
    # METHODS and SERVICES are computed on first access (PEP 562).
    if name == "METHODS":
        return _get().methods
    if name == "SERVICES":
        return _get().services
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    METHODS: Mapping[tuple[str, str], MethodInfo]
    SERVICES: tuple[str, ...]
