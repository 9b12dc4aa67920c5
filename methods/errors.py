"""One root error class for the library, so callers can catch everything prunetune raises."""


class PruneTuneError(Exception):
    """Root of prunetune's own errors."""


class ConfigError(PruneTuneError, ValueError):
    """A user-supplied value is invalid; the message names the field and the value received."""


class SurgeryError(PruneTuneError):
    """A model cannot be cut as asked (unsupported op, empty group, ...)."""
