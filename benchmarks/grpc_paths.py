"""Section 9 — native gRPC paths (issue 10): the gateway's KeyValue Get over native gRPC through
the ASGI app on the HTTP port (app/transports/grpc_asgi.py, on pyvoy and on Hypercorn, the
servers that offer HTTP/2 trailers) against its embedded grpc.aio port, and each against a bare
server on the same stack, in one run:

    bare grpc.aio echo             baselines/grpc_echo.py (answers the request bytes)
    gateway, grpc.aio port         on the pyvoy gateway and on the Hypercorn gateway
    raw ASGI gRPC answer           baselines/raw_grpc_asgi.py on pyvoy / Hypercorn (fixed answer, trailers)
    gateway, ASGI path             the HTTP port of the same two gateways

Every target answers the gateway's own GetResponse bytes. Per target: h2load on one h2c
connection × 64 streams (pre-framed body, content-type application/grpc, te: trailers,
x-prism-session), then 500 calls/s open loop (benchmarks/openloop.py, grpc.aio client). Peak
RSS is per target: the kernel's high-water mark is reset (``/proc/<pid>/clear_refs``) before the
target's load and read after it.

A gRPC error is HTTP 200, which is all h2load sees. So each target also answers a grpcio call
(status OK, expected bytes) and 2,000 calls from benchmarks/grpc_check.py (h2load's exact request
on one connection × 64 streams, every trailer read: ``grpc-status 0`` counted) before and after
its h2load run; h2load's own run must carry exactly one full message per response (an error has
no DATA); the open-loop client counts every non-OK call. Any failure stops the section.

    python -m benchmarks.grpc_paths [--quick] [--label grpc-paths] [--wait-quiet 60]
    python -m benchmarks.run --only grpc-paths            (the same as a section of the full run)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Any

from benchmarks import grpc_check, kv, procs, report
from benchmarks.context import DISTURBED, Context, Durations
from benchmarks.loader import H2LOAD, Shape
from benchmarks.procs import Server, memory_kb
from benchmarks.report import Column, Row, Table, ms, rps, share, signed_ms, text

TITLE = "Native gRPC paths: gateway through the ASGI app (pyvoy, Hypercorn) vs its grpc.aio port vs bare servers"
SHAPE = Shape(1, 64)  # one connection, as a gRPC channel is, 64 streams
CHECK_CALLS = 2000
SECTION = "grpc-paths"
RAW_APP = "benchmarks.baselines.raw_grpc_asgi:app"

# Issue 10's targets.
RATIO_GOAL = 2.0  # the ASGI path's RPS over the bare grpc.aio echo's
RPS_GOAL = 10_000  # the ASGI path, one connection × 64 streams
ADDED_GOALS = {"p50": 0.25, "p99": 1.0}  # ms over the bare server on the same stack, 500 calls/s


@dataclass
class Target:
    key: str
    name: str
    path: str  # "ASGI path", "grpc.aio port", or "bare"
    stack: str  # "pyvoy", "hypercorn", "grpc.aio": what the bare server of the same stack is
    server: Server
    port: int
    request: bytes  # the message sent (h2load, grpcio, open loop)
    response: bytes  # the message every target answers
    token: str
    body: pathlib.Path  # h2load's pre-framed request
    payload: pathlib.Path  # the open-loop client's request message


# --- memory: per target, and per process for section 5 -----------------------------------------


def _names(server: Server) -> dict[int, str]:
    out = {}
    for pid in server.pids():
        try:
            out[pid] = pathlib.Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            pass
    return out


def _reset_peaks(server: Server, seen: dict[int, int]) -> None:
    """Keep each process's high-water mark so far (for section 5), then reset it to its current RSS."""
    for pid in server.pids():
        seen[pid] = max(seen.get(pid, 0), memory_kb(pid).get("VmHWM") or 0)
        try:
            pathlib.Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            pass


def _peaks(server: Server, seen: dict[int, int]) -> dict[str, Any]:
    """Peak RSS since the last reset: the serving process (the largest) and the whole tree."""
    names = _names(server)
    peaks = {pid: memory_kb(pid).get("VmHWM") or 0 for pid in names}
    for pid, kb in peaks.items():
        seen[pid] = max(seen.get(pid, 0), kb)
    top = max(peaks, key=peaks.__getitem__)
    return {
        "peak_rss_mb": round(peaks[top] / 1024, 1),
        "peak_rss_process": names[top],
        "peak_rss_tree_mb": round(sum(peaks.values()) / 1024, 1),
        "processes": {f"{names[pid]}[{pid}]": round(kb / 1024, 1) for pid, kb in peaks.items()},
    }


