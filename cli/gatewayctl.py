"""``gatewayctl``: inspect and steer a running gateway through its admin API.

Talks HTTP to the admin API (``--admin-url``, env ``GATEWAY_ADMIN_URL``, default
``http://127.0.0.1:9901``) with the standard library only, so the CLI stays light;
the one exception is ``check``, which validates a routes file offline with the
gateway's own config schema.

People get aligned tables; scripts pass ``--json`` and get the admin API's JSON.

Exit codes: 0 success; 1 the gateway answered with an error (unknown service, a
refused reload) or ``check`` found problems; 2 a usage error; 3 the gateway could
not be reached (or what answered is not its admin API); 4 the admin token is
missing or refused.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn

import click

DEFAULT_ADMIN_URL = "http://127.0.0.1:9901"

EXIT_ERROR = 1
EXIT_UNREACHABLE = 3
EXIT_AUTH = 4


# --- talking to the admin API ---------------------------------------------------------


class CtlError(click.ClickException):
    """One clear line on stderr (prefixed ``gatewayctl:``) and a chosen exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR, extra: Sequence[str] = ()):
        super().__init__(message)
        self.exit_code = exit_code
        self.extra = list(extra)

    def show(self, file: Any = None) -> None:
        out = file or sys.stderr
        click.echo(f"gatewayctl: {self.format_message()}", file=out)
        for line in self.extra:
            click.echo(f"  {line}", file=out)


@dataclass
class AdminClient:
    url: str
    token: str | None
    timeout: float

    def get(self, path: str) -> Any:
        return self.call("GET", path)

    def post(self, path: str) -> Any:
        return self.call("POST", path)

    def call(self, method: str, path: str, *, accept_error: bool = False) -> Any:
        """The JSON answer; on an HTTP error, raise :class:`AdminError` unless told not to."""
        headers = {"Accept": "application/json", "User-Agent": "gatewayctl"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(
            self.url + path,
            data=b"" if method == "POST" else None,
            method=method,
            headers=headers,
        )
        try:
            with self._opener().open(request, timeout=self.timeout) as response:
                status, body, ctype = response.status, response.read(), response.headers
        except urllib.error.HTTPError as exc:
            with exc:
                status, body, ctype = exc.code, exc.read(), exc.headers
        except urllib.error.URLError as exc:
            self._unreachable(exc.reason)
        except (OSError, http.client.HTTPException) as exc:
            self._unreachable(exc)
        if status == 401:
            if self.token:
                raise CtlError(
                    f"the gateway admin API at {self.url} refused the admin token "
                    "(set --token or GATEWAY_ADMIN_TOKEN)",
                    EXIT_AUTH,
                )
            raise CtlError(
                f"the gateway admin API at {self.url} requires an admin token "
                "(set --token or GATEWAY_ADMIN_TOKEN)",
                EXIT_AUTH,
            )
        try:
            data = json.loads(body)
        except ValueError:
            if status >= 500:
                raise CtlError(
                    f"the gateway admin API at {self.url} failed on {method} {path} "
                    f"with HTTP {status} (see the gateway's log)",
                    EXIT_ERROR,
                ) from None
            kind = (ctype.get("Content-Type") or "no content type").split(";")[0]
            raise CtlError(
                f"{self.url}{path} answered HTTP {status} with {kind}, not the gateway admin "
                "API's JSON (check --admin-url or GATEWAY_ADMIN_URL)",
                EXIT_UNREACHABLE,
            ) from None
        if status >= 400 and not accept_error:
            raise AdminError(status, data)
        return data

    def _opener(self) -> urllib.request.OpenerDirector:
        host = urllib.parse.urlsplit(self.url).hostname or ""
        if _is_loopback(host):
            # a proxy from the environment must never intercept a local admin API
            return urllib.request.build_opener(urllib.request.ProxyHandler({}))
        return urllib.request.build_opener()

    def _unreachable(self, reason: object) -> NoReturn:
        raise CtlError(
            f"cannot reach the gateway admin API at {self.url}: {_reason(reason, self.timeout)} "
            "(is the gateway running? set --admin-url or GATEWAY_ADMIN_URL)",
            EXIT_UNREACHABLE,
        )


class AdminError(CtlError):
    """The gateway answered with an error document."""

    def __init__(self, status: int, data: Any) -> None:
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict):
            message = str(error.get("message") or error.get("type") or f"HTTP {status}")
        else:
            message = f"the gateway answered HTTP {status}"
        super().__init__(message, EXIT_ERROR)
        self.status = status
        self.data = data


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _reason(reason: object, timeout: float) -> str:
    if isinstance(reason, TimeoutError | socket.timeout):
        return f"no answer within {timeout:g}s"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror[:1].lower() + reason.strerror[1:]
    text = str(reason) or type(reason).__name__
    return text


