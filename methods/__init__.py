"""prunetune.methods: pruning algorithms, channel surgery and cost measurement (pure PyTorch).

Every method module is imported here explicitly so that every process (each Ray worker too)
sees the same registry.
"""
from . import csgd, ista, l1_norm, manidp, random_prune, scratch, slimming, thinet  # noqa: F401  (registration)
from .base import PruneContext, PruningMethod
from .errors import ConfigError, PruneTuneError, SurgeryError
from .fold import fold_batchnorm
from .graph import ChannelGroup, DependencyGraph
from .hyperparameters import Hyperparameter
from .registry import create_method, get_method_class, list_methods, register_method
from .surgery import prune_group

__all__ = [
    "ChannelGroup", "ConfigError", "DependencyGraph", "Hyperparameter", "PruneContext", "PruneTuneError",
    "PruningMethod", "SurgeryError", "create_method", "fold_batchnorm", "get_method_class", "list_methods", "prune_group",
    "register_method",
]
