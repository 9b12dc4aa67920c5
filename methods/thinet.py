"""Placeholder: the thinet method is being implemented (see its issue)."""
