"""Billing's charging rate against the chat path's serving rate, and billing alone.

    .venv/bin/python bench/charging_rate.py [--requests 2000] [--connections 10,50]
                                            [--events 2000] [--latency 20ms] [--db sqlite]

Part 1, **chat load**: the whole platform (as in ``bench/chat_vs_litellm.py``: gateway +
five services as separate processes, RabbitMQ in a namespace of this run, the proxy's
upstream being ``bench/openai_mock.py``) serves ``--requests`` non-streamed chat
completions as fast as it can (wrk, stopped after that many answers), once for each
``--connections`` value. Every second the script samples:

* **served**: rows in the proxy's ``proxy_usage`` (= ``usage.recorded`` events made);
* **charged**: ``charge`` rows in billing's ledger;
* **lag** = served - charged: usage recorded but not charged yet (in the proxy's
  outbox, in RabbitMQ, or in billing's hands);
* **queue**: messages ready in ``<namespace>.billing.usage`` (passive declare).

After the load it keeps sampling until the lag and the queue are back to 0 (or 60 s).

Part 2, **billing alone**: ``--events`` holds are made through billing's internal
reservation API (as the orchestrator does), billing is paused (SIGSTOP, its own pid)
while that many ``usage.recorded`` events for those holds are published to the
exchange (the project's RabbitBus, confirmed), then resumed (SIGCONT): the time until
the last one is charged gives billing's drain rate from a full queue. Analytics is
paused as well during that window, so billing has the machine to itself; it catches
up afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_vs_litellm import (
    AMQP_URL,
    LUA,
    PY,
    Platform,
    broker_pid,
    chat_body,
    cpu_of,
    spawn,
    wait_ready,
)
from harness import free_port, machine_line, parse_wrk, stop, table

#: sends exactly {limit} requests, then leaves every connection idle (in-flight ones finish)
COUNT_LUA = (
    LUA
    + """
-- wrk 4 calls request() once on the first thread's state to check the script
local sent = -1
local body = wrk.body
request = function()
  sent = sent + 1
  return wrk.format(nil, nil, nil, body)
end
delay = function()
  if sent >= {limit} then return 1000000000 end
  return 0
end
"""
)


class Counts:
    """Usage rows (proxy) and charges (billing), read straight from their databases."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.pg: dict[str, object] = {}

    async def open(self) -> None:
        if self.platform.db == "postgres":
            import asyncpg

            for name in ("proxy", "billing"):
                self.pg[name] = await asyncpg.connect(self.platform.db_urls[name])

    async def close(self) -> None:
        for conn in self.pg.values():
            with contextlib.suppress(Exception):
                await conn.close()

    async def _one(self, service: str, sql: str) -> int:
        if self.pg:
            return int(await self.pg[service].fetchval(sql))
        path = self.platform.db_urls[service].removeprefix("sqlite:///")
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
            return int(db.execute(sql).fetchone()[0])

    async def served(self) -> int:
        return await self._one("proxy", "SELECT count(*) FROM proxy_usage")

    async def charged(self) -> int:
        return await self._one(
            "billing", "SELECT count(*) FROM billing_ledger WHERE kind = 'charge'"
        )


class Depth:
    """Messages ready in a queue (passive declare); reconnects if the broker went away."""

    def __init__(self) -> None:
        self.connection = None

    async def __call__(self, name: str) -> int | None:
        import aio_pika

        try:
            if self.connection is None or self.connection.is_closed:
                self.connection = await aio_pika.connect(AMQP_URL, timeout=5)
            channel = await self.connection.channel()
        except Exception:
            self.connection = None
            return None
        try:
            q = await channel.declare_queue(name, passive=True)
            return q.declaration_result.message_count
        except Exception:
            return None
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    async def close(self) -> None:
        if self.connection is not None:
            with contextlib.suppress(Exception):
                await self.connection.close()


@dataclass
class Sample:
    t: float
    served: int
    charged: int
    queue: int | None
    loading: bool

    @property
    def lag(self) -> int:
        return self.served - self.charged


