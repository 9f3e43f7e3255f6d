"""Processes the benchmark starts: the gateway, the baselines, the loaders.

Every server runs in its own session (process group) so it can be stopped with everything
it spawned (Granian forks its worker); only processes started here are ever signalled.
/proc gives CPU time and memory without psutil.
"""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

ROOT = pathlib.Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without PRISM_* (a stray variable would change the gateway)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRISM_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra or {})
    return env


# --- /proc ---------------------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    """Every live descendant of ``pid``."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = pathlib.Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (all its threads)."""
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS since start) in kB."""
    out: dict[str, int] = {}
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value = line.split(":", 1)
                out[name] = int(value.split()[0])
    except OSError:
        pass
    return out


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine, from /proc/stat; time stolen by the
    hypervisor counts as neither."""
    values = [int(v) for v in pathlib.Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:7])  # user nice system idle iowait irq softirq (guest is inside user)
    return total - idle, total


def steal_jiffies() -> tuple[int, int]:
    """(stolen, all) jiffies: CPU time the hypervisor gave to someone else."""
    values = [int(v) for v in pathlib.Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return values[7], sum(values[:8])


def all_cpu_seconds() -> dict[int, tuple[str, float]]:
    """CPU seconds of every live process: to name whatever else was busy during a run."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = pathlib.Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        out[int(entry)] = (name, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    return out


# --- servers --------------------------------------------------------------------------------


@dataclass
class Server:
    """A server process started by the benchmark, with its ports and memory record."""

    name: str
    command: list[str]
    log_path: pathlib.Path
    env: dict[str, str]
    http_port: int | None = None
    grpc_port: int | None = None
    process: subprocess.Popen[bytes] | None = None
    memory: dict[str, dict[str, object]] = field(default_factory=dict)  # role → {pid, idle_rss_kb, ...}

    def start(self) -> Server:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def pids(self) -> list[int]:
        return [self.pid, *children_of(self.pid)]

    def roles(self) -> dict[int, str]:
        """The process that serves is the 'worker'; a supervisor above it is 'main'."""
        pids = self.pids()
        if len(pids) == 1:
            return {pids[0]: "worker"}
        return {pid: ("main" if pid == self.pid else f"worker{'' if len(pids) == 2 else i}") for i, pid in enumerate(pids)}

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log()[-3000:]}")

    def wait_http(self, path: str = "/", timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=1) as r:
                    if r.status < 500:
                        return
            except urllib.error.HTTPError as exc:
                if exc.code < 500:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.log()[-3000:]}")

    def wait_port(self, port: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name}: port {port} not open after {timeout}s:\n{self.log()[-3000:]}")

    def record_idle(self) -> None:
        for pid, role in self.roles().items():
            mem = memory_kb(pid)
            self.memory[role] = {"pid": pid, "idle_rss_kb": mem.get("VmRSS"), "idle_hwm_kb": mem.get("VmHWM")}

    def record_peak(self) -> None:
        """VmHWM is the kernel's own peak-RSS record: read it just before stopping."""
        for pid, role in self.roles().items():
            mem = memory_kb(pid)
            entry = self.memory.setdefault(role, {"pid": pid})
            entry["peak_rss_kb"] = mem.get("VmHWM")
            entry["final_rss_kb"] = mem.get("VmRSS")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        # Whatever is left of this server's own process group (e.g. an orphaned worker).
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.process.poll() is None:
            self.process.wait(timeout=5)


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def gateway(
    workdir: pathlib.Path, server: str, env: dict[str, str] | None = None, config: pathlib.Path | None = None
) -> Server:
    """``prism serve`` on the embedded default (SQLite + in-process pub/sub), fresh data dir;
    with ``config``, on that server configuration YAML (``--config``) instead."""
    http_port, grpc_port = free_port(), free_port()
    data = workdir / f"gateway-{server}-{http_port}"
    data.mkdir(parents=True, exist_ok=True)
    command = python(
        "-m", "app.cli", "serve", "--server", server, "--port", str(http_port), "--grpc-port", str(grpc_port),
        "--data-dir", str(data / "data"), "--log-level", "warning",
    )
    if config is not None:
        command += ["--config", str(config)]
    srv = Server(f"gateway ({server})", command, data / "gateway.log", clean_env(env), http_port, grpc_port)
    srv.start()
    srv.wait_http("/readyz")
    return srv


def grpc_echo(workdir: pathlib.Path) -> Server:
    port = free_port()
    command = python("-m", "benchmarks.baselines.grpc_echo", "--port", str(port))
    srv = Server("grpc echo", command, workdir / f"grpc-echo-{port}.log", clean_env(), grpc_port=port)
    srv.start()
    srv.wait_port(port)
    return srv


def asgi_baseline(workdir: pathlib.Path, app: str, server: str, body_file: pathlib.Path) -> Server:
    port = free_port()
    command = python("-m", "benchmarks.baselines.serve", "--server", server, "--port", str(port), app)
    name = f"{app.split(':')[0].rsplit('.', 1)[-1]} ({server})"
    env = clean_env({"BENCH_BODY_FILE": str(body_file)})
    srv = Server(name, command, workdir / f"{name.replace(' ', '-')}-{port}.log", env, http_port=port)
    srv.start()
    srv.wait_http("/healthz-probe")  # any answer (404) means it is serving
    return srv
