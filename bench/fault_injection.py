"""Fault injection against the whole platform on RabbitMQ and PostgreSQL, in one command.

    .venv/bin/python bench/fault_injection.py [--requests 600] [--concurrency 8]
                                              [--window 100] [--max-outage 10] [--keep]
                                              [--db postgres|sqlite]

``--db sqlite`` runs the same faults and checks with the services on SQLite files (the
platform's embedded default) instead of PostgreSQL databases.

See the README, "Benchmarks" for what is checked and the results.

Phase 1 (money under faults). Starts a fresh platform: five PostgreSQL databases of
its own, an ``EVENTS_NAMESPACE`` of its own on the local RabbitMQ, the five services as
separate processes (``python -m services.X``) and the gateway (``python -m gateway``),
with two mock providers for one model, one of them failing 30 % of its calls. It
creates users with API keys and balances, then sends N chat requests (mixed streaming
and non-streaming) paced over ``--window`` seconds while it

* restarts RabbitMQ (``rabbitmqctl stop_app``, a few seconds, ``start_app``),
* ``kill -9``s billing and starts it again,
* reloads the gateway's routes twice (unchanged, then with a changed timeout).

Phase 2 (resilience of the gateway).
* ``kill -9`` the orchestrator: the gateway's breaker for it opens after the configured
  failures, then answers 503 ``circuit_open`` at once (latency measured); the
  orchestrator is started again and after ``reset_after`` a probe closes the breaker.
* The Consul double is started as a process, a test upstream is registered in it, a
  second gateway discovers it through Consul; the double is killed and traffic keeps
  being served from the last known instances, ``GET /upstreams`` showing staleness.

Then it waits (bounded) for the outboxes and queues to drain and checks the money with
SQL against every service's database: no usage event lost, nobody charged twice,
balances equal top-ups minus charges, DLQs empty (or their messages are printed),
analytics agrees with billing; and that chat came back within ``--max-outage`` seconds
of billing listening again. It prints tables and exits 1 if any check fails.

Everything is dropped at the end (databases, queues, exchanges, temp files) unless
``--keep``; processes it started are stopped by PID. Load goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from harness import (
    PY,
    ROOT,
    free_port,
    machine_line,
    platform_routes,
    stop,
    table,
    wait_port,
)

sys.path.insert(0, str(ROOT))

import aio_pika
import aiohttp
import asyncpg

from gateway.consul import RETRY_MAX
from services.common.events import EventSettings, Topology
from services.common.events.broker import (
    delete_names,
    listed_names,
    namespace_names,
    queue_depths,
)

AMQP_URL = os.environ.get("FAULT_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
PG_URL = os.environ.get("FAULT_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
MASTER_KEY = "mk-fault-" + uuid.uuid4().hex
ADMIN = {"Authorization": f"Bearer {MASTER_KEY}"}
SERVICES = ("auth", "billing", "analytics", "proxy", "orchestrator")
MODEL = "fault-model"
RUN = f"{int(time.time())}_{uuid.uuid4().hex[:6]}"
NAMESPACE = f"fault-{RUN}"
DB_PREFIX = "aiagg_fault_"
# After the Consul double returns: the watcher's next try (at most RETRY_MAX away), one
# read, and this script's 0.5 s polling of /upstreams.
FRESH_WITHIN = RETRY_MAX + 2.5
#: environment variables of the caller that must not leak into the platform under test
_SCRUB = re.compile(
    r"^(CONSUL_HTTP_|AMQP_|EVENTS_|GATEWAY_|MASTER_KEY$|PROVIDERS_FILE$|SERVICE_|"
    r"(AUTH|BILLING|ANALYTICS|PROXY|ORCHESTRATOR)_)"
)

PROVIDERS = f"""
defaults:
  max_output_tokens: 64
  timeout: 10s
  cooldown: {{failures: 3, duration: 5s}}
providers:
  steady:
    kind: mock
    priority: 1
    weight: 1
    mock: {{latency: 300ms, chunk_delay: 20ms, seed: 1}}
    models:
      {MODEL}: {{input_price: "0.50", output_price: "1.50"}}
  flaky:                         # fails 30 % of its calls before the first byte
    kind: mock
    priority: 1
    weight: 1
    mock: {{latency: 300ms, chunk_delay: 20ms, failure_rate: 0.3, seed: 2}}
    models:
      {MODEL}: {{input_price: "1.234567", output_price: "2.345678"}}
"""

CONSUL_ROUTES = """
defaults:
  timeout: {{connect: 500ms, per_try: 5s, total: 10s}}
  breaker: {{failures: 5, reset_after: 10s}}
services:
  faultecho:
    discovery: consul
    instances: []
routes:
  - {{name: echo, match: {{prefix: /echo/}}, service: faultecho}}
"""


# -- output -------------------------------------------------------------------------------

T0 = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {text}", flush=True)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Check:
    name: str
    ok: bool | None  # None: informational
    detail: str

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "info"}[self.ok]


CHECKS: list[Check] = []


def check(name: str, ok: bool | None, detail: str) -> bool:
    CHECKS.append(Check(name, ok, detail))
    return bool(ok)


# -- processes ----------------------------------------------------------------------------


class Procs:
    """The processes this run started, by name; stopped by PID only."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: dict[str, subprocess.Popen] = {}
        self.envs: dict[str, tuple[list[str], dict[str, str], int | None]] = {}
        self.generation: Counter[str] = Counter()

    def launch(
        self, name: str, args: list[str], env: dict[str, str], port: int | None = None
    ) -> subprocess.Popen:
        self.generation[name] += 1
        log = (self.logdir / f"{name}.{self.generation[name]}.log").open("wb")
        base = {k: v for k, v in os.environ.items() if not _SCRUB.match(k)}
        proc = subprocess.Popen(
            args, cwd=ROOT, env={**base, **env}, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        self.procs[name] = proc
        self.envs[name] = (args, env, port)
        return proc

    async def ready(self, name: str, within: float = 30.0) -> None:
        _, _, port = self.envs[name]
        if port is None:
            return
        try:
            await asyncio.to_thread(wait_port, port, within)
        except RuntimeError:
            proc = self.procs[name]
            raise RuntimeError(
                f"{name} did not listen on {port} (exit code {proc.poll()}); see "
                f"{self.logdir}/{name}.{self.generation[name]}.log"
            ) from None

    async def restart(self, name: str) -> None:
        args, env, port = self.envs[name]
        self.launch(name, args, env, port)
        await self.ready(name)

    def kill9(self, name: str) -> None:
        proc = self.procs[name]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)

    def stop_all(self) -> None:
        stop(*[p for p in self.procs.values() if p.poll() is None])


# -- PostgreSQL and RabbitMQ ----------------------------------------------------------------


def is_sqlite(database: str) -> bool:
    """``--db sqlite`` names each service's database by its file path."""
    return database.endswith(".db")


def db_url(name: str) -> str:
    if is_sqlite(name):
        return f"sqlite:///{name}"
    base = PG_URL.rsplit("/", 1)[0]
    return f"{base}/{name}"