async def chat_load(
    platform: Platform, requests: int, connections: int, max_seconds: int
) -> tuple[list[Sample], dict]:
    counts = Counts(platform)
    await counts.open()
    queue = platform.queue_names()[0]
    depth = Depth()
    base_served, base_charged = await counts.served(), await counts.charged()
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(
            COUNT_LUA.replace("{limit}", str(requests)).format(
                body=json.dumps(chat_body(False).decode()), key=platform.key
            )
        )
        script = f.name
    samples: list[Sample] = []
    pids = platform.pids
    cpu0 = {name: cpu_of([proc.pid]) for name, proc in platform.procs.items()}
    t0 = time.monotonic()

    async def sample(loading: bool) -> Sample:
        s = Sample(
            time.monotonic() - t0,
            await counts.served() - base_served,
            await counts.charged() - base_charged,
            await depth(queue),
            loading,
        )
        samples.append(s)
        return s

    wrk = None
    try:
        wrk = await asyncio.create_subprocess_exec(
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max_seconds}s",
            "--timeout=30s",
            "--latency",
            "-s",
            script,
            f"{platform.url}/v1/chat/completions",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out_task = asyncio.create_task(wrk.communicate())
        await sample(True)
        last = 0.0
        while not out_task.done():
            await asyncio.wait({out_task}, timeout=0.2)
            now = time.monotonic() - t0
            if out_task.done():
                break
            if now - last >= 1.0:
                s = await sample(True)
                last = now
            else:
                s = Sample(now, await counts.served() - base_served, 0, None, True)
            stalled = (
                len(samples) > 2 and s.served == samples[-2].served and (s.t - samples[-2].t >= 1.5)
            )
            if s.served >= requests or (s.served >= requests - connections and stalled):
                if samples[-1] is not s:
                    await sample(True)
                wrk.send_signal(signal.SIGINT)  # wrk stops and prints its statistics
                break
        out = (await out_task)[0].decode()
        load_end = samples[-1].t
        samples[-1].loading = False
        cpu_load = {name: cpu_of([proc.pid]) - cpu0[name] for name, proc in platform.procs.items()}
        drained_at = None
        while time.monotonic() - t0 < load_end + 60:
            await asyncio.sleep(0.25 if samples[-1].lag < 50 else 1.0)
            s = await sample(False)
            if s.lag <= 0 and (s.queue or 0) == 0:
                drained_at = s.t
                break
        cpu_all = {name: cpu_of([proc.pid]) - cpu0[name] for name, proc in platform.procs.items()}
    finally:
        if wrk is not None and wrk.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                wrk.kill()
            await wrk.wait()
        os.unlink(script)
        await depth.close()
        await counts.close()
    result = parse_wrk(out)
    info = {
        "wrk_requests": result.requests,
        "errors": result.errors,
        "load_seconds": load_end,
        "p50": result.p50_ms,
        "p99": result.p99_ms,
        "drained_at": drained_at,
        "cpu_load": cpu_load,
        "cpu_all": cpu_all,
        "pids": pids,
    }
    return samples, info


# -- billing alone ------------------------------------------------------------------------


def usage_event(request_id: str, user_id: str):
    from services.common import events

    return events.Event.new(
        events.USAGE_RECORDED,
        "proxy",
        {
            "request_id": request_id,
            "user_id": user_id,
            "key_id": None,
            "provider": "bench-mock",
            "model": "bench-gpt",
            "upstream_model": "bench-gpt",
            "prompt_tokens": 21,
            "completion_tokens": 12,
            "total_tokens": 33,
            "cost": "0.000029",
            "currency": "USD",
            "input_price": "0.50",
            "output_price": "1.50",
            "estimated": False,
            "stream": False,
            "attempt": 1,
            "outcome": "completed",
            "charge_rule": "reported",
            "error": None,
        },
    )


