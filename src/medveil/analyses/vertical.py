"""Vertical GLM over aligned rows (helper C fills this in)."""
