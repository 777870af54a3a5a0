"""Orchestrator settings, plus the shared ones (``MASTER_KEY`` is required: it is the
credential for billing's and the proxy's internal endpoints).

================================  ===================================================
``ORCHESTRATOR_PORT``             3002
``ORCHESTRATOR_DATABASE_URL``     its own database (requests and the outbox)
``PROVIDERS_FILE``                providers and prices (``providers.yaml``)
``GATEWAY_ROUTES_FILE``           where peers (billing, proxy) are found
                                  (``routes.yaml``: static instances or Consul)
``ORCHESTRATOR_MAX_ATTEMPTS``     providers tried per request at most (3)
``ORCHESTRATOR_PROXY_TIMEOUT``    longest a whole call to the proxy may take (300s)
``ORCHESTRATOR_PROXY_MARGIN``     added to a provider's ``timeout`` for the wait on
                                  the proxy, so the proxy reports a silent provider
                                  first (5s)
``ORCHESTRATOR_BILLING_TIMEOUT``  per try of a billing call (5s)
================================  ===================================================
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, field_validator

from services.common.events.settings import parse_duration
from services.common.settings import DEFAULT_PORTS, ServiceSettings


class OrchestratorSettings(ServiceSettings):
    service_name: ClassVar[str] = "orchestrator"

    port: int = Field(DEFAULT_PORTS["orchestrator"], validation_alias="ORCHESTRATOR_PORT")
    database_url: str | None = Field(None, validation_alias="ORCHESTRATOR_DATABASE_URL")
    providers_file: str = Field("providers.yaml", validation_alias="PROVIDERS_FILE")
    routes_file: str = Field("routes.yaml", validation_alias="GATEWAY_ROUTES_FILE")
    max_attempts: int = Field(3, validation_alias="ORCHESTRATOR_MAX_ATTEMPTS", ge=1, le=20)
    proxy_timeout: float = Field(300.0, validation_alias="ORCHESTRATOR_PROXY_TIMEOUT", gt=0)
    proxy_margin: float = Field(5.0, validation_alias="ORCHESTRATOR_PROXY_MARGIN", ge=0)
    billing_timeout: float = Field(5.0, validation_alias="ORCHESTRATOR_BILLING_TIMEOUT", gt=0)

    @field_validator("proxy_timeout", "proxy_margin", "billing_timeout", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return parse_duration(value)
