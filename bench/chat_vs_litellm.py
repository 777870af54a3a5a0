"""One run, side by side: chat completions through the whole platform, through LiteLLM's
proxy, and straight to the upstream, all three calling the very same OpenAI-compatible mock.

    .venv/bin/python bench/chat_vs_litellm.py [--seconds 8] [--connections 10,50]
                                              [--latency 20ms] [--no-stream] [--db sqlite]
                                              [--rounds 1]

* **platform**: ``python -m gateway`` (forward-auth to auth, cached 5 s) -> orchestrator
  (validation, hold with billing, ``route.decided``) -> proxy (provider call, usage row
  + ``usage.recorded`` through the outbox) -> ``bench/openai_mock.py`` (kind ``openai``);
  billing charges from RabbitMQ and analytics consumes every event. Every part is its
  own process, as in production; RabbitMQ at ``AMQP_URL`` in a namespace of this run
  (deleted at the end), SQLite files in a temp dir (``--db postgres``: one PostgreSQL
  database per service, dropped at the end).
* **LiteLLM**: ``litellm --config ... --num_workers 1`` (its default; ``--litellm-workers
  2`` gives it both cores, as the platform's processes have), no database, in its own
  virtualenv (``var/bench/litellm-venv``, created here when missing), pointed at the
  same mock (``openai/bench-gpt`` with ``api_base``).
* **direct**: wrk straight to the mock: the floor.

Load: ``wrk -t1`` with a Lua script for the POST body, 127.0.0.1 only, bounded in time.
CPU per request is the sum of ``utime + stime`` of every process of the contender
(platform: gateway + the five services; LiteLLM: its process tree), divided by the
requests wrk reports. For the platform a second figure waits until the events of
those requests are consumed (billing's charge, analytics), since that work happens
after the answer. Overhead = contender's latency percentile minus direct's, at the
same concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import (
    PY,
    ROOT,
    LoadResult,
    cpu_seconds,
    free_port,
    machine_line,
    parse_wrk,
    platform_routes,
    rss_mib,
    stop,
    table,
    wait_port,
)

from services.common.events import EventSettings
from services.common.events.broker import (
    delete_names,
    listed_names,
    namespace_names,
    queue_depths,
)

AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
PG_URL = os.environ.get("PG_BENCH_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
MODEL = "bench-gpt"
PROMPT = "Say hello to the benchmark, in one short sentence."
SERVICES = ("analytics", "billing", "auth", "proxy", "orchestrator")
LITELLM_VENV = ROOT / "var" / "bench" / "litellm-venv"
MOCK_KEY_ENV = "AIAGG_BENCH_MOCK_KEY"

PROVIDERS = """
defaults:
  max_output_tokens: 4096
  timeout: 30s
  cooldown: {{failures: 5, duration: 10s}}
providers:
  bench-mock:
    kind: openai
    base_url: {mock_url}/v1
    api_key_env: AIAGG_BENCH_MOCK_KEY
    models:
      bench-gpt: {{input_price: "0.50", output_price: "1.50"}}
"""

LITELLM_CONFIG = """
model_list:
  - model_name: bench-gpt
    litellm_params:
      model: openai/bench-gpt
      api_base: {mock_url}/v1
      api_key: sk-mock-upstream
general_settings:
  master_key: {master}
litellm_settings:
  telemetry: false
