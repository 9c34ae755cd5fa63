"""Private set intersection and the registry de-duplication count (helper B fills this in)."""
