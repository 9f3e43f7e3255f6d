"""The run's results as markdown tables, the targets of issue 3 checked against them, and the
before/after columns of ``--compare``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchmarks.rest_throughput import SERVERS as REST_SERVERS

Row = dict[str, Any]


# --- formatting ------------------------------------------------------------------------------


def _num(value: Any, digits: int = 0) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, str):
        return value
    return f"{value:,.{digits}f}"


def rps(v: Any) -> str:
    return _num(v, 0)


def ms(v: Any) -> str:
    return _num(v, 3)


def signed_ms(v: Any) -> str:
    return "—" if v is None else f"{v:+.3f}"


def share(v: Any) -> str:
    return "—" if v is None else f"{v * 100:.0f}%"


def ratio(v: Any) -> str:
    return "—" if v is None else f"{v:.2f}×"


def mb(v: Any) -> str:
    return _num(v, 1)


def text(v: Any) -> str:
    return "—" if v is None else str(v)


def change(new: Any, old: Any) -> str:
    if not isinstance(new, (int, float)) or not isinstance(old, (int, float)) or not old:
        return "—"
    return f"{(new - old) / old * 100:+.1f}%"


@dataclass(frozen=True)
class Column:
    header: str
    key: str
    fmt: Callable[[Any], str] = text


@dataclass(frozen=True)
class Table:
    columns: list[Column]
    compare: list[Column]  # metrics given a before column and a change column under --compare


THROUGHPUT_TAIL = [
    Column("loader CPU", "loader_cpu_share", share),
    Column("server CPU", "server_cpu_share", share),
    Column("other CPU", "other_cpu", text),
]
# benchmarks/variants.py: a feature's gateway against the baseline's, measurement by measurement.
VARIANTS = Table(
    [
        Column("measurement", "measurement"),
        Column("transport", "transport"),
        Column("load", "load"),
        Column("gateway", "gateway"),
        Column("RPS", "rps", rps),
        Column("p50 ms", "p50_ms", ms),
        Column("p99 ms", "p99_ms", ms),
        Column("RPS vs baseline", "rps_vs_base", ratio),
        Column("Δ p50 ms", "vs_base_p50_ms", signed_ms),
        Column("Δ p99 ms", "vs_base_p99_ms", signed_ms),
        Column("server CPU", "server_cpu_share", share),
        Column("other CPU", "other_cpu", text),
    ],
    [Column("RPS", "rps", rps), Column("p50 ms", "p50_ms", ms), Column("p99 ms", "p99_ms", ms)],
)

TABLES: dict[str, Table] = {
    "grpc": Table(
        [
            Column("target", "target"),
            Column("in flight", "in_flight"),
            Column("h2load", "h2load"),
            Column("RPS", "rps", rps),
            Column("p50 ms", "p50_ms", ms),
            Column("p99 ms", "p99_ms", ms),
            Column("gateway/bare", "ratio_vs_bare", ratio),
            *THROUGHPUT_TAIL,
        ],
        [Column("RPS", "rps", rps), Column("p99 ms", "p99_ms", ms)],
    ),
    "rest": Table(
        [
            Column("server", "server"),
            Column("protocol", "protocol"),
            Column("target", "target"),
            Column("h2load", "h2load"),
            Column("RPS", "rps", rps),
            Column("p50 ms", "p50_ms", ms),
            Column("p99 ms", "p99_ms", ms),
            Column("gateway/FastAPI", "ratio_vs_fastapi", ratio),
            Column("gateway/raw", "ratio_vs_raw", ratio),
            *THROUGHPUT_TAIL,
        ],
        [Column("RPS", "rps", rps), Column("p99 ms", "p99_ms", ms)],
    ),
    "latency": Table(
        [
            Column("target", "target"),
            Column("transport", "transport"),
            Column("calls/s", "achieved_rps", rps),
            Column("p50 ms", "p50_ms", ms),
            Column("p99 ms", "p99_ms", ms),
            Column("p99.9 ms", "p999_ms", ms),
            Column("added p50 ms", "added_p50_ms", signed_ms),
            Column("added p99 ms", "added_p99_ms", signed_ms),
            Column("over bare p50 ms", "over_bare_p50_ms", signed_ms),
            Column("over bare p99 ms", "over_bare_p99_ms", signed_ms),
            Column("client dispatch p50/p99 ms", "dispatch", text),
            Column("client CPU", "client_cpu_share", share),
            Column("server CPU", "server_cpu_share", share),
            Column("other CPU", "other_cpu", text),
        ],
        [Column("p50 ms", "p50_ms", ms), Column("p99 ms", "p99_ms", ms)],
    ),
    "saturation": Table(
        [
            Column("target", "target"),
            Column("transport", "transport"),
            Column("measured by", "source"),
            Column("RPS", "rps", rps),
            Column("p50 ms", "p50_ms", ms),
            Column("p99 ms", "p99_ms", ms),
            Column("added p50 ms", "added_p50_ms", signed_ms),
            Column("added p99 ms", "added_p99_ms", signed_ms),
        ],
        [Column("p50 ms", "p50_ms", ms), Column("p99 ms", "p99_ms", ms)],
    ),
    "streams": Table(
        [
            Column("backend", "backend"),
            Column("target", "target"),
            Column("transport", "transport"),
            Column("publisher", "publisher"),
            Column("subscribers", "subscribers"),
            Column("messages", "messages", rps),
            Column("payload B", "payload_bytes", rps),
            Column("delivered", "delivered", rps),
            Column("lost", "lost", rps),
            Column("cut off", "subscribers_cut_off"),
            Column("seconds", "seconds", lambda v: _num(v, 2)),
            Column("deliveries/s", "deliveries_per_s", rps),
            Column("deliveries / client read", "deliveries_per_response", lambda v: _num(v, 1)),
            Column("vs baseline", "vs_baseline", lambda v: "—" if v is None else f"{v * 100:.1f}%"),
            Column("stalled subscriber", "stalled", text),
            Column("gateway RSS MB before → peak", "rss", text),
            Column("client CPU", "client_cpu_share", share),
            Column("gateway CPU", "server_cpu_share", share),
            Column("NATS CPU", "backend_cpu_share", share),
            Column("other CPU", "other_cpu", text),
        ],
        [Column("deliveries/s", "deliveries_per_s", rps)],
    ),
    "backends": Table(
        [
            Column("backend", "backend"),
            Column("target", "target"),
            Column("transport", "transport"),
            Column("calls/s", "achieved_rps", rps),
            Column("p50 ms", "p50_ms", ms),
            Column("p99 ms", "p99_ms", ms),
            Column("p99.9 ms", "p999_ms", ms),
            Column("added p50 ms", "added_p50_ms", signed_ms),
            Column("added p99 ms", "added_p99_ms", signed_ms),
            Column("client dispatch p50/p99 ms", "dispatch", text),
            Column("client CPU", "client_cpu_share", share),
            Column("gateway CPU", "server_cpu_share", share),
            Column("backend CPU", "backend_cpu_share", share),
            Column("other CPU", "other_cpu", text),
        ],
        [Column("p50 ms", "p50_ms", ms), Column("p99 ms", "p99_ms", ms)],
    ),
    "auth": VARIANTS,
    "tracing": VARIANTS,
    "writes": Table(
        [
            Column("backend", "backend"),
            Column("operation", "operation"),
            Column("calls", "calls"),
            Column("mean ms", "mean_ms", ms),
            Column("p50 ms", "p50_ms", ms),
            Column("p99 ms", "p99_ms", ms),
        ],
        [Column("mean ms", "mean_ms", ms), Column("p50 ms", "p50_ms", ms), Column("p99 ms", "p99_ms", ms)],
    ),
    "memory": Table(
        [
            Column("section", "section"),
            Column("server", "server"),
            Column("process", "role"),
            Column("load", "load"),
            Column("idle RSS MB", "idle_rss_mb", mb),
            Column("peak RSS MB (VmHWM)", "peak_rss_mb", mb),
        ],
        [Column("peak RSS MB", "peak_rss_mb", mb)],
    ),
}


def table(name: str, rows: list[Row], old: dict[str, Row] | None, old_label: str) -> str:
    return render(TABLES[name], rows, old, old_label)


def render(spec: Table, rows: list[Row], old: dict[str, Row] | None, old_label: str) -> str:
    headers = [c.header for c in spec.columns]
    if old is not None:
        for c in spec.compare:
            headers += [f"{c.header} ({old_label})", f"Δ {c.header}"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        row = dict(row)
        if "other_cpu_share" in row:  # say when a row had to be measured again
            tries = row.get("attempts", 1)
            row["other_cpu"] = share(row.get("other_cpu_share")) + (f" (best of {tries})" if tries > 1 else "")
        if "dispatch_p50_ms" in row:
            row["dispatch"] = f"{ms(row['dispatch_p50_ms'])} / {ms(row['dispatch_p99_ms'])}"
        cells = [c.fmt(row.get(c.key)) for c in spec.columns]
        if old is not None:
            before = old.get(row["id"], {})
            for c in spec.compare:
                cells += [c.fmt(before.get(c.key)), change(row.get(c.key), before.get(c.key))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- targets ---------------------------------------------------------------------------------


def targets(sections: dict[str, dict[str, Any]]) -> list[Row]:
    """Issue 3's goals, each with what this run measured and by how much it is missed."""
    out: list[Row] = []

    def rows(section: str) -> dict[str, Row]:
        return {r["id"]: r for r in sections.get(section, {}).get("rows", []) if "id" in r}

    grpc = rows("grpc")
    for server in ("hypercorn", "granian"):
        for shape in ("c4m16", "c1m64"):
            row = grpc.get(f"grpc/gateway-{server}/{shape}")
            if row and row.get("ratio_vs_bare") is not None:
                value = row["ratio_vs_bare"]
                out.append(_goal(f"gRPC Get ≥ 70% of bare echo RPS, 64 in flight ({server}, h2load {row['h2load']})",
                                 f"{value * 100:.0f}% ({rps(row['rps'])} RPS)", value >= 0.70,
                                 f"by {(0.70 - value) * 100:.0f} points"))
    rest = rows("rest")
    for server in REST_SERVERS:
        for proto in ("http1", "h2c", "h2c-1conn"):
            row = rest.get(f"rest/{server}/{proto}/gateway")
            if row and row.get("ratio_vs_fastapi") is not None:
                value = row["ratio_vs_fastapi"]
                out.append(_goal(f"REST Get ≥ bare FastAPI route ({server}, {row['protocol']})",
                                 f"{value:.2f}× ({rps(row['rps'])} RPS)", value >= 1.0,
                                 f"by {(1 - value) * 100:.0f}%"))
        row = rest.get(f"rest/{server}/h2c-1conn/gateway")
        if row:
            out.append(_goal(f"REST Get ≥ 10k RPS on one h2c connection ({server})", f"{rps(row['rps'])} RPS",
                             row["rps"] >= 10_000, f"by {rps(10_000 - row['rps'])} RPS"))
    for row in [*sections.get("latency", {}).get("rows", []), *sections.get("backends", {}).get("rows", [])]:
        if "added_p50_ms" not in row:
            continue
        on = f"{row['backend']}: " if row.get("backend") else ""
        for q, goal in (("p50", 0.5), ("p99", 2.0)):
            value = row[f"added_{q}_ms"]
            out.append(_goal(f"added {q} ≤ {goal} ms at {row['achieved_rps']:.0f}/s ({on}{row['target']}, {row['transport']})",
                             f"{value:+.3f} ms", value <= goal, f"by {value - goal:.3f} ms"))
    peaks: dict[str, float] = {}
    for row in sections.get("memory", {}).get("rows", []):
        if row["server"].startswith("gateway") and row["role"].startswith("worker") and row.get("peak_rss_mb"):
            peaks[row["server"]] = max(peaks.get(row["server"], 0.0), row["peak_rss_mb"])
    for server, peak in peaks.items():
        out.append(_goal(f"peak RSS ≤ 150 MB per worker under load ({server})", f"{peak:.1f} MB", peak <= 150,
                         f"by {peak - 150:.1f} MB"))
    return out


