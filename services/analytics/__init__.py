"""The analytics service (port 3005): every event once, and metrics over them."""