"""


def chat_body(stream: bool) -> bytes:
    body: dict = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]}
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode()


# -- processes ----------------------------------------------------------------------------


def spawn(args: list[str], env: dict[str, str], log: Path | None = None) -> subprocess.Popen:
    out = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_ready(
    proc: subprocess.Popen, port: int, what: str, timeout: float = 60.0, log: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening\n{tail}")
        try:
            wait_port(port, 0.2)
            return
        except RuntimeError:
            pass
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout}s")


def tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/*/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*") if Path(f"/proc/{p}").exists() else ():
            with contextlib.suppress(OSError):
                todo += [int(c) for c in (task / "children").read_text().split()]
    return out


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


def snapshot(groups: dict[str, list[int]]) -> dict[str, dict[int, float]]:
    """CPU seconds of every pid, by group (a service, "postgres", ...)."""
    out: dict[str, dict[int, float]] = {}
    for name, pids in groups.items():
        out[name] = {}
        for pid in pids:
            with contextlib.suppress(OSError):
                out[name][pid] = cpu_seconds(pid)
    return out


def spent(
    before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]
) -> dict[str, float]:
    """CPU seconds used between two snapshots, by group; a pid born in between counts whole."""
    return {
        name: sum(cpu - before.get(name, {}).get(pid, 0.0) for pid, cpu in pids.items())
        for name, pids in after.items()
    }


def rss_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += rss_mib(pid)
    return total


def broker_pid() -> int | None:
    """The RabbitMQ node's pid (beam.smp listening on 5672), for its CPU share; None if unknown."""
    for _ in range(3):
        with contextlib.suppress(Exception):
            out = subprocess.run(
                ["ss", "-ltnpH", "sport = :5672"], capture_output=True, text=True, timeout=10
            ).stdout
            if m := re.search(r"pid=(\d+)", out):
                return int(m.group(1))
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            if (
                comm.read_text().strip() == "beam.smp"
                and b"rabbit" in (comm.parent / "cmdline").read_bytes()
            ):
                return int(comm.parent.name)
    return None


# -- load -----------------------------------------------------------------------------------

LUA = """
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
"""


def wrk_post(
    url: str, body: bytes, key: str, connections: int, seconds: float, timeout: str = "10s"
) -> LoadResult:
    """wrk -t1 with a POST body (Lua script in a temp file); parsed like harness.wrk."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(LUA.format(body=json.dumps(body.decode()), key=key))
        script = f.name
    try:
        out = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{seconds}s",
                f"--timeout={timeout}",
                "--latency",
                "-s",
                script,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=True,
        ).stdout
    finally:
        os.unlink(script)
    return parse_wrk(out)


async def post_once(url: str, body: bytes, key: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            url,
            data=body,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=60),
        ) as r,
    ):
        return r.status, await r.text()


def check_answer(name: str, status: int, text: str, stream: bool) -> None:
    ok = status == 200 and (("[DONE]" in text) if stream else ('"choices"' in text))
    if not ok:
        raise RuntimeError(f"{name}: a test request failed: {status} {text[:500]}")


# -- RabbitMQ and PostgreSQL clean-up ---------------------------------------------------------


def delete_namespace(namespace: str) -> int:
    """Delete every queue and exchange named ``<namespace>.*``; retried while the broker
    is away (e.g. restarted by someone else's test)."""
    for attempt in range(5):
        try:
            names = namespace_names(EventSettings(events_namespace=namespace)) | listed_names(
                lambda name: name.startswith(namespace + ".")
            )
            asyncio.run(delete_names(AMQP_URL, names))
            return len(names)
        except Exception as exc:
            if attempt == 4:
                print(
                    f"could not delete the RabbitMQ namespace {namespace}: {exc!r}", file=sys.stderr
                )
            time.sleep(2)
    return 0


async def create_pg(name: str) -> str:
    import asyncpg
    from yarl import URL

    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return str(URL(PG_URL).with_path(f"/{name}"))


async def pg_backends(names: list[str]) -> list[int]:
    import asyncpg

    conn = await asyncpg.connect(PG_URL)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = ANY($1::text[])", names
        )
    finally:
        await conn.close()
    return [r["pid"] for r in rows]