def _goal(goal: str, measured: str, met: bool, missed_by: str) -> Row:
    return {"goal": goal, "measured": measured, "met": met, "status": "met" if met else f"MISSED {missed_by}"}


# --- the document ----------------------------------------------------------------------------

# Document order (the run order differs: memory runs last, after sections 6-7).
SECTION_ORDER = [
    "grpc", "rest", "latency", "streams", "memory", "backends", "auth", "tracing", "writes", "grpc-paths", "queue",
    "reader", "transact",
]


def _renderer(name: str) -> Callable[[dict[str, Any], dict[str, Row] | None, str], list[str]] | None:
    """Sections that render their own tables (imported here, not at the top: they import this module)."""
    if name == "grpc-paths":
        from benchmarks import grpc_paths

        return grpc_paths.markdown
    if name == "queue":
        from benchmarks import queue

        return queue.markdown
    if name == "reader":
        from benchmarks import reader

        return reader.markdown
    if name == "transact":
        from benchmarks import transact

        return transact.markdown
    return None


def markdown(result: dict[str, Any], old: dict[str, Any] | None) -> str:
    meta = result["meta"]
    machine = meta["machine"]
    git = meta["git"]
    old_rows: dict[str, Row] | None = None
    old_label = ""
    if old is not None:
        old_label = old["meta"].get("label") or old["meta"]["git"]["short"]
        old_rows = {}
        for section in old.get("sections", {}).values():
            for row in [*section.get("rows", []), *section.get("saturation", []), *section.get("latency_rows", [])]:
                old_rows[row["id"]] = row
    title = "Prism benchmarks" + (f" — {meta['label']}" if meta.get("label") else "")
    out = [
        f"# {title}",
        "",
        f"- **date**: {meta['date']}",
        f"- **machine**: {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['memory_gb']} GB RAM, "
        f"Linux {machine['kernel']}; before starting, {meta['background_cpu_start'] * 100:.0f}% of a core was busy "
        f"with other work{_waited(meta)}; load average at start {meta['loadavg_start']}, at end {meta.get('loadavg_end', '—')}",
        f"- **software**: Python {machine['python']}, {machine['h2load']}, "
        + ", ".join(f"{k} {v}" for k, v in machine["packages"].items()),
        f"- **commit**: `{git['commit']}` ({git['branch']}"
        + (f", working tree modified: {git['modified']} files" if git["modified"] else ", clean working tree")
        + ")",
        f"- **command**: `{meta['command']}` (same as `{meta['make_command']}`)",
        f"- **mode**: {'quick (smoke test, short durations)' if meta['quick'] else 'full'}; "
        + ", ".join(f"{k}={v}" for k, v in meta["durations"].items()),
        f"- **label**: {meta.get('label') or '—'}"
        + (f"; compared with `{meta['compare']['file']}` (label {old_label})" if meta.get("compare") else ""),
        f"- **wall time**: {meta.get('wall_seconds', 0):.0f} s",
        "",
        "Ratios compare servers measured in this same run on this machine. The loader (h2load, or "
        "the Python clients of sections 3–4) shares the 2 cores with the server: *loader CPU* is its "
        "CPU time / wall time, *server CPU* the server process tree's, *other CPU* the rest of the "
        "machine's busy time in the same interval (other processes; 100% = one core). An h2load row "
        "disturbed by more than a quarter core of other work is measured again (up to 3 tries, within a "
        "time budget) and the least disturbed try is kept: *best of N*; latency rows likewise.",
        "",
    ]
    goals = result.get("targets", [])
    if goals:
        out += ["## Targets (issue 3; its added-latency goals also applied to section 6's Redis/Postgres rows)", "",
                "| goal | measured | status |", "|---|---|---|"]
        out += [f"| {g['goal']} | {g['measured']} | {g['status']} |" for g in goals]
        out.append("")
    notes = _notes(result["sections"])
    for number, name in enumerate(SECTION_ORDER, 1):
        section = result["sections"].get(name)
        if section is None:
            continue
        out += [f"## {number}. {section.get('title', name)}", ""]
        if "error" in section:
            out += [f"**Section failed**: `{section['error']}`", ""]
            continue
        if (own := _renderer(name)) is not None:
            out += [*own(section, old_rows, old_label), ""]
            continue
        if name in ("latency", "backends"):
            out += [f"### Open loop at {meta['durations']['rate']:g} calls/s", ""]
        out += [table(name, section["rows"], old_rows, old_label), ""]
        if name == "latency" and section.get("saturation"):
            out += ["### At saturation (64 in flight)", "", table("saturation", section["saturation"], old_rows, old_label), ""]
        out += [f"- {n}" for n in notes.get(name, []) if n]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _waited(meta: dict[str, Any]) -> str:
    waited = meta.get("waited_for_quiet_s") or 0
    return f" (after waiting {waited:.0f} s for a quieter machine)" if waited >= 2 else ""


