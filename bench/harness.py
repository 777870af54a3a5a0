"""Shared benchmark plumbing: start processes, wait for ports, drive load, read CPU time.

Load goes to 127.0.0.1 only, bounded in duration. wrk is used when installed
(Debian package ``wrk``); otherwise a small aiohttp load generator stands in.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TICKS = os.sysconf("SC_CLK_TCK")

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# ports below the kernel's ephemeral range, so that no outgoing connection takes one
# before the server binds it (a run once failed with "address already in use")
from tests.support import free_port  # noqa: E402, F401 (re-exported for the bench scripts)


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listened on 127.0.0.1:{port} within {timeout}s")


def start(args: list[str], env: dict[str, str] | None = None, port: int | None = None):
    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if port is not None:
        try:
            wait_port(port)
        except RuntimeError:
            proc.kill()
            raise
    return proc


def stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()


@dataclass
class Run:
    """What one benchmark run started: its temp directory and its processes."""

    work: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def start(
        self, args: list[str], env: dict[str, str] | None = None, port: int | None = None
    ) -> subprocess.Popen:
        return self.keep(start(args, env, port))

    def keep(self, proc: subprocess.Popen) -> subprocess.Popen:
        """Stop ``proc`` with the rest when the run ends."""
        self.procs.append(proc)
        return proc


@contextlib.contextmanager
def run(prefix: str) -> Iterator[Run]:
    """A temp directory and the processes started through the yielded :class:`Run`;
    all stopped and removed at the end, also when a start or a measure fails."""
    current = Run(Path(tempfile.mkdtemp(prefix=prefix)))
    try:
        yield current
    finally:
        stop(*current.procs)
        shutil.rmtree(current.work, ignore_errors=True)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and its reaped children), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class LoadResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def wrk(url: str, connections: int = 50, seconds: int = 8, threads: int = 1) -> LoadResult:
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", url],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
    ).stdout
    return parse_wrk(out)


def parse_wrk(out: str) -> LoadResult:
    """Requests, duration, p50/p99 and errors from ``wrk --latency`` output."""
    reqs = int(re.search(r"(\d+) requests in ([\d.]+)(\w+)", out).group(1))
    dur_m = re.search(r"requests in ([\d.]+)(ms|s|m)", out)
    dur = float(dur_m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[dur_m.group(2)]
    p50 = _ms(re.search(r"^\s*50%\s+(\S+)", out, re.M).group(1))
    p99 = _ms(re.search(r"^\s*99%\s+(\S+)", out, re.M).group(1))
    errs = 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errs += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errs += sum(int(x) for x in m.groups())
    return LoadResult(reqs, dur, p50, p99, errs)


async def _py_load(url: str, connections: int, seconds: float, body: bytes | None) -> LoadResult:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            try:
                method = "POST" if body is not None else "GET"
                async with session.request(method, url, data=body) as r:
                    await r.read()
                    if r.status >= 400:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1
            latencies.append(time.perf_counter() - t0)

    conn = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=conn) as session:
        t0 = time.monotonic()
        await asyncio.gather(*(worker(session) for _ in range(connections)))
        elapsed = time.monotonic() - t0
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000  # noqa: E731
    return LoadResult(len(latencies), elapsed, pick(0.5), pick(0.99), errors)


def py_load(url: str, connections: int = 50, seconds: float = 8, body: bytes | None = None):
    return asyncio.run(_py_load(url, connections, seconds, body))


def load(url: str, connections: int = 50, seconds: int = 8) -> tuple[LoadResult, str]:
    if shutil.which("wrk"):
        return wrk(url, connections, seconds), "wrk"
    return py_load(url, connections, seconds), "python (aiohttp) load generator"


ARCH_PORTS = {"auth": 3001, "orchestrator": 3002, "proxy": 3003, "billing": 3004, "analytics": 3005}


def platform_routes(ports: dict[str, int]) -> str:
    """The top-level routes.yaml pointed at this run's service ports, static discovery."""
    text = (ROOT / "routes.yaml").read_text()
    for name, port in ARCH_PORTS.items():
        text = text.replace(f"http://127.0.0.1:{port}]", f"http://127.0.0.1:{ports[name]}]")
    text = text.replace("discovery: consul", "discovery: static")
    if not all(f":{ports[n]}]" in text for n in ARCH_PORTS):
        raise RuntimeError("routes.yaml changed shape: cannot point it at this run's ports")
    return text


def machine_line() -> str:
    cpu = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{datetime.now(UTC).isoformat(timespec='seconds')} · {platform.node()} · "
        f"{os.cpu_count()} cores · {cpu} · Python {platform.python_version()}"
    )


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join(
        [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
    )
