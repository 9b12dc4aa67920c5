"""Placeholder: the manidp method is being implemented (see its issue)."""
