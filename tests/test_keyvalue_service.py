"""KeyValueService refuses what its backend does not declare: FAILED_PRECONDITION naming the
field, the backend and the capability, before the adapter is asked.

The adapter suite (tests/conformance/test_keyvalue_adapter.py) checks the same refusal on any
registered backend that lacks a capability; every built-in KeyValue backend declares them all,
so this runs the service over a memory adapter declaring none of them.
"""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import duration_pb2

from adapters.capabilities import Capability
from adapters.keyvalue.memory import MemoryKeyValue
from prism.v1 import keyvalue_pb2 as kv
from tests.conformance.test_keyvalue_adapter import NEEDING, claims, refused, service_over


class BareKeyValue(MemoryKeyValue):
    """Memory storage declaring none of the optional capabilities."""

    capabilities = frozenset()


@pytest.mark.parametrize("capability", list(NEEDING))
async def test_each_capability_a_request_needs_is_refused(capability: Capability, request: pytest.FixtureRequest) -> None:
    assert not await claims(BareKeyValue(), capability, request)


async def test_every_field_needing_a_capability_is_named() -> None:
    service, call = service_over(BareKeyValue(), "bare")
    error = await refused(service.Delete(kv.DeleteRequest(key="k", if_match="e"), call))
    assert (error.code, error.message) == (grpc.StatusCode.FAILED_PRECONDITION, "ifMatch: backend 'bare' lacks etag")
    error = await refused(service.Set(kv.SetRequest(key="k", value=b"v", idempotency_token="t"), call))
    assert error.message == "idempotencyToken: backend 'bare' lacks create_only"
    ttl = duration_pb2.Duration(seconds=1)
    entries = [kv.SetRequest(key="a", value=b"1"), kv.SetRequest(key="b", value=b"2", ttl=ttl)]
    batch = await service.BatchSet(kv.BatchSetRequest(entries=entries), call)
    assert [(r.status.code, r.status.message) for r in batch.results] == [
        (0, ""),
        (grpc.StatusCode.FAILED_PRECONDITION.value[0], "entries[1].ttl: backend 'bare' lacks ttl"),
    ]
