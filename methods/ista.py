"""Placeholder: the ista method is being implemented (see its issue)."""
