"""Placeholder: the csgd method is being implemented (see its issue)."""
