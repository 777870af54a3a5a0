"""The replay command, the bus factory and the metrics."""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

import services.common.events.metrics as metrics
from services.common.events import (
    USAGE_RECORDED,
    Event,
    InProcessBus,
    RabbitBus,
    build_bus,
    in_process_warning,
    refresh_queue_depths,
)
from tests.support import require_server

from .conftest import BusKit, eventually, test_settings

ROOT = Path(__file__).resolve().parents[2]


async def _fail(event: Event) -> None:
    raise RuntimeError("still broken")


def _run_replay(args: list[str], settings) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "AMQP_URL": settings.amqp_url or "",
        "EVENTS_NAMESPACE": settings.events_namespace,
        "EVENTS_RETRY_DELAYS": "200ms,400ms",
        "EVENTS_MAX_ATTEMPTS": "3",
    }
    return subprocess.run(
        [sys.executable, "-m", "services.common.events.replay", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_replay_command_moves_dead_letters_back(rabbit_kit: BusKit) -> None:
    bus = await rabbit_kit.make()
    rabbit_kit.track("jobs")
    # dead letters made the real way: a poison body and an event whose handler failed
    await bus.subscribe("jobs", ["usage.recorded"], _fail)
    good = Event.new(USAGE_RECORDED, "proxy", {"n": 1})
    await bus.publish(good)
    await bus.publish_raw("usage.recorded", b"{oops", message_id="poison-1")
    await eventually(lambda: _dlq(bus, "jobs", 2), within=5, what="two dead letters")
    await bus.close()  # nobody consumes "jobs" while we look

    listed = await asyncio.to_thread(_run_replay, ["jobs", "--list"], rabbit_kit.settings)
    assert listed.returncode == 0, listed.stderr
    assert f"usage.recorded {good.id}" in listed.stdout
    assert "reason=max-attempts" in listed.stdout and "RuntimeError: still broken" in listed.stdout
    assert "(poison) message_id=poison-1" in listed.stdout
    assert "2 dead letter(s)" in listed.stdout

    done = await asyncio.to_thread(_run_replay, ["jobs", "--limit", "1"], rabbit_kit.settings)
    assert done.returncode == 0, done.stderr
    assert "replayed 1 message(s)" in done.stdout
    fresh = await rabbit_kit.make()
    assert await fresh.dlq_depth("jobs") == 1
    assert await fresh.queue_depth("jobs") == 1

    done = await asyncio.to_thread(_run_replay, ["jobs"], rabbit_kit.settings)
    assert "replayed 1 message(s)" in done.stdout
    assert await fresh.dlq_depth("jobs") == 0
    assert await fresh.queue_depth("jobs") == 2
    got: list[Event] = []

    async def fixed(event: Event) -> None:
        got.append(event)

    await fresh.subscribe("jobs", ["usage.recorded"], fixed)
    await eventually(lambda: len(got) == 1, what="the replayed event handled")
    assert got[0] == good
    await eventually(lambda: _dlq(fresh, "jobs", 1), what="the poison back in the DLQ")


async def _dlq(bus, queue: str, n: int) -> bool:
    return await bus.dlq_depth(queue) == n


def test_replay_command_without_amqp_url() -> None:
    env = {k: v for k, v in os.environ.items() if k != "AMQP_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "services.common.events.replay", "billing.usage"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "AMQP_URL is not set" in result.stderr


async def test_build_bus(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="aiagg.events"):
        bus = build_bus("billing", test_settings(amqp_url=None))
    assert isinstance(bus, InProcessBus)
    assert in_process_warning("billing") in caplog.text
    assert "AMQP_URL is not set" in caplog.text
    caplog.clear()
    shared = InProcessBus()
    with caplog.at_level(logging.WARNING, logger="aiagg.events"):
        assert build_bus("billing", test_settings(amqp_url=None), shared=shared) is shared
    assert caplog.text == ""  # the launcher's choice: no warning
    rabbit = build_bus("billing", test_settings(amqp_url="amqp://guest:guest@127.0.0.1/"))
    assert isinstance(rabbit, RabbitBus)
    assert rabbit.connection_name == "billing"


def _value(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_metrics_count_the_flow(bus_kit: BusKit) -> None:
    bus = await bus_kit.make()
    bus_kit.track("metered")
    kind = {"type": USAGE_RECORDED}
    published = _value("aiagg_events_published_total", kind)
    confirmed = _value("aiagg_events_confirmed_total", kind)
    consumed = _value("aiagg_events_consumed_total", {"queue": "metered", **kind})
    retried = _value("aiagg_events_retried_total", {"queue": "metered"})
    dead = _value("aiagg_events_dead_lettered_total", {"queue": "metered", "reason": "poison"})
    failed = _value(
        "aiagg_events_publish_failed_total", {"type": "nobody.listens", "reason": "unroutable"}
    )
    calls = 0

    async def flaky(event: Event) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("once")

    await bus.subscribe("metered", ["usage.recorded"], flaky)
    await bus.publish(Event.new(USAGE_RECORDED, "proxy", {}))
    await bus.publish_raw(USAGE_RECORDED, b"junk")
    with pytest.raises(Exception, match="unroutable"):
        await bus.publish(Event.new("nobody.listens", "proxy", {}))
    await eventually(lambda: calls == 2, what="retry")
    await eventually(lambda: _dlq(bus, "metered", 1), what="poison dead-lettered")
    assert _value("aiagg_events_published_total", kind) == published + 2
    assert _value("aiagg_events_confirmed_total", kind) == confirmed + 2
    assert _value("aiagg_events_consumed_total", {"queue": "metered", **kind}) == consumed + 1
    assert _value("aiagg_events_retried_total", {"queue": "metered"}) == retried + 1
    assert (
        _value("aiagg_events_dead_lettered_total", {"queue": "metered", "reason": "poison"})
        == dead + 1
    )
    assert (
        _value(
            "aiagg_events_publish_failed_total", {"type": "nobody.listens", "reason": "unroutable"}
        )
        == failed + 1
    )

    read = await refresh_queue_depths(bus, ["metered"])
    assert read == {"metered": {"ready": 0, "dlq": 1}}
    assert _value("aiagg_events_dlq_depth", {"queue": "metered"}) == 1
    assert _value("aiagg_events_queue_depth", {"queue": "metered"}) == 0


def test_metrics_module_can_be_imported_twice() -> None:
    before = metrics.PUBLISHED
    again = importlib.reload(metrics)  # would raise "Duplicated timeseries" if re-registered
    assert again.PUBLISHED is before
    names = [n for n in REGISTRY._names_to_collectors if n.startswith("aiagg_events_")]
    assert "aiagg_events_outbox_backlog" in names


def test_require_server_fails_in_ci_and_skips_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true requires it"):
        require_server(f"tcp://127.0.0.1:{port}", 5672, "Nothing")
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="Nothing is not reachable"):
        require_server(f"tcp://127.0.0.1:{port}", 5672, "Nothing")
