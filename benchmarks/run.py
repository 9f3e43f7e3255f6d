"""Run the benchmark sections side by side and write benchmarks/results/latest.{md,json} plus a
dated copy. ``make bench`` runs this; see benchmarks/README.md.

    python -m benchmarks.run [--quick]
        [--only grpc,rest,latency,backends,auth,tracing,streams,writes,grpc-paths,queue,reader,transact,memory]
        [--label before] [--compare benchmarks/results/before.json]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

from benchmarks import (
    auth_cost,
    backends,
    grpc_paths,
    grpc_throughput,
    latency,
    memory,
    queue,
    reader,
    report,
    rest_throughput,
    streams,
    tracing_cost,
    transact,
    writes,
)
from benchmarks.context import Context, Durations
from benchmarks.loader import h2load_version
from benchmarks.procs import ROOT, machine_jiffies

SECTIONS = {
    "grpc": grpc_throughput.run,
    "rest": rest_throughput.run,
    "latency": latency.run,  # after grpc and rest: its saturation rows come from them
    "backends": backends.run,  # issue 5: added latency on Redis and Postgres
    "auth": auth_cost.run,  # issue 4: the cost of authentication per request
    "tracing": tracing_cost.run,  # issue 15: the cost of tracing per request
    "streams": streams.run,
    "writes": writes.run,  # the KeyValue service's write path, in process
    "grpc-paths": grpc_paths.run,  # issue 10: native gRPC through the ASGI app vs the grpc.aio port
    "queue": queue.run,  # issue 11: Queue publish and consume, gateway vs the backend's own client
    "reader": reader.run,  # issue 13: a full Read, gateway vs the backend's own client
    "transact": transact.run,  # issue 14: Writes/s and the listener's delivery lag, gateway vs the backend's own client
    "memory": memory.run,  # last: it reports the servers of every section before it
}
RESULTS = ROOT / "benchmarks" / "results"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _cpu_model() -> str:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory_gb() -> float:
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 1024 / 1024, 1)
    return 0.0


def _loadavg() -> str:
    return " ".join(pathlib.Path("/proc/loadavg").read_text().split()[:3])


def _background_cpu(seconds: float = 1.0) -> float:
    """Cores busy on the machine before anything is started: someone else's load skews every number."""
    busy0, total0 = machine_jiffies()
    time.sleep(seconds)
    busy1, total1 = machine_jiffies()
    return round((busy1 - busy0) / max(1, total1 - total0) * (os.cpu_count() or 1), 2)


