# One image for the gateway and every service of the AI aggregator.
#
#   docker build -t aiagg:local .
#   docker run --rm -p 3000:3000 aiagg:local                 # the gateway (default)
#   docker run --rm aiagg:local python -m services.billing   # a service
#
# docker-compose.yml builds it once per app service (the layers are shared) and
# overrides the command of each service. Settings come from the environment
# (see the README, "Deploying with Docker Compose"); routes.yaml and providers.yaml are baked in as defaults
# and compose mounts the repository's copies over them.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# An unprivileged user owns nothing but the data directory.
RUN groupadd --system --gid 10001 aiagg \
 && useradd --system --uid 10001 --gid aiagg --home-dir /app --shell /usr/sbin/nologin aiagg

# Install the package (gateway, services, cli) with `pip install .`. Every
# dependency ships manylinux wheels for CPython 3.11, so no compiler is needed.
WORKDIR /src
COPY setup.cfg pyproject.toml README.md ./
COPY gateway ./gateway
COPY services ./services
COPY cli ./cli
RUN pip install . \
 && cd / && rm -rf /src

WORKDIR /app
COPY routes.yaml providers.yaml ./
RUN mkdir -p /app/var/data && chown -R aiagg:aiagg /app/var

ENV GATEWAY_ROUTES_FILE=/app/routes.yaml \
    PROVIDERS_FILE=/app/providers.yaml \
    AIAGG_DATA_DIR=/app/var/data

USER aiagg:aiagg

# gateway public + admin, then auth, orchestrator, proxy, billing, analytics
EXPOSE 3000 9901 3001 3002 3003 3004 3005

CMD ["python", "-m", "gateway"]
