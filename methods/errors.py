"""One root error class for the library, so callers can catch everything prunetune raises.

Every exception prunetune raises is a ``PruneTuneError`` (``tests/test_errors.py`` checks the
source). The subclasses that stand for a built-in kind also derive from it, so ``except ValueError``
and ``except KeyError`` keep working for callers that expect the built-in."""


class PruneTuneError(Exception):
    """Root of prunetune's own errors."""


class ConfigError(PruneTuneError, ValueError):
    """A user-supplied value is invalid; the message names the field and the value received."""


class ArgumentError(PruneTuneError, ValueError):
    """A library function was called with an invalid argument (a caller's mistake, not a config's)."""


class NotFoundError(PruneTuneError, KeyError):
    """A name (a module, a channel group, a gate) that the model does not have."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


class SurgeryError(PruneTuneError):
    """A model cannot be cut as asked (unsupported op, empty group, ...)."""


class MissingFileError(PruneTuneError, FileNotFoundError):
    """A file or directory prunetune needs (a saved model, a sweep's state, a base model) is not there."""
