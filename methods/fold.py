"""Inference export: every batch norm folded into the convolution that feeds it.

In eval mode a ``BatchNorm2d`` is a per-channel affine map ``y = (x - mean) * s + beta`` with
``s = gamma / sqrt(var + eps)``; when its input is a ``Conv2d``'s output and nothing else reads that
output, the map folds into the conv exactly (up to float rounding): ``W' = W * s`` per output
channel, ``b' = (b - mean) * s + beta``. The batch norm then becomes ``nn.Identity``. This removes
one memory-bound pass over every activation, for dense and pruned models alike, so a latency
comparison between them folds both (see ``trainables.trial``).

The conv -> batch-norm pairs come from a ``torch.fx`` trace (the same leaf modules as
``methods.graph``): a pair folds only when the batch norm reads the conv's output directly, the
conv's output has no other reader, and each of the two modules is called exactly once, has no
forward hooks and its parameters are read nowhere else. Batch norms anywhere
else (after a pad shortcut, an add, a linear) stay as they are. The result is a copy in eval mode
(the running statistics are used, as in eval); the model passed in is not touched. A folded model
is for inference only: training it would train a different parametrisation.
"""
from __future__ import annotations

import copy
import logging
from collections import Counter
from typing import Sequence

import torch
from torch import fx, nn

from .errors import SurgeryError
from .graph import _Tracer

__all__ = ["fold_batchnorm", "conv_bn_pairs", "fold_alike"]

log = logging.getLogger(__name__)


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``[(conv name, batch-norm name)]`` that :func:`fold_batchnorm` folds, in graph order.

    Raises ``SurgeryError`` when ``model`` cannot be traced with ``torch.fx``."""
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many kinds; one clear message is what callers need
        raise SurgeryError(f"cannot fold batch norms of {type(model).__name__}: torch.fx trace failed: {exc}") from exc
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    read = [n.target for n in graph.nodes if n.op == "get_attr"]  # parameters read directly

    def untouched(name: str) -> bool:
        m = modules[name]  # a hook (a gate, a mask) would see or change what folding moves
        hooked = m._forward_hooks or m._forward_pre_hooks
        return calls[name] == 1 and not hooked and not any(t.startswith(name + ".") for t in read)

    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not _foldable_bn(modules[node.target]):
            continue
        src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not (isinstance(src, fx.Node) and src.op == "call_module" and isinstance(modules[src.target], nn.Conv2d)):
            continue
        conv = modules[src.target]
        if len(src.users) == 1 and untouched(src.target) and untouched(node.target) \
                and conv.out_channels == modules[node.target].num_features:
            pairs.append((src.target, node.target))
    return pairs


def _foldable_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.BatchNorm2d) and m.running_mean is not None and m.running_var is not None


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every foldable batch norm folded into its conv.

    Outputs equal the eval-mode model's within float rounding. Raises ``SurgeryError`` when the
    model cannot be traced (see :func:`conv_bn_pairs`)."""
    pairs = conv_bn_pairs(model)
    folded = copy.deepcopy(model).eval()
    with torch.no_grad():
        for conv_name, bn_name in pairs:
            _fold_pair(folded.get_submodule(conv_name), folded.get_submodule(bn_name))
            _replace(folded, bn_name, nn.Identity())
    log.debug("folded %d batch norms of %s into their convs", len(pairs), type(model).__name__)
    return folded


def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold ``bn`` (eval semantics) into ``conv`` in place, computed in float64."""
    w = conv.weight
    var, mean = bn.running_var.double(), bn.running_mean.double()
    scale = torch.rsqrt(var + bn.eps)
    shift = torch.zeros_like(mean)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
        shift = bn.bias.double()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
    w.copy_((w.double() * scale.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
    new_bias = ((bias - mean) * scale + shift).to(dtype=w.dtype, device=w.device)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias, requires_grad=w.requires_grad)
    else:
        conv.bias.copy_(new_bias)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def fold_alike(models: Sequence[nn.Module]) -> tuple[list[nn.Module], bool]:
    """``(models folded, True)``, or ``(models as they are, False)`` when any of them cannot be
    traced (ManiDP's per-input ``SkippingView``, say): models timed against each other are folded
    all or none, so their latency ratio compares like with like."""
    try:
        return [fold_batchnorm(m) for m in models], True
    except SurgeryError as exc:
        log.info("batch norms left unfolded for timing: %s", exc)
        return list(models), False