async def pg_admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _sqlite_fetch(path: str, sql: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
    # beside the running service, reading only (WAL: readers do not block its writes)
    conn = sqlite3.connect(path, timeout=10)
    try:
        conn.row_factory = sqlite3.Row
        # asyncpg's $1, $2 ... are SQLite's ?1, ?2 ...
        rows = conn.execute(re.sub(r"\$(\d+)", r"?\1", sql), args).fetchall()
        return [dict(r) for r in rows]
    finally:
        conn.close()


async def db_fetch(database: str, sql: str, *args: Any) -> list[Any]:
    """Rows of ``sql`` on a service's database (asyncpg records or dicts; read as r["col"])."""
    if is_sqlite(database):
        return await asyncio.to_thread(_sqlite_fetch, database, sql, args)
    conn = await asyncpg.connect(db_url(database))
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


def event_settings() -> EventSettings:
    return EventSettings(amqp_url=AMQP_URL, events_namespace=NAMESPACE)


async def peek_dlq(name: str, limit: int = 20) -> list[dict[str, Any]]:
    """The messages in a DLQ (headers and what the event was), left in place."""
    found: list[dict[str, Any]] = []
    connection = await aio_pika.connect(AMQP_URL, timeout=10)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, passive=True)
        held = []
        for _ in range(limit):
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            held.append(message)
            headers = {
                k: (v.decode() if isinstance(v, bytes) else v)
                for k, v in (message.headers or {}).items()
            }
            try:
                body = json.loads(message.body)
                what = f"{body.get('type')} {(body.get('data') or {}).get('request_id', '')}"
            except ValueError:
                what = message.body[:80].decode("utf-8", "replace")
            found.append(
                {
                    "event": what.strip(),
                    "x-death-reason": headers.get("x-death-reason"),
                    "x-error": str(headers.get("x-error"))[:160],
                    "x-attempt": headers.get("x-attempt"),
                }
            )
        for message in held:
            await message.nack(requeue=True)
    finally:
        await connection.close()
    return found


async def rabbitmqctl(*args: str) -> tuple[int, float, str]:
    t = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, time.monotonic() - t, out.decode(errors="replace")


# -- the platform ---------------------------------------------------------------------------


@dataclass
class Platform:
    tmp: Path
    procs: Procs
    ports: dict[str, int]
    dbs: dict[str, str]
    routes_file: Path
    routes_text: str
    http: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['gateway']}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.ports['admin']}"

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        base: str | None = None,
    ) -> tuple[int, Any]:
        assert self.http is not None
        async with self.http.request(
            method,
            (base or self.url) + path,
            json=body,
            headers=headers if headers is not None else ADMIN,
            timeout=aiohttp.ClientTimeout(total=30),
        ) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text)
            except ValueError:
                return resp.status, text


async def start_platform(tmp: Path, procs: Procs, db: str) -> Platform:
    ports = {name: free_port() for name in (*SERVICES, "gateway", "admin")}
    if db == "sqlite":
        dbs = {name: str(tmp / f"{name}.db") for name in SERVICES}  # made by the services
    else:
        dbs = {name: f"{DB_PREFIX}{RUN}_{name}" for name in SERVICES}
        for database in dbs.values():
            await pg_admin(f'CREATE DATABASE "{database}"')
    routes_text = platform_routes(ports)
    routes_file = tmp / "routes.yaml"
    routes_file.write_text(routes_text)
    providers_file = tmp / "providers.yaml"
    providers_file.write_text(PROVIDERS)
    common = {
        "AMQP_URL": AMQP_URL,
        "EVENTS_NAMESPACE": NAMESPACE,
        "MASTER_KEY": MASTER_KEY,
        "PROVIDERS_FILE": str(providers_file),
        "GATEWAY_ROUTES_FILE": str(routes_file),
        "LOG_LEVEL": "INFO",
    }
    for name in SERVICES:
        upper = name.upper()
        env = {
            **common,
            f"{upper}_PORT": str(ports[name]),
            f"{upper}_DATABASE_URL": db_url(dbs[name]),
        }
        procs.launch(name, [PY, "-m", f"services.{name}"], env, ports[name])
    procs.launch(
        "gateway",
        [PY, "-m", "gateway"],
        {
            "GATEWAY_ROUTES_FILE": str(routes_file),
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": str(ports["gateway"]),
            "GATEWAY_ADMIN_PORT": str(ports["admin"]),
            "GATEWAY_ACCESS_LOG": "false",
        },
        ports["gateway"],
    )
    await asyncio.gather(*(procs.ready(n, 60) for n in (*SERVICES, "gateway")))
    await asyncio.to_thread(wait_port, ports["admin"], 20)
    return Platform(tmp, procs, ports, dbs, routes_file, routes_text)


# -- users --------------------------------------------------------------------------------


@dataclass
class User:
    user_id: str
    key: str
    topped_up: int = 0  # micro-units the script credited (each idempotency key once)


def micro(text: str) -> int:
    return int(Decimal(text) * 1_000_000)


async def top_up(p: Platform, user: User, amount: str, key: str, tries: int = 1) -> None:
    """Credit ``amount`` under ``key``, sending it ``tries`` times (replays credit nothing)."""
    statuses = []
    for _ in range(tries):
        status, body = await p.call(
            "POST",
            "/billing/top-up",
            {"user_id": user.user_id, "amount": amount, "idempotency_key": key},
        )
        statuses.append(status)
        if status not in (200, 201):
            raise RuntimeError(f"top-up for {user.user_id}: {status} {body}")
    user.topped_up += micro(amount)


async def make_users(p: Platform, count: int) -> list[User]:
    users = []
    for i in range(count):
        user_id = f"fault-user-{i}-{uuid.uuid4().hex[:6]}"
        status, body = await p.call(
            "POST", "/auth/api-keys", {"user_id": user_id, "name": "fault injection"}
        )
        if status != 201:
            raise RuntimeError(f"cannot create a key: {status} {body}")
        user = User(user_id, body["key"])
        # two top-ups; the second is sent twice with its idempotency key (credited once)
        await top_up(p, user, "20.00", f"fault-{RUN}-{i}-a")
        await top_up(p, user, "5.123456", f"fault-{RUN}-{i}-b", tries=2)
        users.append(user)
    return users


# -- chat load ----------------------------------------------------------------------------


@dataclass
class Result:
    index: int
    user: str
    stream: bool
    usage_chunk: bool
    started: float
    ended: float = 0.0
    status: int = 0
    ok: bool = False
    request_id: str | None = None
    cost: str | None = None
    provider: str | None = None
    error: str | None = None

    @property
    def latency(self) -> float:
        return self.ended - self.started


async def chat(
    http: aiohttp.ClientSession, url: str, user: User, index: int, stream: bool, usage_chunk: bool
) -> Result:
    r = Result(index, user.user_id, stream, usage_chunk, time.monotonic())
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"fault injection request {index} {RUN}"}],
        "max_tokens": 48,
    }
    if stream:
        body["stream"] = True
        if usage_chunk:
            body["stream_options"] = {"include_usage": True}
    headers = {"Authorization": f"Bearer {user.key}"}
    try:
        async with http.post(
            f"{url}/v1/chat/completions",
            json=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=60),
        ) as resp:
            r.status = resp.status
            r.provider = resp.headers.get("X-Aiagg-Provider")
            if resp.status != 200:
                text = await resp.text()
                try:
                    err = json.loads(text).get("error") or {}
                    r.error = str(err.get("code") or err.get("type") or text[:80])
                except (ValueError, AttributeError):
                    r.error = text[:80]
                return r
            if not stream:
                data = await resp.json()
                r.request_id = data.get("id")
                r.cost = (data.get("usage") or {}).get("cost")
                content = data["choices"][0]["message"]["content"]
                r.ok = bool(r.request_id and content and r.cost is not None)
                if not r.ok:
                    r.error = "incomplete answer"
                return r
            done = False
            buffer = b""
            async for piece in resp.content.iter_any():
                buffer += piece
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    for line in event.split(b"\n"):
                        if not line.startswith(b"data:"):
                            continue
                        data_text = line[5:].strip()
                        if data_text == b"[DONE]":
                            done = True
                            continue
                        chunk = json.loads(data_text)
                        r.request_id = r.request_id or chunk.get("id")
                        if chunk.get("error"):
                            r.error = "stream error chunk"
                        if chunk.get("usage"):
                            r.cost = chunk["usage"].get("cost")
            r.ok = done and r.error is None and bool(r.request_id)
            if not r.ok and r.error is None:
                r.error = "stream without [DONE]"
            if r.ok and usage_chunk and r.cost is None:
                r.ok, r.error = False, "no usage chunk"
            return r
    except (TimeoutError, aiohttp.ClientError, ValueError, KeyError) as exc:
        r.error = f"{type(exc).__name__}: {exc}"[:120]
        return r
    finally:
        r.ended = time.monotonic()


