"""The envelope, the settings and the topic rules: pure code."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from services.common.events import (
    APIKEY_CREATED,
    APIKEY_REVOKED,
    EVENT_TYPES,
    PAYMENT_RECEIVED,
    ROUTE_DECIDED,
    TRANSACTION_CREATED,
    USAGE_RECORDED,
    Event,
    EventSettings,
    PoisonMessage,
    Topology,
    topic_matches,
)
from services.common.events.settings import parse_duration, parse_durations


def test_event_type_names_are_the_contract() -> None:
    assert (
        USAGE_RECORDED,
        TRANSACTION_CREATED,
        PAYMENT_RECEIVED,
        APIKEY_CREATED,
        APIKEY_REVOKED,
        ROUTE_DECIDED,
    ) == (
        "usage.recorded",
        "transaction.created",
        "payment.received",
        "apikey.created",
        "apikey.revoked",
        "route.decided",
    )
    assert len(EVENT_TYPES) == 6


def test_new_event_and_wire_round_trip() -> None:
    event = Event.new(USAGE_RECORDED, "proxy", {"cost": "0.000125", "tokens": 42, "ok": True})
    assert uuid.UUID(event.id).version == 7  # time-ordered: see services/common/ids.py
    assert event.occurred_at.tzinfo is not None
    assert abs((datetime.now(UTC) - event.occurred_at).total_seconds()) < 5
    wire = json.loads(event.to_json())
    assert set(wire) == {"id", "type", "source", "occurred_at", "data"}
    assert wire["occurred_at"].endswith("Z")  # RFC 3339, UTC
    assert Event.from_json(event.to_json()) == event
    assert Event.from_json(event.to_json().decode()) == event
    assert hash(Event.from_json(event.to_json())) == hash(event)


def test_times_are_normalised_to_utc() -> None:
    plus2 = timezone(timedelta(hours=2))
    event = Event.new(
        PAYMENT_RECEIVED, "billing", {}, occurred_at=datetime(2026, 1, 1, 12, tzinfo=plus2)
    )
    assert event.occurred_at == datetime(2026, 1, 1, 10, tzinfo=UTC)
    assert json.loads(event.to_json())["occurred_at"] == "2026-01-01T10:00:00.000000Z"
    with pytest.raises(ValueError, match="timezone"):
        Event(id=str(uuid.uuid4()), type="a.b", source="s", occurred_at=datetime(2026, 1, 1))


def test_data_must_be_plain_json() -> None:
    with pytest.raises(TypeError, match="money as strings"):
        Event.new(USAGE_RECORDED, "proxy", {"cost": Decimal("0.10")})
    with pytest.raises(TypeError):
        Event.new(USAGE_RECORDED, "proxy", {"nan": float("nan")})
    with pytest.raises(TypeError):
        Event.new(USAGE_RECORDED, "proxy", ["not", "a", "dict"])  # type: ignore[arg-type]
    data = {"nested": {"k": [1, 2]}}
    event = Event.new(USAGE_RECORDED, "proxy", data)
    data["nested"]["k"].append(3)
    assert event.data == {"nested": {"k": [1, 2]}}  # detached from the caller's dict


@pytest.mark.parametrize("bad_type", ["", "usage.*", "usage.#", "usage..x", "has space"])
def test_event_type_must_be_a_plain_routing_key(bad_type: str) -> None:
    with pytest.raises(ValueError):
        Event.new(bad_type, "proxy", {})


def test_event_needs_a_source() -> None:
    with pytest.raises(ValueError):
        Event.new(USAGE_RECORDED, "", {})


GOOD = {
    "id": "0b6f1c7e-3c1a-4d55-9f1e-6f7f0e0d9a11",
    "type": "usage.recorded",
    "source": "proxy",
    "occurred_at": "2026-01-01T00:00:00Z",
    "data": {},
}


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "not an object"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "data"}).encode(), "lacks field"),
        (json.dumps({**GOOD, "id": "nope"}).encode(), "not a UUID"),
        (json.dumps({**GOOD, "id": 7}).encode(), "must be a string"),
        (json.dumps({**GOOD, "type": ""}).encode(), "non-empty"),
        (json.dumps({**GOOD, "data": [1]}).encode(), "not an object"),
        (json.dumps({**GOOD, "occurred_at": "yesterday"}).encode(), "RFC 3339"),
        (json.dumps({**GOOD, "occurred_at": "2026-01-01T00:00:00"}).encode(), "no UTC offset"),
        (json.dumps({**GOOD, "occurred_at": 1700000000}).encode(), "RFC 3339"),
    ],
)
def test_unparseable_bodies_are_poison(body: bytes, why: str) -> None:
    with pytest.raises(PoisonMessage, match=why):
        Event.from_json(body)
    assert issubclass(PoisonMessage, ValueError)


def test_unknown_envelope_fields_are_ignored() -> None:
    event = Event.from_json(json.dumps({**GOOD, "version": 2}).encode())
    assert event.id == GOOD["id"]


@pytest.mark.parametrize(
    ("pattern", "key", "match"),
    [
        ("#", "usage.recorded", True),
        ("#", "a", True),
        ("usage.recorded", "usage.recorded", True),
        ("usage.recorded", "usage.recorded.x", False),
        ("*.created", "apikey.created", True),
        ("*.created", "apikey.revoked", False),
        ("*.created", "a.b.created", False),
        ("usage.#", "usage", True),
        ("usage.#", "usage.recorded.late", True),
        ("#.created", "created", True),
        ("a.#.z", "a.z", True),
        ("a.#.z", "a.b.c.z", True),
        ("a.*.z", "a.z", False),
        ("*", "usage.recorded", False),
    ],
)
def test_topic_matching(pattern: str, key: str, match: bool) -> None:
    assert topic_matches(pattern, key) is match


def test_durations() -> None:
    assert parse_duration("250ms") == 0.25
    assert parse_duration("2m") == 120
    assert parse_duration("1.5s") == 1.5
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration("3") == 3.0
    assert parse_duration(0.5) == 0.5
    assert parse_durations("1s, 5s,30s") == (1.0, 5.0, 30.0)
    assert parse_durations(["100ms", 2]) == (0.1, 2.0)
    for bad in ("soon", "-1s", "1 week", True):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "AMQP_URL": "amqp://u:p@rabbit:5672/",
        "AMQP_PREFETCH": "5",
        "EVENTS_RETRY_DELAYS": "100ms,1s",
        "EVENTS_MAX_ATTEMPTS": "5",
        "EVENTS_NAMESPACE": "staging",
        "EVENTS_OUTBOX_POLL_INTERVAL": "250ms",
    }.items():
        monkeypatch.setenv(name, value)
    s = EventSettings()
    assert s.amqp_url == "amqp://u:p@rabbit:5672/"
    assert s.amqp_prefetch == 5
    assert s.events_retry_delays == (0.1, 1.0)
    assert s.events_namespace == "staging"
    assert s.events_outbox_poll_interval == 0.25
    # 5 attempts, 2 delays: the last delay repeats
    assert [s.retry_delay(n) for n in range(1, 6)] == [0.1, 1.0, 1.0, 1.0, None]
    assert s.retry_delays_in_use() == (0.1, 1.0)


def test_every_duration_setting_takes_units(monkeypatch: pytest.MonkeyPatch) -> None:
    """EVENTS_CONSUMER_LINGER=10ms once failed as "not a number": every duration takes units."""
    durations = [n for n, f in EventSettings.model_fields.items() if f.annotation is float]
    assert {"events_consumer_linger", "events_outbox_linger", "amqp_connect_timeout"} <= set(
        durations
    )
    for name in durations:
        monkeypatch.setenv(name.upper(), "250ms")
    s = EventSettings(events_outbox_backoff_max="1s")
    assert {name: getattr(s, name) for name in durations} == {
        name: (1.0 if name == "events_outbox_backoff_max" else 0.25) for name in durations
    }
    monkeypatch.setenv("EVENTS_CONSUMER_LINGER", "soon")
    with pytest.raises(ValueError, match="not a duration"):
        EventSettings()


def test_settings_defaults_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AMQP_URL", "EVENTS_NAMESPACE", "EVENTS_RETRY_DELAYS", "EVENTS_MAX_ATTEMPTS"):
        monkeypatch.delenv(name, raising=False)
    s = EventSettings()
    assert s.amqp_url is None
    assert s.amqp_prefetch == 32
    assert s.events_retry_delays == (1.0, 5.0, 30.0)
    assert s.events_max_attempts == 4
    assert s.events_namespace == ""
    assert [s.retry_delay(n) for n in range(1, 5)] == [1.0, 5.0, 30.0, None]
    assert EventSettings(amqp_url="  ").amqp_url is None
    assert EventSettings(events_max_attempts=1).retry_delay(1) is None
    with pytest.raises(ValueError):
        EventSettings(events_namespace="no spaces")
    with pytest.raises(ValueError):
        EventSettings(events_retry_delays="")
    with pytest.raises(ValueError):
        EventSettings(events_outbox_backoff_initial="5s", events_outbox_backoff_max="1s")


def test_topology_names() -> None:
    plain = Topology()
    assert plain.exchange == "aiagg.events"
    assert plain.queue("billing.usage") == "billing.usage"
    assert plain.dlq("billing.usage") == "billing.usage.dlq"
    assert plain.retry_queue("billing.usage", 5) == "billing.usage.retry.5000"
    ns = Topology("t1")
    assert ns.exchange == "t1.aiagg.events"
    assert ns.dlq("analytics.events") == "t1.analytics.events.dlq"
    assert ns.logical("t1.analytics.events") == "analytics.events"