async def billing_alone(platform: Platform, count: int) -> dict:
    from services.common.events import EventSettings, RabbitBus

    billing = platform.procs["billing"]
    analytics = platform.procs["analytics"]
    url = f"http://127.0.0.1:{platform.ports['billing']}/internal/billing/reservations"
    admin = {"Authorization": f"Bearer {platform.master}"}
    user = platform.user_id
    ids = [f"chatcmpl-bench{uuid.uuid4().hex}" for _ in range(count)]
    t0 = time.monotonic()
    sem = asyncio.Semaphore(16)
    async with aiohttp.ClientSession() as http:

        async def hold(request_id: str) -> None:
            async with (
                sem,
                http.post(
                    url,
                    headers=admin,
                    json={"request_id": request_id, "user_id": user, "amount": "0.006200"},
                ) as r,
            ):
                if r.status != 201:
                    raise RuntimeError(f"reservation failed: {r.status} {await r.text()}")

        await asyncio.gather(*(hold(i) for i in ids))
    holds_s = time.monotonic() - t0

    counts = Counts(platform)
    await counts.open()
    before = await counts.charged()
    settings = EventSettings(amqp_url=AMQP_URL, events_namespace=platform.namespace)
    bus = RabbitBus(AMQP_URL, settings, connection_name="bench-publisher")
    await bus.start()
    os.kill(billing.pid, signal.SIGSTOP)
    os.kill(analytics.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        events = [usage_event(i, user) for i in ids]
        for start in range(0, count, 200):
            await asyncio.gather(*(bus.publish(e) for e in events[start : start + 200]))
        publish_s = time.monotonic() - t0
        await bus.close()
        depth = Depth()
        queued = await depth(platform.queue_names()[0])
        await depth.close()
        cpu0 = cpu_of([billing.pid])
    finally:
        os.kill(billing.pid, signal.SIGCONT)
    t0 = time.monotonic()
    timeline = []
    try:
        while True:
            done = await counts.charged() - before
            now = time.monotonic() - t0
            if not timeline or now - timeline[-1][0] >= 1.0 or done >= count:
                timeline.append((now, done))
            if done >= count or now > 120:
                break
            await asyncio.sleep(0.05)
        drain_s = time.monotonic() - t0
        cpu = cpu_of([billing.pid]) - cpu0
    finally:
        os.kill(analytics.pid, signal.SIGCONT)
        await counts.close()
    return {
        "count": count,
        "charged": done,
        "holds_s": holds_s,
        "publish_s": publish_s,
        "queued": queued,
        "drain_s": drain_s,
        "cpu_per_charge_ms": cpu / max(done, 1) * 1e3,
        "timeline": timeline,
    }


def report_load(connections: int, samples: list[Sample], info: dict, broker_cpu) -> str:
    """The per-second table and the summary of one chat load."""
    load_s = info["load_seconds"]
    at_end = max((s for s in samples if s.t <= load_s + 1e-6), key=lambda s: s.t)
    final = samples[-1]
    served_rate = at_end.served / load_s
    out = [f"\n## chat load, {connections} connections: per-second samples during and after"]
    rows = []
    prev = Sample(0, 0, 0, 0, True)
    for s in samples:
        dt = s.t - prev.t or 1.0
        if s is samples[0] or s.t - prev.t >= 0.9 or s is final:
            rows.append(
                [
                    f"{s.t:5.1f}",
                    "load" if s.loading else "after",
                    str(s.served),
                    f"{(s.served - prev.served) / dt:,.0f}",
                    str(s.charged),
                    f"{(s.charged - prev.charged) / dt:,.0f}",
                    str(s.lag),
                    "-" if s.queue is None else str(s.queue),
                ]
            )
            prev = s
    out.append(
        table(
            [
                "t (s)",
                "phase",
                "served",
                "served/s",
                "charged",
                "charged/s",
                "lag (served-charged)",
                "billing.usage ready",
            ],
            rows,
        )
    )
    n = max(info["wrk_requests"], 1)
    cpu = ", ".join(
        f"{k} {v / n * 1e3:.2f}" for k, v in sorted(info["cpu_all"].items(), key=lambda kv: -kv[1])
    )
    summary = [
        [
            "requests answered (wrk)",
            f"{info['wrk_requests']:,} in {load_s:.1f} s, {info['errors']} non-2xx",
        ],
        ["served req/s", f"{served_rate:,.0f}"],
        ["latency p50 / p99", f"{info['p50']:.0f} ms / {info['p99']:.0f} ms"],
        ["charged during the load", f"{at_end.charged:,} ({at_end.charged / load_s:,.0f}/s)"],
        ["charged in all", f"{final.charged:,} of {final.served:,} usage events"],
        ["max lag (served - charged)", f"{max(s.lag for s in samples):,}"],
        ["max billing.usage ready", f"{max((s.queue or 0) for s in samples):,}"],
        ["lag / queue when the load stopped", f"{at_end.lag:,} / {at_end.queue}"],
        [
            "back to 0 after the load",
            "NOT within 60 s"
            if info["drained_at"] is None
            else f"{info['drained_at'] - load_s:.1f} s",
        ],
        ["CPU ms per request (load + drain; services and gateway)", cpu],
    ]
    if broker_cpu is not None:
        summary.append(
            ["RabbitMQ broker CPU per request", f"{broker_cpu / n * 1e3:.2f} ms (shared)"]
        )
    out.append(f"\n## chat load, {connections} connections: summary")
    out.append(table(["", ""], summary))
    verdict = (
        "the backlog does NOT return to 0 within 60 s"
        if info["drained_at"] is None
        else f"back to 0 {info['drained_at'] - load_s:.1f} s after the load"
    )
    info["verdict"] = (
        f"c={connections}: served {served_rate:,.0f} req/s, charged "
        f"{at_end.charged / load_s:,.0f}/s during the load, lag {at_end.lag} when it stopped "
        f"(max {max(s.lag for s in samples)}), {verdict}"
    )
    info["served_rate"] = served_rate
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--connections", default="10,50", help="one chat load per value")
    ap.add_argument("--max-seconds", type=int, default=90, help="cap on each chat load")
    ap.add_argument("--events", type=int, default=2000, help="usage events for billing alone")
    ap.add_argument("--latency", default="20ms")
    ap.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    ap.add_argument("--log-level", default="WARNING")
    args = ap.parse_args()
    levels = [int(c) for c in args.connections.split(",")]

    mock_port = free_port()
    mock = spawn(
        [PY, "bench/openai_mock.py", str(mock_port), "--latency", args.latency], dict(os.environ)
    )
    wait_ready(mock, mock_port, "openai_mock")
    platform = Platform(f"http://127.0.0.1:{mock_port}", db=args.db, log_level=args.log_level)
    started = time.monotonic()
    broker = broker_pid()
    loads = []
    try:
        platform.start()
        # warm up (connections, caches), then let its events settle
        asyncio.run(_warm(platform))
        platform.drain()
        for c in levels:
            b0 = cpu_of([broker]) if broker else 0.0
            samples, info = asyncio.run(chat_load(platform, args.requests, c, args.max_seconds))
            broker_cpu = (cpu_of([broker]) - b0) if broker else None
            loads.append((c, samples, info, broker_cpu))
            platform.drain()
        alone = asyncio.run(billing_alone(platform, args.events)) if args.events else None
        platform.drain()
    finally:
        problems = platform.log_problems()
        platform.stop()
        stop(mock)

    print(f"# billing's charging rate vs the chat path — {machine_line()}")
    print(
        f"# platform: gateway + 5 services as processes, RabbitMQ, {args.db}; upstream "
        f"openai_mock {args.latency}; load: wrk -t1, {args.requests} non-streamed chat "
        f"completions per load, at {', '.join(map(str, levels))} connections"
    )
    for c, samples, info, broker_cpu in loads:
        print(report_load(c, samples, info, broker_cpu))
    if alone:
        rate = alone["charged"] / alone["drain_s"] if alone["drain_s"] else 0
        print("\n## billing alone (analytics paused too)")
        print(
            table(
                ["", ""],
                [
                    [
                        "holds made (internal reservation API, 16 at a time)",
                        f"{alone['count']:,} in {alone['holds_s']:.1f} s "
                        f"({alone['count'] / alone['holds_s']:,.0f}/s)",
                    ],
                    [
                        "usage.recorded published while billing was paused",
                        f"{alone['count']:,} in {alone['publish_s']:.1f} s "
                        f"({alone['queued']} ready in the queue)",
                    ],
                    [
                        "drained after resume",
                        f"{alone['charged']:,} charged in {alone['drain_s']:.1f} s "
                        f"= {rate:,.0f} charges/s",
                    ],
                    ["billing CPU per charge", f"{alone['cpu_per_charge_ms']:.2f} ms"],
                ],
            )
        )
        tl = ", ".join(f"{t:.0f}s:{n}" for t, n in alone["timeline"])
        print(f"drain timeline (seconds after resume: charged): {tl}")
    print("\nverdict:")
    for _c, _samples, info, _ in loads:
        print("  " + info["verdict"])
    if alone:
        best = max(info["served_rate"] for _c, _s, info, _b in loads)
        print(
            f"  billing alone drains {rate:,.0f} charges/s = {rate / best:.1f}x the chat "
            f"path's best serving rate ({best:,.0f} req/s)"
        )
    unreachable = sum(1 for _c, samples, _i, _b in loads for s in samples if s.queue is None)
    if unreachable:
        problems.insert(0, f"RabbitMQ did not answer {unreachable} queue-depth sample(s)")
    if problems:
        print(
            "\nWARNING: problems during this run (numbers may be disturbed):\n  "
            + "\n  ".join(problems)
        )
    print(f"(run took {time.monotonic() - started:.0f} s)")


async def _warm(platform: Platform) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(20):
            async with http.post(
                f"{platform.url}/v1/chat/completions",
                data=chat_body(False),
                headers={
                    "Authorization": f"Bearer {platform.key}",
                    "Content-Type": "application/json",
                },
            ) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"warm-up request failed: {r.status}")


if __name__ == "__main__":
    main()