def _wait_quiet(limit: float, below: float = 0.25) -> float:
    """Seconds spent waiting (up to ``limit``) for the machine's other work to drop ``below`` cores."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit:
        busy = _background_cpu(2.0)
        if busy < below:
            break
        print(f"benchmarks: machine busy ({busy:.2f} cores in use elsewhere), waiting …", file=sys.stderr, flush=True)
    return round(time.perf_counter() - started, 1)


def _packages() -> dict[str, str]:
    out = {}
    for name in ("grpcio", "protobuf", "fastapi", "hypercorn", "granian", "uvloop", "aiosqlite", "redis", "asyncpg"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def meta(args: argparse.Namespace, argv: list[str], durations: Durations) -> dict[str, Any]:
    status = _git("status", "--porcelain")
    arg_text = shlex.join(argv)
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "label": args.label,
        "quick": args.quick,
        "sections": args.sections,
        "command": f"python -m benchmarks.run {arg_text}".strip(),
        "make_command": f'make bench ARGS="{arg_text}"' if arg_text else "make bench",
        "durations": {k: v for k, v in vars(durations).items()},
        "machine": {
            "nproc": len(os.sched_getaffinity(0)),
            "cpu_model": _cpu_model(),
            "memory_gb": _memory_gb(),
            "kernel": platform.release(),
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "h2load": h2load_version(),
            "packages": _packages(),
        },
        "git": {
            "commit": _git("rev-parse", "HEAD"),
            "short": _git("rev-parse", "--short", "HEAD") or "nogit",
            "branch": _git("rev-parse", "--abbrev-ref", "HEAD"),
            "modified": len(status.splitlines()) if status else 0,
            "modified_files": status.splitlines()[:50],
        },
        "loadavg_start": _loadavg(),
        "background_cpu_start": _background_cpu(),
    }


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short durations: a smoke test, not numbers to quote")
    parser.add_argument("--only", action="append", default=[], metavar="SECTION",
                        help=f"run only these sections (repeat or comma-separate): {', '.join(SECTIONS)}")
    parser.add_argument("--label", default="", help='recorded in the results, e.g. "before" / "after"')
    parser.add_argument("--compare", type=pathlib.Path, metavar="OLD.json",
                        help="add before/after columns against an earlier run's JSON")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="results directory")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                        help="first wait up to this long for other work on the machine to drop below a quarter core")
    parser.add_argument("--keep-workdir", action="store_true", help="keep server logs and scratch files")
    args = parser.parse_args(argv)
    wanted = [s.strip() for item in args.only for s in item.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    args.sections = [s for s in SECTIONS if not wanted or s in wanted]
    if args.compare is not None and not args.compare.is_file():
        parser.error(f"--compare: no file {args.compare}")
    return args


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through every section's cleanup: servers are stopped


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if not shutil.which("h2load") and not pathlib.Path("/usr/bin/h2load").exists():
        print("benchmarks: h2load not found (Debian package nghttp2-client)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    waited = _wait_quiet(args.wait_quiet)
    durations = Durations.quick() if args.quick else Durations.full()
    result: dict[str, Any] = {"meta": meta(args, argv, durations), "sections": {}}
    result["meta"]["waited_for_quiet_s"] = waited
    old = json.loads(args.compare.read_text()) if args.compare else None
    if args.compare:
        result["meta"]["compare"] = {"file": str(args.compare), "label": old["meta"].get("label"),
                                     "commit": old["meta"]["git"]["commit"], "date": old["meta"]["date"]}
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="prism-bench-"))
    ctx = Context(workdir, durations)
    started = time.perf_counter()
    failed = False
    try:
        for name in args.sections:
            print(f"benchmarks: {name} …", file=sys.stderr, flush=True)
            section_started = time.perf_counter()
            try:
                ctx.results[name] = SECTIONS[name](ctx)
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                failed = True
                traceback.print_exc()
                ctx.results[name] = {"title": name, "error": f"{type(exc).__name__}: {exc}"[:2000], "rows": []}
            ctx.results[name]["seconds"] = round(time.perf_counter() - section_started, 1)
            print(f"benchmarks: {name} done in {ctx.results[name]['seconds']} s", file=sys.stderr, flush=True)
    finally:
        if args.keep_workdir:
            print(f"benchmarks: scratch files kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    result["sections"] = ctx.results
    result["meta"]["wall_seconds"] = round(time.perf_counter() - started, 1)
    result["meta"]["loadavg_end"] = _loadavg()
    result["targets"] = report.targets(ctx.results)
    text = report.markdown(result, old)
    write(args.out, result, text)
    print(text)
    return 1 if failed else 0


def write(out: pathlib.Path, result: dict[str, Any], text: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = result["meta"]
    stem = f"{meta['date'][:10]}-{meta['git']['short']}"
    if meta.get("label"):
        stem += "-" + "".join(c if c.isalnum() or c in "-_." else "-" for c in meta["label"])
    if meta["quick"]:
        stem += "-quick"
    data = json.dumps(result, indent=2, default=str) + "\n"
    for name in ("latest", stem):
        (out / f"{name}.json").write_text(data)
        (out / f"{name}.md").write_text(text)
    print(f"benchmarks: wrote {out / 'latest.md'}, {out / 'latest.json'} and {out / stem}.md/.json", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
