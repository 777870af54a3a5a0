"""The billing service (port 3004): balances, top-ups, the ledger, and reservations."""