@dataclass
class Fault:
    name: str
    started: float
    ended: float = 0.0
    detail: str = ""
    ok: bool = True
    wall: float = field(default_factory=time.time)  # wall-clock start, for SQL
    wall_ended: float = 0.0

    def end(self) -> None:
        self.ended, self.wall_ended = time.monotonic(), time.time()


async def run_load(
    p: Platform,
    users: list[User],
    total: int,
    concurrency: int,
    window: float,
    results: list[Result],
) -> None:
    """``total`` requests paced evenly over ``window`` seconds, at most ``concurrency``
    at a time; 60 % streamed (half of those asking for the usage chunk)."""
    assert p.http is not None
    rng = random.Random(RUN)
    sem = asyncio.Semaphore(concurrency)
    start = time.monotonic()
    interval = window / total

    async def one(i: int) -> None:
        async with sem:
            stream = rng.random() < 0.6
            results.append(
                await chat(
                    p.http,
                    p.url,
                    users[i % len(users)],
                    i,
                    stream,
                    usage_chunk=stream and i % 2 == 0,
                )
            )

    tasks = []
    for i in range(total):
        delay = start + i * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)


async def reload(p: Platform, label: str) -> Fault:
    f = Fault(label, time.monotonic())
    status, body = await p.call("POST", "/reload", base=p.admin)
    f.end()
    f.ok = status == 200 and isinstance(body, dict) and bool(body.get("reloaded"))
    f.detail = f"{status} reloaded={body.get('reloaded') if isinstance(body, dict) else body}"
    return f


async def inject_faults(
    p: Platform, window: float, faults: list[Fault], rabbit_down: list[bool]
) -> None:
    t0 = time.monotonic()

    async def at(fraction: float) -> None:
        delay = t0 + fraction * window - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    await at(0.07)
    f = await reload(p, "reload (same file)")
    faults.append(f)
    say(f"reload #1 (unchanged file): {f.detail}")

    await at(0.15)
    f = Fault("RabbitMQ restart", time.monotonic())
    rabbit_down[0] = True
    rc1, d1, out1 = await rabbitmqctl("stop_app")
    say(f"rabbitmqctl stop_app: rc={rc1} in {d1:.1f}s")
    await asyncio.sleep(4)
    rc2, d2, out2 = await rabbitmqctl("start_app")
    rabbit_down[0] = False
    f.end()
    f.ok = rc1 == 0 and rc2 == 0
    f.detail = f"stop_app {d1:.1f}s, down 4s, start_app {d2:.1f}s (rc {rc1}/{rc2})" + (
        "" if f.ok else f": {out1.strip()[-120:]} {out2.strip()[-120:]}"
    )
    faults.append(f)
    say(f"rabbitmqctl start_app: rc={rc2} in {d2:.1f}s")

    await at(0.30)
    f = Fault("kill -9 billing", time.monotonic())
    p.procs.kill9("billing")
    say("billing killed (SIGKILL)")
    await asyncio.sleep(1.0)
    await p.procs.restart("billing")
    f.end()
    f.detail = f"down {f.ended - f.started:.1f}s (1s dead + start until it listened)"
    faults.append(f)
    say(f"billing listening again after {f.ended - f.started:.1f}s")

    await at(0.92)
    changed = p.routes_text.replace(
        "timeout: {per_try: 300s, total: 300s}", "timeout: {per_try: 120s, total: 120s}"
    )
    if changed == p.routes_text:
        raise RuntimeError("routes.yaml changed shape: the chat timeout line is not there")
    p.routes_file.write_text(changed)
    f = await reload(p, "reload (chat timeout 300s -> 120s)")
    _, routes = await p.call("GET", "/routes", base=p.admin)
    chat_route = next((r for r in routes.get("routes", []) if r.get("name") == "chat"), {})
    seen = json.dumps(chat_route.get("timeout", chat_route))[:120]
    f.ok = f.ok and (chat_route.get("timeout") or {}).get("total") == 120
    f.detail += f"; GET /routes chat timeout: {seen}"
    faults.append(f)
    say(f"reload #2 (changed timeout): {f.detail}")


# -- phase 2a: breaker ----------------------------------------------------------------------


async def breaker_of(p: Platform, service: str) -> dict[str, Any]:
    _, body = await p.call("GET", "/breakers", base=p.admin)
    return next(b for b in body["breakers"] if b["service"] == service)


