"""Disclosure control and (later) differential privacy, applied at the node before release."""
