"""``make run``'s launcher as a user meets it: start, chat through it, Ctrl-C, start again."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp
import openai

from tests.support import free_port

ROOT = Path(__file__).resolve().parents[1]
SERVICES = {"auth": 3001, "orchestrator": 3002, "proxy": 3003, "billing": 3004, "analytics": 3005}


def environment(tmp_path: Path) -> dict[str, str]:
    ports = {name: free_port() for name in SERVICES}
    routes = (ROOT / "routes.yaml").read_text()
    for name, default in SERVICES.items():
        routes = routes.replace(f"127.0.0.1:{default}]", f"127.0.0.1:{ports[name]}]")
    (tmp_path / "routes.yaml").write_text(routes)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_DATABASE_URL")}
    for key in ("AMQP_URL", "CONSUL_HTTP_ADDR", "MASTER_KEY"):
        env.pop(key, None)
    env.update(
        {
            "AIAGG_DATA_DIR": str(tmp_path / "data"),
            "GATEWAY_ROUTES_FILE": str(tmp_path / "routes.yaml"),
            "GATEWAY_PORT": str(free_port()),
            "GATEWAY_ADMIN_PORT": str(free_port()),
            "GATEWAY_ACCESS_LOG": "false",
            "PROVIDERS_FILE": str(ROOT / "providers.yaml"),
        }
    )
    env.update({f"{name.upper()}_PORT": str(port) for name, port in ports.items()})
    return env


async def launch(env: dict[str, str]) -> tuple[asyncio.subprocess.Process, dict[str, str]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.local",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    seen: list[str] = []

    async def banner() -> dict[str, str]:
        assert proc.stdout is not None
        while True:
            line = (await proc.stdout.readline()).decode()
            if not line:
                raise AssertionError("the launcher exited:\n" + "".join(seen))
            seen.append(line)
            if m := re.search(r"API key\s+(sk-\S+)\s+\(user (\S+), balance (\S+)\)", line):
                return {"key": m.group(1), "user": m.group(2), "balance": m.group(3)}

    info = await asyncio.wait_for(banner(), 60)
    asyncio.get_running_loop().create_task(_drain(proc))
    return proc, info


async def _drain(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdout is not None
    while await proc.stdout.read(65536):
        pass


async def stop(proc: asyncio.subprocess.Process) -> int:
    proc.send_signal(signal.SIGINT)
    return await asyncio.wait_for(proc.wait(), 30)


async def test_make_run_serves_chat_and_stops_cleanly(tmp_path):
    env = environment(tmp_path)
    base = f"http://127.0.0.1:{env['GATEWAY_PORT']}"
    proc, info = await launch(env)
    try:
        assert info["user"] == "demo" and info["balance"] == "10.000000"
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=info["key"])
        reply = await client.chat.completions.create(
            model="mock-small", messages=[{"role": "user", "content": "Hello!"}]
        )
        assert reply.choices[0].message.content
        cost = reply.usage.model_extra["cost"]
        async with aiohttp.ClientSession() as http:
            auth = {"Authorization": f"Bearer {info['key']}"}
            for _ in range(50):  # the charge lands through usage.recorded
                async with http.get(f"{base}/billing/balance/demo", headers=auth) as r:
                    balance = (await r.json())["balance"]
                if balance != "10.000000":
                    break
                await asyncio.sleep(0.1)
        from decimal import Decimal

        assert Decimal(balance) == Decimal("10") - Decimal(cost)
    finally:
        code = await stop(proc)
    assert code == 0

    # started again on the same data: the balance is kept, the starting credit is not
    # repeated, and the first run's events reached analytics before it stopped
    proc, info = await launch(env)
    try:
        assert Decimal(info["balance"]) == Decimal("10") - Decimal(cost)
        master = (tmp_path / "data" / "master_key").read_text().strip()
        async with aiohttp.ClientSession() as http:
            async with http.get(
                f"{base}/analytics/metrics", headers={"Authorization": f"Bearer {master}"}
            ) as r:
                metrics = await r.json()
        assert metrics["events_by_type"].get("usage.recorded") == 1
        assert metrics["events_by_type"].get("transaction.created", 0) >= 2  # credit + charge
    finally:
        assert await stop(proc) == 0