def _normalise_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    return url


# --- shared options ---------------------------------------------------------------------


@dataclass
class Options:
    admin_url: str
    token: str | None
    json: bool
    timeout: float

    def client(self) -> AdminClient:
        return AdminClient(_normalise_url(self.admin_url), self.token or None, self.timeout)


def _local_options(func: Callable) -> Callable:
    """``--json``, ``--admin-url`` and ``--token`` also after the verb (they win there)."""
    func = click.option("--json", "as_json", is_flag=True, default=None, help="Print JSON.")(func)
    func = click.option("--token", default=None, help="Admin bearer token.")(func)
    func = click.option("--admin-url", default=None, help="Admin API base URL.")(func)
    return func


def _options(ctx: click.Context, admin_url: str | None, token: str | None, as_json: bool | None):
    opts: Options = ctx.ensure_object(Options)
    return Options(
        admin_url=admin_url or opts.admin_url,
        token=token if token is not None else opts.token,
        json=bool(as_json) or opts.json,
        timeout=opts.timeout,
    )


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


# --- formatting for people --------------------------------------------------------------

_STYLES = {
    "closed": "green",
    "open": "red",
    "half_open": "yellow",
    "ok": "green",
    "fresh": "green",
    "ejected": "red",
    "stale": "yellow",
}