async def drop_pg(name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


# -- the platform -------------------------------------------------------------------------------


@dataclass
class Platform:
    """Gateway + five services as separate processes, on RabbitMQ and SQLite/PostgreSQL."""

    mock_url: str
    db: str = "sqlite"
    log_level: str = "WARNING"
    #: False: the gateway and the services on asyncio's own loop (to show what uvloop buys)
    uvloop: bool = True
    namespace: str = field(default_factory=lambda: f"benchchat-{uuid.uuid4().hex[:10]}")
    master: str = field(default_factory=lambda: "mk-bench-" + secrets.token_hex(16))
    work: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="bench-chat-")))
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    db_urls: dict[str, str] = field(default_factory=dict)
    pg_dbs: list[str] = field(default_factory=list)
    key: str = ""
    user_id: str = ""
    admin_port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['gateway']}"

    @property
    def pids(self) -> list[int]:
        return [p for proc in self.procs.values() for p in tree(proc.pid)]

    def service_pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self.procs.items()}

    def groups(self) -> dict[str, list[int]]:
        """The platform's processes by part; with PostgreSQL, the server backends serving
        this run's databases count too (they do the platform's database work)."""
        out = {name: tree(proc.pid) for name, proc in self.procs.items()}
        if self.pg_dbs:
            out["postgres"] = asyncio.run(pg_backends(self.pg_dbs))
        return out

    def start(self) -> None:
        self.ports = {name: free_port() for name in (*SERVICES, "gateway")}
        self.admin_port = free_port()
        routes = self.work / "routes.yaml"
        routes.write_text(platform_routes(self.ports))
        providers = self.work / "providers.yaml"
        providers.write_text(PROVIDERS.format(mock_url=self.mock_url))
        for name in SERVICES:
            if self.db == "postgres":
                database = f"benchchat_{self.namespace[-10:]}_{name}"
                self.db_urls[name] = asyncio.run(create_pg(database))
                self.pg_dbs.append(database)
            else:
                self.db_urls[name] = f"sqlite:///{self.work}/{name}.db"
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("CONSUL_", "GATEWAY_", "EVENTS_", "AMQP_"))
        }
        base.update(
            {
                "AMQP_URL": AMQP_URL,
                "EVENTS_NAMESPACE": self.namespace,
                "MASTER_KEY": self.master,
                "PROVIDERS_FILE": str(providers),
                "GATEWAY_ROUTES_FILE": str(routes),
                "LOG_LEVEL": self.log_level,
                "SERVICE_UVLOOP": "true" if self.uvloop else "false",
                MOCK_KEY_ENV: "sk-mock-upstream",
                "AIAGG_DATA_DIR": str(self.work),
            }
        )
        for name in SERVICES:
            env = {
                **base,
                f"{name.upper()}_PORT": str(self.ports[name]),
                f"{name.upper()}_DATABASE_URL": self.db_urls[name],
            }
            log = self.work / f"{name}.log"
            self.procs[name] = spawn([PY, "-m", f"services.{name}"], env, log)
            wait_ready(self.procs[name], self.ports[name], name, log=log)
        env = {
            **base,
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": str(self.ports["gateway"]),
            "GATEWAY_ADMIN_PORT": str(self.admin_port),
        }
        if not self.uvloop:
            env["GATEWAY_UVLOOP"] = "false"
        log = self.work / "gateway.log"
        self.procs["gateway"] = spawn([PY, "-m", "gateway"], env, log)
        wait_ready(self.procs["gateway"], self.ports["gateway"], "gateway", log=log)
        asyncio.run(self._bootstrap())

    async def _bootstrap(self) -> None:
        self.user_id = f"bench-{uuid.uuid4().hex[:8]}"
        admin = {"Authorization": f"Bearer {self.master}"}
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{self.url}/auth/api-keys",
                headers=admin,
                json={"user_id": self.user_id, "name": "bench"},
            ) as r:
                body = await r.json()
                if r.status != 201:
                    raise RuntimeError(f"cannot create the bench key: {r.status} {body}")
                self.key = body["key"]
            async with http.post(
                f"{self.url}/billing/top-up",
                headers=admin,
                json={
                    "user_id": self.user_id,
                    "amount": "100000",
                    "idempotency_key": f"bench-{uuid.uuid4().hex}",
                },
            ) as r:
                if r.status != 201:
                    raise RuntimeError(f"cannot top up: {r.status} {await r.text()}")

    def queue_names(self) -> list[str]:
        from services.common.events import Topology

        topo = Topology(self.namespace)
        return [topo.queue("billing.usage"), topo.queue("analytics.events")]

    def drain(self, timeout: float = 60.0) -> float:
        """Wait until the event queues are empty and the platform is idle; seconds waited."""
        t0 = time.monotonic()
        names = self.queue_names()
        calm = 0
        pids = self.pids
        last = cpu_of(pids)
        while time.monotonic() - t0 < timeout:
            time.sleep(0.3)
            depths = asyncio.run(queue_depths(AMQP_URL, names))
            now = cpu_of(pids)
            idle = now - last < 0.03  # < 10% of one core over 0.3 s
            last = now
            calm = calm + 1 if all(d == 0 for d in depths.values()) and idle else 0
            if calm >= 2:
                break
        return time.monotonic() - t0

    def log_problems(self, limit: int = 5) -> list[str]:
        """WARNING/ERROR lines the services and the gateway logged (a broker restart by
        someone else, a crash, ...): printed with the results so a disturbed run shows.

        Not counted: the gateway's complaints about clients that hung up mid-stream,
        which wrk does to the streams in flight when it stops."""
        lines: list[str] = []
        hangups = ("ended early", "Error handling request", "Cannot write to closing")
        for log in sorted(self.work.glob("*.log")):
            with contextlib.suppress(OSError):
                for line in log.read_text(errors="replace").splitlines():
                    if (" WARNING " in line or " ERROR " in line) and not any(
                        h in line for h in hangups
                    ):
                        lines.append(f"{log.stem}: {line[:200]}")
        if len(lines) > limit:
            lines = [*lines[:limit], f"... and {len(lines) - limit} more"]
        return lines

    def stop(self) -> None:
        procs = list(self.procs.values())
        if "gateway" in self.procs:
            stop(self.procs["gateway"])
        stop(*procs)
        delete_namespace(self.namespace)
        for database in self.pg_dbs:
            with contextlib.suppress(Exception):
                asyncio.run(drop_pg(database))
        shutil.rmtree(self.work, ignore_errors=True)


