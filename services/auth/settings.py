"""Auth settings: ``AUTH_PORT`` (3001), ``AUTH_DATABASE_URL``, plus the shared ones."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from services.common.settings import DEFAULT_PORTS, ServiceSettings


class AuthSettings(ServiceSettings):
    service_name: ClassVar[str] = "auth"

    port: int = Field(DEFAULT_PORTS["auth"], validation_alias="AUTH_PORT")
    database_url: str | None = Field(None, validation_alias="AUTH_DATABASE_URL")
