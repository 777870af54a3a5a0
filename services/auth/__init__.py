"""The auth service (port 3001): API keys, and forward-auth for the gateway."""