async def breaker_phase(p: Platform, user: User, results: list[Result]) -> list[list[str]]:
    """Kill the orchestrator; watch its gateway breaker open, answer fast, close again."""
    assert p.http is not None
    rows: list[list[str]] = []
    _, routes = await p.call("GET", "/routes", base=p.admin)
    # start from a closed breaker: phase 1's billing outage may have left it open
    t_wait = time.monotonic()
    snap = await breaker_of(p, "orchestrator")
    while snap["state"] != "closed" and time.monotonic() - t_wait < 90:
        await asyncio.sleep((snap.get("next_try_in") or 0.0) + 0.2)
        results.append(
            await chat(p.http, p.url, user, 200_000 + len(results), stream=False, usage_chunk=False)
        )
        snap = await breaker_of(p, "orchestrator")
    threshold = snap["failure_threshold"]
    rows.append(
        [
            f"before kill (waited {time.monotonic() - t_wait:.1f}s)",
            "",
            "",
            "",
            snap["state"],
            f"{snap['failures']}/{threshold}",
        ]
    )
    say(f"phase 2a: orchestrator breaker {snap['state']}, threshold {threshold}")
    if snap["state"] != "closed":
        check(
            "breaker opens after the configured failures",
            False,
            f"the orchestrator's breaker did not close within 90s before the test: {snap}",
        )
        return rows
    t_kill = time.monotonic()
    p.procs.kill9("orchestrator")
    say("orchestrator killed (SIGKILL)")

    before_open: list[Result] = []
    opened_after: int | None = None
    for i in range(20):
        r = await chat(p.http, p.url, user, 100_000 + i, stream=False, usage_chunk=False)
        results.append(r)
        snap = await breaker_of(p, "orchestrator")
        rows.append(
            [
                f"after kill #{i + 1}",
                str(r.status),
                r.error or "",
                ms(r.latency),
                snap["state"],
                f"{snap['failures']}/{threshold}",
            ]
        )
        before_open.append(r)
        if snap["state"] == "open":
            opened_after = i + 1
            break
    t_open = time.monotonic()
    attempts = next(r for r in routes["routes"] if r["name"] == "chat")["retry"]["attempts"]
    expected = -(-threshold // attempts)
    check(
        "breaker opens after the configured failures",
        opened_after == expected,
        f"open after {opened_after} request(s) to a dead orchestrator, expected "
        f"{expected} (threshold {threshold} failed attempts, {attempts} attempts per "
        f"request on connect errors); {t_open - t_kill:.2f}s after the kill; "
        f"before opening: {dict(Counter(f'{r.status} {r.error}' for r in before_open))}",
    )
    # fast answers while open
    fast: list[Result] = []
    for i in range(30):
        r = await chat(p.http, p.url, user, 100_100 + i, stream=i % 2 == 0, usage_chunk=False)
        results.append(r)
        fast.append(r)
    lat = [r.latency for r in fast]
    codes = Counter(f"{r.status} {r.error}" for r in fast)
    all_open = all(r.status == 503 and r.error == "circuit_open" for r in fast)
    rows.append(
        [
            "while open (30)",
            ",".join(sorted({str(r.status) for r in fast})),
            ", ".join(f"{k} x{v}" for k, v in codes.items()),
            f"p50 {ms(pct(lat, 0.5))} / max {ms(max(lat))}",
            "open",
            "",
        ]
    )
    check(
        "open breaker answers 503 circuit_open fast",
        all_open and max(lat) < 0.25,
        f"{len(fast)} requests: {dict(codes)}; latency p50 {ms(pct(lat, 0.5))} ms, "
        f"max {ms(max(lat))} ms (limit 250 ms)",
    )
    # recovery
    t_restart = time.monotonic()
    await p.procs.restart("orchestrator")
    t_restarted = time.monotonic()
    say(f"orchestrator restarted in {t_restarted - t_restart:.1f}s")
    snap = await breaker_of(p, "orchestrator")
    wait = snap.get("next_try_in") or 0.0
    say(f"waiting {wait:.1f}s for reset_after")
    await asyncio.sleep(wait + 0.2)
    probe = await chat(p.http, p.url, user, 100_200, stream=False, usage_chunk=False)
    results.append(probe)
    closed_after = time.monotonic() - t_open
    snap = await breaker_of(p, "orchestrator")
    rows.append(
        [
            "probe after reset_after",
            str(probe.status),
            probe.error or probe.provider or "",
            ms(probe.latency),
            snap["state"],
            f"{snap['failures']}/{threshold}",
        ]
    )
    after: list[Result] = []
    for i in range(10):
        r = await chat(p.http, p.url, user, 100_300 + i, stream=i % 2 == 1, usage_chunk=True)
        results.append(r)
        after.append(r)
    lat_after = [r.latency for r in after]
    rows.append(
        [
            "after close (10)",
            ",".join(sorted({str(r.status) for r in after})),
            f"{sum(r.ok for r in after)} ok",
            f"p50 {ms(pct(lat_after, 0.5))}",
            snap["state"],
            "",
        ]
    )
    check(
        "breaker closes after recovery",
        probe.ok and snap["state"] == "closed" and all(r.ok for r in after),
        f"probe {probe.status} {closed_after:.1f}s after opening (orchestrator back "
        f"{t_restarted - t_open:.1f}s after opening), "
        f"breaker {snap['state']}; {sum(r.ok for r in after)}/{len(after)} ok afterwards",
    )
    return rows


# -- phase 2b: Consul down ------------------------------------------------------------------


async def consul_phase(tmp: Path, procs: Procs, http: aiohttp.ClientSession) -> list[list[str]]:
    rows: list[list[str]] = []
    consul_port, echo_port, gw_port, admin_port = (free_port() for _ in range(4))
    procs.launch(
        "consul-double",
        [PY, "-m", "tests.consul_double", "--port", str(consul_port)],
        {},
        consul_port,
    )
    procs.launch(
        "echo-upstream", [PY, str(ROOT / "bench" / "upstream.py"), str(echo_port)], {}, echo_port
    )
    await procs.ready("consul-double")
    await procs.ready("echo-upstream")
    consul = f"http://127.0.0.1:{consul_port}"

    async def register() -> int:
        async with http.put(
            f"{consul}/v1/agent/service/register",
            json={
                "Name": "faultecho",
                "ID": "faultecho-1",
                "Address": "127.0.0.1",
                "Port": echo_port,
                "Tags": ["fault"],
                "Check": {"CheckID": "faultecho-ttl", "TTL": "600s", "Status": "passing"},
            },
        ) as resp:
            return resp.status

    status = await register()
    rows_file = tmp / "consul-routes.yaml"
    rows_file.write_text(CONSUL_ROUTES.format())
    procs.launch(
        "gateway-consul",
        [PY, "-m", "gateway"],
        {
            "GATEWAY_ROUTES_FILE": str(rows_file),
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": str(gw_port),
            "GATEWAY_ADMIN_PORT": str(admin_port),
            "GATEWAY_ACCESS_LOG": "false",
            "CONSUL_HTTP_ADDR": f"127.0.0.1:{consul_port}",
        },
        gw_port,
    )
    await procs.ready("gateway-consul")
    await asyncio.to_thread(wait_port, admin_port, 20)
    gw, admin = f"http://127.0.0.1:{gw_port}", f"http://127.0.0.1:{admin_port}"

    async def burst(n: int, seconds: float) -> tuple[Counter[int], list[float]]:
        codes: Counter[int] = Counter()
        lat: list[float] = []
        sem = asyncio.Semaphore(8)

        async def one(i: int) -> None:
            await asyncio.sleep(i * seconds / n)
            async with sem:
                t = time.monotonic()
                try:
                    async with http.get(
                        f"{gw}/echo/{i}", timeout=aiohttp.ClientTimeout(total=10)
                    ) as resp:
                        await resp.read()
                        codes[resp.status] += 1
                except (TimeoutError, aiohttp.ClientError):
                    codes[0] += 1
                lat.append(time.monotonic() - t)

        await asyncio.gather(*(one(i) for i in range(n)))
        return codes, lat

    async def upstreams() -> dict[str, Any]:
        async with http.get(f"{admin}/upstreams") as resp:
            body = await resp.json()
        return next(s for s in body["services"] if s["service"] == "faultecho")

    def row(label: str, codes: Counter[int], lat: list[float], up: dict[str, Any]) -> list[str]:
        return [
            label,
            str(sum(codes.values())),
            ", ".join(f"{k}: {v}" for k, v in sorted(codes.items())),
            f"{ms(pct(lat, 0.5))} / {ms(pct(lat, 0.99))}",
            f"{up.get('source')} {len(up.get('instances', []))} inst",
            f"{up.get('stale_seconds', 0):.1f}",
            str(up.get("error") or "")[:60],
        ]

    codes, lat = await burst(100, 3)
    up = await upstreams()
    rows.append(row(f"Consul up (register {status})", codes, lat, up))
    served_up = codes == Counter({200: 100})
    t_kill = time.monotonic()
    procs.kill9("consul-double")
    say("Consul double killed (SIGKILL)")
    down_codes: Counter[int] = Counter()
    stale_seen = 0.0
    error_seen = ""
    for label, n, secs in (("Consul down 0-4s", 100, 4), ("Consul down 4-12s", 200, 8)):
        codes, lat = await burst(n, secs)
        down_codes += codes
        up = await upstreams()
        stale_seen = max(stale_seen, float(up.get("stale_seconds") or 0))
        error_seen = error_seen or str(up.get("error") or "")
        rows.append(row(label, codes, lat, up))
    check(
        "gateway serves while Consul is down",
        served_up and down_codes == Counter({200: sum(down_codes.values())}),
        f"{sum(down_codes.values())} requests in {time.monotonic() - t_kill:.0f}s after the "
        f"kill: {dict(down_codes)}",
    )
    check(
        "/upstreams shows staleness while Consul is down",
        stale_seen > 0 and bool(error_seen),
        f"stale_seconds up to {stale_seen:.1f}, error: {error_seen[:90]!r}",
    )
    # Consul back (a fresh agent: the instance registers again) -> fresh again
    procs.launch(
        "consul-double",
        [PY, "-m", "tests.consul_double", "--port", str(consul_port)],
        {},
        consul_port,
    )
    await procs.ready("consul-double")
    await register()
    t_back = time.monotonic()
    fresh = False
    while time.monotonic() - t_back < 40:
        up = await upstreams()
        if not up.get("error") and (up.get("stale_seconds") or 0) == 0 and up.get("instances"):
            fresh = True
            break
        await asyncio.sleep(0.5)
    to_fresh = time.monotonic() - t_back
    codes, lat = await burst(50, 2)
    rows.append(row(f"Consul back ({to_fresh:.1f}s to fresh)", codes, lat, up))
    check(
        f"discovery fresh again within {FRESH_WITHIN:g}s of Consul's return",
        fresh and to_fresh <= FRESH_WITHIN and codes == Counter({200: 50}),
        f"fresh {fresh} after {to_fresh:.1f}s (the watchers retry at most "
        f"{RETRY_MAX:g}s apart); then {dict(codes)}",
    )
    return rows


# -- drain and verify -------------------------------------------------------------------


async def pending_outbox(p: Platform) -> dict[str, int]:
    out = {}
    for name in SERVICES:
        try:
            rows = await db_fetch(
                p.dbs[name], "SELECT count(*) AS n FROM event_outbox WHERE sent_at IS NULL"
            )
            out[name] = rows[0]["n"]
        except asyncpg.UndefinedTableError:
            out[name] = 0
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):
                raise
            out[name] = 0
    return out


