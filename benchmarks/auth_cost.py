"""Section 7 — the added cost of authentication per request (issue 4), by ``variants.py``: two
gateways from the same server configuration, one in dev mode and one with everything of issue 4
switched on:

    auth      an API key (``auth.api_keys``; the session is created with ``x-api-key``), a policy
              granting KEY_VALUE.* (and SESSION.*) in the namespace to the key's role, a namespace
              rate limit so high it never refuses (the token bucket is still checked on every
              call) and the audit log written to a file (one JSON line per call)
    dev       no auth: every caller "anonymous", no policy, no rate limit, no audit

Per request both resolve the session token; the auth gateway also authorizes, takes a token
from the bucket and queues an audit record.
"""

from __future__ import annotations

import pathlib
from typing import Any

from benchmarks import kv, procs, variants
from benchmarks.context import Context

TITLE = "Cost of authentication: gateway with auth, RBAC, rate limit and audit vs dev mode"
API_KEY = "prism_bench_" + "k" * 40  # a throwaway key for this run's own gateway only


def config(mode: str, audit_file: pathlib.Path) -> dict[str, Any]:
    from app.auth.api_keys import hash_key

    config = variants.base_config()
    if mode == "auth":
        namespace = variants.NAMESPACE
        config.update({
            "auth": {"api_keys": [{"identity": "bench-client", "sha256": hash_key(API_KEY), "roles": ["bench"]}]},
            "policies": [{"role": "bench", "namespaces": [namespace], "operations": ["KEY_VALUE.*", "SESSION.*"]}],
            "namespaces": [{"name": namespace, "rate_limit": {"requests_per_second": 10_000_000, "burst": 10_000_000}}],
            "audit": {"sink": str(audit_file)},
        })
    return config


def _lines(path: pathlib.Path) -> int:
    try:
        return sum(1 for _ in path.open("rb"))
    except OSError:
        return 0


def _refuses_without_the_key(gateways: dict[str, procs.Server]) -> None:
    """The auth gateway really refuses a call without the key (else the comparison is void)."""
    try:
        kv.create_session(f"127.0.0.1:{gateways['auth'].grpc_port}", "kv")
    except Exception as exc:  # grpc.RpcError expected
        refused = getattr(exc, "code", lambda: None)()
        if refused is None or refused.name != "UNAUTHENTICATED":
            raise
    else:
        raise RuntimeError("the auth gateway opened a session without an API key")


def run(ctx: Context) -> dict[str, Any]:
    work = ctx.subdir("auth-configs")
    audit_file = work / "audit.jsonl"
    configs = {mode: variants.write(work / f"prism-{mode}.yaml", config(mode, audit_file)) for mode in ("dev", "auth")}
    before = _lines(audit_file)
    rows = variants.measure(ctx, "auth", configs, "dev", api_keys={"auth": API_KEY}, check=_refuses_without_the_key)
    return {"title": TITLE, "rows": rows, "namespace": variants.NAMESPACE, "audit_lines_during_load": _lines(audit_file) - before}
