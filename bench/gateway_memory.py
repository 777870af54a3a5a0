"""Gateway memory over a long run: RSS after every slice of load, up to N requests.

    .venv/bin/python bench/gateway_memory.py [--requests 1000000] [--connections 50]

The gateway runs its full policy chain (access log to /dev/null, metrics, breaker,
retries) in front of the minimal upstream. Memory must stay flat once warm: the
table shows RSS per slice and the growth between the first warm slice and the end.
"""

from __future__ import annotations

import argparse

from gateway_proxy import ROUTES
from harness import PY, free_port, load, machine_line, rss_mib, run, table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--slice-seconds", type=int, default=10)
    ap.add_argument("--max-minutes", type=float, default=8.0, help="hard stop")
    args = ap.parse_args()

    up_port, gw_port, admin_port = free_port(), free_port(), free_port()
    url = f"http://127.0.0.1:{gw_port}/bench/item"
    rows: list[list[str]] = []
    served = 0
    elapsed = 0.0
    with run("bench-gateway-memory-") as current:
        routes = current.work / "routes.yaml"
        routes.write_text(ROUTES.format(port=up_port))
        current.start([PY, "bench/upstream.py", str(up_port)], port=up_port)
        gateway = current.start(
            [PY, "-m", "gateway"],
            env={
                "GATEWAY_ROUTES_FILE": str(routes),
                "GATEWAY_HOST": "127.0.0.1",
                "GATEWAY_PORT": str(gw_port),
                "GATEWAY_ADMIN_PORT": str(admin_port),
            },
            port=gw_port,
        )
        samples: list[float] = [rss_mib(gateway.pid)]
        while served < args.requests and elapsed < args.max_minutes * 60:
            result, tool = load(url, args.connections, args.slice_seconds)
            served += result.requests
            elapsed += result.seconds
            samples.append(rss_mib(gateway.pid))
            rows.append(
                [
                    f"{served:,}",
                    f"{result.rps:,.0f}",
                    f"{result.p99_ms:.2f} ms",
                    f"{samples[-1]:.1f} MiB",
                    str(result.errors),
                ]
            )
    warm = samples[2] if len(samples) > 2 else samples[-1]
    print(f"# gateway memory over {served:,} requests — {machine_line()}")
    print(f"# load: {tool}, {args.connections} connections, slices of {args.slice_seconds}s")
    print(table(["requests so far", "req/s", "p99", "gateway RSS", "errors"], rows))
    print(
        f"\nRSS at start {samples[0]:.1f} MiB, after the 2nd slice {warm:.1f} MiB, "
        f"at the end {samples[-1]:.1f} MiB: growth after warm-up {samples[-1] - warm:+.1f} MiB"
    )


if __name__ == "__main__":
    main()