async def drain(p: Platform, limit: float) -> tuple[bool, float, str]:
    """Wait until every outbox is sent, the main queues are empty and analytics has seen
    every usage event; bounded by ``limit`` seconds."""
    topo = Topology(NAMESPACE)
    main = [topo.queue("billing.usage"), topo.queue("analytics.events")]
    retry = [
        topo.retry_queue(q, d)
        for q in ("billing.usage", "analytics.events")
        for d in event_settings().retry_delays_in_use()
    ]
    t = time.monotonic()
    state = ""
    stable = 0
    while time.monotonic() - t < limit:
        pending = await pending_outbox(p)
        depths = await queue_depths(AMQP_URL, main + retry)
        usage = (await db_fetch(p.dbs["proxy"], "SELECT count(*) AS n FROM proxy_usage"))[0]["n"]
        charged = (
            await db_fetch(
                p.dbs["billing"], "SELECT count(*) AS n FROM billing_ledger WHERE kind = 'charge'"
            )
        )[0]["n"]
        seen = (await db_fetch(p.dbs["analytics"], "SELECT count(*) AS n FROM analytics_usage"))[0][
            "n"
        ]
        state = (
            f"outbox pending {sum(pending.values())}, queued "
            f"{sum(v or 0 for v in depths.values())}, usage {usage}, charges {charged}, "
            f"analytics usage {seen}"
        )
        if (
            not any(pending.values())
            and not any(depths.values())
            and usage == seen
            and charged >= usage
        ):
            stable += 1
            if stable >= 3:  # three quiet polls in a row: unacked work is done too
                return True, time.monotonic() - t, state
        else:
            stable = 0
        await asyncio.sleep(1.0)
    return False, time.monotonic() - t, state


def _during(database: str, f: Fault, *, zoned: bool) -> tuple[str, tuple[Any, Any]]:
    """``created_at`` within a fault's wall-clock span, and the query's parameters.

    PostgreSQL gets epoch seconds (``zoned``: a ``timestamptz`` column; otherwise UTC wall
    time); SQLite gets the text SQLAlchemy stores there (UTC, no zone)."""
    if is_sqlite(database):
        start, end = (
            datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
            for t in (f.wall, f.wall_ended)
        )
        return "created_at BETWEEN $1 AND $2", (start, end)
    if zoned:
        return "created_at BETWEEN to_timestamp($1) AND to_timestamp($2)", (f.wall, f.wall_ended)
    return (
        "created_at BETWEEN (to_timestamp($1) AT TIME ZONE 'UTC') AND "
        "(to_timestamp($2) AT TIME ZONE 'UTC')",
        (f.wall, f.wall_ended),
    )


async def exercised(p: Platform, faults: list[Fault]) -> None:
    """Show that the faults hit live traffic: what was written while each one lasted."""
    for f in faults:
        if f.name == "RabbitMQ restart":
            counts = {}
            for name in SERVICES:
                within, span = _during(p.dbs[name], f, zoned=True)
                rows = await db_fetch(
                    p.dbs[name],
                    "SELECT count(*) AS n, count(sent_at) AS sent FROM event_outbox"
                    f" WHERE {within}",
                    *span,
                )
                counts[name] = f"{rows[0]['sent']}/{rows[0]['n']}"
            check(
                "events recorded while RabbitMQ was down (sent since / recorded)",
                None,
                ", ".join(f"{k} {v}" for k, v in counts.items()),
            )
        if f.name == "kill -9 billing":
            proxy_db, billing_db = p.dbs["proxy"], p.dbs["billing"]
            within, span = _during(proxy_db, f, zoned=False)
            rows = await db_fetch(
                proxy_db, f"SELECT request_id FROM proxy_usage WHERE {within}", *span
            )
            ids = [r["request_id"] for r in rows]
            if is_sqlite(billing_db):
                among, arg = "request_id IN (SELECT value FROM json_each($1))", json.dumps(ids)
            else:
                among, arg = "request_id = ANY($1::text[])", ids
            charged = await db_fetch(
                billing_db,
                f"SELECT count(*) AS n FROM billing_ledger WHERE kind = 'charge' AND {among}",
                arg,
            )
            check(
                "usage metered while billing was dead (charged after its restart / metered)",
                None,
                f"{charged[0]['n']}/{len(ids)} (requests in flight at the kill)",
            )