# --- checks --------------------------------------------------------------------------------------


def _check(t: Target) -> dict[str, Any]:
    """A grpcio call and CHECK_CALLS trailer-checked calls: every one must be grpc-status 0."""
    kv.check_grpc(f"127.0.0.1:{t.port}", t.request, t.token, t.response)
    counted = grpc_check.check(t.port, kv.GET_PATH, kv.grpc_frame(t.request), [(kv.SESSION_HEADER, t.token)],
                               t.response, calls=CHECK_CALLS, streams=SHAPE.streams)
    if counted["not_ok"]:
        raise RuntimeError(f"{t.name}: {counted['ok']} of {counted['calls']} calls OK, others {counted['not_ok']}")
    return counted


# --- the section -----------------------------------------------------------------------------


def run(ctx: Context) -> dict[str, Any]:
    d = ctx.durations
    load = f"h2load gRPC {SHAPE.label}, then {d.rate:g} calls/s open loop"
    work = ctx.subdir(SECTION)
    servers: list[Server] = []
    seen: dict[int, int] = {}  # pid → highest VmHWM, across the per-target resets
    idle: dict[int, int] = {}
    try:
        echo = procs.grpc_echo(ctx.workdir)
        servers.append(echo)
        gateways, prepared = {}, {}
        for stack in ("pyvoy", "hypercorn"):
            gateways[stack] = procs.gateway(ctx.workdir, stack)
            servers.append(gateways[stack])
            prepared[stack] = kv.prepare(f"127.0.0.1:{gateways[stack].grpc_port}", gateways[stack].http_port)
        sizes = {len(p.response) for p in prepared.values()}
        if len(sizes) != 1:
            raise RuntimeError(f"the gateways answer different sizes: {sizes}")
        raws, files = {}, {}
        for stack in ("pyvoy", "hypercorn"):
            p = prepared[stack]
            files[stack] = {
                "request": work / f"{stack}-request.grpc",  # h2load's body: the gateway's GetRequest, framed
                "answer": work / f"{stack}-answer.grpc",  # the raw ASGI app's answer: the gateway's, framed
                "message": work / f"{stack}-request.bin",
            }
            files[stack]["request"].write_bytes(kv.grpc_frame(p.request))
            files[stack]["answer"].write_bytes(kv.grpc_frame(p.response))
            files[stack]["message"].write_bytes(p.request)
            raws[stack] = procs.asgi_baseline(ctx.workdir, RAW_APP, stack, files[stack]["answer"])
            servers.append(raws[stack])
        first = prepared["pyvoy"]
        (work / "echo-request.grpc").write_bytes(kv.grpc_frame(first.response))  # the echo answers what it gets
        (work / "echo-request.bin").write_bytes(first.response)
        (work / "value.bin").write_bytes(kv.VALUE)
        for server in servers:
            for pid in server.pids():
                idle[pid] = memory_kb(pid).get("VmRSS") or 0

        def gw(stack: str, path: str) -> Target:
            g, p, f = gateways[stack], prepared[stack], files[stack]
            port = g.http_port if path == "ASGI path" else g.grpc_port
            key = f"gateway-{'asgi' if path == 'ASGI path' else 'grpc-port'}-{stack}"
            return Target(key, f"gateway, {path} ({stack})", path, stack if path == "ASGI path" else "grpc.aio", g,
                          port, p.request, p.response, p.token, f["request"], f["message"])  # type: ignore[arg-type]

        def raw(stack: str) -> Target:
            p, f = prepared[stack], files[stack]
            return Target(f"raw-{stack}", f"raw ASGI gRPC answer ({stack})", "bare", stack, raws[stack],
                          raws[stack].http_port, p.request, p.response, p.token, f["request"], f["message"])  # type: ignore[arg-type]

        targets = [
            Target("bare-grpc-aio", "bare grpc.aio echo", "bare", "grpc.aio", echo, echo.grpc_port,  # type: ignore[arg-type]
                   first.response, first.response, first.token, work / "echo-request.grpc", work / "echo-request.bin"),
            gw("pyvoy", "grpc.aio port"),
            gw("hypercorn", "grpc.aio port"),
            raw("pyvoy"),
            gw("pyvoy", "ASGI path"),
            raw("hypercorn"),
            gw("hypercorn", "ASGI path"),
        ]
        for t in targets:
            _check(t)

        rows, latency_rows = [], []
        direct = ctx.least_disturbed(lambda: ctx.client(
            "benchmarks.openloop", "--kind", "sqlite", "--db", str(work / "direct.db"),
            "--payload-file", str(work / "value.bin"), *_rate(d)))
        latency_rows.append({"id": f"{SECTION}/latency/direct", "target": "aiosqlite directly (client process)",
                             "path": "—", **direct})
        for t in targets:
            print(f"benchmarks: {SECTION}: {t.name} …", file=sys.stderr, flush=True)
            _reset_peaks(t.server, seen)
            before = _check(t)
            result = ctx.h2load(
                f"http://127.0.0.1:{t.port}{kv.GET_PATH}", SHAPE, server=t.server, body=t.body,
                headers=["content-type: application/grpc", "te: trailers", f"{kv.SESSION_HEADER}: {t.token}"],
                expect_body_bytes=5 + len(t.response),
            )
            after = _check(t)
            rows.append({"id": f"{SECTION}/{t.key}", "target": t.name, "path": t.path, "stack": t.stack,
                         "h2load": SHAPE.label, **result,
                         "grpc_checked": f"{before['ok'] + after['ok']:,}/{before['calls'] + after['calls']:,}"})
            open_loop = ctx.least_disturbed(lambda t=t: ctx.client(
                "benchmarks.openloop", "--kind", "grpc", "--port", str(t.port), "--path", kv.GET_PATH,
                "--payload-file", str(t.payload), f"--token={t.token}", "--expect-bytes", str(len(t.response)),
                *_rate(d), server=t.server))
            if open_loop["errors"]:
                raise RuntimeError(f"{t.name}: {open_loop['errors']} failed calls, first: {open_loop['first_error']}")
            latency_rows.append({"id": f"{SECTION}/latency/{t.key}", "target": t.name, "path": t.path,
                                 "stack": t.stack, **open_loop})
            rows[-1].update(_peaks(t.server, seen))
            _check(t)  # still right after the open loop
    finally:
        for server in servers:
            names, roles = _names(server), server.roles()
            for pid in names:
                seen[pid] = max(seen.get(pid, 0), memory_kb(pid).get("VmHWM") or 0)
            server.stop()
            for pid, name in names.items():
                ctx.memory.append({"section": SECTION, "server": server.name, "role": f"{roles.get(pid, '?')} ({name})",
                                   "load": load, "pid": pid, "idle_rss_kb": idle.get(pid), "peak_rss_kb": seen.get(pid)})
    _compare(rows, latency_rows)
    return {"title": TITLE, "rows": rows, "latency_rows": latency_rows, "targets": _targets(rows, latency_rows),
            "payload": {"request_bytes_gateway": len(first.request), "response_bytes": len(first.response)},
            "check_calls": CHECK_CALLS}


