"""routes.yaml: parsing, file:line errors, and route > service > defaults resolution."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gateway.config import (
    breaker_config,
    breaker_configs,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
    resolve_policy,
)
from gateway.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def cfg(text: str):
    return parse_config(textwrap.dedent(text), "r.yaml")


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as exc:
        cfg(text)
    return exc.value.message


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("15s", 15.0), ("2m", 120.0), ("1h", 3600.0), ("1.5s", 1.5), (3, 3.0)],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["15", "fast", "-1s", "1d", True, None])
def test_bad_durations(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "size"), [("64KiB", 65536), ("10MB", 10_000_000), ("1MiB", 1048576), (512, 512)]
)
def test_sizes(text, size):
    assert parse_size(text) == size


def test_the_shipped_routes_file_is_valid():
    config = load_config(ROOT / "routes.yaml")
    names = {r.name for r in config.routes}
    assert {"chat", "models", "billing", "analytics", "auth"} <= names
    chat = next(r for r in config.routes if r.name == "chat")
    policy = resolve_policy(config, chat)
    assert policy.auth == "api_key"
    assert policy.total_timeout == 300.0
    assert "POST" not in policy.retry.methods  # POST is never repeated after it may have run
    assert "proxy" not in {r.service for r in config.routes}  # internal only


def test_route_over_service_over_defaults_field_by_field():
    c = cfg(
        """
        defaults:
          timeout: {connect: 2s, per_try: 10s, total: 20s}
          retry: {attempts: 4, backoff: {initial: 10ms, max: 2s}, on: [connect-error, 503]}
          breaker: {failures: 7, reset_after: 40s}
          limits: {max_body: 1MiB}
        services:
          s:
            instances: [http://127.0.0.1:1]
            timeout: {per_try: 5s}
            retry: {attempts: 2}
            breaker: {failures: 2}
        routes:
          - name: r
            match: {prefix: /}
            service: s
            timeout: {total: 8s}
            retry: {methods: [GET, POST], backoff: {max: 100ms}}
            limits: {max_body: 2KiB}
        """
    )
    p = resolve_policy(c, c.routes[0])
    assert (p.connect_timeout, p.per_try_timeout, p.total_timeout) == (2.0, 5.0, 8.0)
    assert p.retry.attempts == 2
    assert p.retry.backoff_initial == 0.01 and p.retry.backoff_max == 0.1
    assert p.retry.on == frozenset({"connect-error", "503"})
    assert p.retry.methods == frozenset({"GET", "POST"})
    assert p.max_body == 2048
    b = breaker_config(c, "s")
    assert (b.failures, b.reset_after) == (2, 40.0)
    assert b.count == frozenset({"connect-error", "timeout", "reset", "5xx"})


def test_route_breaker_layers_over_its_service():
    c = cfg(
        """
        defaults:
          breaker: {failures: 7, reset_after: 40s}
        services:
          s: {instances: ["http://127.0.0.1:1"], breaker: {failures: 2}}
        routes:
          - {name: plain, match: {prefix: /a/}, service: s}
          - {name: own, match: {prefix: /b/}, service: s, breaker: {reset_after: 5s}}
        """
    )
    configs = breaker_configs(c)
    assert set(configs) == {"s", "s:own"}
    assert (configs["s"].failures, configs["s"].reset_after) == (2, 40.0)
    assert (configs["s:own"].failures, configs["s:own"].reset_after) == (2, 5.0)


def test_per_try_never_exceeds_total():
    c = cfg(
        """
        services: {s: {instances: ["http://127.0.0.1:1"]}}
        routes: [{name: r, match: {prefix: /}, service: s, timeout: {total: 2s}}]
        """
    )
    assert resolve_policy(c, c.routes[0]).per_try_timeout == 2.0


def test_on_is_a_key_not_a_boolean():
    c = cfg(
        """
        defaults:
          retry: {on: [timeout, 5xx]}
        """
    )
    assert c.defaults.retry.on == ["timeout", "5xx"]


def test_unknown_field_names_file_line_and_field():
    msg = error_of(
        """
        services:
          s:
            instances: [http://127.0.0.1:1]
            breakr: {failures: 3}
        """
    )
    assert msg == "r.yaml:5: services.s.breakr: unknown field (check the spelling)"


def test_bad_duration_names_line():
    msg = error_of(
        """
        services:
          s: {instances: ["http://127.0.0.1:1"]}
        routes:
          - name: r
            match: {prefix: /}
            service: s
            timeout:
              total: soon
        """
    )
    assert msg.startswith("r.yaml:9: routes[0].timeout.total: ")
    assert "250ms or 15s" in msg


def test_route_naming_an_unknown_service():
    msg = error_of(
        """
        services:
          s: {instances: ["http://127.0.0.1:1"]}
        routes:
          - name: r
            match: {prefix: /}
            service: nope
        """
    )
    assert msg == "r.yaml:7: routes[0].service: service 'nope' is not under services: (known: s)"


def test_match_needs_exactly_one_of_path_or_prefix():
    msg = error_of(
        """
        services:
          s: {instances: ["http://127.0.0.1:1"]}
        routes:
          - name: r
            match: {path: /a, prefix: /b}
            service: s
        """
    )
    assert msg.startswith("r.yaml:6: routes[0].match: ")
    assert "exactly one of path or prefix" in msg


def test_bad_retry_condition_and_method():
    msg = error_of(
        """
        defaults:
          retry:
            on: [connect-error, sometimes]
            methods: [GET, FETCH]
        """
    )
    lines = msg.splitlines()
    assert lines[0].startswith("r.yaml:4: defaults.retry.on: ")
    assert "sometimes" in lines[0]
    assert lines[1].startswith("r.yaml:5: defaults.retry.methods: ")


def test_duplicate_keys_and_broken_yaml():
    msg = error_of(
        """
        services:
          s: {instances: ["http://127.0.0.1:1"]}
          s: {instances: ["http://127.0.0.1:2"]}
        """
    )
    assert msg.startswith("r.yaml:4: invalid YAML: duplicate key 's' (first on line 3)")
    msg = error_of("routes: [\n  {name: a\n")
    assert msg.startswith("r.yaml:3: invalid YAML")


def test_unknown_auth_policy_and_bad_instance_url():
    msg = error_of(
        """
        services:
          s: {instances: ["127.0.0.1:1"]}
        """
    )
    assert msg.startswith("r.yaml:3: services.s.instances: ")
    msg = error_of(
        """
        services:
          s: {instances: ["http://127.0.0.1:1"]}
        routes:
          - {name: r, match: {prefix: /}, service: s, auth: magic}
        """
    )
    assert "auth 'magic'" in msg


def test_policies_that_cannot_be_built_are_config_errors():
    msg = error_of(
        """
        services:
          s: {instances: ["http://127.0.0.1:1"]}
        routes:
          - name: r
            match: {prefix: /}
            service: s
            retry: {backoff: {initial: 2s, max: 1s}}
        """
    )
    assert msg.startswith("r.yaml:5: routes[0]: ")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "absent.yaml")
    assert "absent.yaml: cannot read the routes file" in exc.value.message