STREAMS_GOAL = 0.50  # issue 12: the gateway on NATS at ≥ 50% of nats-py's deliveries/s, per transport


def _streams_notes(section: dict[str, Any]) -> list[str]:
    """Issue 12's targets, what each baseline is, and the stalled subscribers' story."""
    rows = section.get("rows", [])
    if not rows:
        return []
    notes: list[str] = []
    for row in rows:
        if row.get("ratio_vs_direct") is not None:
            value = row["ratio_vs_direct"]
            status = "met" if value >= STREAMS_GOAL else f"MISSED by {(STREAMS_GOAL - value) * 100:.0f} points"
            headed = row.get("ratio_vs_direct_headers")
            also = "" if headed is None else f"; {headed * 100:.1f}% of nats-py publishing the adapter's headers"
            notes.append(f"**Target (issue 12)**: NATS fan-out over {row['transport']} ≥ {STREAMS_GOAL:.0%} of nats-py "
                         f"directly: {value * 100:.1f}% ({rps(row['deliveries_per_s'])} deliveries/s{also}): {status}.")
    for row in rows:
        stall = row.get("stall")
        if stall:
            grew = (row.get("rss_peak_second_half_mb") or 0) - (row.get("rss_peak_first_half_mb") or 0)
            notes.append(
                f"**Stalled subscriber, {row['transport']}**: subscriber {stall['subscriber']} stopped reading while "
                f"{row['messages']:,} messages of {row['payload_bytes']:,} B went out; the other "
                f"{row['subscribers'] - 1} received {row['delivered']:,} of {row['expected']:,} "
                f"({row['subscribers_cut_off']} cut off). Reading again, it got {stall['delivered']:,} (what the "
                f"transport held for it) and then: {stall['ended']}. "
                f"Gateway RSS: {row.get('rss_before_mb')} MB before, "
                f"peak {row.get('rss_peak_mb')} MB (first half of the row {row.get('rss_peak_first_half_mb')}, second "
                f"half {row.get('rss_peak_second_half_mb')}: {grew:+.1f} MB), {row.get('rss_after_mb')} MB at the end; "
                "peak per tenth of the row: " + ", ".join(f"{v:.0f}" for v in row.get("rss_by_tenth_mb", [])) + " MB."
            )
    notes += [
        "Subscribers (and the gRPC publisher) run in one client process; every subscription delivered its "
        "first (live) message before publishing started. *window N*: the publisher stays at most N messages "
        "ahead of the slowest subscriber (the gateway's per-stream buffer is 1024); *unpaced*: it publishes "
        "flat out and slow subscribers may be cut off (RESOURCE_EXHAUSTED), counted as lost. *vs baseline*: "
        "in-process rows against MemoryPubSub used directly, NATS rows against nats-py directly (plain publishes). "
        "*deliveries / client read*: deliveries per gRPC response, or per socket read of the SSE clients.",
        "NATS gateway rows: *SubscribeBatches lingerMs N* subscribe in batches (a waiting message waits up to N ms "
        "for others, at most 100 a response) while the publisher writes every message into one PublishStream "
        "call without awaiting an answer per message, as `nc.publish` buffers: the target rows. *Subscribe* "
        "rows get one message a response and the publisher awaits each unary Publish: for reference.",
        "NATS rows: one gateway on Granian (one worker) with PUBSUB config `events-nats` on the local NATS server "
        f"(subject prefix `{section.get('nats_prefix')}`, namespace `{section.get('namespace')}`). *nats-py directly*: "
        "a client process with one connection, 100 core subscriptions (a counting callback each) on "
        f"`{section.get('direct_subject')}` and the publisher awaiting `nc.publish` on the same connection, same "
        "message count, payload and window as the gateway rows (NATS sends each message 100 times; the "
        "gateway's adapter shares one NATS subscription among its 100 and gets it once); plain publishes (no "
        "headers) — the row *with the adapter's headers* publishes the message id and time the gateway adds, "
        "for reference. *NATS CPU* is the nats-server process's CPU, counted apart from *other CPU*.",
        "Stall rows: subscriber 0 stops reading once live (gRPC: a channel of its own without BDP probing, 64 KiB "
        "HTTP/2 window; SSE: a 16 KiB socket receive buffer) and reads again once the others have everything; "
        "the publisher paces on the other 99; 4 KiB payloads so the kernel's socket buffers hold a few hundred "
        "messages, not thousands. Gateway RSS sampled every 50 ms during the row (the serving process).",
        f"NATS streams removed afterwards: {section.get('removed_after')} (left over beforehand: "
        f"{section.get('leftover_before')}); core NATS stores no message.",
    ]
    for row in rows:
        if row.get("errors"):
            notes.append(f"{row['target']} {row['transport']} ({row.get('publisher')}): " + "; ".join(row["errors"]))
    return notes


