"""Settings every service shares, from the environment (pydantic-settings).

A service subclasses :class:`ServiceSettings`, names itself and overrides the two
fields whose variable carries its name::

    class BillingSettings(ServiceSettings):
        service_name: ClassVar[str] = "billing"
        port: int = Field(3004, validation_alias="BILLING_PORT")
        database_url: str | None = Field(None, validation_alias="BILLING_DATABASE_URL")

Shared names (standard names win over invented ones):

==========================  ==========================================================
``SERVICE_HOST``            address to bind (default ``127.0.0.1``: the gateway is the
                            trust boundary, see :mod:`services.common.identity`)
``SERVICE_ADVERTISE_HOST``  address registered in Consul (default: the bind address,
                            or ``127.0.0.1`` when binding ``0.0.0.0``)
``<SERVICE>_PORT``          the service's port (ARCHITECTURE.md ports by default)
``<SERVICE>_DATABASE_URL``  ``postgresql://...`` or ``sqlite:///...``; unset: the SQLite
                            file ``<AIAGG_DATA_DIR>/<service>.db``
``AIAGG_DATA_DIR``          data directory for the SQLite defaults (``./var/data``)
``MASTER_KEY``              bootstrap admin credential (``Authorization: Bearer ...``)
``AMQP_URL``                RabbitMQ; unset: an in-process bus, announced loudly
``AIAGG_VERSION``           version registered in Consul's ``Meta``
``SERVICE_MAX_BODY_SIZE``   largest request body in bytes (1 MiB)
``SERVICE_HEALTH_TIMEOUT``  seconds ``GET /health`` waits for the database (2)
``SERVICE_HEALTH_REQUIRES_BROKER``  a disconnected bus makes ``/health`` 503 (true); set
                            false to keep serving from the outbox while RabbitMQ is down
==========================  ==========================================================
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .db import default_sqlite_url

__all__ = ["DEFAULT_PORTS", "ServiceSettings"]

#: The fixed ports of ARCHITECTURE.md.
DEFAULT_PORTS: dict[str, int] = {
    "auth": 3001,
    "orchestrator": 3002,
    "proxy": 3003,
    "billing": 3004,
    "analytics": 3005,
}


class ServiceSettings(BaseSettings):
    """The base every service's settings extend; see the module docstring for names."""

    model_config = SettingsConfigDict(
        extra="ignore",
        env_ignore_empty=True,
        validate_by_name=True,
        validate_by_alias=True,
    )

    service_name: ClassVar[str] = "service"

    host: str = Field("127.0.0.1", validation_alias="SERVICE_HOST")
    advertise_host: str | None = Field(None, validation_alias="SERVICE_ADVERTISE_HOST")
    port: int = Field(0, validation_alias="SERVICE_PORT")
    database_url: str | None = Field(None, validation_alias="SERVICE_DATABASE_URL")
    data_dir: Path = Field(Path("./var/data"), validation_alias="AIAGG_DATA_DIR")
    master_key: SecretStr | None = Field(None, validation_alias="MASTER_KEY")
    amqp_url: str | None = Field(None, validation_alias="AMQP_URL")
    version: str = Field("0.1.0", validation_alias="AIAGG_VERSION")
    #: largest request body accepted, in bytes
    max_body_size: int = Field(1024 * 1024, validation_alias="SERVICE_MAX_BODY_SIZE", gt=0)
    #: how long ``GET /health`` waits for the database
    health_timeout: float = Field(2.0, validation_alias="SERVICE_HEALTH_TIMEOUT", gt=0)
    #: whether a disconnected event bus makes ``GET /health`` answer 503
    health_requires_broker: bool = Field(True, validation_alias="SERVICE_HEALTH_REQUIRES_BROKER")
    #: run on uvloop (when installed): less event-loop CPU per request and per event
    uvloop: bool = Field(True, validation_alias="SERVICE_UVLOOP")
    #: freeze start-up objects and collect the young generation less often (the p99)
    gc_tune: bool = Field(True, validation_alias="SERVICE_GC_TUNE")
    #: CPU niceness added at start (0-19): background work yields to the request path
    nice: int = Field(0, validation_alias="SERVICE_NICE", ge=0, le=19)

    @field_validator("port")
    @classmethod
    def _port_range(cls, value: int) -> int:
        if not 0 <= value <= 65535:
            raise ValueError("a port is between 0 and 65535")
        return value

    @field_validator("master_key")
    @classmethod
    def _master_key_length(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("MASTER_KEY must be at least 16 characters")
        return value

    def resolved_database_url(self) -> str:
        """The configured URL, or this service's SQLite file in the data directory."""
        return self.database_url or default_sqlite_url(self.service_name, self.data_dir)

    def resolved_advertise_host(self) -> str:
        if self.advertise_host:
            return self.advertise_host
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    def master_key_value(self) -> str | None:
        return self.master_key.get_secret_value() if self.master_key else None