def render_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], *, style: bool = False
) -> list[str]:
    """Left-aligned columns, two spaces apart, no trailing spaces.

    With ``style``, the header is bold and states are coloured by their first word
    (click drops the colours when the output is not a terminal).
    """
    cells = [[str(c) for c in headers]]
    cells += [["-" if c in (None, "") else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        parts = []
        for i, cell in enumerate(row):
            padded = cell if i == len(row) - 1 else cell.ljust(widths[i])
            if style and n == 0:
                padded = click.style(padded, bold=True)
            elif style and (color := _STYLES.get(cell.split(" ")[0])):
                padded = click.style(cell, fg=color) + padded[len(cell) :]
            parts.append(padded)
        lines.append("  ".join(parts).rstrip())
    return lines


def fmt_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f}ms"
    if value < 60:
        return f"{value:.0f}s" if float(value).is_integer() else f"{value:.1f}s"
    minutes, seconds = divmod(round(value), 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s" if seconds else f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def fmt_time(iso: str | None, now: datetime | None = None) -> str:
    """``2025-06-01 12:00:03Z (42s ago)`` from an ISO-8601 instant."""
    if not iso:
        return "-"
    try:
        when = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return iso
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    when = when.astimezone(UTC)
    ago = ((now or datetime.now(UTC)) - when).total_seconds()
    text = when.strftime("%Y-%m-%d %H:%M:%SZ")
    if ago >= 0:
        text += f" ({fmt_seconds(ago)} ago)"
    return text


def fmt_match(match: dict[str, Any]) -> str:
    text = f"path {match['path']}" if match.get("path") else f"prefix {match.get('prefix')}"
    if match.get("host"):
        text += f" host {match['host']}"
    return text


def breaker_rows(breakers: Sequence[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for b in breakers:
        state = b.get("state", "?")
        if b.get("forced"):
            state += " (forced)"
        if b.get("state") == "open":
            if b.get("forced"):
                probe = "never: forced open"
            else:
                probe = f"in {fmt_seconds(b.get('next_try_in'))}"
        elif b.get("state") == "half_open":
            probe = f"now: probing ({b.get('half_open_in_flight', 0)} in flight)"
        else:
            probe = "-"
        rows.append(
            [
                b.get("service"),
                state,
                f"{b.get('failures', 0)}/{b.get('failure_threshold', '?')}",
                fmt_time(b.get("opened_at")),
                probe,
            ]
        )
    return rows


def _health(passive: dict[str, Any] | None) -> str:
    if not passive:
        return "ok"
    if passive.get("ejected"):
        until = passive.get("ejected_until") or ""
        return f"ejected until {until[11:19] + 'Z' if len(until) >= 19 else until}".rstrip()
    failures = passive.get("consecutive_failures") or 0
    return f"ok ({failures} failing)" if failures else "ok"


def _staleness(source: str | None, stale: float | None) -> str:
    if stale is None:
        return "-"
    if stale <= 0:
        return "fresh" if source != "static" else "fresh (static)"
    return f"stale {fmt_seconds(stale)}"


# --- the commands -----------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--admin-url",
    envvar="GATEWAY_ADMIN_URL",
    default=DEFAULT_ADMIN_URL,
    show_default=True,
    help="Base URL of the gateway admin API (env GATEWAY_ADMIN_URL).",
)
@click.option(
    "--token",
    envvar="GATEWAY_ADMIN_TOKEN",
    default=None,
    help="Admin bearer token, when the gateway has one (env GATEWAY_ADMIN_TOKEN).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON, for scripts.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds to wait for the admin API.",
)
@click.pass_context
def cli(ctx: click.Context, admin_url: str, token: str | None, as_json: bool, timeout: float):
    """Inspect and control a running gateway; validate routes.yaml offline.

    \b
    Exit codes: 0 ok, 1 the gateway answered an error or `check` found problems,
    2 usage, 3 gateway unreachable, 4 admin token missing or refused.
    """
    ctx.obj = Options(admin_url=admin_url, token=token, json=as_json, timeout=timeout)


@cli.command()
@_local_options
@click.pass_context
def routes(ctx: click.Context, admin_url, token, as_json) -> None:
    """The routes the gateway serves.

    GET /routes.
    """
    opts = _options(ctx, admin_url, token, as_json)
    data = opts.client().get("/routes")
    if opts.json:
        return _print_json(data)
    rows = []
    for r in data.get("routes", []):
        methods = r.get("match", {}).get("methods")
        retry, timeout = r.get("retry") or {}, r.get("timeout") or {}
        rows.append(
            [
                r.get("name"),
                fmt_match(r.get("match") or {}),
                ",".join(methods) if methods else "any",
                r.get("service"),
                r.get("auth") or "none",
                fmt_seconds(timeout.get("total")),
                retry.get("attempts"),
            ]
        )
    headers = ["NAME", "MATCH", "METHODS", "SERVICE", "AUTH", "TIMEOUT", "ATTEMPTS"]
    _echo_table(headers, rows, empty="no routes")
    n = len(rows)
    source = data.get("source", "?")
    click.echo(
        f"\n{n} route{'s' * (n != 1)} from {source}, loaded {fmt_time(data.get('loaded_at'))}"
    )


@cli.command()
@click.argument("service", required=False)
@_local_options
@click.pass_context
def upstreams(ctx: click.Context, service: str | None, admin_url, token, as_json) -> None:
    """Instances per service: source, health, staleness.

    GET /upstreams, or GET /upstreams/SERVICE for one service.
    """
    opts = _options(ctx, admin_url, token, as_json)
    path = "/upstreams" if service is None else f"/upstreams/{urllib.parse.quote(service, '')}"
    data = opts.client().get(path)
    if opts.json:
        return _print_json(data)
    rows = []
    for svc in data.get("services", []):
        stale = _staleness(svc.get("source"), svc.get("stale_seconds"))
        instances = svc.get("instances") or []
        first = [svc.get("service"), svc.get("source")]
        if not instances:
            rows.append([*first, "(no instances)", "-", stale, svc.get("error")])
        for inst in instances:
            rows.append(
                [*first, inst.get("url"), _health(inst.get("passive")), stale, svc.get("error")]
            )
    headers = ["SERVICE", "SOURCE", "INSTANCE", "HEALTH", "STALENESS", "ERROR"]
    _echo_table(headers, rows, empty="no services")


@cli.command()
@_local_options
@click.pass_context
def breakers(ctx: click.Context, admin_url, token, as_json) -> None:
    """Breaker per service: state, failures, next probe.

    GET /breakers.
    """
    opts = _options(ctx, admin_url, token, as_json)
    data = opts.client().get("/breakers")
    if opts.json:
        return _print_json(data)
    headers = ["SERVICE", "STATE", "FAILURES", "OPENED AT", "NEXT PROBE"]
    _echo_table(headers, breaker_rows(data.get("breakers", [])), empty="no breakers")


_ACTION_SAYS = {
    "open": "forced open: requests get 503 until 'gatewayctl breaker close {s}' or 'reset {s}'",
    "close": "closed: traffic flows again, failure count cleared",
    "reset": "reset: closed, failure count and history cleared",
}


@cli.command()
@click.argument("action", type=click.Choice(["open", "close", "reset"]))
@click.argument("service")
@_local_options
@click.pass_context
def breaker(ctx: click.Context, action: str, service: str, admin_url, token, as_json) -> None:
    """Force a breaker open, close it, or reset it.

    POST /breakers/SERVICE/open|close|reset. A forced-open breaker stays open until
    it is closed or reset.
    """
    opts = _options(ctx, admin_url, token, as_json)
    data = opts.client().post(f"/breakers/{urllib.parse.quote(service, '')}/{action}")
    if opts.json:
        return _print_json(data)
    click.echo(f"{data.get('service', service)}: breaker {_ACTION_SAYS[action].format(s=service)}")
    _echo_table(
        ["SERVICE", "STATE", "FAILURES", "OPENED AT", "NEXT PROBE"], breaker_rows([data]), empty=""
    )


@cli.command()
@_local_options
@click.pass_context
def reload(ctx: click.Context, admin_url, token, as_json) -> None:
    """Re-read the routes file (a bad one is refused).

    POST /reload. A refused file changes nothing: the gateway keeps serving its
    previous routes, and every problem is printed as FILE:LINE: FIELD: MESSAGE.
    """
    opts = _options(ctx, admin_url, token, as_json)
    data = opts.client().call("POST", "/reload", accept_error=True)
    ok = isinstance(data, dict) and data.get("reloaded") is True
    if opts.json:
        _print_json(data)
    if ok:
        if not opts.json:
            n = data.get("routes", 0)
            click.echo(f"reloaded {data.get('source', 'routes')}: {n} route{'s' * (n != 1)}")
        return
    error = (data.get("error") if isinstance(data, dict) else None) or {}
    problems = error.get("problems") or [error.get("message") or "unknown error"]
    raise CtlError(
        "reload refused; the gateway keeps serving its previous routes:",
        EXIT_ERROR,
        extra=problems,
    )


@cli.command()
@click.argument("file", required=False, envvar="GATEWAY_ROUTES_FILE", default="routes.yaml")
@click.option("--json", "as_json", is_flag=True, default=None, help="Print JSON.")
@click.pass_context
def check(ctx: click.Context, file: str, as_json: bool | None) -> None:
    """Validate a routes file offline, no gateway needed.

    FILE defaults to $GATEWAY_ROUTES_FILE, else ./routes.yaml.

    Prints every problem as FILE:LINE: FIELD: MESSAGE and exits 1 if there is any.
    """
    opts = _options(ctx, None, None, as_json)
    problems, cfg = check_file(file)
    if opts.json:
        if problems:
            _print_json({"ok": False, "file": file, "problems": problems})
        else:
            _print_json(
                {"ok": True, "file": file, "routes": len(cfg.routes), "services": len(cfg.services)}
            )
    elif problems:
        for line in problems:
            click.echo(line)
        n = len(problems)
        click.echo(f"{file}: {n} problem{'s' * (n != 1)}", err=True)
    else:
        r, s = len(cfg.routes), len(cfg.services)
        click.echo(f"OK {file}: {r} route{'s' * (r != 1)}, {s} service{'s' * (s != 1)}")
    if problems:
        ctx.exit(EXIT_ERROR)


def check_file(path: str) -> tuple[list[str], Any]:
    """(problems, config): every file:line problem, policy-level ones included."""
    from gateway.config import load_config
    from gateway.errors import ConfigError

    try:
        return [], load_config(path)
    except ConfigError as exc:
        return list(exc.problems), None


def _echo_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, empty: str) -> None:
    if not rows:
        if empty:
            click.echo(f"({empty})")
        return
    for line in render_table(headers, rows, style=True):
        click.echo(line)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="gatewayctl")


if __name__ == "__main__":
    main()
