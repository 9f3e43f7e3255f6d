"""h2load as the loader: one run, its RPS, latency percentiles from the per-request log, and
who used the 2 cores meanwhile (the loader, the server, anything else on the machine).

h2load prints mean/sd/max of the request time, not percentiles, so every run writes
``--log-file`` (start µs, HTTP status, duration µs per request, main phase only) and p50/p99
come from that. h2load counts HTTP statuses only: gRPC callers check grpc-status with a real
client before timing, and every run checks that each response carried the expected number of
body bytes (a gRPC error is a trailers-only response with no DATA at all).
"""

from __future__ import annotations

import math
import os
import pathlib
import re
import shutil
import subprocess
import time
from dataclasses import dataclass

from benchmarks.procs import Server, all_cpu_seconds, machine_jiffies, steal_jiffies

H2LOAD = shutil.which("h2load") or "/usr/bin/h2load"


def h2load_version() -> str:
    try:
        return subprocess.run([H2LOAD, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "missing"


def percentile(ordered: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def latency_summary(seconds: list[float]) -> dict[str, float | None]:
    """p50/p90/p99/p99.9/max in milliseconds."""
    ordered = sorted(seconds)
    out: dict[str, float | None] = {}
    for name, q in (("p50_ms", 50), ("p90_ms", 90), ("p99_ms", 99), ("p999_ms", 99.9)):
        value = percentile(ordered, q)
        out[name] = None if value is None else round(value * 1000, 3)
    out["max_ms"] = round(ordered[-1] * 1000, 3) if ordered else None
    return out


@dataclass(frozen=True)
class Shape:
    """Concurrency as h2load makes it: ``clients`` connections x ``streams`` in flight each."""

    clients: int
    streams: int

    @property
    def in_flight(self) -> int:
        return self.clients * self.streams

    @property
    def label(self) -> str:
        return f"-c{self.clients} -m{self.streams}"

    @property
    def key(self) -> str:
        return f"c{self.clients}m{self.streams}"


_NUM = r"([\d.]+)"


def _parse(stdout: str) -> dict[str, float]:
    out: dict[str, float] = {}
    if m := re.search(rf"finished in {_NUM}(ms|s), {_NUM} req/s", stdout):
        out["duration_s"] = float(m[1]) / (1000 if m[2] == "ms" else 1)
        out["h2load_rps"] = float(m[3])
    if m := re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout",
        stdout,
    ):
        for i, name in enumerate(("total", "started", "done", "succeeded", "failed", "errored", "timeout"), 1):
            out[name] = int(m[i])
    if m := re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", stdout):
        out["status_2xx"] = int(m[1])
        out["status_non_2xx"] = int(m[2]) + int(m[3]) + int(m[4])
    if m := re.search(r"\((\d+)\) data", stdout):
        out["data_bytes"] = int(m[1])
    return out


def _read_log(path: pathlib.Path) -> tuple[list[float], list[float], int]:
    """Durations in seconds of 2xx responses and of responses with no status read (0), and
    the count of all the others (failed streams are -1)."""
    ok, unread, others = [], [], 0
    with path.open() as log:
        for line in log:
            parts = line.split("\t")
            if len(parts) < 3:
                continue
            if parts[1].startswith("2"):
                ok.append(int(parts[2]) / 1e6)
            elif parts[1] == "0":
                unread.append(int(parts[2]) / 1e6)
            else:
                others += 1
    return ok, unread, others


def _busiest_others(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], exclude: set[int], wall: float
) -> list[str]:
    """Processes outside this run that used over 5% of a core meanwhile, busiest first (a
    process that started and ended within the run is not seen, only its share of other CPU)."""
    used = []
    for pid, (name, seconds) in after.items():
        if pid in exclude:
            continue
        share = (seconds - before.get(pid, (name, 0.0))[1]) / wall
        if share > 0.05:
            used.append((share, f"{name}[{pid}] {share * 100:.0f}%"))
    return [text for _, text in sorted(used, reverse=True)[:3]]


def run(
    url: str,
    shape: Shape,
    *,
    duration: float,
    warmup: float,
    server: Server,
    workdir: pathlib.Path,
    h1: bool = False,
    body: pathlib.Path | None = None,
    headers: list[str] = (),  # type: ignore[assignment]
    expect_body_bytes: int | None = None,
) -> dict[str, object]:
    """One timed h2load run after a separate warm-up run; raises if any response was wrong."""
    base = [H2LOAD, "-t1", f"-c{shape.clients}", f"-m{shape.streams}"]
    if h1:
        base.append("--h1")
    if body is not None:
        base += ["-d", str(body)]
    for header in headers:
        base += ["-H", header]
    if warmup > 0:
        # A run of its own: h2load's byte counters would mix a --warm-up-time phase in.
        subprocess.run([*base, "-D", f"{int(warmup * 1000)}ms", url], capture_output=True, check=True, cwd=workdir)
    log_path = workdir / "h2load-requests.log"
    command = [*base, "-D", f"{int(duration * 1000)}ms", "--log-file", str(log_path), url]
    busy0, total0 = machine_jiffies()
    steal0 = steal_jiffies()
    everyone0 = all_cpu_seconds()
    server_cpu0 = server.cpu_seconds()
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=workdir)
    stdout_bytes = b""
    assert process.stdout is not None
    stdout_bytes = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    busy1, total1 = machine_jiffies()
    steal1 = steal_jiffies()
    busiest = _busiest_others(everyone0, all_cpu_seconds(), {*server.pids(), process.pid, os.getpid()}, wall)
    server.check_alive()
    server_cpu = server.cpu_seconds() - server_cpu0
    stdout = stdout_bytes.decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"h2load failed ({process.returncode}): {' '.join(command)}\n{stdout}")
    stats = _parse(stdout)
    durations, unread, non_2xx = _read_log(log_path)
    log_path.unlink(missing_ok=True)
    # "succeeded": completed with a 2xx status ("status codes" also counts responses whose
    # headers arrived but whose body was cut off when the duration ended).
    succeeded = int(stats.get("succeeded", 0))
    status_unread = (
        h1 and succeeded == 0 and bool(unread) and not non_2xx
        and not stats.get("errored") and not stats.get("timeout") and expect_body_bytes is not None
    )
    if status_unread:
        # h2load's HTTP/1.1 parser reports no status for a status line with an empty reason
        # phrase ("HTTP/1.1 200 ", as Hypercorn's h11 writes it): every request then counts as
        # "failed". Such a run is accepted only if every response carried exactly the expected
        # body (checked below); the caller also checks status and body with a real client.
        succeeded, durations = int(stats.get("done", 0)), unread
    elif unread:
        non_2xx += len(unread)
    cores = os.cpu_count() or 1
    machine_busy = (busy1 - busy0) / max(1, total1 - total0) * cores  # in cores
    loader_cpu = usage.ru_utime + usage.ru_stime
    result: dict[str, object] = {
        # Without the temporary log path, and temporary files named as $BENCH_TMP/...: results
        # name no path of the machine that ran them.
        "command": re.sub(r"\S*/prism-bench-[^/\s]+/", "$BENCH_TMP/", " ".join([*command[:-3], url])),
        "rps": round(succeeded / stats["duration_s"], 1) if stats.get("duration_s") else None,
        **latency_summary(durations),
        "requests": int(stats.get("done", 0)),
        "succeeded": succeeded,
        "failed": (0 if status_unread else int(stats.get("failed", 0)))
        + int(stats.get("errored", 0)) + int(stats.get("timeout", 0)),
        "loader_cpu_share": round(loader_cpu / wall, 3),
        "server_cpu_share": round(server_cpu / wall, 3),
        "other_cpu_share": round(max(0.0, machine_busy - loader_cpu / wall - server_cpu / wall), 3),
        "steal_share": round((steal1[0] - steal0[0]) / max(1, steal1[1] - steal0[1]) * cores, 3),
        "busiest_others": busiest,
        "duration_s": stats.get("duration_s"),
    }
    if status_unread:
        result["status_check"] = "h2load read no HTTP/1.1 status (empty reason phrase): body sizes checked instead"
    problems = []
    if not succeeded:
        problems.append("no successful response")
    if result["failed"]:
        problems.append(f"{result['failed']} requests failed or errored")
    if non_2xx:
        problems.append(f"{non_2xx} non-2xx responses in the request log")
    if expect_body_bytes is not None and succeeded:
        data, done = int(stats.get("data_bytes", 0)), int(stats.get("done", 0))
        bodies = data / expect_body_bytes
        result["body_bytes_per_response"] = round(data / max(1, done), 1)
        # Responses still in flight when the duration ends may add their bytes without being
        # counted as done: between done and done + in flight whole bodies, nothing less.
        if not done <= bodies <= done + shape.in_flight or (status_unread and data % expect_body_bytes):
            problems.append(f"{data} body bytes for {done} responses of {expect_body_bytes} bytes")
    if problems:
        raise RuntimeError(f"h2load run not clean: {'; '.join(problems)}\n{' '.join(command)}\n{stdout}")
    return result
