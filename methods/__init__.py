"""prunetune.methods: pruning algorithms, channel surgery and cost measurement (pure PyTorch).

Importing the package imports every module in it (sorted by name), so every process (each Ray
worker too) sees the same registry, and a new method is its own file: its ``@register_method``
class is found here, and the config, the search space, the CLI, the README's table
(``prunetune methods --markdown``) and the contract tests take it from the registry.
"""
import importlib as _importlib
import pkgutil as _pkgutil

from .base import PruneContext, PruningMethod
from .errors import ConfigError, PruneTuneError, SurgeryError
from .fold import fold_batchnorm
from .graph import ChannelGroup, DependencyGraph
from .hyperparameters import Hyperparameter
from .registry import create_method, get_method_class, list_methods, markdown_table, register_method
from .surgery import prune_group

__all__ = [
    "ChannelGroup", "ConfigError", "DependencyGraph", "Hyperparameter", "PruneContext", "PruneTuneError",
    "PruningMethod", "SurgeryError", "create_method", "fold_batchnorm", "get_method_class", "list_methods",
    "markdown_table", "prune_group", "register_method",
]

for _module in sorted(m.name for m in _pkgutil.iter_modules(__path__)):
    _importlib.import_module(f"{__name__}.{_module}")  # registers every method module's class
