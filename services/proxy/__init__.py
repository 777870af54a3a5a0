"""The proxy service (port 3003, internal): calls ONE provider for the orchestrator,
counts tokens, prices them and records ``usage.recorded`` through its outbox."""