def _notes(sections: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    notes: dict[str, list[str]] = {}
    if payload := sections.get("grpc", {}).get("payload"):
        notes["grpc"] = [
            f"Both answer {payload['response_bytes']} message bytes (the gateway's GetResponse: 9-byte key, "
            f"100-byte value, etag); the gateway is sent a {payload['request_bytes_gateway']}-byte GetRequest, the echo "
            f"those {payload['request_bytes_echo']} bytes. h2load -t1, pre-framed body, headers content-type: "
            "application/grpc, te: trailers, x-prism-session. Every run checked: all responses 2xx, each with the "
            "full message bytes, and a real gRPC call (grpc-status 0) before and after.",
            "p50/p99 are computed from h2load's per-request log (--log-file).",
        ]
    if payload := sections.get("rest", {}).get("payload"):
        notes["rest"] = [
            f"All three answer the same {payload['response_bytes']}-byte JSON; servers run as `prism serve` runs them "
            "(one worker, uvloop; Hypercorn with keep_alive_max_requests raised). HTTP/1.1 is 64 connections "
            "(no pipelining), h2c 4 connections × 16 streams, and one connection × 64 streams.",
        ]
    if sections.get("latency", {}).get("rows"):
        notes["latency"] = [
            "*added* = gateway − aiosqlite read directly (same table, pragmas and SELECT, in the client process); "
            "*over bare* = gateway − the bare server on the same transport with the same client. "
            "Latency counts from each call's scheduled start (open loop: a stall shows as latency, not as a lower rate).",
            "*client dispatch* is how late the client's event loop started calls after their scheduled time: the "
            "client's own share of every latency, the same for all targets. gRPC rows use grpc.aio; REST rows a raw "
            "HTTP/1.1 keep-alive client.",
        ]
    if section := sections.get("streams"):
        notes["streams"] = _streams_notes(section)
    if section := sections.get("backends"):
        if section.get("rows"):
            notes["backends"] = [
                "*added* = gateway − the backend's own Python client reading the same record directly (redis.asyncio "
                "HMGET of the record hash as adapters/keyvalue/redis.py reads it; asyncpg SELECT with the adapter's "
                "statement and a pool like its own), from a client process of its own, same open-loop client. "
                "Local Redis and Postgres servers; one gateway on Granian (one worker) serving both configs "
                f"(kv-redis, kv-postgres) in the bench-only namespace `{section.get('namespace')}`.",
                f"Namespace removed afterwards: {section.get('removed_after')} (left over from an earlier run "
                f"beforehand: {section.get('leftover_before')}).",
            ]
    if section := sections.get("auth"):
        if section.get("rows"):
            notes["auth"] = [
                "Two gateways from the same configuration, both Granian with one worker, SQLite `kv` config in "
                f"namespace `{section.get('namespace')}`: *dev* (no auth) and *auth* (API key — the session created with "
                "x-api-key, the auth gateway refusing one without it — a policy granting KEY_VALUE.* in the namespace, "
                "a namespace rate limit of 10,000,000/s so the bucket is checked but never refuses, audit to a file). "
                "RPS vs baseline and Δ p50/p99 (auth − dev) are the cost of authentication per request.",
                f"Audit lines written during the load: {section.get('audit_lines_during_load', '—'):,}." if isinstance(
                    section.get("audit_lines_during_load"), int) else "",
            ]
    if sections.get("tracing", {}).get("rows"):
        notes["tracing"] = [
            "Two gateways from the same configuration, both Granian with one worker, SQLite `kv` config: *off* (the "
            "default, no span taken) and *on* (every call sampled: a server span and two step spans per call, through "
            "the batching processor to an exporter that drops them). RPS vs baseline and Δ p50/p99 (on − off) are "
            "the cost of tracing per request.",
        ]
    if sections.get("memory", {}).get("rows"):
        notes["memory"] = [
            "idle = VmRSS once started and set up; peak = VmHWM read just before the process was stopped (covers all "
            "the load its section applied). Granian runs a main process and a worker process; Hypercorn with one "
            "worker serves in its main process.",
        ]
    return notes
