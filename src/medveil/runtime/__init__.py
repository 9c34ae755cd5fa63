"""I/O layer: hub, node agent, transport, stores and audit ledger."""
