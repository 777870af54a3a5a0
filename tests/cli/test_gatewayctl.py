"""``gatewayctl`` against a live gateway: every verb, tables and ``--json``, and its errors.

The CLI is synchronous and the gateway runs on the test's event loop, so in-process
calls go through a thread (``asyncio.to_thread``); one test runs the installed
console script as a real subprocess.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
from aiohttp import web
from click.testing import CliRunner, Result

from cli.gatewayctl import cli, fmt_seconds, render_table
from tests.support import refused_port, refused_url

CLEAN_ENV = {"GATEWAY_ADMIN_URL": None, "GATEWAY_ADMIN_TOKEN": None, "GATEWAY_ROUTES_FILE": None}


def config(app_url: str, dead_url: str) -> str:
    return f"""
services:
  echo:
    instances: [{app_url}]
    breaker: {{failures: 2, reset_after: 10s}}
  billing:
    instances: [{app_url}, {dead_url}]
  flaky:
    instances: [{dead_url}]
    breaker: {{failures: 1, reset_after: 30s}}
routes:
  - name: items
    match: {{path: "/items/{{id}}", methods: [GET]}}
    service: echo
    timeout: {{total: 2s}}
    retry: {{attempts: 2}}
  - name: billing
    match: {{prefix: /billing/}}
    service: billing
  - name: flaky
    match: {{prefix: /flaky/}}
    service: flaky
    retry: {{attempts: 1}}
