"""Proxy settings: ``PROXY_PORT`` (3003), ``PROXY_DATABASE_URL``, ``PROVIDERS_FILE``
(the providers-and-prices YAML, default ``providers.yaml``), plus the shared ones.
``MASTER_KEY`` is required: the internal endpoint answers only the master bearer.
Provider credentials come from the variables the providers file names in
``api_key_env``."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from services.common.settings import DEFAULT_PORTS, ServiceSettings


class ProxySettings(ServiceSettings):
    service_name: ClassVar[str] = "proxy"

    port: int = Field(DEFAULT_PORTS["proxy"], validation_alias="PROXY_PORT")
    database_url: str | None = Field(None, validation_alias="PROXY_DATABASE_URL")
    providers_file: str = Field("providers.yaml", validation_alias="PROVIDERS_FILE")