def _rate(d: Durations) -> list[str]:
    return ["--rate", str(d.rate), "--duration", str(d.latency), "--warmup", str(max(d.warmup, 0.5))]


def _bare_key(row: Row) -> str:
    return "bare-grpc-aio" if row["stack"] == "grpc.aio" else f"raw-{row['stack']}"


def _compare(rows: list[Row], latency_rows: list[Row]) -> None:
    by_key = {r["id"].rsplit("/", 1)[1]: r for r in rows}
    echo = by_key["bare-grpc-aio"]
    for row in rows:
        if row["id"].endswith("bare-grpc-aio"):
            continue
        row["ratio_vs_echo"] = round(row["rps"] / echo["rps"], 3)
        if row["path"] != "bare":
            row["ratio_vs_same_stack"] = round(row["rps"] / by_key[_bare_key(row)]["rps"], 3)
    lat = {r["id"].rsplit("/", 1)[1]: r for r in latency_rows}
    for row in latency_rows:
        if row.get("path") not in ("ASGI path", "grpc.aio port"):
            continue
        bare = lat[_bare_key(row)]
        for q in ("p50", "p99"):
            row[f"over_bare_{q}_ms"] = round(row[f"{q}_ms"] - bare[f"{q}_ms"], 3)
            row[f"over_echo_{q}_ms"] = round(row[f"{q}_ms"] - lat["bare-grpc-aio"][f"{q}_ms"], 3)
            row[f"added_{q}_ms"] = round(row[f"{q}_ms"] - lat["direct"][f"{q}_ms"], 3)


