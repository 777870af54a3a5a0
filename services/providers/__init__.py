"""The providers-and-prices table shared by the orchestrator and the proxy.

* :mod:`.config`: the YAML schema (``PROVIDERS_FILE``, default ``providers.yaml``),
  validated at startup with ``file:line: field: message`` errors, and the
  :class:`~.config.Catalog` built from it;
* :mod:`.pricing`: exact cost in integer micro-units (Decimal arithmetic, round half
  up) and the deterministic token estimator used when a provider reports no usage;
* :mod:`.sse`: a small server-sent-events decoder/encoder for OpenAI-style streams.

See the README, "Chat completions" for the file format.
"""

from .config import (
    Catalog,
    CooldownSpec,
    MockSpec,
    ModelRoute,
    ModelSpec,
    ProvidersFile,
    ProviderSpec,
    load_catalog,
    parse_catalog,
)
from .pricing import (
    cost_micro,
    estimate_prompt_tokens,
    estimate_tokens,
    reserve_micro,
)

__all__ = [
    "Catalog",
    "CooldownSpec",
    "MockSpec",
    "ModelRoute",
    "ModelSpec",
    "ProviderSpec",
    "ProvidersFile",
    "cost_micro",
    "estimate_prompt_tokens",
    "estimate_tokens",
    "load_catalog",
    "parse_catalog",
    "reserve_micro",
]
