"""The interface every pruning method implements.

A method is used in three steps by the trainable (``trainables/``), which owns the loop:

1. ``prepare(model, context)`` once, then a *training phase* of ``phase_epochs`` epochs in which the loop
   calls ``make_optimizer``, ``extra_loss``, ``after_backward``, ``after_step`` and
   ``on_epoch_end`` (all do nothing special by default);
2. ``prune(model, context)``: returns a *physically smaller* ``nn.Module`` (or, for a dynamic method,
   a gated one);
3. a plain fine-tune, which is not the method's business.

Methods that start from random weights instead of the shared dense model set ``from_scratch``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar, Iterable, Mapping

import torch
from torch import nn

from .errors import ConfigError
from .hyperparameters import Hyperparameter

__all__ = ["PruningMethod", "PruneContext", "PRUNE_RATIO", "PHASE_EPOCHS", "SCOPE", "ALLOCATION", "ROUND_TO",
           "allocation_hp"]

# Shared declarations, so every method spells and ranges them the same way.
PRUNE_RATIO = Hyperparameter("prune_ratio", 0.5, 0.05, 0.98,
                             doc="fraction of the dense model's MACs removed")
PHASE_EPOCHS = Hyperparameter("phase_epochs", 2, 0, 200, kind="int", doc="epochs of the method's training phase")
#: Which channel groups may lose channels: block-internal ones only (what the papers did on
#: ResNets), or the residual-coupled groups too (stem, block outputs, shortcuts), scored as a group.
SCOPE = Hyperparameter("scope", "internal", choices=("internal", "all"), kind="categorical",
                       doc="internal: block-internal channels only; all: residual-coupled groups too")
#: How the MACs target is spread over the groups (``methods.budget``).
ALLOCATION = Hyperparameter("allocation", "uniform", choices=("uniform", "global"), kind="categorical",
                            doc="uniform: one ratio per group; global: one ranking over all groups, "
                                "residual-coupled groups last at one rate")
#: Every pruned width a multiple of this (CPU/GPU convolution kernels pad channels to 8 or 16).
ROUND_TO = Hyperparameter("round_to", 1, choices=(1, 2, 4, 8, 16), kind="categorical",
                          doc="keep every pruned width a multiple of this")


def allocation_hp(default: str) -> Hyperparameter:
    """``ALLOCATION`` with the paper's own default (slimming and scratch rank globally)."""
    return replace(ALLOCATION, default=default)


@dataclass
class PruneContext:
    """What ``prune`` may use besides the model.

    ``calibration`` yields ``(inputs, targets)`` training batches (ThiNet samples activations from
    them); ``finetune(model, steps)`` trains a model in place for a few steps (ThiNet's per-layer
    recovery). Both may be None for methods that only look at weights.
    """

    input_shape: tuple[int, int, int]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    calibration: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None
    finetune: Callable[[nn.Module, int], None] | None = None
    seed: int = 0
    #: MACs of the original, unexpanded dense model: every ``prune_ratio`` (a fraction of MACs
    #: removed) is measured against it; None means "the model being pruned".
    reference_macs: int | None = None


class PruningMethod(ABC):
    """Base class: declare ``name`` and ``hyperparameters``, implement ``prune``."""

    name: ClassVar[str] = ""
    #: The paper (``Authors et al., VENUE YEAR``, or ``baseline``) and what the method does, in one
    #: line each: ``prunetune methods`` and the README's method table are made from them.
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    hyperparameters: ClassVar[tuple[Hyperparameter, ...]] = ()
    #: Start from a freshly initialised network instead of the shared dense base model.
    from_scratch: ClassVar[bool] = False
    #: The pruned model keeps all weights and skips channels per input (cost is an average).
    dynamic: ClassVar[bool] = False

    def __init__(self, **hparams: Any):
        declared = {hp.name: hp for hp in self.hyperparameters}
        unknown = sorted(set(hparams) - set(declared))
        if unknown:
            raise ConfigError(f"{self.name}: unknown hyperparameter(s) {unknown}; valid: {sorted(declared)}")
        self.hparams: dict[str, Any] = {
            name: hp.validate(hparams.get(name, hp.default), owner=self.name) for name, hp in declared.items()
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
        return f"{type(self).__name__}({args})"

    @property
    def phase_epochs(self) -> int:
        return int(self.hparams.get("phase_epochs", 0))

    # ---- training-phase hooks (defaults: plain SGD training) -----------------------------------
    def prepare(self, model: nn.Module, context: PruneContext | None = None) -> nn.Module:
        """Called once before the phase; may wrap or modify the model and must return it.
        ``context`` (input shape, device, seed, the dense MACs; no calibration yet) lets a method
        size its phase for the MACs target (C-SGD's clusters, ISTA's rho schedule)."""
        return model

    def make_optimizer(self, model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)

    def make_finetune_optimizer(self, model: nn.Module, lr: float, momentum: float,
                                weight_decay: float) -> torch.optim.Optimizer:
        """Optimizer for the fine-tune of the pruned model (plain SGD over every parameter)."""
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)

    def extra_loss(self, model: nn.Module, inputs: torch.Tensor, logits: torch.Tensor,
                   targets: torch.Tensor) -> torch.Tensor | None:
        """A term added to the mean cross-entropy during the phase."""
        return None

    def after_backward(self, model: nn.Module) -> None:
        """Edit gradients before the optimizer step."""

    def after_step(self, model: nn.Module) -> None:
        """Edit parameters after the optimizer step (proximal steps, clamps)."""

    def on_epoch_end(self, model: nn.Module, epoch: int, mean_loss: float) -> None:
        """Called after each phase epoch with the epoch's mean training loss."""

    # ---- cost -------------------------------------------------------------------------------------------
    def measure_macs(self, model: nn.Module, input_shape: tuple[int, ...],
                     batches: Iterable[tuple[torch.Tensor, torch.Tensor]] = ()) -> float:
        """MACs of the pruned model at batch 1. Dynamic methods override this with the average
        over ``batches`` (the evaluation set) of the channels each input really uses."""
        from .cost import profile

        return profile(model, input_shape).macs

    def inference_model(self, model: nn.Module, *, batch_size: int = 1) -> nn.Module:
        """The module whose wall-clock time is the pruned model's real inference cost at
        ``batch_size`` (the trial times it for ``latency_ms``); it computes what ``model`` computes.
        Default: ``model`` itself (a static method's pruned model is already physically small). A
        dynamic method whose masked model computes every channel returns the path that really skips
        them where skipping applies (ManiDP: ``SkippingView`` at batch 1). Called once on the final
        model, in eval mode; not for training/export."""
        return model

    # ---- checkpointed method state ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    # ---- the cut -------------------------------------------------------------------------------------
    @abstractmethod
    def prune(self, model: nn.Module, context: PruneContext) -> nn.Module:
        """Return the pruned model (physically smaller unless ``dynamic``)."""