def _targets(rows: list[Row], latency_rows: list[Row]) -> list[Row]:
    out = []
    for row in rows:
        if row["path"] != "ASGI path":
            continue
        value = row["ratio_vs_echo"]
        out.append(report._goal(f"ASGI path ≥ {RATIO_GOAL:g}× the bare grpc.aio echo's RPS ({row['stack']}, {SHAPE.label})",
                                f"{value:.2f}× ({rps(row['rps'])} RPS)", value >= RATIO_GOAL,
                                f"by {RATIO_GOAL - value:.2f}×"))
        out.append(report._goal(f"ASGI path ≥ {RPS_GOAL:,} RPS on one connection × 64 streams ({row['stack']})",
                                f"{rps(row['rps'])} RPS", row["rps"] >= RPS_GOAL, f"by {rps(RPS_GOAL - row['rps'])} RPS"))
    for row in latency_rows:
        if "over_bare_p50_ms" not in row:
            continue
        bare = "bare grpc.aio echo" if row["stack"] == "grpc.aio" else f"raw ASGI gRPC answer on {row['stack']}"
        for q, goal in ADDED_GOALS.items():
            value = row[f"over_bare_{q}_ms"]
            out.append(report._goal(f"added {q} ≤ {goal} ms at {row['achieved_rps']:.0f}/s over gRPC ({row['target']} − {bare})",
                                    f"{value:+.3f} ms", value <= goal, f"by {value - goal:.3f} ms"))
    return out


# --- markdown ------------------------------------------------------------------------------------

THROUGHPUT = Table(
    [
        Column("target", "target"),
        Column("h2load", "h2load"),
        Column("RPS", "rps", rps),
        Column("p50 ms", "p50_ms", ms),
        Column("p99 ms", "p99_ms", ms),
        Column("vs bare grpc.aio echo", "ratio_vs_echo", report.ratio),
        Column("vs bare, same stack", "ratio_vs_same_stack", report.ratio),
        Column("grpc-status 0 (checked)", "grpc_checked"),
        Column("peak RSS MB", "peak_rss", text),
        Column("loader CPU", "loader_cpu_share", share),
        Column("server CPU", "server_cpu_share", share),
        Column("other CPU", "other_cpu", text),
    ],
    [Column("RPS", "rps", rps), Column("p99 ms", "p99_ms", ms)],
)
LATENCY = Table(
    [
        Column("target", "target"),
        Column("calls/s", "achieved_rps", rps),
        Column("p50 ms", "p50_ms", ms),
        Column("p99 ms", "p99_ms", ms),
        Column("p99.9 ms", "p999_ms", ms),
        Column("over bare, same stack p50 / p99 ms", "over_bare", text),
        Column("over grpc.aio echo p50 / p99 ms", "over_echo", text),
        Column("over aiosqlite p50 / p99 ms", "added", text),
        Column("client CPU", "client_cpu_share", share),
        Column("server CPU", "server_cpu_share", share),
        Column("other CPU", "other_cpu", text),
    ],
    [Column("p50 ms", "p50_ms", ms), Column("p99 ms", "p99_ms", ms)],
)


def _pair(row: Row, name: str) -> str | None:
    if f"{name}_p50_ms" not in row:
        return None
    return f"{signed_ms(row[f'{name}_p50_ms'])} / {signed_ms(row[f'{name}_p99_ms'])}"