"""


async def ctl(*args: str, env: dict | None = None) -> Result:
    """Run gatewayctl in-process, off the event loop the gateway runs on."""
    runner = CliRunner()
    return await asyncio.to_thread(runner.invoke, cli, list(args), env={**CLEAN_ENV, **(env or {})})


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def row(output: str, first: str) -> list[str]:
    """The table row whose first column is ``first``, split on the two-space gaps."""
    for line in output.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in:\n{output}")


@pytest.fixture
async def gateway(start_gateway, make_upstream):
    up = await make_upstream()
    dead = refused_url()
    g = await start_gateway(config(up.url, dead))
    g.app_url, g.dead_url = up.url, dead
    return g


async def test_routes_table_and_json(gateway):
    res = await ctl("--admin-url", gateway.admin, "routes")
    assert res.exit_code == 0, res.output
    header = lines(res.stdout)[0].split()
    assert header == ["NAME", "MATCH", "METHODS", "SERVICE", "AUTH", "TIMEOUT", "ATTEMPTS"]
    assert row(res.stdout, "items") == [
        "items",
        "path /items/{id}",
        "GET",
        "echo",
        "none",
        "2s",
        "2",
    ]
    billing = ["billing", "prefix /billing/", "any", "billing", "none", "30s", "3"]
    assert row(res.stdout, "billing") == billing
    assert f"3 routes from {gateway.routes_file}" in res.stdout
    # columns are aligned: every row starts its columns where the header does
    table = lines(res.stdout)[:4]
    starts = [m.start() for m in re.finditer(r"(?<=  )\S", table[0])]
    for line in table[1:]:
        assert all(line[i - 2 : i] == "  " and line[i] != " " for i in starts), line

    res = await ctl("--admin-url", gateway.admin, "--json", "routes")
    assert res.exit_code == 0
    data = json.loads(res.stdout)
    assert [r["name"] for r in data["routes"]] == ["items", "billing", "flaky"]
    assert data["routes"][0]["timeout"]["total"] == 2.0
    # --json and --admin-url are accepted after the verb as well
    res = await ctl("routes", "--json", "--admin-url", gateway.admin)
    assert res.exit_code == 0 and json.loads(res.stdout) == data


async def test_upstreams_all_and_one_service(gateway):
    async with gateway.session.get(f"{gateway.url}/flaky/x") as r:  # a failure on the dead one
        assert r.status == 502
    res = await ctl("upstreams", env={"GATEWAY_ADMIN_URL": gateway.admin})
    assert res.exit_code == 0, res.output
    assert lines(res.stdout)[0].split() == [
        "SERVICE", "SOURCE", "INSTANCE", "HEALTH", "STALENESS", "ERROR"
    ]  # fmt: skip
    assert row(res.stdout, "echo") == [
        "echo",
        "static",
        gateway.app_url,
        "ok",
        "fresh (static)",
        "-",
    ]
    billing = [line for line in res.stdout.splitlines() if line.startswith("billing")]
    assert len(billing) == 2 and gateway.dead_url in billing[1]
    assert row(res.stdout, "flaky")[3] == "ok (1 failing)"

    res = await ctl("--admin-url", gateway.admin, "upstreams", "billing")
    assert res.exit_code == 0
    assert {line.split()[0] for line in lines(res.stdout)[1:]} == {"billing"}

    res = await ctl("--admin-url", gateway.admin, "--json", "upstreams", "billing")
    data = json.loads(res.stdout)
    assert [s["service"] for s in data["services"]] == ["billing"]
    assert [i["url"] for i in data["services"][0]["instances"]] == [
        gateway.app_url,
        gateway.dead_url,
    ]

    res = await ctl("--admin-url", gateway.admin, "upstreams", "nope")
    assert res.exit_code == 1
    assert res.stdout == ""
    assert res.stderr == "gatewayctl: unknown service 'nope'\n"


async def test_breaker_open_close_reset_show_in_breakers(gateway):
    admin = ["--admin-url", gateway.admin]
    res = await ctl(*admin, "breakers")
    assert res.exit_code == 0, res.output
    assert lines(res.stdout)[0].split() == [
        "SERVICE", "STATE", "FAILURES", "OPENED", "AT", "NEXT", "PROBE"
    ]  # fmt: skip
    assert row(res.stdout, "echo") == ["echo", "closed", "0/2", "-", "-"]

    res = await ctl(*admin, "breaker", "open", "echo")
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("echo: breaker forced open")
    async with gateway.session.get(f"{gateway.url}/items/1") as r:
        assert r.status == 503
    res = await ctl(*admin, "breakers")
    echo = row(res.stdout, "echo")
    assert echo[:3] == ["echo", "open (forced)", "0/2"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ \(.+ ago\)", echo[3])
    assert echo[4] == "never: forced open"

    res = await ctl(*admin, "--json", "breaker", "close", "echo")
    assert res.exit_code == 0
    snap = json.loads(res.stdout)
    assert snap["service"] == "echo" and snap["state"] == "closed" and snap["forced"] is False
    async with gateway.session.get(f"{gateway.url}/items/1") as r:
        assert r.status == 200
    res = await ctl(*admin, "--json", "breakers")
    echo_json = next(b for b in json.loads(res.stdout)["breakers"] if b["service"] == "echo")
    assert echo_json["state"] == "closed" and echo_json["opened_at"] is not None

    res = await ctl(*admin, "breaker", "reset", "echo")
    assert res.exit_code == 0 and "reset" in res.stdout
    res = await ctl(*admin, "breakers")
    assert row(res.stdout, "echo") == ["echo", "closed", "0/2", "-", "-"]

    # a breaker opened by failures shows when it will probe next
    async with gateway.session.get(f"{gateway.url}/flaky/x") as r:
        assert r.status == 502
    res = await ctl(*admin, "breakers")
    flaky = row(res.stdout, "flaky")
    assert flaky[:3] == ["flaky", "open", "1/1"]
    assert re.fullmatch(r"in (29|30)(\.\d)?s", flaky[4]), flaky

    res = await ctl(*admin, "breaker", "open", "nope")
    assert res.exit_code == 1
    assert res.stderr == "gatewayctl: unknown service 'nope' (known: billing, echo, flaky)\n"
    res = await ctl(*admin, "breaker", "explode", "echo")
    assert res.exit_code == 2  # click's usage error


async def test_reload_ok_then_refused_with_file_and_line(gateway):
    admin = ["--admin-url", gateway.admin]
    text = config(gateway.app_url, gateway.dead_url)
    gateway.write(text + "  - name: extra\n    match: {prefix: /extra/}\n    service: echo\n")
    res = await ctl(*admin, "reload")
    assert res.exit_code == 0, res.output
    assert res.stdout == f"reloaded {gateway.routes_file}: 4 routes\n"

    broken = text + "  - name: bad\n    match: {prefix: /bad/}\n    service: nowhere\n"
    gateway.write(broken)
    line = textwrap.dedent(broken).splitlines().index("    service: nowhere") + 1
    res = await ctl(*admin, "reload")
    assert res.exit_code == 1
    assert res.stdout == ""
    err = res.stderr.splitlines()
    assert err[0] == "gatewayctl: reload refused; the gateway keeps serving its previous routes:"
    assert err[1].startswith(f"  {gateway.routes_file}:{line}: routes[3].service: ")
    assert "nowhere" in err[1]

    res = await ctl(*admin, "--json", "reload")
    assert res.exit_code == 1
    data = json.loads(res.stdout)
    assert data["reloaded"] is False
    assert data["error"]["problems"][0].startswith(f"{gateway.routes_file}:{line}:")

    res = await ctl(*admin, "--json", "routes")  # the previous good routes still serve
    assert len(json.loads(res.stdout)["routes"]) == 4


async def test_check_ok_and_broken(tmp_path, monkeypatch):
    good = tmp_path / "routes.yaml"
    good.write_text(config("http://127.0.0.1:1", "http://127.0.0.1:2"))
    res = await ctl("check", str(good))
    assert res.exit_code == 0, res.output
    assert res.stdout == f"OK {good}: 3 routes, 3 services\n"

    # the default file: $GATEWAY_ROUTES_FILE, else ./routes.yaml
    res = await ctl("check", env={"GATEWAY_ROUTES_FILE": str(good)})
    assert res.exit_code == 0 and res.stdout.startswith(f"OK {good}:")
    monkeypatch.chdir(tmp_path)
    res = await ctl("--json", "check")
    assert res.exit_code == 0
    assert json.loads(res.stdout) == {"ok": True, "file": "routes.yaml", "routes": 3, "services": 3}

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        textwrap.dedent(
            """\
            services:
              echo:
                instances: [http://127.0.0.1:1]
                breaker: {failures: 0}
            routes:
              - name: one
                match: {prefix: /one/}
                service: echo
                timout: {total: 1s}
            """
        )
    )
    res = await ctl("check", str(bad))
    assert res.exit_code == 1
    out = lines(res.stdout)
    assert out == [
        f"{bad}:4: services.echo.breaker.failures: Input should be greater than or equal to 1",
        f"{bad}:9: routes[0].timout: unknown field (check the spelling)",
    ]
    assert res.stderr == f"{bad}: 2 problems\n"
    res = await ctl("check", str(bad), "--json")
    assert res.exit_code == 1
    assert json.loads(res.stdout)["problems"] == out

    # what only shows when policies are resolved is reported too
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "defaults:\n  retry: {backoff: {initial: 2s, max: 1s}}\n"
        "services:\n  echo:\n    instances: [http://127.0.0.1:1]\n"
        "routes:\n  - name: one\n    match: {prefix: /one/}\n    service: echo\n"
    )
    res = await ctl("check", str(policy))
    assert res.exit_code == 1
    assert (
        res.stdout == f"{policy}:7: routes[0]: retry backoff_max must be >= backoff_initial\n"
    )

    res = await ctl("check", str(tmp_path / "missing.yaml"))
    assert res.exit_code == 1
    assert res.stdout.startswith(f"{tmp_path / 'missing.yaml'}: cannot read the routes file")


async def test_unreachable_gateway_is_one_line_and_nonzero():
    url = refused_url()
    for args in (["breakers"], ["--json", "routes"], ["breaker", "open", "echo"], ["reload"]):
        res = await ctl("--admin-url", url, *args)
        assert res.exit_code == 3, (args, res.output)
        assert res.stdout == ""
        assert res.stderr == (
            f"gatewayctl: cannot reach the gateway admin API at {url}: connection refused "
            "(is the gateway running? set --admin-url or GATEWAY_ADMIN_URL)\n"
        )


async def test_admin_token_missing_wrong_and_right(start_gateway, make_upstream):
    up = await make_upstream()
    g = await start_gateway(
        f"services:\n  echo:\n    instances: [{up.url}]\nroutes: []\n", admin_token="s3cret"
    )
    res = await ctl("--admin-url", g.admin, "breakers")
    assert res.exit_code == 4
    assert res.stderr == (
        f"gatewayctl: the gateway admin API at {g.admin} requires an admin token "
        "(set --token or GATEWAY_ADMIN_TOKEN)\n"
    )
    res = await ctl("--admin-url", g.admin, "--token", "nope", "breaker", "open", "echo")
    assert res.exit_code == 4
    assert res.stdout == ""
    assert res.stderr == (
        f"gatewayctl: the gateway admin API at {g.admin} refused the admin token "
        "(set --token or GATEWAY_ADMIN_TOKEN)\n"
    )
    assert g.gw.upstreams.breakers["echo"].state == "closed"
    res = await ctl("--admin-url", g.admin, "--token", "s3cret", "breakers")
    assert res.exit_code == 0 and row(res.stdout, "echo")[1] == "closed"
    res = await ctl("routes", env={"GATEWAY_ADMIN_URL": g.admin, "GATEWAY_ADMIN_TOKEN": "s3cret"})
    assert res.exit_code == 0 and "(no routes)" in res.stdout


async def test_something_else_or_a_crash_at_the_admin_url(aiohttp_server):
    async def page(_: web.Request) -> web.Response:
        return web.Response(text="<html>hello</html>", content_type="text/html")

    async def crash(_: web.Request) -> web.Response:
        raise RuntimeError("boom")

    app = web.Application()
    app.router.add_post("/reload", crash)
    app.router.add_get("/{tail:.*}", page)
    server = await aiohttp_server(app)
    url = f"http://127.0.0.1:{server.port}"
    res = await ctl("--admin-url", url, "breakers")
    assert res.exit_code == 3
    assert res.stderr == (
        f"gatewayctl: {url}/breakers answered HTTP 200 with text/html, not the gateway admin "
        "API's JSON (check --admin-url or GATEWAY_ADMIN_URL)\n"
    )
    res = await ctl("--admin-url", url, "reload")
    assert res.exit_code == 1
    assert res.stderr == (
        f"gatewayctl: the gateway admin API at {url} failed on POST /reload with HTTP 500 "
        "(see the gateway's log)\n"
    )


def console_script() -> str:
    script = Path(sys.executable).parent / "gatewayctl"
    found = str(script) if script.exists() else shutil.which("gatewayctl")
    if found is None:
        pytest.fail("the gatewayctl console script is not installed: run pip install -e .")
    return found


async def run_script(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        console_script(),
        *args,
        env={"PATH": "/usr/bin:/bin", **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, out.decode(), err.decode()


async def test_console_script_as_a_subprocess(gateway):
    env = {"GATEWAY_ADMIN_URL": gateway.admin}
    code, out, err = await run_script("breaker", "open", "billing", "--json", env=env)
    assert code == 0, err
    assert json.loads(out)["state"] == "open"
    code, out, err = await run_script("breakers", env=env)
    assert code == 0, err
    assert row(out, "billing")[1] == "open (forced)"
    assert "\x1b[" not in out  # no colour codes when stdout is not a terminal

    code, out, err = await run_script(
        "routes", env={"GATEWAY_ADMIN_URL": f"127.0.0.1:{refused_port()}"}
    )
    assert code == 3 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("gatewayctl: cannot reach the gateway")


def test_table_and_duration_formatting():
    assert render_table(["A", "LONGER"], [["x", None], ["wide cell", "v"]]) == [
        "A          LONGER",
        "x          -",
        "wide cell  v",
    ]
    assert [fmt_seconds(v) for v in (None, 0.25, 2.0, 9.56, 60, 150, 300, 7200)] == [
        "-", "250ms", "2s", "9.6s", "1m", "2m30s", "5m", "2h00m"
    ]  # fmt: skip
