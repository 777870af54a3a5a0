"""One run, side by side: direct upstream, nginx, a 30-line aiohttp proxy, and the gateway.

    .venv/bin/python bench/gateway_proxy.py [--seconds 8] [--connections 50]

The gateway runs its full policy chain on a one-route config: route match, retry
policy, circuit breaker, balancer, per-try timeout, header rewriting, metrics and
the JSON access log (written to /dev/null). CPU per request is the proxy process's
utime + stime over the run, divided by the requests served.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from harness import (
    PY,
    cpu_seconds,
    free_port,
    load,
    machine_line,
    run,
    start,
    table,
)

ROUTES = """
defaults:
  timeout: {{connect: 1s, per_try: 5s, total: 10s}}
  retry: {{attempts: 3, backoff: {{initial: 50ms, max: 1s}}, on: [connect-error, 502, 503, 504]}}
  breaker: {{failures: 5, reset_after: 30s}}
services:
  bench:
    instances: [http://127.0.0.1:{port}]
routes:
  - name: bench
    match: {{prefix: /}}
    service: bench
"""


NGINX = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  upstream bench {{ server 127.0.0.1:{up}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://bench;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"""


def start_nginx(port: int, up_port: int, work: Path):
    """nginx 1 worker with upstream keep-alive, as in ../shared/BENCHMARKING.md; None if absent.

    ``work`` is its prefix directory (config, logs, temp files); the caller removes it.
    """
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        return None
    work.mkdir()
    conf = work / "nginx.conf"
    conf.write_text(NGINX.format(dir=work, up=up_port, port=port))
    return start([binary, "-c", str(conf), "-p", str(work)], port=port)


def worker_pid(master_pid: int) -> int:
    """nginx serves from its worker: measure that process's CPU."""
    children = Path(f"/proc/{master_pid}/task/{master_pid}/children")
    kids = children.read_text().split() if children.exists() else []
    return int(kids[0]) if kids else master_pid


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=2, help="seconds of load before each measure")
    args = ap.parse_args()

    up_port, bare_port, gw_port, admin_port, nginx_port, gw2_port, admin2_port = (
        free_port() for _ in range(7)
    )
    shared_port, shared_admin1, shared_admin2 = (free_port() for _ in range(3))
    rows = []
    measured: dict[str, tuple[float, float]] = {}
    tool = ""
    with run("bench-gateway-") as current:
        upstream = current.start([PY, "bench/upstream.py", str(up_port)], port=up_port)
        bare = current.start(
            [PY, "bench/bare_proxy.py", str(bare_port), f"http://127.0.0.1:{up_port}"],
            port=bare_port,
        )
        routes = current.work / "routes.yaml"
        routes.write_text(ROUTES.format(port=up_port))
        env = {
            "GATEWAY_ROUTES_FILE": str(routes),
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": str(gw_port),
            "GATEWAY_ADMIN_PORT": str(admin_port),
        }
        gateway_cmd = [PY, "-m", "gateway"]
        gateway = current.start(gateway_cmd, env=env, port=gw_port)  # the default: on uvloop
        plain_env = env | {
            "GATEWAY_UVLOOP": "false",
            "GATEWAY_PORT": str(gw2_port),
            "GATEWAY_ADMIN_PORT": str(admin2_port),
        }
        gateway_asyncio = current.start(gateway_cmd, env=plain_env, port=gw2_port)
        # two gateway processes on one port (GATEWAY_REUSE_PORT): the kernel spreads the
        # connections; both share the two cores with the load generator and the upstream
        shared_env = env | {"GATEWAY_PORT": str(shared_port), "GATEWAY_REUSE_PORT": "true"}
        shared = [
            current.start(
                gateway_cmd, env=shared_env | {"GATEWAY_ADMIN_PORT": str(admin)}, port=shared_port
            )
            for admin in (shared_admin1, shared_admin2)
        ]
        nginx = start_nginx(nginx_port, up_port, current.work / "nginx")
        if nginx is not None:
            current.keep(nginx)
        contenders = [("direct to upstream", up_port, [upstream])]
        if nginx is not None:
            contenders.append(("nginx 1 worker, keepalive 64", nginx_port, [nginx]))
        contenders += [
            ("30-line aiohttp proxy", bare_port, [bare]),
            ("gateway, asyncio's loop", gw2_port, [gateway_asyncio]),
            ("gateway (full policy chain, uvloop)", gw_port, [gateway]),
            ("gateway, 2 processes sharing the port", shared_port, shared),
        ]
        for name, port, procs in contenders:
            url = f"http://127.0.0.1:{port}/bench/item?x=1"
            load(url, args.connections, args.warmup)  # warm up connections and caches
            pids = [worker_pid(p.pid) if p is nginx else p.pid for p in procs]
            cpu0 = sum(cpu_seconds(pid) for pid in pids)
            result, tool = load(url, args.connections, args.seconds)
            cpu = sum(cpu_seconds(pid) for pid in pids) - cpu0
            per_req_us = cpu / max(result.requests, 1) * 1e6
            measured[name] = (result.rps, per_req_us)
            rows.append(
                [
                    name,
                    f"{result.rps:,.0f}",
                    f"{result.p50_ms:.2f} ms",
                    f"{result.p99_ms:.2f} ms",
                    f"{per_req_us:.0f} µs" if upstream not in procs else f"({per_req_us:.0f} µs)",
                    str(result.errors),
                ]
            )
            time.sleep(0.5)
    print(f"# gateway vs bare proxy vs direct — {machine_line()}")
    print(f"# load: {tool}, {args.connections} connections, {args.seconds}s, small GET, loopback")
    print(table(["path", "req/s", "p50", "p99", "CPU per request", "errors"], rows))
    gw_rps, gw_cpu = measured["gateway (full policy chain, uvloop)"]
    bare_rps, _ = measured["30-line aiohttp proxy"]
    verdict = lambda ok: "MET" if ok else "NOT met"  # noqa: E731
    print(
        f"gateway req/s / 30-line proxy req/s = {gw_rps / bare_rps:.2f}x "
        f"(target >= 1: {verdict(gw_rps >= bare_rps)}); gateway CPU per request "
        f"{gw_cpu:.0f} µs (target <= 80 µs: {verdict(gw_cpu <= 80)})"
    )
    # the absolute target moves with the machine (this VM's speed has varied 1.8x between
    # hours); the upstream, a 12-line aiohttp app, is the yardstick measured in this run
    _, up_cpu = measured["direct to upstream"]
    print(
        f"machine yardstick: the upstream alone costs {up_cpu:.0f} µs per request, so the "
        f"gateway costs {gw_cpu / up_cpu:.2f}x that (the reference run, at 26 µs for the "
        f"upstream, had the gateway at 68 µs = 2.62x; 80 µs there = 3.08x)"
    )


if __name__ == "__main__":
    main()