def markdown(section: dict[str, Any], old: dict[str, Row] | None, old_label: str) -> list[str]:
    rows = [{**r, "peak_rss": f"{r['peak_rss_mb']:.1f} ({r['peak_rss_process']})"} for r in section["rows"]]
    latency = [{**r, **{k: _pair(r, k) for k in ("over_bare", "over_echo", "added")}} for r in section["latency_rows"]]
    rate = next((r["mode"] for r in section["latency_rows"] if "mode" in r), "open loop")
    out = ["### Targets (issue 10)", "", "| goal | measured | status |", "|---|---|---|"]
    out += [f"| {g['goal']} | {g['measured']} | {g['status']} |" for g in section["targets"]]
    out += ["", "### Throughput: h2load, one h2c connection × 64 streams", "",
            report.render(THROUGHPUT, rows, old, old_label), "",
            f"### Latency: {rate}, grpc.aio client", "", report.render(LATENCY, latency, old, old_label), ""]
    payload = section["payload"]
    disturbed = [r for r in [*section["rows"], *section["latency_rows"]] if r.get("other_cpu_share", 0) > DISTURBED]
    if disturbed:
        out.append(f"- **Disturbed**: {len(disturbed)} of {len(section['rows']) + len(section['latency_rows'])} rows "
                   f"ran beside more than {DISTURBED:g} of a core of other work (*other CPU*; the JSON names the "
                   "processes, `busiest_others`): their absolute figures, p99 above all, are not for quoting.")
    out += [
        f"- Every target answers the gateway's {payload['response_bytes']}-byte GetResponse; the gateways and raw "
        f"ASGI apps are sent its {payload['request_bytes_gateway']}-byte GetRequest, the grpc.aio echo the response "
        "bytes it echoes. Servers as `prism serve --server pyvoy|hypercorn` runs them (one worker, uvloop); the "
        "grpc.aio port rows are the embedded grpc.aio server of the same two gateway processes.",
        f"- Checked, so no fast error is timed: before and after each h2load run, {section['check_calls']:,} calls on "
        "one connection × 64 streams with h2load's exact request, every trailer read (*grpc-status 0 (checked)*: "
        "all of them answered OK with the expected message), and a grpcio call; h2load's run itself had no failed "
        "stream and one full message per response (a gRPC error carries no DATA); the open-loop client counted "
        "no failed call.",
        "- *peak RSS*: VmHWM of the serving process (Envoy, which embeds Python, for pyvoy), reset before the "
        "target's load and read after its h2load and open-loop runs (the grpc.aio port and ASGI rows of a gateway "
        "are the same process, measured one after the other). Per process in the JSON (`processes`).",
        "- *over bare, same stack*: gateway − the bare server on the same stack with the same client (the raw "
        "ASGI gRPC answer on the same server for the ASGI path, the bare grpc.aio echo for the grpc.aio port); "
        "*over aiosqlite*: gateway − the same read through aiosqlite directly (section 3's *added*).",
    ]
    return out


# --- standalone --------------------------------------------------------------------------------


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.grpc_paths", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short durations: a smoke test, not numbers to quote")
    parser.add_argument("--duration", type=float, default=10, help="seconds of each timed h2load run (default 10)")
    parser.add_argument("--latency", type=float, default=10, help="seconds of each open-loop run (default 10)")
    parser.add_argument("--warmup", type=float, default=2, help="seconds of load before each timed run (default 2)")
    parser.add_argument("--label", default=SECTION, help=f"recorded in the results and the file name (default {SECTION})")
    parser.add_argument("--compare", type=pathlib.Path, metavar="OLD.json", help="add columns from an earlier run")
    parser.add_argument("--out", type=pathlib.Path, default=procs.ROOT / "benchmarks" / "results")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                        help="first wait up to this long for other work on the machine to drop below a quarter core")
    parser.add_argument("--keep-workdir", action="store_true", help="keep server logs and scratch files")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from benchmarks import run as harness  # the full run's metadata and file naming

    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    if not shutil.which(H2LOAD):
        print("benchmarks: h2load not found (Debian package nghttp2-client)", file=sys.stderr)
        return 2
    waited = harness._wait_quiet(args.wait_quiet)
    durations = Durations.quick() if args.quick else replace(
        Durations.full(), warmup=args.warmup, throughput=args.duration, latency=args.latency)
    args.sections = [SECTION]
    result: dict[str, Any] = {"meta": harness.meta(args, argv, durations), "sections": {}, "targets": []}
    command = " ".join(["python -m benchmarks.grpc_paths", *argv])
    result["meta"].update(command=command, make_command=f"python -m benchmarks.run --only {SECTION}", waited_for_quiet_s=waited)
    old = json.loads(args.compare.read_text()) if args.compare else None
    if old is not None:
        result["meta"]["compare"] = {"file": str(args.compare), "label": old["meta"].get("label"),
                                     "commit": old["meta"]["git"]["commit"], "date": old["meta"]["date"]}
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="prism-bench-grpc-paths-"))
    ctx = Context(workdir, durations)
    started = time.perf_counter()
    try:
        result["sections"][SECTION] = run(ctx)
    finally:
        if args.keep_workdir:
            print(f"benchmarks: scratch files kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    result["sections"][SECTION]["seconds"] = round(time.perf_counter() - started, 1)
    result["sections"][SECTION]["memory"] = ctx.memory
    meta = result["meta"]
    meta["wall_seconds"] = round(time.perf_counter() - started, 1)
    meta["loadavg_end"] = harness._loadavg()
    text_out = report.markdown(result, old)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{meta['date'][:10]}-{meta['git']['short']}-{args.label}" + ("-quick" if args.quick else "")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (args.out / f"{stem}.md").write_text(text_out)
    print(text_out)
    print(f"benchmarks: wrote {args.out / stem}.md/.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
