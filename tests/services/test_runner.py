"""``python -m services.<name>`` starts a service from the environment and stops on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import aiohttp
import pytest

from tests.support import free_port

from .conftest import ADMIN, MASTER_KEY


async def run_service(name: str, env: dict[str, str]) -> tuple[int, str, list[dict]]:
    """Start the service, call it, SIGTERM it: (exit code, output, answers)."""
    port = int(env[f"{name.upper()}_PORT"])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", f"services.{name}",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    chunks: list[bytes] = []

    async def collect() -> None:  # all along, so that a failure can show the output
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(4096):
            chunks.append(chunk)

    def output() -> str:
        return b"".join(chunks).decode(errors="replace")

    collector = asyncio.create_task(collect())
    answers: list[dict] = []
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 20
            while True:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/health") as resp:
                        answers.append({"status": resp.status, "body": await resp.json()})
                        break
                except aiohttp.ClientConnectionError:
                    if proc.returncode is not None or time.monotonic() > deadline:
                        pytest.fail(f"services.{name} did not come up:\n{output()}")
                    await asyncio.sleep(0.1)
            async with http.get(f"http://127.0.0.1:{port}/nope", headers=ADMIN) as resp:
                answers.append({"status": resp.status, "body": await resp.json()})
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.kill()  # a stuck shutdown says what it was doing, not a bare TimeoutError
            await proc.wait()
            await collector
            pytest.fail(f"services.{name} did not stop within 20 s of SIGTERM:\n{output()}")
        await asyncio.wait_for(collector, 20)
    return code, output(), answers


async def test_billing_runs_on_rabbitmq_from_the_environment(tmp_path, rabbit_settings):
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.endswith("_DATABASE_URL")},
        "BILLING_PORT": str(port),
        "AIAGG_DATA_DIR": str(tmp_path / "data"),
        "MASTER_KEY": MASTER_KEY,
        "AMQP_URL": rabbit_settings.amqp_url,
        "EVENTS_NAMESPACE": rabbit_settings.events_namespace,
    }
    env.pop("CONSUL_HTTP_ADDR", None)
    code, out, answers = await run_service("billing", env)
    assert answers[0]["status"] == 200, out
    assert answers[0]["body"]["checks"]["events"] == {"status": "ok", "bus": "rabbitmq"}
    assert answers[1]["status"] == 404 and answers[1]["body"]["error"]["type"] == "not_found"
    assert code == 0, out
    assert f"billing listening on http://127.0.0.1:{port}" in out
    assert (tmp_path / "data" / "billing.db").exists()


async def test_auth_alone_without_amqp_says_events_stay_in_process(tmp_path):
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items()
           if k not in ("AMQP_URL", "CONSUL_HTTP_ADDR") and not k.endswith("_DATABASE_URL")},
        "AUTH_PORT": str(port),
        "AIAGG_DATA_DIR": str(tmp_path / "data"),
    }
    code, out, answers = await run_service("auth", env)
    assert answers[0]["status"] == 200
    assert answers[0]["body"]["checks"]["events"]["bus"] == "in-process"
    assert "AMQP_URL is not set" in out
    assert "Consul registration is off" in out
    assert code == 0, out