# -- LiteLLM ------------------------------------------------------------------------------------


def ensure_litellm(venv: Path) -> tuple[Path | None, str]:
    """The ``litellm`` executable of ``venv`` (created and installed when missing)."""
    exe = venv / "bin" / "litellm"
    if exe.exists():
        version = subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-c",
                "import importlib.metadata as m; print(m.version('litellm'))",
            ],
            capture_output=True,
            text=True,
        ).stdout.strip()
        return exe, f"LiteLLM {version} (already installed in {venv})"
    print(f"installing LiteLLM into {venv} (pip install 'litellm[proxy]') ...", flush=True)
    t0 = time.monotonic()
    try:
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["python3", "-m", "venv", str(venv)], check=True, timeout=300, capture_output=True
        )
        done = subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", "litellm[proxy]"],
            capture_output=True,
            text=True,
            timeout=1200,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        return None, f"LiteLLM could NOT be installed: {exc}"
    took = time.monotonic() - t0
    if done.returncode != 0 or not exe.exists():
        tail = (done.stderr or done.stdout)[-1500:]
        return None, f"LiteLLM could NOT be installed (pip exit {done.returncode}):\n{tail}"
    version = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import importlib.metadata as m; print(m.version('litellm'))",
        ],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return exe, f"LiteLLM {version} (installed now in {took:.0f} s into {venv})"