async def verify(p: Platform, users: list[User], results: list[Result]) -> list[list[str]]:
    proxy_db, billing_db, analytics_db, orch_db = (
        p.dbs["proxy"],
        p.dbs["billing"],
        p.dbs["analytics"],
        p.dbs["orchestrator"],
    )
    ok_results = [r for r in results if r.ok]
    ok_ids = {r.request_id for r in ok_results}
    failed_ids = {r.request_id for r in results if not r.ok and r.request_id}

    usage_rows = {
        r["request_id"]: r
        for r in await db_fetch(
            proxy_db, "SELECT request_id, user_id, cost_micro, outcome FROM proxy_usage"
        )
    }
    outbox_usage: dict[str, list[Any]] = defaultdict(list)
    for r in await db_fetch(
        proxy_db,
        "SELECT event_id, payload, sent_at FROM event_outbox WHERE type = 'usage.recorded'",
    ):
        outbox_usage[json.loads(r["payload"])["data"]["request_id"]].append(r)
    ledger = await db_fetch(
        billing_db,
        "SELECT user_id, kind, amount_micro, balance_after_micro,"
        " request_id, charge_request_id, idempotency_key, seq"
        " FROM billing_ledger ORDER BY seq",
    )
    charges: dict[str, list[Any]] = defaultdict(list)
    for r in ledger:
        if r["kind"] == "charge":
            charges[r["request_id"]].append(r)
    accounts = {
        r["user_id"]: r
        for r in await db_fetch(
            billing_db, "SELECT user_id, balance_micro, held_micro FROM billing_accounts"
        )
    }
    holds = await db_fetch(
        billing_db, "SELECT request_id, user_id, amount_micro, status FROM billing_holds"
    )
    a_usage: dict[str, list[Any]] = defaultdict(list)
    for r in await db_fetch(
        analytics_db, "SELECT request_id, cost_micro, user_id FROM analytics_usage"
    ):
        a_usage[r["request_id"]].append(r)
    a_types = {
        r["type"]: r["n"]
        for r in await db_fetch(
            analytics_db, "SELECT type, count(*) AS n FROM analytics_events GROUP BY type"
        )
    }
    decisions = {
        r["request_id"]: r
        for r in await db_fetch(orch_db, "SELECT request_id, outcome, hold FROM chat_requests")
    }

    # 1. no usage event lost, for every successful answer
    lost = defaultdict(list)
    for rid in ok_ids:
        if rid not in usage_rows:
            lost["proxy usage row"].append(rid)
        sent = [e for e in outbox_usage.get(rid, []) if e["sent_at"] is not None]
        if len(outbox_usage.get(rid, [])) != 1 or len(sent) != 1:
            lost["usage.recorded in outbox (1, sent)"].append(rid)
        if len(charges.get(rid, [])) != 1:
            lost["one billing charge"].append(rid)
        if len(a_usage.get(rid, [])) != 1:
            lost["one analytics usage"].append(rid)
    check(
        "no usage event lost (every OK answer: 1 usage row, 1 usage.recorded sent, "
        "1 charge, 1 analytics row)",
        not lost,
        f"{len(ok_ids)} OK answers; "
        + (
            "all complete"
            if not lost
            else "; ".join(f"missing {k}: {len(v)} e.g. {v[:2]}" for k, v in lost.items())
        ),
    )

    # 2. none charged twice
    twice = {rid: len(v) for rid, v in charges.items() if len(v) > 1}
    dup_events = {rid: len(v) for rid, v in outbox_usage.items() if len(v) > 1}
    dup_analytics = {rid: len(v) for rid, v in a_usage.items() if len(v) > 1}
    check(
        "none charged twice (one charge, one usage.recorded per request_id)",
        not twice and not dup_events and not dup_analytics,
        f"{len(charges)} charged request ids; twice: {len(twice)} {list(twice)[:2]}; "
        f"usage events twice: {len(dup_events)}; analytics twice: {len(dup_analytics)}",
    )

    # 3. the reverse: nothing charged that was not metered or not served
    charged_not_metered = [rid for rid in charges if rid not in usage_rows]
    metered_not_charged = [rid for rid in usage_rows if rid not in charges]
    served = {"completed", "cut", "client_disconnected"}
    charged_not_served = [
        rid for rid in charges if (decisions.get(rid) or {}).get("outcome") not in served
    ]
    charged_failed_client = [rid for rid in charges if rid in failed_ids]
    check(
        "every charge is a metered, served request (and every metered one is charged)",
        not charged_not_metered and not metered_not_charged and not charged_not_served,
        f"charged not metered {len(charged_not_metered)}, metered not charged "
        f"{len(metered_not_charged)}, charged but the orchestrator says not served "
        f"{len(charged_not_served)} {charged_not_served[:2]}; charged although the "
        f"client saw an error: {len(charged_failed_client)}",
    )

    # 4. the client was told what it was charged
    mismatched = []
    for r in ok_results:
        if r.cost is None or len(charges.get(r.request_id, [])) != 1:
            continue
        charged = -charges[r.request_id][0]["amount_micro"]
        metered = usage_rows[r.request_id]["cost_micro"] if r.request_id in usage_rows else None
        if not (micro(r.cost) == charged == metered):
            mismatched.append((r.request_id, r.cost, charged, metered))
    told = sum(1 for r in ok_results if r.cost is not None)
    check(
        "cost shown to the client = proxy's metered cost = billing's charge",
        not mismatched,
        f"{told} answers carried a cost; mismatches: {len(mismatched)} {mismatched[:2]}",
    )

    # 5. balances
    bad_balance = []
    by_user: dict[str, dict[str, int]] = defaultdict(lambda: {"top": 0, "charge": 0})
    last_after: dict[str, int] = {}
    for r in ledger:
        key = "top" if r["kind"] == "top_up" else "charge"
        by_user[r["user_id"]][key] += r["amount_micro"]
        last_after[r["user_id"]] = r["balance_after_micro"]
    rows = []
    for user in users:
        acct = accounts.get(user.user_id)
        sums = by_user[user.user_id]
        expected = sums["top"] + sums["charge"]
        open_held = sum(
            h["amount_micro"]
            for h in holds
            if h["user_id"] == user.user_id and h["status"] == "open"
        )
        status, api = await p.call("GET", f"/billing/balance/{user.user_id}")
        api_balance = micro(api["balance"]) if status == 200 else None
        good = (
            acct is not None
            and acct["balance_micro"] == expected == last_after.get(user.user_id) == api_balance
            and sums["top"] == user.topped_up
            and acct["held_micro"] == open_held
        )
        if not good:
            bad_balance.append(user.user_id)
        n_charges = sum(1 for r in ledger if r["user_id"] == user.user_id and r["kind"] == "charge")
        rows.append(
            [
                user.user_id,
                f"{sums['top'] / 1e6:.6f}",
                f"{user.topped_up / 1e6:.6f}",
                f"{-sums['charge'] / 1e6:.6f}",
                str(n_charges),
                f"{acct['balance_micro'] / 1e6:.6f}" if acct else "-",
                f"{api_balance / 1e6:.6f}" if api_balance is not None else str(status),
                f"{acct['held_micro'] / 1e6:.6f}" if acct else "-",
                "ok" if good else "MISMATCH",
            ]
        )
    check(
        "every balance = top-ups - charges (ledger, account row, last balance_after, API; "
        "top-ups credited once; held = open holds)",
        not bad_balance,
        f"{len(users)} users; mismatched: {bad_balance}",
    )
    open_holds = [h for h in holds if h["status"] == "open"]
    check(
        "open holds left after the run",
        None,
        f"{len(open_holds)} open (holds the orchestrator could not release while billing "
        f"was down expire after BILLING_HOLD_TTL); statuses: "
        f"{dict(Counter(h['status'] for h in holds))}",
    )

    # 6. analytics agrees with billing
    total_charged = -sum(r["amount_micro"] for v in charges.values() for r in v)
    total_analytics = sum(r["cost_micro"] for v in a_usage.values() for r in v)
    total_metered = sum(r["cost_micro"] for r in usage_rows.values())
    per_request = [
        rid
        for rid, v in charges.items()
        if rid in a_usage and -v[0]["amount_micro"] != a_usage[rid][0]["cost_micro"]
    ]
    status, metrics = await p.call("GET", "/analytics/metrics")
    api_cost = micro(metrics["cost"]) if status == 200 else None
    api_requests = metrics.get("requests") if status == 200 else None
    tx_rows = len(ledger)
    decisions_n = len(decisions)
    check(
        "analytics totals agree with billing",
        total_charged == total_analytics == total_metered == api_cost
        and len(charges) == sum(len(v) for v in a_usage.values()) == api_requests
        and not per_request
        and a_types.get("transaction.created", 0) == tx_rows
        and a_types.get("route.decided", 0) == decisions_n,
        f"cost: billing {total_charged / 1e6:.6f}, analytics {total_analytics / 1e6:.6f} "
        f"(API {api_cost / 1e6 if api_cost is not None else None}), proxy "
        f"{total_metered / 1e6:.6f}; requests: billing {len(charges)}, analytics "
        f"{sum(len(v) for v in a_usage.values())} (API {api_requests}); per-request "
        f"mismatches {len(per_request)}; transaction.created "
        f"{a_types.get('transaction.created', 0)} = ledger rows {tx_rows}; "
        f"route.decided {a_types.get('route.decided', 0)} = "
        f"chat_requests {decisions_n}",
    )
    return rows


