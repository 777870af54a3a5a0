"""A faithful double of the parts of Consul's HTTP API the platform uses (test code only).

No Consul binary can be installed where these tests run, so this aiohttp app
plays a single-node Consul server (agent + catalog) as documented:

* ``PUT /v1/agent/service/register`` (Name required, ID defaults to Name, Address,
  Port, Tags, Meta, Check/Checks; a check starts ``critical`` unless it sets
  ``Status``; check IDs default to ``service:<id>`` or ``service:<id>:<n>``);
  ``?replace-existing-checks``; re-registering keeps known checks' statuses.
* ``PUT /v1/agent/service/deregister/<id>`` (404 for an unknown id, like Consul 1.11+).
* ``GET /v1/agent/service/<id>``, ``GET /v1/agent/services``, ``GET /v1/agent/checks``.
* ``PUT /v1/agent/check/pass|warn|fail/<check_id>?note=`` and
  ``PUT /v1/agent/check/update/<check_id>`` (TTL checks only, as in Consul).
* ``GET /v1/health/service/<name>``: ``passing`` (every check of the entry, node
  checks included, must pass; an instance with no checks of its own counts as
  passing), ``tag`` (repeatable, all must match, case-insensitive), entries of
  ``{Node, Service, Checks}`` with the node's ``serfHealth`` check.
* ``GET /v1/catalog/services`` (including the ``consul`` service itself).
* ``GET /v1/status/leader``.
* Blocking queries on the health and catalog endpoints: ``index`` and ``wait``
  (Go durations, default 5m, capped at 10m, plus up to wait/16 of random jitter);
  an answer is immediate when the query's index is above ``index``, else held
  until it is or the wait ends, then given with the current (possibly the same)
  index. ``X-Consul-Index`` is on every health and catalog answer (the agent
  endpoints carry none, as in Consul) and comes from a raft-like index that rises
  with every write; each service name keeps the index of its last change.
* ACLs when ``acl_token`` is set: the token from ``X-Consul-Token``,
  ``Authorization: Bearer`` or ``?token=``; an unknown one is ``403 ACL not found``;
  none at all is the anonymous token: writes get ``403 Permission denied``, reads
  are filtered to nothing with ``X-Consul-Results-Filtered-By-ACLs: true``.

Test-only controls: :meth:`ConsulDouble.set_check_status`,
:meth:`ConsulDouble.set_node_health`, :meth:`ConsulDouble.reset_index` (a snapshot
restore: indexes go backwards), ``zero_index_bug`` (old Consul versions that
answered ``X-Consul-Index: 0``), :meth:`ConsulDouble.stop` / :meth:`ConsulDouble.start`
(down and up again on the same port, state kept like a server with a data dir),
:meth:`ConsulDouble.clear` (a fresh agent), and ``run_http_checks`` (the double
calls HTTP checks itself: 2xx passing, 429 warning, anything else critical).
Not modelled: DeregisterCriticalServiceAfter reaping, other check kinds,
datacenters other than ``dc1``, namespaces, the ``filter`` expression language.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

HEALTH_STATUSES = ("passing", "warning", "critical")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
MAX_WAIT = 600.0
DEFAULT_WAIT = 300.0
ANONYMOUS = web.RequestKey("anonymous", bool)


def parse_go_duration(text: str) -> float:
    """``"10s"``, ``"500ms"``, ``"1m30s"`` -> seconds (Go's time.ParseDuration, roughly)."""
    text = text.strip()
    if text in ("0", ""):
        return 0.0
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(text):
        if m.start() != pos:
            raise ValueError(text)
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or pos == 0:
        raise ValueError(text)
    return total


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    token: str | None


@dataclass
class _Check:
    check_id: str
    name: str
    service_id: str
    service_name: str
    type: str
    status: str
    output: str = ""
    notes: str = ""
    http: str | None = None
    method: str = "GET"
    interval: float = 0.0
    timeout: float = 10.0
    ttl: float = 0.0
    definition: dict[str, Any] = field(default_factory=dict)
    create_index: int = 0
    modify_index: int = 0


@dataclass
class _Service:
    id: str
    name: str
    address: str
    port: int
    tags: list[str]
    meta: dict[str, str]
    create_index: int
    modify_index: int
    enable_tag_override: bool = False


class ConsulDouble:
    """A one-node Consul on 127.0.0.1 for tests; see the module docstring."""

    def __init__(
        self,
        *,
        acl_token: str | None = None,
        node: str = "consul-double",
        node_address: str = "127.0.0.1",
        datacenter: str = "dc1",
        run_http_checks: bool = False,
        jitter: bool = True,
        start_index: int = 12,
    ) -> None:
        self.acl_token = acl_token
        self.node = node
        self.node_id = str(uuid.uuid4())
        self.node_address = node_address
        self.datacenter = datacenter
        self.run_http_checks = run_http_checks
        self.jitter = jitter
        self.zero_index_bug = False
        self.port: int | None = None
        self.requests: list[RecordedRequest] = []
        self._start_index = start_index
        self._runner: web.AppRunner | None = None
        self._inflight: set[asyncio.BaseTransport] = set()
        self._check_tasks: dict[str, asyncio.Task[None]] = {}
        self._http: aiohttp.ClientSession | None = None
        self._changed = asyncio.Event()
        self.clear()

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def addr(self) -> str:
        """``127.0.0.1:<port>``, the form CONSUL_HTTP_ADDR usually takes."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._runner is not None

    async def start(self, port: int | None = None) -> None:
        """Listen on ``port`` (or the previous one, or a free one); state survives restarts."""
        if self._runner is not None:
            return
        app = web.Application(middlewares=[self._middleware])
        r = app.router
        r.add_put("/v1/agent/service/register", self._register)
        r.add_put("/v1/agent/service/deregister/{id}", self._deregister)
        r.add_get("/v1/agent/service/{id}", self._agent_service)
        r.add_get("/v1/agent/services", self._agent_services)
        r.add_get("/v1/agent/checks", self._agent_checks)
        r.add_put("/v1/agent/check/{verb:pass|warn|fail}/{check_id}", self._check_ttl)
        r.add_put("/v1/agent/check/update/{check_id}", self._check_update)
        r.add_get("/v1/health/service/{name}", self._health_service)
        r.add_get("/v1/catalog/services", self._catalog_services)
        r.add_get("/v1/status/leader", self._leader)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await runner.setup()
        want = port if port is not None else (self.port or 0)
        site = web.TCPSite(runner, "127.0.0.1", want, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        server = site._server  # the asyncio Server: the real port when 0 was asked for
        assert server is not None and server.sockets
        self.port = server.sockets[0].getsockname()[1]
        if self.run_http_checks:
            self._http = aiohttp.ClientSession()
            for check in self._checks.values():
                self._start_check_runner(check)

    async def stop(self) -> None:
        """Go down like a killed agent: open connections (blocked queries too) are cut."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        for transport in list(self._inflight):
            transport.abort()
        self._inflight.clear()
        await self._stop_check_runners()
        self._notify()  # wake held queries so the runner's shutdown is quick
        await runner.cleanup()

    async def close(self) -> None:
        await self.stop()

    def clear(self) -> None:
        """Forget everything: a fresh agent (the index starts low again)."""
        for task in self._check_tasks.values():
            task.cancel()
        self._check_tasks = {}
        self.index = self._start_index
        self.node_index = self._start_index
        self.node_status = "passing"
        self._services: dict[str, _Service] = {}
        self._checks: dict[str, _Check] = {}
        self._name_index: dict[str, int] = {}
        self._services_table_index = self._start_index
        self._notify()

    # -- test controls ------------------------------------------------------------------

    @property
    def services(self) -> dict[str, dict[str, Any]]:
        """Registered services by ID, in the agent's JSON shape."""
        return {sid: self._agent_json(s) for sid, s in self._services.items()}

    def checks_of(self, service_id: str) -> list[dict[str, Any]]:
        return [self._check_json(c) for c in self._checks.values() if c.service_id == service_id]

    def set_check_status(self, target: str, status: str, output: str = "") -> None:
        """Set a check's status by check ID, or every check of a service by service ID."""
        if status not in HEALTH_STATUSES:
            raise ValueError(status)
        checks = [self._checks[target]] if target in self._checks else [
            c for c in self._checks.values() if c.service_id == target
        ]
        if not checks:
            raise KeyError(f"no check or service with id {target!r}")
        for check in checks:
            self._update_check(check, status, output)

    def set_node_health(self, status: str) -> None:
        """The node's ``serfHealth`` check (every instance on the node depends on it)."""
        if status not in HEALTH_STATUSES:
            raise ValueError(status)
        if status == self.node_status:
            return
        idx = self._bump()
        self.node_status = status
        self.node_index = idx
        for name in self._name_index:
            self._name_index[name] = idx
        self._notify()

    def reset_index(self, to: int = 1) -> None:
        """Every index drops to at most ``to``, as after restoring an older snapshot."""
        if to < 1:
            raise ValueError("Consul's indexes start at 1")
        self.index = to
        self.node_index = min(self.node_index, to)
        self._services_table_index = min(self._services_table_index, to)
        for name, idx in self._name_index.items():
            self._name_index[name] = min(idx, to)
        for s in self._services.values():
            s.create_index, s.modify_index = min(s.create_index, to), min(s.modify_index, to)
        for c in self._checks.values():
            c.create_index, c.modify_index = min(c.create_index, to), min(c.modify_index, to)
        self._notify()

    def service_index(self, name: str) -> int:
        """The index a health query for ``name`` answers with."""
        if self.zero_index_bug:
            return 0
        return self._name_index.get(name, self.index)

    # -- write side ---------------------------------------------------------------------

    def _bump(self) -> int:
        self.index += 1
        return self.index

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _touch(self, name: str, idx: int) -> None:
        self._name_index[name] = idx

    def _update_check(self, check: _Check, status: str, output: str | None = None) -> None:
        if check.status == status and (output is None or output == check.output):
            return  # an idempotent update writes nothing (no index change), as in Consul
        idx = self._bump()
        check.status = status
        if output is not None:
            check.output = output
        check.modify_index = idx
        self._touch(check.service_name, idx)
        self._notify()

    def register(self, body: dict[str, Any], *, replace_existing_checks: bool = False) -> str:
        """Register like the agent endpoint; raises ValueError with Consul's message if invalid."""
        name = body.get("Name")
        if not isinstance(name, str) or not name:
            raise ValueError("Missing service name")
        sid = body.get("ID") or name
        port = body.get("Port") or 0
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"Invalid Port: {port!r}")
        tags = body.get("Tags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ValueError("Invalid Tags: must be a list of strings")
        meta = body.get("Meta") or {}
        if not isinstance(meta, dict):
            raise ValueError("Invalid Meta: must be a map of strings")
        defs: list[dict[str, Any]] = []
        if body.get("Check"):
            defs.append(body["Check"])
        defs.extend(body.get("Checks") or [])
        checks = [self._parse_check(d, sid, name, i, len(defs)) for i, d in enumerate(defs)]

        idx = self._bump()
        old = self._services.get(sid)
        if old is not None and old.name != name:
            self._touch(old.name, idx)
        self._services[sid] = _Service(
            id=sid, name=name, address=body.get("Address") or "", port=port, tags=list(tags),
            meta={str(k): str(v) for k, v in meta.items()},
            create_index=old.create_index if old else idx, modify_index=idx,
            enable_tag_override=bool(body.get("EnableTagOverride")),
        )
        new_ids = {c.check_id for c in checks}
        for cid in [cid for cid, c in self._checks.items() if c.service_id == sid]:
            if replace_existing_checks and cid not in new_ids:
                self._drop_check(cid)
        for check in checks:
            prev = self._checks.get(check.check_id)
            if prev is not None:
                if "Status" not in check.definition:
                    check.status, check.output = prev.status, prev.output  # no flapping
                check.create_index = prev.create_index
                self._stop_check_runner(check.check_id)
            else:
                check.create_index = idx
            check.modify_index = idx
            self._checks[check.check_id] = check
            self._start_check_runner(check)
        self._touch(name, idx)
        self._services_table_index = idx
        self._notify()
        return sid

    def deregister(self, service_id: str) -> None:
        svc = self._services.pop(service_id, None)
        if svc is None:
            raise KeyError(service_id)
        idx = self._bump()
        for cid in [cid for cid, c in self._checks.items() if c.service_id == service_id]:
            self._drop_check(cid)
        self._touch(svc.name, idx)
        self._services_table_index = idx
        self._notify()

    def _drop_check(self, check_id: str) -> None:
        self._checks.pop(check_id, None)
        self._stop_check_runner(check_id)

    def _parse_check(
        self, d: dict[str, Any], sid: str, name: str, i: int, count: int
    ) -> _Check:
        if not isinstance(d, dict):
            raise ValueError("Invalid check: must be an object")
        cid = d.get("CheckID") or d.get("ID") or (
            f"service:{sid}:{i + 1}" if count > 1 else f"service:{sid}"
        )
        status = d.get("Status") or "critical"
        if status not in HEALTH_STATUSES:
            raise ValueError(f"Invalid check status: {status!r}")
        try:
            ttl = parse_go_duration(str(d.get("TTL") or "0"))
            interval = parse_go_duration(str(d.get("Interval") or "0"))
            timeout = parse_go_duration(str(d.get("Timeout") or "10s"))
            if d.get("DeregisterCriticalServiceAfter"):
                parse_go_duration(str(d["DeregisterCriticalServiceAfter"]))
        except ValueError as exc:
            raise ValueError(f"Invalid check: bad duration {exc}") from None
        if d.get("HTTP"):
            kind = "http"
            if interval <= 0:
                raise ValueError(
                    "Invalid check: Interval must be > 0 for Script, HTTP, or TCP checks"
                )
        elif d.get("TTL"):
            kind = "ttl"
            if ttl <= 0:
                raise ValueError("Invalid check: TTL must be > 0 for TTL checks")
        else:
            raise ValueError(
                "Invalid check: Interval and one of HTTP, TCP, GRPC, Args, UDP or TTL must be set"
            )
        return _Check(
            check_id=cid, name=d.get("Name") or f"Service '{name}' check", service_id=sid,
            service_name=name, type=kind, status=status, notes=d.get("Notes") or "",
            http=d.get("HTTP"), method=d.get("Method") or "GET", interval=interval,
            timeout=timeout, ttl=ttl, definition=dict(d),
        )

    # -- HTTP checks (run_http_checks) ----------------------------------------------------

    def _start_check_runner(self, check: _Check) -> None:
        if not (self.run_http_checks and self.running and check.type == "http"):
            return
        self._stop_check_runner(check.check_id)
        self._check_tasks[check.check_id] = asyncio.create_task(self._run_http_check(check))

    def _stop_check_runner(self, check_id: str) -> None:
        task = self._check_tasks.pop(check_id, None)
        if task is not None:
            task.cancel()

    async def _stop_check_runners(self) -> None:
        tasks = list(self._check_tasks.values())
        self._check_tasks = {}
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _run_http_check(self, check: _Check) -> None:
        while True:
            if self._checks.get(check.check_id) is not check or self._http is None:
                return
            try:
                async with self._http.request(
                    check.method, check.http, timeout=aiohttp.ClientTimeout(total=check.timeout)
                ) as resp:
                    body = (await resp.text())[:4096]
                    if 200 <= resp.status < 300:
                        status = "passing"
                    elif resp.status == 429:
                        status = "warning"
                    else:
                        status = "critical"
                    output = (
                        f"HTTP {check.method} {check.http}: {resp.status} {resp.reason} "
                        f"Output: {body}"
                    )
            except (aiohttp.ClientError, TimeoutError) as exc:
                status, output = "critical", f"Get \"{check.http}\": {exc or type(exc).__name__}"
            self._update_check(check, status, output)
            await asyncio.sleep(check.interval)

    # -- HTTP layer ---------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        token = request.headers.get("X-Consul-Token")
        auth = request.headers.get("Authorization", "")
        if token is None and auth.lower().startswith("bearer "):
            token = auth[7:].strip()
        if token is None:
            token = request.query.get("token")
        self.requests.append(RecordedRequest(
            request.method, request.path,
            {k: request.query.getall(k) for k in request.query}, token,
        ))
        request[ANONYMOUS] = False
        if self.acl_token is not None:
            if token:
                if token != self.acl_token:
                    return web.Response(status=403, text="ACL not found")
            else:
                request[ANONYMOUS] = True
        dc = request.query.get("dc")
        if dc and dc != self.datacenter:
            return web.Response(status=500, text="No path to datacenter")
        transport = request.transport
        if transport is not None:
            self._inflight.add(transport)
        try:
            return await handler(request)
        finally:
            if transport is not None:
                self._inflight.discard(transport)

    def _deny_anonymous_write(self, request: web.Request, what: str) -> web.Response | None:
        if request[ANONYMOUS]:
            return web.Response(
                status=403,
                text=f"Permission denied: anonymous token lacks permission '{what}'",
            )
        return None

    def _headers(self, index: int, *, filtered: bool = False) -> dict[str, str]:
        h = {
            "X-Consul-Index": str(index),
            "X-Consul-KnownLeader": "true",
            "X-Consul-LastContact": "0",
            "X-Consul-Effective-Consistency": "leader",
        }
        if self.acl_token is not None:
            h["X-Consul-Default-ACL-Policy"] = "deny"
        if filtered:
            h["X-Consul-Results-Filtered-By-ACLs"] = "true"
        return h

    async def _block(self, request: web.Request, current_index: Any) -> web.Response | None:
        """Hold a blocking query until ``current_index()`` passes ``?index`` or the wait ends."""
        raw_index = request.query.get("index")
        if raw_index is None:
            return None
        try:
            min_index = int(raw_index)
            if min_index < 0:
                raise ValueError
        except ValueError:
            return web.Response(status=400, text="Invalid index")
        try:
            raw_wait = request.query.get("wait")
            wait = parse_go_duration(raw_wait) if raw_wait is not None else DEFAULT_WAIT
        except ValueError:
            return web.Response(status=400, text="Invalid wait time")
        if min_index == 0:
            return None
        wait = min(wait, MAX_WAIT) or DEFAULT_WAIT
        if self.jitter:
            wait += random.uniform(0, wait / 16)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while self.running and current_index() <= min_index:
            left = deadline - loop.time()
            if left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        return None

    async def _register(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.text() or "null")
        except ValueError as exc:
            return web.Response(status=400, text=f"Request decode failed: {exc}")
        if not isinstance(body, dict):
            return web.Response(status=400, text="Request decode failed: not an object")
        denied = self._deny_anonymous_write(request, f"service:write on {body.get('Name')!r}")
        if denied:
            return denied
        try:
            self.register(body, replace_existing_checks="replace-existing-checks" in request.query)
        except ValueError as exc:
            return web.Response(status=400, text=str(exc))
        return web.Response(status=200)

    async def _deregister(self, request: web.Request) -> web.Response:
        sid = request.match_info["id"]
        denied = self._deny_anonymous_write(request, "service:write")
        if denied:
            return denied
        try:
            self.deregister(sid)
        except KeyError:
            return web.Response(
                status=404,
                text=f'Unknown service ID "{sid}". Ensure that the service ID is passed, '
                "not the service name.",
            )
        return web.Response(status=200)

    async def _agent_service(self, request: web.Request) -> web.Response:
        svc = self._services.get(request.match_info["id"])
        if svc is None or request[ANONYMOUS]:
            return web.Response(status=404, text=f"unknown service ID: {request.match_info['id']}")
        return web.json_response(self._agent_json(svc))

    async def _agent_services(self, request: web.Request) -> web.Response:
        if request[ANONYMOUS]:
            return web.json_response({}, headers={"X-Consul-Results-Filtered-By-ACLs": "true"})
        return web.json_response(self.services)

    async def _agent_checks(self, request: web.Request) -> web.Response:
        if request[ANONYMOUS]:
            return web.json_response({}, headers={"X-Consul-Results-Filtered-By-ACLs": "true"})
        return web.json_response({cid: self._check_json(c) for cid, c in self._checks.items()})

    def _ttl_check(self, request: web.Request) -> _Check | web.Response:
        cid = request.match_info["check_id"]
        denied = self._deny_anonymous_write(request, "service:write")
        if denied:
            return denied
        check = self._checks.get(cid)
        if check is None:
            return web.Response(status=404, text=f'Unknown check ID "{cid}"')
        if check.type != "ttl":
            return web.Response(status=500, text=f'CheckID "{cid}" does not have associated TTL')
        return check

    async def _check_ttl(self, request: web.Request) -> web.Response:
        found = self._ttl_check(request)
        if isinstance(found, web.Response):
            return found
        status = {"pass": "passing", "warn": "warning", "fail": "critical"}[
            request.match_info["verb"]
        ]
        self._update_check(found, status, request.query.get("note", ""))
        return web.Response(status=200)

    async def _check_update(self, request: web.Request) -> web.Response:
        found = self._ttl_check(request)
        if isinstance(found, web.Response):
            return found
        try:
            body = json.loads(await request.text() or "{}")
        except ValueError as exc:
            return web.Response(status=400, text=f"Request decode failed: {exc}")
        status = body.get("Status")
        if status not in HEALTH_STATUSES:
            return web.Response(status=400, text=f"Invalid check status: '{status}'")
        self._update_check(found, status, str(body.get("Output") or ""))
        return web.Response(status=200)

    async def _health_service(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        early = await self._block(request, lambda: self.service_index(name))
        if early is not None:
            return early
        passing = "passing" in request.query and request.query["passing"].lower() not in (
            "false", "0",
        )
        wanted = [t.lower() for t in request.query.getall("tag", [])]
        entries = []
        for svc in sorted(self._services.values(), key=lambda s: s.id):
            if svc.name != name:
                continue
            lowered = {t.lower() for t in svc.tags}
            if any(t not in lowered for t in wanted):
                continue
            checks = [self._serf_json()] + [
                self._check_json(c) for c in self._checks.values() if c.service_id == svc.id
            ]
            if passing and any(c["Status"] != "passing" for c in checks):
                continue
            entries.append({"Node": self._node_json(), "Service": self._health_svc_json(svc),
                            "Checks": checks})
        filtered = bool(request[ANONYMOUS] and entries)
        if request[ANONYMOUS]:
            entries = []
        return web.json_response(
            entries, headers=self._headers(self.service_index(name), filtered=filtered)
        )

    async def _catalog_services(self, request: web.Request) -> web.Response:
        def idx() -> int:
            return 0 if self.zero_index_bug else self._services_table_index

        early = await self._block(request, idx)
        if early is not None:
            return early
        catalog: dict[str, list[str]] = {"consul": []}
        for svc in self._services.values():
            tags = catalog.setdefault(svc.name, [])
            tags.extend(t for t in svc.tags if t not in tags)
        filtered = bool(request[ANONYMOUS])
        if filtered:
            catalog = {}
        return web.json_response(catalog, headers=self._headers(idx(), filtered=filtered))

    async def _leader(self, request: web.Request) -> web.Response:
        return web.json_response(f"{self.node_address}:8300")

    # -- JSON shapes ----------------------------------------------------------------------

    def _node_json(self) -> dict[str, Any]:
        return {
            "ID": self.node_id, "Node": self.node, "Address": self.node_address,
            "Datacenter": self.datacenter,
            "TaggedAddresses": {"lan": self.node_address, "wan": self.node_address},
            "Meta": {"consul-network-segment": ""},
            "CreateIndex": min(self._start_index, self.index), "ModifyIndex": self.node_index,
        }

    def _serf_json(self) -> dict[str, Any]:
        return {
            "Node": self.node, "CheckID": "serfHealth", "Name": "Serf Health Status",
            "Status": self.node_status, "Notes": "",
            "Output": "Agent alive and reachable" if self.node_status == "passing"
            else "Agent not live or unreachable",
            "ServiceID": "", "ServiceName": "", "ServiceTags": [], "Type": "",
            "Interval": "", "Timeout": "", "ExposedPort": 0, "Definition": {},
            "CreateIndex": min(self._start_index, self.index), "ModifyIndex": self.node_index,
        }

    def _check_json(self, c: _Check) -> dict[str, Any]:
        svc = self._services.get(c.service_id)
        return {
            "Node": self.node, "CheckID": c.check_id, "Name": c.name, "Status": c.status,
            "Notes": c.notes, "Output": c.output, "ServiceID": c.service_id,
            "ServiceName": c.service_name, "ServiceTags": list(svc.tags) if svc else [],
            "Type": c.type,
            "Interval": c.definition.get("Interval", "") if c.type == "http" else "",
            "Timeout": c.definition.get("Timeout", "") if c.type == "http" else "",
            "ExposedPort": 0, "Definition": {}, "CreateIndex": c.create_index,
            "ModifyIndex": c.modify_index,
        }

    def _health_svc_json(self, s: _Service) -> dict[str, Any]:
        return {
            "ID": s.id, "Service": s.name, "Tags": list(s.tags), "Address": s.address,
            "TaggedAddresses": {}, "Meta": dict(s.meta), "Port": s.port,
            "Weights": {"Passing": 1, "Warning": 1}, "EnableTagOverride": s.enable_tag_override,
            "Proxy": {"Mode": "", "MeshGateway": {}, "Expose": {}}, "Connect": {},
            "PeerName": "", "CreateIndex": s.create_index, "ModifyIndex": s.modify_index,
        }

    def _agent_json(self, s: _Service) -> dict[str, Any]:
        return {
            "ID": s.id, "Service": s.name, "Tags": list(s.tags), "Meta": dict(s.meta),
            "Port": s.port, "Address": s.address, "Weights": {"Passing": 1, "Warning": 1},
            "EnableTagOverride": s.enable_tag_override, "Datacenter": self.datacenter,
        }


async def _serve(port: int, token: str | None, run_http_checks: bool) -> None:
    double = ConsulDouble(acl_token=token, run_http_checks=run_http_checks)
    await double.start(port)
    print(f"Consul double on {double.url} (CONSUL_HTTP_ADDR={double.addr}); Ctrl-C stops it")
    try:
        await asyncio.Event().wait()
    finally:
        await double.stop()


if __name__ == "__main__":  # a stand-in Consul for poking at by hand: python -m tests.consul_double
    import argparse

    parser = argparse.ArgumentParser(description="Run the Consul double (test tool, not Consul)")
    parser.add_argument("--port", type=int, default=8500)
    parser.add_argument("--token", help="enable ACLs with this one valid token")
    parser.add_argument("--run-http-checks", action="store_true")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.port, args.token, args.run_http_checks))
