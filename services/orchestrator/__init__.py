"""The orchestrator service (port 3002): the public chat API behind the gateway.

Validates, reserves the worst-case cost with billing, picks providers by priority,
weight and health, calls them through the proxy service with fallback before the
first byte, and records ``route.decided``."""
