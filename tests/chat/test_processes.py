"""``python -m services.proxy`` and ``python -m services.orchestrator`` as real processes:
they start from the environment, answer, stop on SIGTERM, and refuse a bad providers file
with one clear ``file:line`` message."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import aiohttp
import pytest

from tests.support import free_port, serves_health

from .conftest import ADMIN, MASTER_KEY, ROOT


def base_env(tmp_path) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items()
        if k not in ("AMQP_URL", "CONSUL_HTTP_ADDR", "PROVIDERS_FILE", "GATEWAY_ROUTES_FILE")
        and not k.endswith("_DATABASE_URL")
    }
    env.update({"AIAGG_DATA_DIR": str(tmp_path / "data"), "MASTER_KEY": MASTER_KEY})
    return env


async def start(name: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", f"services.{name}", env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )


async def wait_up(proc: asyncio.subprocess.Process, port: int) -> None:
    if not await serves_health(proc, port):
        out = (await proc.stdout.read()).decode() if proc.stdout else ""
        pytest.fail(f"service on {port} did not come up:\n{out}")


async def stop(proc: asyncio.subprocess.Process, *, signal_it: bool = True) -> tuple[int, str]:
    if signal_it and proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    assert proc.stdout is not None
    out = (await asyncio.wait_for(proc.stdout.read(), 20)).decode()
    return await asyncio.wait_for(proc.wait(), 20), out


async def test_proxy_and_orchestrator_run_as_processes(tmp_path):
    proxy_port, orchestrator_port = free_port(), free_port()
    routes = (ROOT / "routes.yaml").read_text().replace(
        "http://127.0.0.1:3003]", f"http://127.0.0.1:{proxy_port}]")
    (tmp_path / "routes.yaml").write_text(routes)
    env = {**base_env(tmp_path), "PROXY_PORT": str(proxy_port),
           "ORCHESTRATOR_PORT": str(orchestrator_port),
           "GATEWAY_ROUTES_FILE": str(tmp_path / "routes.yaml")}
    proxy = await start("proxy", env)
    orchestrator = await start("orchestrator", env)
    try:
        await wait_up(proxy, proxy_port)
        await wait_up(orchestrator, orchestrator_port)
        async with aiohttp.ClientSession() as http:
            identity = {"X-User-Id": "u1", "X-Key-Id": "k1"}  # what the gateway sets
            async with http.get(f"http://127.0.0.1:{orchestrator_port}/v1/models",
                                headers=identity) as resp:
                models = await resp.json()
            assert [m["id"] for m in models["data"]] == ["mock-free", "mock-large",
                                                         "mock-small"]
            async with http.get(f"http://127.0.0.1:{orchestrator_port}/v1/models") as resp:
                assert resp.status == 401
                assert (await resp.json())["error"]["code"] == "invalid_api_key"
            # the internal endpoint answers the master bearer only
            body = {"request_id": "r1", "user_id": "u1", "provider": "mock",
                    "model": "mock-small",
                    "request": {"messages": [{"role": "user", "content": "hi"}]}}
            url = f"http://127.0.0.1:{proxy_port}/internal/proxy/chat/completions"
            async with http.post(url, json=body, headers=identity) as resp:
                assert resp.status == 403
            async with http.post(url, json=body, headers=ADMIN) as resp:
                answer = await resp.json()
            assert resp.status == 200 and answer["id"] == "r1"
            assert answer["choices"][0]["message"]["content"]
            async with http.post(url, json={**body, "model": "nope"}, headers=ADMIN) as resp:
                assert resp.status == 404
            async with http.post(url, json={**body, "request": {}}, headers=ADMIN) as resp:
                assert resp.status == 400
                assert "request.messages" in (await resp.json())["error"]["message"]
    finally:
        code_o, out_o = await stop(orchestrator)
        code_p, out_p = await stop(proxy)
    assert code_o == 0 and code_p == 0, out_o + out_p
    assert f"orchestrator listening on http://127.0.0.1:{orchestrator_port}" in out_o
    assert "events of orchestrator stay inside this process" in out_o  # AMQP_URL unset
    assert (tmp_path / "data" / "proxy.db").exists()


async def test_a_bad_providers_file_or_missing_master_key_stops_startup(tmp_path):
    bad = tmp_path / "providers.yaml"
    bad.write_text("providers:\n  m:\n    kind: mock\n    models:\n"
                   "      x: {input_price: 0.15, output_price: '1'}\n")
    env = {**base_env(tmp_path), "PROVIDERS_FILE": str(bad), "PROXY_PORT": str(free_port()),
           "ORCHESTRATOR_PORT": str(free_port())}
    for name in ("proxy", "orchestrator"):
        code, out = await stop(await start(name, env), signal_it=False)
        assert code != 0
        assert f"{bad}:5: providers.m.models.x.input_price: write the price as a string" in out
    env.pop("MASTER_KEY")
    env.pop("PROVIDERS_FILE")
    code, out = await stop(await start("orchestrator", env), signal_it=False)
    assert code != 0 and "MASTER_KEY is not set" in out