@dataclass
class LiteLLM:
    exe: Path
    mock_url: str
    port: int = field(default_factory=free_port)
    master: str = field(default_factory=lambda: "sk-" + secrets.token_hex(16))
    work: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="bench-litellm-")))
    proc: subprocess.Popen | None = None
    workers: int = 1

    @property
    def label(self) -> str:
        return f"LiteLLM proxy ({self.workers} worker{'s' if self.workers > 1 else ''})"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pids(self) -> list[int]:
        return tree(self.proc.pid) if self.proc else []

    def start(self) -> None:
        config = self.work / "config.yaml"
        config.write_text(LITELLM_CONFIG.format(mock_url=self.mock_url, master=self.master))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LITELLM_"))}
        env.pop("DATABASE_URL", None)
        env.update(
            {
                "LITELLM_TELEMETRY_DISABLED": "true",
                "LITELLM_LOG": "ERROR",
                "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                "LITELLM_MASTER_KEY": self.master,
                "PATH": f"{self.exe.parent}:{env.get('PATH', '')}",
            }
        )
        log = self.work / "litellm.log"
        self.proc = spawn(
            [
                str(self.exe),
                "--config",
                str(config),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--num_workers",
                str(self.workers),
            ],
            env,
            log,
        )
        wait_ready(self.proc, self.port, "litellm", timeout=120, log=log)

    def stop(self) -> None:
        if self.proc is not None:
            kids = tree(self.proc.pid)[1:]
            stop(self.proc)
            for pid in kids:  # a worker that outlived its parent
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 15)
        shutil.rmtree(self.work, ignore_errors=True)


# -- measuring ----------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    connections: int
    stream: bool
    result: LoadResult
    cpu_us: float | None  # contender CPU per request during the load
    cpu_all_us: float | None = None  # including the events consumed after the load
    broker_us: float | None = None
    rss: float | None = None
    parts: dict[str, float] = field(default_factory=dict)  # µs per request, by process
    round: int = 0  # which of the --rounds this row was measured in


def measure(
    name: str,
    url: str,
    key: str,
    groups_fn,
    connections: int,
    seconds: float,
    stream: bool,
    after=None,
    broker: int | None = None,
) -> Row:
    """Warm up, then load for ``seconds``; CPU of ``groups_fn()``'s processes per request.

    ``after`` (the platform's drain) runs before the window and after it: the second
    CPU figure then includes the work the requests caused after their answers."""
    body = chat_body(stream)
    wrk_post(url, body, key, connections, 2)  # warm up connections, caches, JITs
    if after is not None:
        after()
    s0, b0 = snapshot(groups_fn()), cpu_of([broker]) if broker else 0.0
    result = wrk_post(url, body, key, connections, seconds)
    s1, b1 = snapshot(groups_fn()), cpu_of([broker]) if broker else 0.0
    n = max(result.requests, 1)
    during = spent(s0, s1)
    pids = [p for k, g in groups_fn().items() if k != "postgres" for p in g]  # shared buffers
    row = Row(name, connections, stream, result, sum(during.values()) / n * 1e6, rss=rss_of(pids))
    row.parts = {k: v / n * 1e6 for k, v in during.items()}
    if after is not None:
        after()
        s2 = snapshot(groups_fn())
        total = spent(s0, s2)
        row.cpu_all_us = sum(total.values()) / n * 1e6
        row.parts = {k: v / n * 1e6 for k, v in total.items()}
        if broker:
            row.broker_us = (cpu_of([broker]) - b0) / n * 1e6
    elif broker:
        row.broker_us = (b1 - b0) / n * 1e6
    return row


def render(rows: list[Row], direct: dict[tuple[int, int, bool], Row]) -> str:
    out = []
    for r in rows:
        d = direct.get((r.round, r.connections, r.stream))
        over50 = r.result.p50_ms - d.result.p50_ms if d and d is not r else None
        over99 = r.result.p99_ms - d.result.p99_ms if d and d is not r else None
        cpu = "-" if r.cpu_us is None else f"{r.cpu_us / 1000:.2f} ms"
        if d is r:
            cpu = f"({r.cpu_us / 1000:.2f} ms)"
        if r.cpu_all_us is not None:
            cpu += f" / {r.cpu_all_us / 1000:.2f} ms"
        out.append(
            [
                r.name,
                str(r.connections),
                f"{r.result.rps:,.0f}",
                f"{r.result.p50_ms:.1f} ms",
                f"{r.result.p99_ms:.1f} ms",
                "-" if over50 is None else f"{over50:+.1f} ms",
                "-" if over99 is None else f"{over99:+.1f} ms",
                cpu,
                "-" if r.rss is None else f"{r.rss:.0f} MiB",
                str(r.result.errors),
            ]
        )
    return table(
        [
            "path",
            "conns",
            "req/s",
            "p50",
            "p99",
            "p50 over direct",
            "p99 over direct",
            "CPU per request",
            "RSS",
            "errors",
        ],
        out,
    )


