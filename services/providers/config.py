"""The providers-and-prices file (``PROVIDERS_FILE``, default ``providers.yaml``).

::

    defaults:
      max_output_tokens: 4096           # completion cap used for the hold when a request
                                        # sets no max_tokens (per model below too)
      timeout: 60s                      # per provider below too
      cooldown: {failures: 3, duration: 30s}
    providers:
      local-mock:                       # the provider's name: [a-z0-9][a-z0-9._-]*
        kind: mock                      # mock | openai (any OpenAI-compatible base URL)
        priority: 1                     # lower is tried first
        weight: 1                       # share among providers of the same priority
        mock: {latency: 0ms, chunk_delay: 0ms, failure_rate: 0,
               mid_stream_failure_rate: 0, fail_after_tokens: 3, seed: 0}
        models:
          mock-small: {input_price: "0.50", output_price: "1.50"}   # USD per 1M tokens
      openai:
        kind: openai
        base_url: https://api.openai.com/v1
        api_key_env: OPENAI_API_KEY     # the variable holding the key; never the key itself
        models:
          gpt-4o-mini: {input_price: "0.15", output_price: "0.60", upstream: gpt-4o-mini}

Prices are **decimal strings** (``"0.15"``) or integers (``2``), at most 6 decimal
places; a YAML number with a fraction (``0.15``) is refused because YAML reads it as
a binary float. Errors name the file, the line and the field
(``providers.yaml:12: providers.openai.models.gpt-4o.input_price: ...``).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from gateway.errors import ConfigError
from gateway.yamlfile import load_yaml_model, parse_yaml_model
from services.common.events.settings import parse_duration

__all__ = [
    "Catalog",
    "ConfigError",
    "CooldownSpec",
    "MockSpec",
    "ModelRoute",
    "ModelSpec",
    "ProviderSpec",
    "ProvidersFile",
    "load_catalog",
    "parse_catalog",
]

_PRICE = re.compile(r"^\d{1,9}(\.\d{1,6})?$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,199}$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


def _price(value: Any) -> Decimal:
    if isinstance(value, bool) or value is None:
        raise ValueError('a price is a decimal string such as "0.15" (USD per million tokens)')
    if isinstance(value, float):
        raise ValueError(
            f'write the price as a string such as "{value}": YAML reads {value} as a binary '
            "float, and money is never a float"
        )
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a price cannot be negative")
        return Decimal(value)
    if isinstance(value, str) and _PRICE.match(value.strip()):
        return Decimal(value.strip())
    raise ValueError(
        f'a price is a decimal string such as "0.15" with at most 6 decimals, got {value!r}'
    )


def _duration(value: Any) -> float:
    return parse_duration(value)


def _rate(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("a rate is a number between 0 and 1")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"a rate is a number between 0 and 1, got {value!r}") from None
    if not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"a rate is a number between 0 and 1, got {value!r}")
    return float(value)


Price = Annotated[Decimal, BeforeValidator(_price)]
Duration = Annotated[float, BeforeValidator(_duration)]
Rate = Annotated[float, BeforeValidator(_rate)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """One model of one provider, with its prices in USD per million tokens."""

    input_price: Price
    output_price: Price
    #: the provider's own name for the model (default: the public name, the key)
    upstream: str | None = None
    #: the most completion tokens it produces; the hold assumes it when max_tokens is unset
    max_output_tokens: int | None = Field(None, ge=1, le=10_000_000)


class MockSpec(_Strict):
    """Behaviour of the built-in ``mock`` provider (deterministic, no network)."""

    #: pause before the first chunk (or before a non-streamed answer)
    latency: Duration = 0.0
    #: pause between stream chunks
    chunk_delay: Duration = 0.0
    #: share of requests that fail before the first byte (0..1)
    failure_rate: Rate = 0.0
    #: share of streamed requests that fail after ``fail_after_tokens`` tokens (0..1);
    #: a non-streamed request picked for it fails as a whole (nothing produced)
    mid_stream_failure_rate: Rate = 0.0
    fail_after_tokens: int = Field(3, ge=0, le=100_000)
    #: mixes into every choice the mock makes (answers and failures)
    seed: int = 0


class CooldownSpec(_Strict):
    """A provider is set aside after ``failures`` consecutive failures, for ``duration``."""

    failures: int = Field(3, ge=1, le=1000)
    duration: Duration = 30.0

    @field_validator("duration")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("the cool-down must be longer than 0s")
        return value


class ProviderSpec(_Strict):
    kind: Literal["openai", "mock"]
    base_url: str | None = None
    api_key_env: str | None = None
    #: extra headers sent to the provider (e.g. OpenRouter's HTTP-Referer); no secrets
    headers: dict[str, str] = Field(default_factory=dict)
    priority: int = Field(1, ge=0, le=1000)
    weight: int = Field(1, ge=1, le=1_000_000)
    #: the longest the provider may stay silent: for a whole non-streamed answer, and
    #: before each chunk of a stream (the first one included); default: defaults.timeout
    timeout: Duration | None = None
    cooldown: CooldownSpec | None = None
    mock: MockSpec | None = None
    models: dict[str, ModelSpec]

    @model_validator(mode="before")
    @classmethod
    def _no_secrets(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in ("api_key", "key", "token", "secret"):
                if key in data:
                    raise ValueError(
                        f"'{key}' is not allowed: put the credential in an environment "
                        "variable and name that variable in 'api_key_env'"
                    )
        return data

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.match(r"^https?://[^/\s]+(/\S*)?$", value):
            raise ValueError(
                f"base_url must be an http(s) URL such as https://api.openai.com/v1, got {value!r}"
            )
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env(cls, value: str | None) -> str | None:
        if value is not None and not _ENV.match(value):
            raise ValueError(
                f"api_key_env is the NAME of an environment variable (e.g. OPENAI_API_KEY), "
                f"got {value[:8]!r}..."
            )
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if name.lower() in ("authorization", "api-key", "x-api-key"):
                raise ValueError(
                    f"header {name!r} carries a credential: use api_key_env instead"
                )
        return value

    @field_validator("models")
    @classmethod
    def _models(cls, value: dict[str, ModelSpec]) -> dict[str, ModelSpec]:
        if not value:
            raise ValueError("a provider needs at least one model")
        for name in value:
            if not _MODEL.match(str(name)):
                raise ValueError(
                    f"model name {name!r}: letters, digits and ._:/@+- only (at most 200)"
                )
        return value

    @model_validator(mode="after")
    def _kind_fields(self) -> ProviderSpec:
        if self.kind == "openai":
            if self.base_url is None:
                raise ValueError("kind 'openai' needs a base_url (e.g. https://api.openai.com/v1)")
            if self.mock is not None:
                raise ValueError("'mock' settings are only for kind 'mock'")
        else:
            if self.base_url is not None or self.api_key_env is not None:
                raise ValueError("kind 'mock' has no base_url or api_key_env (it never calls out)")
        return self


class Defaults(_Strict):
    max_output_tokens: int = Field(4096, ge=1, le=10_000_000)
    timeout: Duration = 60.0
    cooldown: CooldownSpec = Field(default_factory=CooldownSpec)

    @field_validator("timeout")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("the timeout must be longer than 0s")
        return value


class ProvidersFile(_Strict):
    defaults: Defaults = Field(default_factory=Defaults)
    providers: dict[str, ProviderSpec]

    @field_validator("providers")
    @classmethod
    def _names(cls, value: dict[str, ProviderSpec]) -> dict[str, ProviderSpec]:
        if not value:
            raise ValueError("at least one provider is needed")
        for name in value:
            if not _NAME.match(str(name)):
                raise ValueError(
                    f"provider name {name!r}: lowercase letters, digits and ._- "
                    "(starting with a letter or digit)"
                )
        return value


def _cross_checks(config: BaseModel) -> list[tuple[tuple, str]]:
    assert isinstance(config, ProvidersFile)
    problems: list[tuple[tuple, str]] = []
    for name, provider in config.providers.items():
        if provider.timeout is not None and provider.timeout <= 0:
            problems.append((("providers", name, "timeout"), "the timeout must be longer than 0s"))
    return problems


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """One way to serve a public model: a provider, its model name and its prices."""

    provider: str
    kind: str
    model: str
    upstream_model: str
    input_price: Decimal
    output_price: Decimal
    max_output_tokens: int
    priority: int
    weight: int
    timeout: float
    cooldown: CooldownSpec


class Catalog:
    """The validated file, indexed by model: which providers serve it, at what price."""

    def __init__(self, config: ProvidersFile, source: str = "providers.yaml") -> None:
        self.config = config
        self.source = source
        self.loaded_at = int(time.time())
        defaults = config.defaults
        self._routes: dict[str, list[ModelRoute]] = {}
        for name, provider in config.providers.items():
            for model, spec in provider.models.items():
                route = ModelRoute(
                    provider=name,
                    kind=provider.kind,
                    model=model,
                    upstream_model=spec.upstream or model,
                    input_price=spec.input_price,
                    output_price=spec.output_price,
                    max_output_tokens=spec.max_output_tokens or defaults.max_output_tokens,
                    priority=provider.priority,
                    weight=provider.weight,
                    timeout=provider.timeout or defaults.timeout,
                    cooldown=provider.cooldown or defaults.cooldown,
                )
                self._routes.setdefault(model, []).append(route)
        for routes in self._routes.values():
            routes.sort(key=lambda r: (r.priority, r.provider))

    @property
    def providers(self) -> dict[str, ProviderSpec]:
        return self.config.providers

    def models(self) -> list[str]:
        return sorted(self._routes)

    def routes(self, model: str) -> list[ModelRoute]:
        """The providers serving ``model``, by priority then name (empty: unknown model)."""
        return list(self._routes.get(model, ()))

    def route(self, provider: str, model: str) -> ModelRoute | None:
        for route in self._routes.get(model, ()):
            if route.provider == provider:
                return route
        return None

    def cooldown(self, provider: str) -> CooldownSpec:
        return self.config.providers[provider].cooldown or self.config.defaults.cooldown

    def timeout(self, provider: str) -> float:
        return self.config.providers[provider].timeout or self.config.defaults.timeout


def parse_catalog(text: str, source: str = "providers.yaml") -> Catalog:
    """Validate YAML text; :class:`ConfigError` names file:line and field."""
    return Catalog(parse_yaml_model(text, source, ProvidersFile, _cross_checks), source)


def load_catalog(path: str | Path) -> Catalog:
    """Read and validate the providers file at startup."""
    config = load_yaml_model(path, ProvidersFile, _cross_checks, what="providers file")
    return Catalog(config, str(path))
