"""What every section gets: durations, a scratch directory, the other sections' results, and
the servers it starts (stopped on the way out, with their memory recorded for section 5)."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from benchmarks import loader
from benchmarks.procs import CLOCK_TICKS, ROOT, Server, clean_env, machine_jiffies

DISTURBED = 0.25  # other work on the machine above this many cores: measure the row again


@dataclass(frozen=True)
class Durations:
    warmup: float  # seconds of load before each timed h2load run (a run of its own)
    throughput: float  # seconds of each timed h2load run
    latency: float  # seconds of each open-loop latency run
    saturation: float  # seconds of the closed-loop direct-read run
    rate: float  # open-loop calls per second
    messages: int  # PubSub messages published per fan-out run
    subscribers: int
    retry_budget: float  # seconds the run may spend re-measuring rows disturbed by other work
    extra_latency: float  # seconds of each open-loop run in sections 6-7 (backends, auth)

    @classmethod
    def full(cls) -> Durations:
        return cls(warmup=1, throughput=5, latency=10, saturation=5, rate=500, messages=2000, subscribers=100,
                   retry_budget=90, extra_latency=6)

    @classmethod
    def quick(cls) -> Durations:
        return cls(warmup=0.3, throughput=1, latency=2, saturation=1, rate=500, messages=100, subscribers=100,
                   retry_budget=10, extra_latency=2)


def backend_cpu_seconds(name: str) -> float:
    """CPU seconds of every process named ``name`` (a local database server and its workers),
    including the children they reaped (cutime + cstime): Postgres serves each connection from
    a process of its own, which exits when the client disconnects."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = pathlib.Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if stat[stat.index("(") + 1 : stat.rindex(")")] != name:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        total += sum(int(v) for v in fields[11:15]) / CLOCK_TICKS  # utime stime cutime cstime
    return total


@dataclass
class Context:
    workdir: pathlib.Path
    durations: Durations
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    memory: list[dict[str, Any]] = field(default_factory=list)
    retried_seconds: float = 0.0

    def subdir(self, name: str) -> pathlib.Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @contextlib.contextmanager
    def serving(self, section: str, load: str) -> Iterator[list[Server]]:
        """Servers appended to the yielded list are stopped on exit, after their peak RSS
        (VmHWM) is read; their idle RSS is read by the section once they are set up."""
        servers: list[Server] = []
        try:
            yield servers
        finally:
            for server in servers:
                try:
                    server.record_peak()
                finally:
                    server.stop()
                for role, mem in server.memory.items():
                    self.memory.append({"section": section, "server": server.name, "role": role, "load": load, **mem})

    def least_disturbed(self, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """``measure()`` again (up to 3 tries in all, within the run's retry budget) while other
        work on the machine took more than DISTURBED cores meanwhile; the least disturbed try
        is kept, and says how many there were."""
        best = measure()
        attempts = 1
        while best["other_cpu_share"] > DISTURBED and attempts < 3 and self.retried_seconds < self.durations.retry_budget:
            started = time.perf_counter()
            time.sleep(2)  # let a burst of someone else's work pass
            again = measure()
            self.retried_seconds += time.perf_counter() - started
            attempts += 1
            if again["other_cpu_share"] < best["other_cpu_share"]:
                best = again
        best["attempts"] = attempts
        return best

    def h2load(self, url: str, shape: loader.Shape, *, server: Server, **kwargs: Any) -> dict[str, Any]:
        """One h2load row, measured again if disturbed (:meth:`least_disturbed`)."""
        d = self.durations
        return self.least_disturbed(
            lambda: loader.run(url, shape, duration=d.throughput, warmup=d.warmup, server=server,
                               workdir=self.workdir, **kwargs)
        )

    def client(self, module: str, *args: str, server: Server | None = None, timeout: float = 600,
               backend: str | None = None) -> dict[str, Any]:
        """Run one of the benchmark's own client processes and parse the JSON it prints; with
        ``server``, also who used the CPU meanwhile (client, that server, anything else). With
        ``backend`` (a process name: ``redis-server``, ``postgres``), that database server's CPU
        is counted apart (``backend_cpu_share``), not as other work."""
        busy0, total0 = machine_jiffies()
        server_cpu0 = server.cpu_seconds() if server else 0.0
        backend_cpu0 = backend_cpu_seconds(backend) if backend else 0.0
        children0 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the client is the only child reaped meanwhile
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", module, *args], cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise RuntimeError(f"{module} {' '.join(args)} still running after {timeout}s") from None
        wall = time.perf_counter() - started
        if process.returncode != 0:
            raise RuntimeError(f"{module} {' '.join(args)} failed ({process.returncode}):\n{stderr[-3000:]}")
        result = json.loads(stdout.strip().splitlines()[-1])
        result["wall_s"] = round(wall, 2)
        busy1, total1 = machine_jiffies()
        children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        client_cpu = (children1.ru_utime - children0.ru_utime) + (children1.ru_stime - children0.ru_stime)
        server_cpu = 0.0
        if server is not None:
            server.check_alive()
            server_cpu = server.cpu_seconds() - server_cpu0
            result["server_cpu_share"] = round(server_cpu / wall, 3)
        backend_cpu = 0.0
        if backend:
            backend_cpu = backend_cpu_seconds(backend) - backend_cpu0
            result["backend_cpu_share"] = round(backend_cpu / wall, 3)
        machine = (busy1 - busy0) / max(1, total1 - total0) * (os.cpu_count() or 1)
        result["other_cpu_share"] = round(max(0.0, machine - (client_cpu + server_cpu + backend_cpu) / wall), 3)
        return result