def _judge(plat: Row, lite: Row, d: Row) -> tuple[float, float, float, str]:
    """req/s ratio, p99-overhead share, CPU ratio, and what the upstream leaves of 5x."""
    ratio = plat.result.rps / lite.result.rps if lite.result.rps else float("inf")
    po, lo = plat.result.p99_ms - d.result.p99_ms, lite.result.p99_ms - d.result.p99_ms
    share = po / lo if lo > 0 else float("inf")
    cpu = (plat.cpu_all_us or plat.cpu_us or 0) / (lite.cpu_us or 1)
    return ratio, share, cpu, _cap(plat.connections, lite.result.rps, d.result.rps)


def _cap(conns: int, lite_rps: float, direct_rps: float) -> str:
    """What 5x asks for when the upstream alone comes close to it ("" when it does not).

    Nobody beats the upstream alone at the same concurrency, and by Little's law c
    connections at R req/s spend c/R seconds per request: 5x LiteLLM leaves the platform
    c/(5 * LiteLLM) - c/direct per request on top of the upstream's own time.
    """
    if not lite_rps or not direct_rps:
        return ""
    ceiling = direct_rps / lite_rps
    if ceiling < 5:
        return (
            f"; at most {ceiling:.1f}x is possible here: the upstream alone serves "
            f"{direct_rps:,.0f} req/s at c={conns}"
        )
    needed = 5 * lite_rps
    if needed < 0.8 * direct_rps:
        return ""
    upstream_ms = 1000 * conns / direct_rps
    budget_ms = 1000 * conns / needed - upstream_ms
    return (
        f"; 5x is {needed:,.0f} req/s, {needed / direct_rps:.0%} of the upstream alone "
        f"({direct_rps:,.0f} req/s at c={conns}): {budget_ms:.1f} ms per request for the "
        f"whole platform path on top of the upstream's {upstream_ms:.1f} ms"
    )


def _met(ok: bool) -> str:
    return "MET" if ok else "NOT met"


def verdict(rows: list[Row], direct: dict[tuple[int, int, bool], Row]) -> list[str]:
    """One line per cell and round; with several rounds, the medians after them."""
    lines = []
    rounds = sorted({r.round for r in rows})
    by = {(r.name.split()[0], r.round, r.connections, r.stream): r for r in rows}
    judged: dict[tuple[bool, int], list[tuple[float, float]]] = {}
    for (kind, rnd, conns, stream), plat in sorted(by.items(), key=lambda kv: kv[0][1:]):
        lite = by.get(("LiteLLM", rnd, conns, stream))
        d = direct.get((rnd, conns, stream))
        if kind != "platform" or lite is None or d is None:
            continue
        ratio, share, cpu, cap = _judge(plat, lite, d)
        judged.setdefault((stream, conns), []).append((ratio, share))
        po, lo = plat.result.p99_ms - d.result.p99_ms, lite.result.p99_ms - d.result.p99_ms
        mode = "stream" if stream else "plain"
        prefix = f"round {rnd + 1}: " if len(rounds) > 1 else ""
        lines.append(
            f"{prefix}{mode:6} c={conns:<3} req/s platform/LiteLLM = {ratio:.2f}x "
            f"(target >= 5x: {_met(ratio >= 5)}{cap}); "
            f"p99 overhead platform/LiteLLM = "
            f"{po:.1f}/{lo:.1f} ms = {share:.2f} (target <= 0.20: "
            f"{_met(share <= 0.2)}); CPU per request platform/LiteLLM = "
            f"{cpu:.2f}x"
        )
    if len(rounds) > 1 and judged:
        lines.append("")
        for (stream, conns), pairs in sorted(judged.items()):
            ratios = sorted(p[0] for p in pairs)
            shares = sorted(p[1] for p in pairs)
            mid_r, mid_s = statistics.median(ratios), statistics.median(shares)
            mode = "stream" if stream else "plain"
            lines.append(
                f"median of {len(pairs)} rounds: {mode:6} c={conns:<3} req/s ratio {mid_r:.2f}x "
                f"({ratios[0]:.2f}-{ratios[-1]:.2f}; target >= 5x: {_met(mid_r >= 5)}); "
                f"p99 overhead share {mid_s:.2f} ({shares[0]:.2f}-{shares[-1]:.2f}; "
                f"target <= 0.20: {_met(mid_s <= 0.2)})"
            )
    return lines