async def dlq_report() -> tuple[list[list[str]], list[list[str]]]:
    topo = Topology(NAMESPACE)
    names = [topo.dlq("billing.usage"), topo.dlq("analytics.events")]
    depths = await queue_depths(AMQP_URL, names)
    rows, messages = [], []
    for name in names:
        rows.append([name, str(depths[name])])
        if depths[name]:
            for m in await peek_dlq(name):
                messages.append(
                    [name, m["event"], str(m["x-death-reason"]), str(m["x-attempt"]), m["x-error"]]
                )
    check(
        "dead-letter queues empty",
        all(v == 0 for v in depths.values()),
        ", ".join(f"{k}: {v}" for k, v in depths.items())
        + ("" if not messages else f" ({len(messages)} message(s) printed below)"),
    )
    return rows, messages


# -- main ---------------------------------------------------------------------------------


def window_rows(
    results: list[Result], faults: list[Fault], load_start: float, load_end: float
) -> list[list[str]]:
    """Requests that overlapped each fault (reloads: +-1 s), with their outcomes."""
    rows = []

    def describe(rs: list[Result]) -> list[str]:
        codes = Counter(r.status for r in rs)
        errors = Counter(r.error for r in rs if not r.ok)
        lat = [r.latency for r in rs if r.ok]
        return [
            str(len(rs)),
            str(sum(r.ok for r in rs)),
            ", ".join(f"{k}: {v}" for k, v in sorted(codes.items())),
            ", ".join(f"{k} x{v}" for k, v in errors.most_common(3)) or "-",
            f"{ms(pct(lat, 0.5))} / {ms(pct(lat, 0.99))}" if lat else "-",
        ]

    load = [r for r in results if r.index < 100_000]
    for f in faults:
        lo, hi = f.started, f.ended
        if f.name.startswith("reload"):
            lo, hi = lo - 1.0, hi + 1.0
        hit = [r for r in load if r.started <= hi and r.ended >= lo]
        rows.append(
            [f.name, f"{f.started - load_start:.1f}-{f.ended - load_start:.1f}", *describe(hit)]
        )
    rows.append(["whole load", f"0.0-{load_end - load_start:.1f}", *describe(load)])
    return rows


def billing_outage(load: list[Result], faults: list[Fault]) -> tuple[float, float] | None:
    """[kill, end of the last failure of the run of failures that follows it]: the chat
    outage billing caused. It ends at 10 successes in a row, so a later error (a reload's,
    say) is not hidden in it."""
    kill = next((f for f in faults if f.name == "kill -9 billing"), None)
    if kill is None:
        return None
    end, streak = kill.ended, 0
    for r in sorted((r for r in load if r.ended >= kill.started), key=lambda r: r.started):
        if not r.ok:
            end, streak = max(end, r.ended), 0
        elif r.started > kill.ended:
            streak += 1
            if streak >= 10:
                break
    return kill.started, end


def phase1_checks(load: list[Result], faults: list[Fault], max_outage: float) -> None:
    outage = billing_outage(load, faults)

    def in_outage(r: Result) -> bool:
        return outage is not None and r.ended >= outage[0] and r.started <= outage[1]

    rabbit = next((f for f in faults if f.name == "RabbitMQ restart"), None)
    if rabbit:
        during = [r for r in load if r.started <= rabbit.ended and r.ended >= rabbit.started]
        check(
            "chat served while RabbitMQ is down (events wait in the outboxes)",
            all(r.ok for r in during),
            f"{sum(r.ok for r in during)}/{len(during)} OK",
        )
    for f in faults:
        if f.name.startswith("reload"):
            near = [r for r in load if r.started <= f.ended + 1 and r.ended >= f.started - 1]
            clear = [r for r in near if not in_outage(r)]
            check(
                f"no client error around {f.name}",
                bool(clear) and all(r.ok for r in clear),
                f"{sum(r.ok for r in clear)}/{len(clear)} OK within 1s of the reload"
                + (
                    f" ({len(near) - len(clear)} inside the billing outage not counted)"
                    if len(near) > len(clear)
                    else ""
                ),
            )
    kill = next((f for f in faults if f.name == "kill -9 billing"), None)
    if kill and outage:
        errs = [r for r in load if not r.ok and in_outage(r)]
        ok_inside = sum(1 for r in load if r.ok and in_outage(r))
        recovery = max(0.0, outage[1] - kill.ended)
        check(
            f"chat back within {max_outage:.0f}s of billing being back (--max-outage)",
            recovery <= max_outage,
            f"billing dead/starting {kill.ended - kill.started:.1f}s, but chat failed for "
            f"{outage[1] - outage[0]:.1f}s, {recovery:.1f}s after billing listened again "
            f"({len(errs)} failed, {ok_inside} OK in between: "
            f"{dict(Counter(f'{r.status} {r.error}' for r in errs))}); see the timeline and "
            "the breaker transitions",
        )
    other = [r for r in load if not r.ok and not in_outage(r)]
    check(
        "no client errors outside the billing outage",
        not other,
        f"{len(other)} failed: {dict(Counter(f'{r.status} {r.error}' for r in other))}",
    )


def timeline_rows(
    load: list[Result], faults: list[Fault], load_start: float, load_end: float, step: float = 5.0
) -> list[list[str]]:
    rows = []
    t = 0.0
    while load_start + t < load_end:
        lo, hi = load_start + t, load_start + t + step
        rs = [r for r in load if lo <= r.started < hi]
        marks = [f.name for f in faults if f.started < hi and f.ended >= lo]
        errors = Counter(r.error for r in rs if not r.ok)
        t += step
        if not rs and not marks:
            continue
        rows.append(
            [
                f"{t - step:5.0f}-{t:.0f}",
                str(len(rs)),
                str(sum(r.ok for r in rs)),
                ", ".join(f"{k} x{v}" for k, v in errors.most_common()) or "-",
                "; ".join(marks),
            ]
        )
    return rows


