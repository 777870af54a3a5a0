"""The deployment files against the code: Dockerfile, docker-compose.yml, the
PostgreSQL init script and the Prometheus config and alert rules.

* ``docker-compose config`` accepts the compose file (and refuses it without
  MASTER_KEY, with a message naming it);
* every container's command, port, environment variable and mount matches what
  the code reads (the pydantic-settings classes), ARCHITECTURE.md's ports and
  the databases the init script creates (the script also runs on a real
  PostgreSQL);
* ``promtool`` accepts the config and the rules, and the alerts fire on the
  series they are meant for (``promtool test rules``);
* a REAL Prometheus, started with the compose entrypoint and config, scrapes a
  live gateway's admin ``/metrics`` with the admin token and evaluates every rule.

A missing tool (docker-compose, promtool, prometheus) or PostgreSQL fails the
test under CI=true, naming the Debian package, and skips it otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import yaml
from prometheus_client import REGISTRY
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from gateway import consul_resolver
from gateway import metrics as gateway_metrics
from gateway.config import load_config
from gateway.consul import ConsulSettings
from gateway.discovery import DiscoveryRouter, StaticResolver
from gateway.registration import RegistrationSettings
from gateway.server import Gateway
from gateway.settings import GatewaySettings
from services.common.events import metrics as event_metrics
from services.common.events.settings import EventSettings
from services.common.settings import DEFAULT_PORTS, ServiceSettings
from tests.support import PG_URL, fail_or_skip, free_port, refused_port

#: every module that defines aiagg_* metrics
METRIC_MODULES = (gateway_metrics, consul_resolver, event_metrics)

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PG_INIT = ROOT / "deploy" / "postgres" / "init.sql"
PROM_DIR = ROOT / "deploy" / "prometheus"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
PROM_RULES = PROM_DIR / "alerts.yml"

#: ARCHITECTURE.md's port table (a fixed contract).
ARCH_PORTS = {
    "gateway": 3000,
    "gateway-admin": 9901,
    "auth": 3001,
    "orchestrator": 3002,
    "proxy": 3003,
    "billing": 3004,
    "analytics": 3005,
}
SERVICES = ("auth", "orchestrator", "proxy", "billing", "analytics")

#: Debian packages that provide the tools these tests run.
PACKAGES = {
    "docker-compose": "docker-compose",
    "promtool": "prometheus",
    "prometheus": "prometheus",
}

#: variables a compose file sets for its own interpolation, given to `docker-compose config`
COMPOSE_ENV = {
    "MASTER_KEY": "mk-compose-test-0123456789abcdef",
    "GATEWAY_ADMIN_TOKEN": "admin-token-compose-test",
}

# -- helpers --------------------------------------------------------------------------


def need_tool(name: str) -> str:
    """The tool's path; fails under CI=true (skips otherwise) naming its Debian package."""
    path = shutil.which(name)
    if path is None:
        fail_or_skip(f"{name} is not installed: apt-get install -y {PACKAGES[name]}")
    return path  # type: ignore[return-value]


def run(args: list[str], *, env: dict[str, str] | None = None, cwd: Path = ROOT,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )




_INTERPOLATION = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` and ``$$``."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group(1), match.group(2), match.group(3)
        value = env.get(name)
        if op in (":-", "-"):
            if value is None or (op == ":-" and value == ""):
                return arg or ""
            return value
        if op in (":?", "?"):
            if value is None or (op == ":?" and value == ""):
                raise KeyError(f"{name}: {arg}")
            return value
        return value or ""

    return _INTERPOLATION.sub(sub, value)


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def compose_services() -> dict[str, dict[str, Any]]:
    return load_compose()["services"]


def container_env(service: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, str]:
    """A compose service's environment, interpolated as compose would with ``env``."""
    raw = service.get("environment") or {}
    assert isinstance(raw, dict), "write environment as a mapping"
    given = dict(COMPOSE_ENV if env is None else env)
    return {str(k): interpolate(str(v), given) for k, v in raw.items()}


def env_names(cls: type[BaseSettings]) -> set[str]:
    """The environment variables a pydantic-settings class reads."""
    prefix = cls.model_config.get("env_prefix") or ""
    names: set[str] = set()
    for field_name, field in cls.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, str):
            names.add(alias.upper())
        elif isinstance(alias, AliasChoices):
            names.update(c.upper() for c in alias.choices if isinstance(c, str))
        elif field.alias:
            names.add(field.alias.upper())
        else:
            names.add(f"{prefix}{field_name}".upper())
    return names


def service_settings_class(name: str) -> type[ServiceSettings]:
    module = pytest.importorskip(f"services.{name}.settings")
    found = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, ServiceSettings)
        and obj is not ServiceSettings
        and obj.service_name == name
    ]
    assert len(found) == 1, f"services/{name}/settings.py: expected one settings class"
    return found[0]


def provider_key_vars() -> set[str]:
    """Variables named by ``api_key_env`` in providers.yaml (the proxy reads them)."""
    path = ROOT / "providers.yaml"
    if not path.exists():
        return set()
    data = yaml.safe_load(path.read_text()) or {}
    providers = data.get("providers") or {}
    return {p["api_key_env"] for p in providers.values() if (p or {}).get("api_key_env")}


def readable_env(process: str) -> set[str]:
    """Every variable the process (``gateway`` or a service name) reads."""
    if process == "gateway":
        return env_names(GatewaySettings) | env_names(ConsulSettings)
    names = (
        env_names(service_settings_class(process))
        | env_names(EventSettings)
        | env_names(ConsulSettings)
        | env_names(RegistrationSettings)
    )
    if "LOG_LEVEL" in (ROOT / "services" / "common" / "app.py").read_text():
        names.add("LOG_LEVEL")  # read with os.environ by run_service
    if process == "proxy":
        names |= provider_key_vars()
    return names


def module_of(service: dict[str, Any]) -> str | None:
    """``gateway`` or the service name a compose service runs (``python -m ...``)."""
    command = service.get("command")
    if isinstance(command, str):
        command = command.split()
    if not command or command[:2] != ["python", "-m"] or len(command) != 3:
        return None
    target = command[2]
    if target == "gateway":
        return "gateway"
    if target.startswith("services."):
        return target.split(".", 1)[1]
    return None


def app_services() -> dict[str, str]:
    """compose service name -> what it runs (``gateway`` or a service name)."""
    out = {}
    for name, service in compose_services().items():
        module = module_of(service)
        if module is not None:
            out[name] = module
    return out


def init_sql_databases() -> list[str]:
    return re.findall(r"^\s*CREATE\s+DATABASE\s+([a-z_][a-z0-9_]*)\s*;", PG_INIT.read_text(),
                      flags=re.IGNORECASE | re.MULTILINE)


def bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> host path (relative to the repo) of a service's bind mounts."""
    out = {}
    for volume in service.get("volumes") or []:
        parts = str(volume).split(":")
        if parts[0].startswith((".", "/")):
            out[parts[1]] = parts[0]
    return out


def port_of_healthcheck(service: dict[str, Any]) -> int | None:
    test = " ".join(service.get("healthcheck", {}).get("test", []))
    match = re.search(r"http://127\.0\.0\.1:(\d+)/", test)
    return int(match.group(1)) if match else None


def _set_env(monkeypatch: pytest.MonkeyPatch, names: set[str], env: dict[str, str]) -> None:
    for name in names | set(env):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


# -- (a) docker-compose accepts the file ------------------------------------------------


def _compose_env(tmp_path: Path, **extra: str) -> tuple[list[str], dict[str, str]]:
    binary = need_tool("docker-compose")
    env = {k: v for k, v in os.environ.items() if k not in COMPOSE_ENV}
    env.update(extra)
    empty = tmp_path / "empty.env"  # a developer's own .env must not change the result
    empty.write_text("")
    return [binary, "--env-file", str(empty), "-f", str(COMPOSE)], env


def test_compose_config_is_valid(tmp_path: Path) -> None:
    args, env = _compose_env(tmp_path, **COMPOSE_ENV)
    result = run([*args, "config"], env=env)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert set(resolved["services"]) >= {"consul", "rabbitmq", "postgres", "prometheus",
                                         "gateway", *SERVICES}
    assert resolved["services"]["auth"]["environment"]["MASTER_KEY"] == COMPOSE_ENV["MASTER_KEY"]


@pytest.mark.parametrize("missing", sorted(COMPOSE_ENV))
def test_compose_requires_secrets(tmp_path: Path, missing: str) -> None:
    given = {k: v for k, v in COMPOSE_ENV.items() if k != missing}
    args, env = _compose_env(tmp_path, **given)
    result = run([*args, "config", "-q"], env=env)
    assert result.returncode != 0
    assert f"set {missing}" in result.stderr, result.stderr


# -- (b) compose against the code -------------------------------------------------------


def test_ports_agree_with_architecture() -> None:
    assert {name: DEFAULT_PORTS[name] for name in SERVICES} == {
        name: ARCH_PORTS[name] for name in SERVICES
    }
    fields = GatewaySettings.model_fields
    assert fields["port"].default == ARCH_PORTS["gateway"]
    assert fields["admin_port"].default == ARCH_PORTS["gateway-admin"]


def test_every_service_runs_once() -> None:
    runs = app_services()
    assert sorted(runs.values()) == sorted(["gateway", *SERVICES])
    for name, module in runs.items():
        # the compose name is the Consul name (SERVICE_ADVERTISE_HOST) and the routes' name
        assert name == module, f"compose service {name!r} runs {module!r}: name them alike"
    routes = yaml.safe_load((ROOT / "routes.yaml").read_text())
    for service, spec in routes["services"].items():
        assert service in runs, f"routes.yaml names {service!r}, which compose does not run"
        assert spec.get("discovery") == "consul", f"routes.yaml: {service} is not in Consul"


@pytest.mark.parametrize("name", SERVICES)
def test_service_container_matches_settings(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    service = compose_services()[name]
    env = container_env(service)
    readable = readable_env(name)
    unknown = sorted(set(env) - readable)
    assert not unknown, f"{name}: compose sets variables nothing reads: {unknown}"

    upper = name.upper()
    port = ARCH_PORTS[name]
    assert env["SERVICE_HOST"] == "0.0.0.0"
    assert env["SERVICE_ADVERTISE_HOST"] == name
    assert env[f"{upper}_PORT"] == str(port)
    assert urlsplit(env["AMQP_URL"]).hostname == "rabbitmq"
    assert urlsplit(env["AMQP_URL"]).port == 5672
    assert env["CONSUL_HTTP_ADDR"] == "consul:8500"
    assert "${MASTER_KEY:?" in str(service["environment"]["MASTER_KEY"])
    db = urlsplit(env[f"{upper}_DATABASE_URL"])
    assert db.scheme == "postgresql" and db.hostname == "postgres" and db.port == 5432
    assert db.path.lstrip("/") in init_sql_databases(), f"{name}: no such database in init.sql"
    assert db.path.lstrip("/") == name, "one database per service, named after it"
    assert [str(p) for p in service.get("expose", [])] == [str(port)]
    assert "ports" not in service, f"{name} must be reached through the gateway only"
    assert port_of_healthcheck(service) == port
    assert "/health'" in " ".join(service["healthcheck"]["test"])
    deps = service["depends_on"]
    for infra in ("consul", "rabbitmq", "postgres"):
        assert deps[infra]["condition"] == "service_healthy"

    # The settings class, fed exactly this environment, sees what compose means.
    mounts = bind_mounts(service)
    for key in ("PROVIDERS_FILE", "GATEWAY_ROUTES_FILE"):
        if key in env:
            assert env[key] in mounts, f"{name}: {key}={env[key]} is not mounted"
    cls = service_settings_class(name)
    _set_env(monkeypatch, readable, env)
    settings = cls()
    assert settings.port == port
    assert settings.host == "0.0.0.0"
    assert settings.resolved_advertise_host() == name
    assert settings.resolved_database_url().startswith("postgresql://")
    assert settings.master_key_value() == COMPOSE_ENV["MASTER_KEY"]
    assert settings.amqp_url == env["AMQP_URL"]
    assert ConsulSettings().base_url == "http://consul:8500"
    assert RegistrationSettings().service_advertise_host == name


def test_gateway_container_matches_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    service = compose_services()["gateway"]
    env = container_env(service)
    readable = readable_env("gateway")
    unknown = sorted(set(env) - readable)
    assert not unknown, f"gateway: compose sets variables nothing reads: {unknown}"
    assert "${GATEWAY_ADMIN_TOKEN:?" in str(service["environment"]["GATEWAY_ADMIN_TOKEN"])

    _set_env(monkeypatch, readable, env)
    settings = GatewaySettings()
    assert (settings.host, settings.port) == ("0.0.0.0", ARCH_PORTS["gateway"])
    assert (settings.admin_host, settings.admin_port) == ("0.0.0.0", ARCH_PORTS["gateway-admin"])
    assert settings.admin_token == COMPOSE_ENV["GATEWAY_ADMIN_TOKEN"]
    assert ConsulSettings().base_url == "http://consul:8500"

    published = {str(p).rsplit(":", 1)[-1]: str(p) for p in service["ports"]}
    assert set(published) == {"3000", "9901"}
    assert published["9901"].startswith("127.0.0.1:"), "the admin API stays on the loopback"
    assert port_of_healthcheck(service) == ARCH_PORTS["gateway-admin"]
    assert "/readyz'" in " ".join(service["healthcheck"]["test"])
    for dep in ("consul", *SERVICES):
        assert service["depends_on"][dep]["condition"] == "service_healthy"

    mounts = bind_mounts(service)
    assert settings.routes_file in mounts, "GATEWAY_ROUTES_FILE is not the mounted routes.yaml"
    load_config(str(ROOT / mounts[settings.routes_file]))  # the file is valid


def test_bind_mounts_exist() -> None:
    for name, service in compose_services().items():
        for target, source in bind_mounts(service).items():
            path = ROOT / source
            assert path.exists(), f"{name}: {source} (mounted at {target}) does not exist"
    consul = compose_services()["consul"]
    assert bind_mounts(consul)["/consul/config"] == "./consul"
    assert (ROOT / "consul" / "agent.hcl").is_file()
    # prometheus: the token's tmpfs needs its mount point inside the read-only config dir
    prom = compose_services()["prometheus"]
    assert bind_mounts(prom)["/etc/prometheus"] == "./deploy/prometheus"
    assert prom["tmpfs"] == ["/etc/prometheus/secrets"]
    assert (PROM_DIR / "secrets").is_dir()


def test_infrastructure_containers() -> None:
    services = compose_services()
    assert services["rabbitmq"]["image"] == "rabbitmq:3-management"
    assert {str(p) for p in services["rabbitmq"]["ports"]} == {
        "127.0.0.1:5672:5672", "127.0.0.1:15672:15672"}
    assert "127.0.0.1:8500:8500" in services["consul"]["ports"]
    assert "127.0.0.1:9090:9090" in services["prometheus"]["ports"]
    pg = services["postgres"]
    assert bind_mounts(pg)["/docker-entrypoint-initdb.d/10-databases.sql"] == (
        "./deploy/postgres/init.sql")
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no health check"
    # AMQP credentials are the ones RabbitMQ is created with
    rabbit_env = container_env(services["rabbitmq"])
    amqp = urlsplit(container_env(services["auth"])["AMQP_URL"])
    assert (amqp.username, amqp.password) == (
        rabbit_env["RABBITMQ_DEFAULT_USER"], rabbit_env["RABBITMQ_DEFAULT_PASS"])
    pg_env = container_env(pg)
    db = urlsplit(container_env(services["billing"])["BILLING_DATABASE_URL"])
    assert (db.username, db.password) == (pg_env["POSTGRES_USER"], pg_env["POSTGRES_PASSWORD"])


def test_init_sql_creates_one_database_per_service() -> None:
    assert sorted(init_sql_databases()) == sorted(SERVICES)


async def test_init_sql_runs_on_postgres() -> None:
    """The script as the postgres image runs it (one statement at a time, like psql),
    with the database names made unique so a shared server is left as it was."""
    asyncpg = pytest.importorskip("asyncpg")
    try:
        conn = await asyncpg.connect(PG_URL, timeout=5)
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        fail_or_skip(f"PostgreSQL is not reachable at {PG_URL} ({exc})")
    prefix = f"deploytest_{uuid.uuid4().hex[:8]}_"
    sql = re.sub(r"--[^\n]*", "", PG_INIT.read_text())
    for name in SERVICES:
        sql = re.sub(rf"\b{name}\b", prefix + name, sql)
    created: list[str] = []
    try:
        for statement in filter(None, (s.strip() for s in sql.split(";"))):
            await conn.execute(statement)
            match = re.match(r"CREATE DATABASE (\w+)", statement, re.IGNORECASE)
            if match:
                created.append(match.group(1))
        rows = await conn.fetch("SELECT datname FROM pg_database WHERE datname LIKE $1",
                                prefix + "%")
        assert sorted(r["datname"] for r in rows) == sorted(prefix + s for s in SERVICES)
    finally:
        for name in created:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await conn.close()


@pytest.mark.parametrize("status", [200, 503])
async def test_health_checks_run(aiohttp_server, status: int) -> None:
    """Each app container's health check command, run against a live endpoint: exit 0
    on 200, non-zero on 503 (an unhealthy service) and on a refused connection."""
    from aiohttp import web

    async def answer(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok" if status == 200 else "fail"}, status=status)

    app = web.Application()
    app.router.add_get("/health", answer)
    app.router.add_get("/readyz", answer)
    server = await aiohttp_server(app)
    dead = refused_port()
    for name, service in compose_services().items():
        if module_of(service) is None:
            continue
        test = service["healthcheck"]["test"]
        assert test[:2] == ["CMD", "python"], f"{name}: the slim image has no curl"
        port = port_of_healthcheck(service)
        for target, expect_ok in ((server.port, status == 200), (dead, False)):
            args = [sys.executable, *(a.replace(f":{port}/", f":{target}/") for a in test[2:])]
            proc = await asyncio.create_subprocess_exec(
                *args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            code = await asyncio.wait_for(proc.wait(), 15)
            assert (code == 0) == expect_ok, f"{name}: health check exit {code} on {target}"


# -- the image ----------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile() -> None:
    steps = dockerfile_instructions()
    assert steps[0] == ("FROM", "python:3.11-slim")
    assert steps[-1] == ("CMD", '["python", "-m", "gateway"]')
    users = [rest for kw, rest in steps if kw == "USER"]
    assert users and not users[-1].startswith(("root", "0")), "the image must not run as root"
    assert any(kw == "RUN" and re.search(r"pip install \.(\s|$)", rest) for kw, rest in steps)

    ignored = [p.strip() for p in DOCKERIGNORE.read_text().splitlines()
               if p.strip() and not p.startswith("#")]
    copied: list[str] = []
    for kw, rest in steps:
        if kw == "COPY" and not rest.startswith("--from"):
            copied += [src.rstrip("/") for src in rest.split()[:-1]]
    for src in copied:
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
        assert src not in ignored, f".dockerignore drops {src}, which the Dockerfile copies"
    # what setup.cfg needs to build: its packages and the files it reads
    setup = (ROOT / "setup.cfg").read_text()
    for needed in re.findall(r"file:\s*(\S+)", setup):
        assert needed in copied, f"setup.cfg reads {needed}: COPY it before pip install ."
    for package in ("gateway", "services", "cli"):
        assert package in copied
        for directory in (ROOT / package).rglob("*"):
            if directory.is_dir() and "__pycache__" not in directory.parts and any(
                directory.glob("*.py")
            ):
                assert (directory / "__init__.py").exists(), (
                    f"{directory.relative_to(ROOT)} has no __init__.py: "
                    "pip install . (packages = find:) would leave it out of the image"
                )

    # the defaults it bakes in are settings the code reads
    env: dict[str, str] = {}
    for kw, rest in steps:
        if kw == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
    readable = set().union(*(readable_env(p) for p in ("gateway", *SERVICES)))
    app_env = {k: v for k, v in env.items() if not k.startswith(("PYTHON", "PIP_"))}
    assert set(app_env) <= readable, sorted(set(app_env) - readable)
    for value in (env["GATEWAY_ROUTES_FILE"], env["PROVIDERS_FILE"]):
        assert Path(value).name in copied


# -- (c) promtool ----------------------------------------------------------------------


def prometheus_dir_copy(tmp_path: Path, token: str = "test-token") -> Path:
    """deploy/prometheus as the container sees it, with the token file the entrypoint writes."""
    target = tmp_path / "etc-prometheus"
    shutil.copytree(PROM_DIR, target)
    (target / "secrets" / "gateway-admin-token").write_text(token)
    return target


def test_promtool_check_config(tmp_path: Path) -> None:
    promtool = need_tool("promtool")
    result = run([promtool, "check", "config", "--syntax-only", str(PROM_CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr
    # fully, with the token file in place (it also checks the rule files it loads)
    copy = prometheus_dir_copy(tmp_path)
    result = run([promtool, "check", "config", str(copy / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "alerts.yml" in result.stdout


def test_promtool_check_rules() -> None:
    promtool = need_tool("promtool")
    result = run([promtool, "check", "rules", str(PROM_RULES)])
    assert result.returncode == 0, result.stdout + result.stderr


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(PROM_RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _known_metric_names() -> set[str]:
    """Every sample name the platform's code can export."""
    assert METRIC_MODULES  # imported: their collectors are in the default registry
    names: set[str] = set()
    for family in REGISTRY.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
                    "summary": ["_sum", "_count"]}.get(family.type, [""])
        names.update(family.name + s for s in suffixes)
    return names


def test_alert_rules_shape_and_metric_names() -> None:
    rules = _rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "alert names must be unique"
    known = _known_metric_names()
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert len(rule["annotations"]["description"]) > 80, f"{rule['alert']}: say what to do"
        for metric in re.findall(r"\baiagg_[a-z0-9_]+", rule["expr"]):
            assert metric in known, f"{rule['alert']}: {metric} is not a metric of the code"
    exprs = "\n".join(rule["expr"] for rule in rules)
    for required in (
        "aiagg_gateway_breaker_state", "aiagg_events_dlq_depth", "aiagg_events_outbox_backlog",
        'aiagg_gateway_requests_total{status=~"5.."}', "aiagg_gateway_discovery_instances",
        "aiagg_gateway_discovery_staleness_seconds",
        "aiagg_gateway_config_last_reload_successful",
    ):
        assert required in exprs, f"no alert uses {required}"


# Each case: the alert, the input series, and (eval time, the labels of each alert
# expected firing then) checks. promtool compares annotations too, so the rules are
# tested from a copy without them (their templates are checked by `check rules`).
G = 'job="gateway", instance="gateway:9901"'
ALERT_CASES: list[tuple[str, list[tuple[str, str]], list[tuple[str, list[dict[str, str]]]]]] = [
    ("AiaggGatewayDown",
     [(f"up{{{G}}}", "0x10"), ('up{job="rabbitmq", instance="rabbitmq:15692"}', "0x10")],
     [("1m", []), ("3m", [{"job": "gateway", "instance": "gateway:9901"}])]),
    ("AiaggBreakerOpen",
     [(f'aiagg_gateway_breaker_state{{{G}, service="billing"}}', "2x10"),
      (f'aiagg_gateway_breaker_state{{{G}, service="auth"}}', "0x10"),
      (f'aiagg_gateway_breaker_state{{{G}, service="proxy"}}', "1x10")],
     [("1m", []), ("3m", [{"service": "billing"}])]),
    ("AiaggBreakerOpen",  # opened, then half-open after a minute: never 2 minutes open
     [(f'aiagg_gateway_breaker_state{{{G}, service="billing"}}', "2 2 1 2 2 1 2 2 1")],
     [("4m", []), ("7m", [])]),
    ("AiaggGatewayHigh5xxRatio",
     [  # chat: 1/s ok and 0.1/s 502 (9%); billing: 1.6% errors; analytics: 50% but ~1/min
         ('aiagg_gateway_requests_total{route="chat", service="orchestrator", status="200"}',
          "0+60x20"),
         ('aiagg_gateway_requests_total{route="chat", service="orchestrator", status="502"}',
          "0+6x20"),
         ('aiagg_gateway_requests_total{route="billing", service="billing", status="200"}',
          "0+60x20"),
         ('aiagg_gateway_requests_total{route="billing", service="billing", status="503"}',
          "0+1x20"),
         ('aiagg_gateway_requests_total{route="analytics", service="analytics", status="200"}',
          "0+0.5x20"),
         ('aiagg_gateway_requests_total{route="analytics", service="analytics", status="500"}',
          "0+0.5x20"),
     ],
     [("3m", []), ("12m", [{"route": "chat", "service": "orchestrator"}])]),
    ("AiaggNoHealthyInstance",
     [('aiagg_gateway_discovery_instances{service="proxy", source="consul"}', "0x10"),
      ('aiagg_gateway_discovery_instances{service="auth", source="consul"}', "2x10")],
     [("2m", [{"service": "proxy", "source": "consul"}])]),
    ("AiaggDiscoveryStale",
     [('aiagg_gateway_discovery_staleness_seconds{service="billing", source="consul"}',
       "0 90+60x10"),
      ('aiagg_gateway_discovery_staleness_seconds{service="auth", source="consul"}', "0x10")],
     [("2m", []), ("4m", [{"service": "billing", "source": "consul"}])]),
    ("AiaggConfigReloadFailed",
     [(f"aiagg_gateway_config_last_reload_successful{{{G}}}", "1 0 0 0 1 1")],
     [("1m", []), ("2m", [{"job": "gateway", "instance": "gateway:9901"}]), ("5m", [])]),
    ("AiaggDeadLetters",
     [('aiagg_events_dlq_depth{queue="billing.usage"}', "0 3 3 3"),
      ('aiagg_events_dlq_depth{queue="analytics.events"}', "0x3")],
     [("2m", [{"queue": "billing.usage"}])]),
    ("AiaggDeadLettersInRabbitMQ",
     [('rabbitmq_detailed_queue_messages{vhost="/", queue="billing.usage.dlq"}', "0 2 2 2"),
      ('rabbitmq_detailed_queue_messages{vhost="/", queue="billing.usage"}', "5x3"),
      ('rabbitmq_detailed_queue_messages{vhost="/", queue="billing.usage.retry.1000"}', "5x3")],
     [("2m", [{"vhost": "/", "queue": "billing.usage.dlq"}])]),
    ("AiaggOutboxBacklogGrowing",
     [('aiagg_events_outbox_backlog{outbox="billing"}', "0+10x40"),
      ('aiagg_events_outbox_backlog{outbox="auth"}', "50x40"),
      ('aiagg_events_outbox_backlog{outbox="proxy"}', "0x40")],
     [("5m", []), ("25m", [{"outbox": "billing"}])]),
    ("AiaggOutboxBacklogHigh",
     [('aiagg_events_outbox_backlog{outbox="proxy"}', "2000x10"),
      ('aiagg_events_outbox_backlog{outbox="auth"}', "999x10")],
     [("3m", []), ("6m", [{"outbox": "proxy"}])]),
    ("AiaggScrapeTargetDown",
     [('up{job="rabbitmq", instance="rabbitmq:15692"}', "0x10"), (f"up{{{G}}}", "0x10"),
      ('up{job="consul", instance="consul:8500"}', "1x10")],
     [("3m", []), ("6m", [{"job": "rabbitmq", "instance": "rabbitmq:15692"}])]),
]


def test_every_alert_has_a_case() -> None:
    assert {rule["alert"] for rule in _rules()} == {case[0] for case in ALERT_CASES}


def test_alerts_fire_as_intended(tmp_path: Path) -> None:
    promtool = need_tool("promtool")
    groups = yaml.safe_load(PROM_RULES.read_text())
    severities = {}
    for group in groups["groups"]:
        for rule in group["rules"]:
            severities[rule["alert"]] = rule["labels"]["severity"]
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(groups, sort_keys=False))
    tests = []
    for alert, series, checks in ALERT_CASES:
        tests.append({
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in series],
            "alert_rule_test": [
                {
                    "eval_time": at,
                    "alertname": alert,
                    "exp_alerts": [
                        {"exp_labels": {**labels, "severity": severities[alert]}}
                        for labels in expected
                    ],
                }
                for at, expected in checks
            ],
        })
    unit = {"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": tests}
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(unit, sort_keys=False))
    result = run([promtool, "test", "rules", str(tmp_path / "alerts_test.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_what_exists() -> None:
    config = yaml.safe_load(PROM_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    gateway = jobs["gateway"]
    assert gateway["static_configs"][0]["targets"] == [f"gateway:{ARCH_PORTS['gateway-admin']}"]
    assert gateway.get("metrics_path", "/metrics") == "/metrics"
    assert gateway["authorization"]["credentials_file"] == "secrets/gateway-admin-token"
    # the entrypoint writes the token exactly where the config reads it
    entry = " ".join(compose_services()["prometheus"]["entrypoint"])
    assert "> /etc/prometheus/secrets/gateway-admin-token" in entry
    assert config["rule_files"] == ["alerts.yml"]
    # every service is scraped on its own port (services/common/app.py serves /metrics)
    service_targets = sorted(
        t
        for job in jobs.values()
        for sc in job.get("static_configs", [])
        for t in sc["targets"]
        if t.split(":")[0] in SERVICES
    )
    assert service_targets == sorted(f"{name}:{ARCH_PORTS[name]}" for name in SERVICES)


# -- (d) a real Prometheus scrapes a live gateway ---------------------------------------

ROUTES = """\
services:
  echo:
    discovery: static
    instances: [http://127.0.0.1:9]
routes:
  - name: echo
    match: {prefix: /echo/}
    service: echo
"""


async def _wait_for(what: str | Callable[[], str], probe, within: float = 25.0,
                    every: float = 0.25):
    """``await probe()`` until truthy; ``what()`` may describe what the probe last saw."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        found = await probe()
        if found:
            return found
        await asyncio.sleep(every)
    pytest.fail(f"timed out after {within}s waiting for {what() if callable(what) else what}")


def _prometheus_command(confdir: Path, datadir: Path, port: int) -> list[str]:
    """The compose service's entrypoint + command, with the container's paths mapped here."""
    binary = need_tool("prometheus")
    prom = compose_services()["prometheus"]
    entrypoint = [interpolate(str(a), {}) for a in prom["entrypoint"]]  # $$ -> $
    command = [str(a) for a in prom["command"]]

    def local(arg: str) -> str:
        arg = arg.replace("/etc/prometheus", str(confdir)).replace("/bin/prometheus", binary)
        return arg.replace("--storage.tsdb.path=/prometheus", f"--storage.tsdb.path={datadir}")

    return [*map(local, entrypoint), *map(local, command),
            f"--web.listen-address=127.0.0.1:{port}"]


async def test_real_prometheus_scrapes_the_gateway(tmp_path: Path) -> None:
    need_tool("prometheus")
    token = f"tok-{uuid.uuid4().hex}"
    routes = tmp_path / "routes.yaml"
    routes.write_text(textwrap.dedent(ROUTES))
    gw = Gateway(
        GatewaySettings(routes_file=str(routes), host="127.0.0.1", port=0, admin_host="127.0.0.1",
                        admin_port=0, admin_token=token, access_log=False),
        resolver=DiscoveryRouter(StaticResolver()),
    )
    await gw.start()
    proc: asyncio.subprocess.Process | None = None
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
    try:
        admin = f"http://127.0.0.1:{gw.admin_port}"
        async with session.get(f"{admin}/metrics") as resp:
            assert resp.status == 401  # so an "up" target below proves the token is sent
        async with session.get(f"http://127.0.0.1:{gw.public_port}/echo/x") as resp:
            assert resp.status in (502, 503)  # nothing listens on port 9: a 5xx series

        # deploy/prometheus as mounted in the container, the gateway job aimed here
        confdir = tmp_path / "etc-prometheus"
        shutil.copytree(PROM_DIR, confdir)
        config = yaml.safe_load(PROM_CONFIG.read_text())
        config["global"].update(scrape_interval="1s", scrape_timeout="1s",
                                evaluation_interval="1s")
        job = next(j for j in config["scrape_configs"] if j["job_name"] == "gateway")
        job["static_configs"][0]["targets"] = [f"127.0.0.1:{gw.admin_port}"]
        config["scrape_configs"] = [job]
        (confdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        datadir = tmp_path / "data"
        datadir.mkdir()
        port = free_port()
        log = (tmp_path / "prometheus.log").open("wb")
        proc = await asyncio.create_subprocess_exec(
            *_prometheus_command(confdir, datadir, port),
            env={**os.environ, "GATEWAY_ADMIN_TOKEN": token},
            stdout=log, stderr=subprocess.STDOUT,
        )
        api = f"http://127.0.0.1:{port}/api/v1"

        seen: dict[str, Any] = {}

        async def gateway_target_up() -> dict[str, Any] | None:
            if proc is not None and proc.returncode is not None:
                pytest.fail("prometheus exited:\n" + (tmp_path / "prometheus.log").read_text())
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(f"{api}/targets") as resp:
                    body = await resp.json()
                for target in body["data"]["activeTargets"]:
                    if target["labels"].get("job") == "gateway":
                        seen.update(health=target["health"], lastError=target["lastError"])
                        if target["health"] == "up":
                            return target
            return None

        target = await _wait_for(lambda: f"the gateway target to be up (last seen: {seen})",
                                 gateway_target_up)
        assert target["lastError"] == ""
        assert target["labels"]["component"] == "gateway"
        assert (confdir / "secrets" / "gateway-admin-token").read_text() == token

        async def query(expr: str) -> list[dict[str, Any]]:
            async with session.get(f"{api}/query", params={"query": expr}) as resp:
                body = await resp.json()
            assert body["status"] == "success", body
            return body["data"]["result"]

        result = await query("aiagg_gateway_config_last_reload_successful")
        assert [r["value"][1] for r in result] == ["1"]
        assert await query('aiagg_gateway_requests_total{route="echo", status=~"5.."}')

        async def rules_evaluated() -> list[dict[str, Any]] | None:
            async with session.get(f"{api}/rules") as resp:
                groups = (await resp.json())["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            if rules and all(not r["lastEvaluation"].startswith("0001") for r in rules):
                return rules
            return None

        rules = await _wait_for("every alert rule to be evaluated", rules_evaluated)
        assert {r["name"] for r in rules} == {rule["alert"] for rule in _rules()}
        bad = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
        assert not bad, bad
        firing = {r["name"] for r in rules if r["state"] == "firing"}
        assert "AiaggGatewayDown" not in firing and "AiaggConfigReloadFailed" not in firing
    finally:
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await session.close()
        await gw.stop()