def measure_cell(
    mock: subprocess.Popen,
    mock_url: str,
    platform: Platform,
    lite: LiteLLM | None,
    broker: int | None,
    connections: int,
    seconds: float,
    stream: bool,
) -> list[Row]:
    """One cell: direct to the mock, the platform, then LiteLLM (when it runs)."""
    rows = [
        measure(
            "direct to mock",
            f"{mock_url}/v1/chat/completions",
            "none",
            lambda: {"mock": [mock.pid]},
            connections,
            seconds,
            stream,
        ),
        measure(
            "platform (gateway+5 services)",
            f"{platform.url}/v1/chat/completions",
            platform.key,
            platform.groups,
            connections,
            seconds,
            stream,
            after=platform.drain,
            broker=broker,
        ),
    ]
    if lite is not None:
        rows.append(
            measure(
                lite.label,
                f"{lite.url}/v1/chat/completions",
                lite.master,
                lambda: {"litellm": lite.pids},
                connections,
                seconds,
                stream,
            )
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--connections", default="10,50")
    ap.add_argument("--latency", default="20ms", help="the mock upstream's fixed latency")
    ap.add_argument("--no-stream", action="store_true", help="skip the streamed variant")
    ap.add_argument("--stream-only", action="store_true", help="only the streamed variant")
    ap.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    ap.add_argument(
        "--asyncio-loop",
        action="store_true",
        help="run the gateway and the services on asyncio's loop instead of uvloop",
    )
    ap.add_argument("--log-level", default="WARNING", help="LOG_LEVEL of the services")
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every cell this many times, alternating the contenders; the verdict "
        "then reports each round and the median ratio (one 8 s LiteLLM run moves by ±10 %%)",
    )
    ap.add_argument("--no-litellm", action="store_true")
    ap.add_argument(
        "--litellm-workers",
        type=int,
        default=1,
        help="LiteLLM's --num_workers (1, its default; 2 gives it both cores)",
    )
    ap.add_argument("--litellm-venv", type=Path, default=LITELLM_VENV)
    ap.add_argument("--keep-logs", action="store_true", help="print the services' log tails")
    args = ap.parse_args()
    conns = [int(c) for c in args.connections.split(",")]
    modes = [False] if args.no_stream else [True] if args.stream_only else [False, True]

    lite_exe, lite_note = (None, "LiteLLM skipped (--no-litellm)")
    if not args.no_litellm:
        lite_exe, lite_note = ensure_litellm(args.litellm_venv)
        print(lite_note, flush=True)

    mock_port = free_port()
    mock = spawn(
        [PY, "bench/openai_mock.py", str(mock_port), "--latency", args.latency], dict(os.environ)
    )
    wait_ready(mock, mock_port, "openai_mock")
    mock_url = f"http://127.0.0.1:{mock_port}"
    platform = Platform(
        mock_url, db=args.db, log_level=args.log_level, uvloop=not args.asyncio_loop
    )
    lite: LiteLLM | None = None
    broker = broker_pid()
    rows: list[Row] = []
    direct: dict[tuple[int, int, bool], Row] = {}  # (round, connections, stream)
    started = time.monotonic()
    try:
        t0 = time.monotonic()
        platform.start()
        plat_start = time.monotonic() - t0
        for stream in modes:
            status, text = asyncio.run(
                post_once(f"{platform.url}/v1/chat/completions", chat_body(stream), platform.key)
            )
            check_answer("platform", status, text, stream)
        if lite_exe is not None:
            t0 = time.monotonic()
            lite = LiteLLM(lite_exe, mock_url, workers=args.litellm_workers)
            try:
                lite.start()
                for stream in modes:
                    status, text = asyncio.run(
                        post_once(f"{lite.url}/v1/chat/completions", chat_body(stream), lite.master)
                    )
                    check_answer("LiteLLM", status, text, stream)
                lite_note += f"; started in {time.monotonic() - t0:.1f} s"
            except Exception as exc:
                log = lite.work / "litellm.log"
                tail = log.read_text()[-1500:] if log.exists() else ""
                lite_note += f"; could NOT be started: {exc}\n{tail}"
                lite.stop()
                lite = None
        for rnd in range(args.rounds):
            for stream in modes:
                for c in conns:
                    cell = measure_cell(
                        mock, mock_url, platform, lite, broker, c, args.seconds, stream
                    )
                    for row in cell:
                        row.round = rnd
                    direct[(rnd, c, stream)] = cell[0]
                    rows += cell
    finally:
        problems = platform.log_problems()
        if args.keep_logs:
            for name in SERVICES:
                log = platform.work / f"{name}.log"
                if log.exists():
                    print(f"--- {name}.log\n{log.read_text()[-1500:]}")
        if lite is not None:
            lite.stop()
        platform.stop()
        stop(mock)

    load = os.getloadavg()[0]
    print(f"# chat completions: platform vs LiteLLM vs direct — {machine_line()}")
    print(
        f"# upstream: bench/openai_mock.py, fixed latency {args.latency}, 12-word answer; "
        f"load: wrk -t1, {args.seconds}s per cell after a 2s warm-up, loopback POST"
    )
    print(
        f"# platform: gateway + auth/orchestrator/proxy/billing/analytics, separate processes, "
        f"RabbitMQ, {args.db}, services LOG_LEVEL={args.log_level}, gateway access log on; "
        f"started in {plat_start:.1f} s"
    )
    print(f"# {lite_note}")
    for rnd in range(args.rounds):
        for stream in modes:
            title = "streamed (stream: true)" if stream else "non-streamed"
            if args.rounds > 1:
                title += f", round {rnd + 1} of {args.rounds}"
            print(f"\n## {title}")
            cells = [r for r in rows if r.stream == stream and r.round == rnd]
            print(render(cells, direct))
            for r in cells:
                if r.name.startswith("platform"):
                    parts = ", ".join(
                        f"{k} {v / 1000:.2f}"
                        for k, v in sorted(r.parts.items(), key=lambda kv: -kv[1])
                    )
                    print(f"platform c={r.connections} CPU ms per request by process: {parts}")
    print(
        "\nCPU per request: the contender's processes' utime+stime / requests; "
        "platform: 'during load / including its events consumed after the load'; "
        "(direct) = the mock itself."
    )
    if broker:
        shares = [
            f"{f'round {r.round + 1} ' if args.rounds > 1 else ''}c={r.connections}"
            f"{' stream' if r.stream else ''}: {r.broker_us / 1000:.2f} ms"
            for r in rows
            if r.broker_us is not None
        ]
        print(
            "RabbitMQ broker CPU per platform request (not in the platform's figure; "
            "the broker is shared with other users of this machine): " + ", ".join(shares)
        )
    judged = verdict(rows, direct)
    if not judged:
        judged = ["no LiteLLM numbers in this run: the targets cannot be judged"]
    print("\n" + "\n".join(judged))
    if problems:
        print(
            "\nWARNING: the platform logged problems during this run (numbers may be "
            "disturbed):\n  " + "\n  ".join(problems)
        )
    print(
        f"\n(run took {time.monotonic() - started:.0f} s; 1-min load average at the end {load:.2f})"
    )


if __name__ == "__main__":
    main()
