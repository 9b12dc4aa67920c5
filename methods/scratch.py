"""Placeholder: the scratch method is being implemented (see its issue)."""