async def breaker_evidence(p: Platform) -> list[list[str]]:
    """Who opened which breaker in phase 1: the gateway's metrics, the orchestrator's log
    (its own breakers for billing and the proxy have no metrics, only log lines)."""
    rows = []
    assert p.http is not None
    async with p.http.get(f"{p.admin}/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith("aiagg_gateway_breaker_transitions_total{"):
            labels, value = line.rsplit(" ", 1)
            rows.append(
                ["gateway /metrics", labels.split("{", 1)[1].rstrip("}"), str(int(float(value)))]
            )
    log = p.tmp / f"orchestrator.{p.procs.generation['orchestrator']}.log"
    if log.exists():
        lines = [
            ln
            for ln in log.read_text(errors="replace").splitlines()
            if "billing unavailable for" in ln
        ]
        # the orchestrator logs this once per reason every 5 s, "(and N more like this ...)"
        by_reason: Counter[bool] = Counter()
        for ln in lines:
            more = re.search(r"\(and (\d+) more like this", ln)
            by_reason["circuit breaker for service 'billing' is open" in ln] += 1 + (
                int(more.group(1)) if more else 0
            )
        times = [ln[11:23] for ln in lines]
        rows.append(
            [
                "orchestrator log",
                "billing unavailable: its billing breaker open",
                f"{by_reason[True]} ({times[0] if times else ''} .. "
                f"{times[-1] if times else ''}, log times)",
            ]
        )
        rows.append(
            ["orchestrator log", "billing unavailable: connect error", str(by_reason[False])]
        )
    return rows


async def amain(args: argparse.Namespace) -> int:
    print(f"# fault injection · {machine_line()}")
    print(
        f"namespace {NAMESPACE} · "
        + (f"databases {DB_PREFIX}{RUN}_*" if args.db == "postgres" else "SQLite files")
        + f" · {args.requests} chat requests "
        f"over {args.window:.0f}s, concurrency {args.concurrency}"
    )
    tmp = Path(tempfile.mkdtemp(prefix="aiagg-fault-"))
    procs = Procs(tmp)
    p: Platform | None = None
    rabbit_down = [False]
    created_dbs: list[str] = []
    results: list[Result] = []
    faults: list[Fault] = []
    timings: list[list[str]] = []
    try:
        t = time.monotonic()
        p = await start_platform(tmp, procs, args.db)
        created_dbs = list(p.dbs.values()) if args.db == "postgres" else []
        p.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
        users = await make_users(p, args.users)
        timings.append(["start platform + users", f"{time.monotonic() - t:.1f}"])
        say(
            f"platform up (gateway :{p.ports['gateway']}, admin :{p.ports['admin']}), "
            f"{len(users)} users with keys and balances"
        )

        # phase 1
        t = time.monotonic()
        load_start = t
        await asyncio.gather(
            run_load(p, users, args.requests, args.concurrency, args.window, results),
            inject_faults(p, args.window, faults, rabbit_down),
        )
        load_end = time.monotonic()
        timings.append(["phase 1: load + faults", f"{load_end - t:.1f}"])
        say(f"phase 1 done: {sum(r.ok for r in results)}/{len(results)} OK")
        for f in faults:
            check(f"fault applied: {f.name}", f.ok, f.detail)
        load = [r for r in results if r.index < 100_000]
        phase1_checks(load, faults, args.max_outage)
        timeline = timeline_rows(load, faults, load_start, load_end)
        evidence = await breaker_evidence(p)
        flaky = Counter(r.provider for r in load if r.ok)
        check(
            "both providers served (the flaky one fails 30 %; fallback hides it)",
            None,
            f"served by {dict(flaky)}",
        )

        # phase 2a
        t = time.monotonic()
        breaker_rows = await breaker_phase(p, users[0], results)
        timings.append(["phase 2a: orchestrator killed, breaker", f"{time.monotonic() - t:.1f}"])

        # phase 2b
        t = time.monotonic()
        consul_rows = await consul_phase(tmp, procs, p.http)
        timings.append(["phase 2b: Consul double killed", f"{time.monotonic() - t:.1f}"])

        # drain and verify
        t = time.monotonic()
        drained, took, state = await drain(p, args.drain)
        check("outboxes and queues drained", drained, f"after {took:.1f}s: {state}")
        timings.append(["drain", f"{time.monotonic() - t:.1f}"])
        t = time.monotonic()
        await exercised(p, faults)
        balance_rows = await verify(p, users, results)
        dlq_rows, dlq_messages = await dlq_report()
        timings.append(["verify", f"{time.monotonic() - t:.1f}"])

        print()
        print("## Faults during the load (requests overlapping each fault; reloads +-1 s)")
        print(
            table(
                ["fault", "t (s)", "requests", "OK", "statuses", "errors", "OK p50 / p99 ms"],
                window_rows(results, faults, load_start, load_end),
            )
        )
        print()
        print("## Phase 1 timeline (by request start)")
        print(table(["t (s)", "requests", "OK", "errors", "faults"], timeline))
        print()
        print("## Breakers that opened in phase 1")
        print(table(["source", "what", "count"], evidence))
        print()
        print("## Breaker: orchestrator killed (gateway GET /breakers)")
        print(
            table(["step", "status", "answer", "latency ms", "breaker", "failures"], breaker_rows)
        )
        print()
        print("## Consul double killed: second gateway, discovery: consul")
        print(
            table(
                [
                    "window",
                    "requests",
                    "statuses",
                    "p50 / p99 ms",
                    "/upstreams",
                    "stale s",
                    "error",
                ],
                consul_rows,
            )
        )
        print()
        print("## Balances (micro-units as USD)")
        print(
            table(
                [
                    "user",
                    "top-ups (ledger)",
                    "top-ups (sent)",
                    "charges",
                    "n",
                    "balance",
                    "API balance",
                    "held",
                    "",
                ],
                balance_rows,
            )
        )
        print()
        print("## Dead-letter queues")
        print(table(["queue", "depth"], dlq_rows))
        if dlq_messages:
            print(table(["queue", "event", "x-death-reason", "x-attempt", "x-error"], dlq_messages))
    except Exception as exc:
        check("run completed", False, f"{type(exc).__name__}: {exc}")
        import traceback

        traceback.print_exc()
    finally:
        t = time.monotonic()
        if rabbit_down[0]:
            await rabbitmqctl("start_app")
        if p is not None and p.http is not None:
            await p.http.close()
        procs.stop_all()
        failed = any(c.ok is False for c in CHECKS)
        if not args.keep:
            for database in created_dbs:
                with contextlib.suppress(Exception):
                    await pg_admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            with contextlib.suppress(Exception):
                names = namespace_names(event_settings()) | await asyncio.to_thread(
                    listed_names, lambda name: name.startswith(NAMESPACE)
                )
                await delete_names(AMQP_URL, names)
        timings.append(["clean-up", f"{time.monotonic() - t:.1f}"])
        timings.append(["total", f"{time.monotonic() - T0:.1f}"])
        print()
        print("## Timings")
        print(table(["step", "seconds"], timings))
        print()
        print("## Verdict")
        print(
            table(["check", "verdict", "detail"], [[c.name, c.verdict, c.detail] for c in CHECKS])
        )
        if args.keep or failed:
            print(
                f"\nlogs: {tmp}"
                + (f"; databases and namespace {NAMESPACE} kept" if args.keep else "")
            )
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        print(
            f"\n{'FAIL' if failed else 'PASS'}: "
            f"{sum(c.ok is True for c in CHECKS)} passed, "
            f"{sum(c.ok is False for c in CHECKS)} failed"
        )
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=600, help="chat requests in phase 1")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--window",
        type=float,
        default=100.0,
        help="seconds over which phase 1's requests are spread",
    )
    parser.add_argument("--users", type=int, default=5)
    parser.add_argument(
        "--drain", type=float, default=90.0, help="longest wait for outboxes and queues to drain"
    )
    parser.add_argument(
        "--max-outage",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="longest chat outage accepted after billing listens again (default 10)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the databases, queues and logs for inspection"
    )
    parser.add_argument(
        "--db",
        choices=("postgres", "sqlite"),
        default="postgres",
        help="the services' databases: PostgreSQL (default) or SQLite files in the run's "
        "temp directory",
    )
    args = parser.parse_args()
    sys.exit(asyncio.run(amain(args)))


if __name__ == "__main__":
    main()
