"""ISTA on batch-norm scales (Ye, Lu, Lin, Wang, ICLR 2018, "Rethinking the
Smaller-Norm-Less-Informative Assumption in Channel Pruning of Convolution Layers").

Batch norm outputs ``gamma * xhat + beta``; when ``gamma_c`` is *exactly* zero, channel ``c`` emits the
constant ``act(beta_c)`` for every input, so it can be deleted and the constant folded into the layer
that reads it. The training phase makes gammas exactly zero:

1. a plain SGD step with learning rate ``mu`` and no momentum (as in the official code) on every
   parameter; the penalised gammas carry no weight decay, everything else keeps the loop's L2 decay;
2. the ISTA (proximal L1) step on every penalised gamma,
   ``gamma <- sign(gamma) * max(|gamma| - lr * rho * lambda_l, 0)``, with ``lr`` the step's actual
   learning rate (``mu`` unless the loop schedules it) and the per-layer cost weight
   ``lambda_l = (out_h*out_w + k*k*c_in + sum_consumers k'*k'*c_out') / (in_h*in_w)``
   (``in_h*in_w`` is the network input's spatial size; see :meth:`ISTA.layer_cost_weights`);
3. gamma-W rescaling: before the phase, ``gamma`` and ``beta`` of each penalised batch norm are
   multiplied by ``alpha`` and the consuming layers' weights divided by ``alpha``; the function is
   unchanged because everything between the batch norm and its consumers is positively
   homogeneous (ReLU, pooling, flatten). ``prune`` undoes it on its copy before the surgery, so
   the pruned model computes the function of the un-rescaled model.

Which channels: the block-internal groups (``DependencyGraph.prunable_groups()``) whose producer
feeds a batch norm: in a basic-block ResNet each block's first conv (as the official code);
residual widths stay. The input shape is not known to ``prepare``: ``extra_loss`` records it from the
first training batch and the first ``after_step`` measures the layers' output sizes with one
batch-1 forward before it applies the first ISTA step.

Surgery: channels with ``gamma == 0`` are removed and the constant each one feeds its consumers (read
off a batch-1 forward of the un-rescaled copy, so any elementwise activation is handled) is folded
into the consumer's bias or the running mean of the batch norm after it
(:func:`methods.surgery.prune_group` ``constants``). That is exact for 1x1 and unpadded consumers;
with a zero-padded 3x3 consumer the border pixels differ (they never saw the constant on the
padded taps). A group never loses every channel (the largest ``|gamma|`` survives).
"""
from __future__ import annotations

import copy
import logging
import operator
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import fx, nn

from .base import PHASE_EPOCHS, PruneContext, PruningMethod
from .graph import DependencyGraph
from .hyperparameters import Hyperparameter
from .layers import ChannelPadShortcut
from .registry import register_method
from .selection import prunable_bns
from .surgery import prune_group

__all__ = ["ISTA"]

log = logging.getLogger(__name__)

# Ops f with f(a * x) == a * f(x) for a > 0: the rescaling passes through them unchanged.
_HOMOGENEOUS_MODULES = (
    nn.ReLU, nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d, nn.Flatten,
)
_HOMOGENEOUS_FUNCTIONS = {
    torch.relu, F.relu, torch.flatten, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d, F.dropout, operator.getitem,
}
_HOMOGENEOUS_METHODS = {"relu", "relu_", "flatten", "view", "reshape", "contiguous", "clone", "mean"}


@dataclass
class _Layer:
    """One penalised batch norm and what surrounds it (module names in the model)."""

    bn: str
    producer: str
    consumers: list[str]
    rescalable: bool


@register_method("ista")
class ISTA(PruningMethod):
    hyperparameters = (
        Hyperparameter("mu", 0.1, 1e-3, 0.2, log=True, doc="SGD learning rate of the phase (no momentum)"),
        Hyperparameter("rho", 5e-3, 1e-4, 1e-2, log=True, doc="global L1 penalty on batch-norm gammas"),
        Hyperparameter("alpha", 0.1, 0.01, 1.0, log=True, doc="gamma-W rescaling factor before the phase"),
        PHASE_EPOCHS,
    )

    def __init__(self, **hparams: Any):
        super().__init__(**hparams)
        self._layers: list[_Layer] | None = None
        self._applied_alpha: float | None = None  # the factor the model's parameters carry now
        self._lambdas: dict[str, float] | None = None
        self._input_shape: tuple[int, ...] | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._bound_model: nn.Module | None = None
        self._bound: list[tuple[nn.Parameter, float]] = []
        self._bound_lambdas: dict[str, float] | None = None
        self._warned = False

    # ---- setup ---------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, context: PruneContext | None = None) -> nn.Module:
        if self._layers is None:
            self._layers = self._find_layers(DependencyGraph(model))
            log.info("ista: penalising %d batch norms (%d rescalable)", len(self._layers),
                     sum(layer.rescalable for layer in self._layers))
        if self._applied_alpha is None:  # not already carried by the model (e.g. state loaded first)
            self.apply_rescaling(model)
        return model

    @staticmethod
    def _find_layers(graph: DependencyGraph) -> list[_Layer]:
        layers = []
        for group, bn_module in prunable_bns(graph):
            if bn_module.weight is None:  # affine=False: no gamma to drive to zero
                continue
            bn = graph.next_module[group.producers[0]]
            consumers = [name for name, _ in group.consumers]
            layers.append(_Layer(bn, group.producers[0], consumers, _homogeneous_path(graph, bn, consumers)))
        return layers

    def apply_rescaling(self, model: nn.Module) -> None:
        """Multiply gamma and beta of each rescalable penalised BN by alpha and divide its
        consumers' weights by alpha (the network function is unchanged). In place."""
        self._applied_alpha = self.hparams["alpha"]
        self._scale(model, self._applied_alpha, undo=False)

    def undo_rescaling(self, model: nn.Module) -> None:
        """Undo :meth:`apply_rescaling` on ``model`` (or a copy of the model it was applied to), up
        to float rounding; a gamma that is exactly zero stays exactly zero. In place."""
        if self._applied_alpha is not None:
            self._scale(model, self._applied_alpha, undo=True)

    @torch.no_grad()
    def _scale(self, model: nn.Module, alpha: float, *, undo: bool) -> None:
        if alpha == 1.0:
            return
        for layer in self._layers or []:
            if not layer.rescalable:
                continue
            bn = model.get_submodule(layer.bn)
            consumer_weights = [model.get_submodule(c).weight for c in layer.consumers]
            if undo:
                torch._foreach_mul_(consumer_weights, alpha)
                torch._foreach_div_([bn.weight, bn.bias], alpha)
            else:
                torch._foreach_div_(consumer_weights, alpha)
                torch._foreach_mul_([bn.weight, bn.bias], alpha)

    def make_optimizer(self, model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
        """SGD with ``lr = mu`` and no momentum (the loop's ``lr`` and ``momentum`` are replaced);
        the penalised gammas get no weight decay, every other parameter keeps ``weight_decay``."""
        gammas = [g for g, _ in self._bind(model)]
        ids = {id(g) for g in gammas}
        others = [p for p in model.parameters() if id(p) not in ids]
        if lr != self.hparams["mu"] or momentum:
            log.info("ista: phase uses SGD lr=mu=%g without momentum (loop asked lr=%g, momentum=%g)",
                     self.hparams["mu"], lr, momentum)
        self._optimizer = torch.optim.SGD(
            [{"params": others, "weight_decay": weight_decay}, {"params": gammas, "weight_decay": 0.0}],
            lr=self.hparams["mu"], momentum=0.0,
        )
        return self._optimizer

    # ---- the phase -----------------------------------------------------------------------------
    def extra_loss(self, model: nn.Module, inputs: torch.Tensor, logits: torch.Tensor,
                   targets: torch.Tensor) -> torch.Tensor | None:
        if self._input_shape is None:
            self._input_shape = tuple(inputs.shape[1:])
        return None

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        if self._lambdas is None:
            if self._input_shape is not None:
                self._lambdas = self.layer_cost_weights(model, self._input_shape)
            elif not self._warned:
                log.warning("ista: input shape unknown (extra_loss was not called); uniform lambda_l = 1")
                self._warned = True
        bound = self._bind(model)
        # The step's actual learning rate (make_optimizer puts the gammas in the last group), so a
        # schedule the loop applies is followed; mu when the loop brought its own optimizer.
        lr = self._optimizer.param_groups[-1]["lr"] if self._optimizer is not None else self.hparams["mu"]
        step = lr * self.hparams["rho"]
        for gamma, lam in bound:
            t = step * lam
            # sign(g) * max(|g| - t, 0) == g - clamp(g, -t, t); exactly 0 where |g| <= t.
            gamma.sub_(gamma.clamp(-t, t))

    def on_epoch_end(self, model: nn.Module, epoch: int, mean_loss: float) -> None:
        log.info("ista: epoch %d: loss %.4f, %.1f%% of penalised gammas are exactly zero",
                 epoch, mean_loss, 100.0 * self.zero_fraction(model))

    def _bind(self, model: nn.Module) -> list[tuple[nn.Parameter, float]]:
        """(gamma, lambda_l) of every penalised BN of ``model`` (lambda_l = 1 until known)."""
        if self._layers is None:
            self._layers = self._find_layers(DependencyGraph(model))
        if self._bound_model is not model or self._bound_lambdas is not self._lambdas:
            lambdas = self._lambdas or {}
            self._bound = [(model.get_submodule(layer.bn).weight, lambdas.get(layer.bn, 1.0)) for layer in self._layers]
            self._bound_model, self._bound_lambdas = model, self._lambdas
        return self._bound

    @torch.no_grad()
    def layer_cost_weights(self, model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, float]:
        """lambda_l per penalised BN: ``(out_h*out_w + k*k*c_in + sum_consumers k'*k'*c_out') /
        (in_h*in_w)``, from one batch-1 forward of zeros (eval mode, each module's flag restored)."""
        layers = self._layers or []
        sizes: dict[str, int] = {}

        def hook(name):
            def record(module, inputs, output):
                sizes[name] = int(output.shape[-2] * output.shape[-1]) if output.dim() == 4 else 1
            return record

        handles = [model.get_submodule(layer.producer).register_forward_hook(hook(layer.producer)) for layer in layers]
        modes = [(m, m.training) for m in model.modules()]
        param = next(model.parameters())
        try:
            model.eval()
            model(torch.zeros((1, *input_shape), device=param.device, dtype=param.dtype))
        finally:
            for h in handles:
                h.remove()
            for m, training in modes:
                m.training = training
        in_hw = int(input_shape[-2] * input_shape[-1]) if len(input_shape) >= 2 else 1
        lambdas = {}
        for layer in layers:
            producer = model.get_submodule(layer.producer)
            fan_in = producer.weight[0].numel()  # k*k*c_in
            fan_out = 0
            for name in layer.consumers:
                m = model.get_submodule(name)
                if isinstance(m, nn.Conv2d):
                    fan_out += m.weight.numel() // m.in_channels  # k'*k'*c_out'
                elif isinstance(m, nn.Linear):
                    fan_out += m.weight.numel() // producer.weight.shape[0]  # features per channel * outputs
            lambdas[layer.bn] = (sizes.get(layer.producer, 1) + fan_in + fan_out) / in_hw
        log.info("ista: lambda_l from input %s: %s", tuple(input_shape),
                 ", ".join(f"{k}={v:.3g}" for k, v in lambdas.items()))
        return lambdas

    # ---- checkpointed state --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "layers": None if self._layers is None else [asdict(layer) for layer in self._layers],
            "applied_alpha": self._applied_alpha,
            "lambdas": None if self._lambdas is None else dict(self._lambdas),
            "input_shape": None if self._input_shape is None else list(self._input_shape),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        layers = state.get("layers")
        self._layers = None if layers is None else [_Layer(l["bn"], l["producer"], list(l["consumers"]), bool(l["rescalable"]))
                                                    for l in layers]
        self._applied_alpha = state.get("applied_alpha")
        lambdas = state.get("lambdas")
        self._lambdas = None if lambdas is None else {str(k): float(v) for k, v in lambdas.items()}
        shape = state.get("input_shape")
        self._input_shape = None if shape is None else tuple(int(s) for s in shape)
        self._bound_model, self._bound, self._bound_lambdas = None, [], None

    # ---- the cut -------------------------------------------------------------------------------
    def zero_fraction(self, model: nn.Module) -> float:
        """Fraction of penalised gammas that are exactly zero."""
        gammas = [model.get_submodule(layer.bn).weight.detach() for layer in self._layers or []]
        if not gammas:
            return 0.0
        flat = torch.cat(gammas)
        return float((flat == 0).float().mean())

    def unscaled_copy(self, model: nn.Module) -> nn.Module:
        """A deep copy of ``model`` with the rescaling undone: the "masked" model the surgery must
        reproduce (its zero-gamma channels still present)."""
        model = copy.deepcopy(model)
        self.undo_rescaling(model)
        return model

    @torch.no_grad()
    def prune(self, model: nn.Module, context: PruneContext) -> nn.Module:
        model = self.unscaled_copy(model)
        graph = DependencyGraph(model)
        layers = self._layers if self._layers is not None else self._find_layers(graph)
        constants = _consumer_constants(model, layers, context)
        removed_total, total = 0, 0
        for layer in layers:
            group = graph.group_of(layer.producer)
            gamma = model.get_submodule(layer.bn).weight.detach()
            total += gamma.numel()
            const, is_constant = constants[layer.bn]
            removable = (gamma == 0) & is_constant
            if any(isinstance(model.get_submodule(c), ChannelPadShortcut) for c in layer.consumers):
                removable &= const == 0  # a shortcut cannot absorb a constant
            if not removable.any():
                continue
            if removable.all():  # never empty a group: keep the largest |gamma|
                removable[gamma.abs().argmax()] = False
            keep = (~removable).nonzero().flatten()
            prune_group(graph, group, keep, constants=const)
            removed_total += int(removable.sum())
        log.info("ista: removed %d of %d penalised channels", removed_total, total)
        return model


def _homogeneous_path(graph: DependencyGraph, bn: str, consumers: list[str]) -> bool:
    """True when everything between ``bn``'s output and the consumers is positively homogeneous
    and every consumer is a conv or linear, so the alpha rescaling leaves the function unchanged."""
    modules = dict(graph.model.named_modules())
    if not all(isinstance(modules[c], (nn.Conv2d, nn.Linear)) for c in consumers):
        return False
    start = next((n for n in graph.fx_graph.nodes if n.op == "call_module" and n.target == bn), None)
    if start is None:
        return False
    frontier, seen = list(start.users), set()
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module" and node.target in consumers:
            continue
        if not _is_homogeneous(node, modules):
            return False
        frontier.extend(node.users)
    return True


def _is_homogeneous(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _HOMOGENEOUS_MODULES)
    if node.op == "call_function":
        return node.target in _HOMOGENEOUS_FUNCTIONS
    if node.op == "call_method":
        return node.target in _HOMOGENEOUS_METHODS
    return False


def _consumer_constants(model: nn.Module, layers: list[_Layer], context: PruneContext
                        ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per penalised BN: (value each channel feeds its consumers, whether that value is constant).

    A channel whose gamma is exactly zero leaves the BN as ``beta``; after any elementwise
    activation it is still a constant, which one batch-1 forward reads off at the consumers' inputs.
    A channel is "constant" when all its consumers see one value at every position.
    """
    seen: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, inputs):
            seen[name] = inputs[0].detach()
        return record

    names = {c for layer in layers for c in layer.consumers}
    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    param = next(model.parameters())
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        model(torch.zeros((1, *context.input_shape), device=param.device, dtype=param.dtype))
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    out = {}
    for layer in layers:
        channels = model.get_submodule(layer.bn).num_features
        value, ok = None, torch.ones(channels, dtype=torch.bool, device=param.device)
        for name in layer.consumers:
            x = seen[name][0].reshape(channels, -1)  # conv: C x (H*W); linear after flatten: C x features
            hi, lo = x.max(dim=1).values, x.min(dim=1).values
            ok &= (hi - lo) <= 1e-6 * hi.abs().clamp(min=1.0)
            v = x[:, 0]
            if value is None:
                value = v
            else:
                ok &= (v - value).abs() <= 1e-6 * v.abs().clamp(min=1.0)
        if value is None:
            value = torch.zeros(channels, device=param.device)
            ok[:] = False
        out[layer.bn] = (value, ok)
    return out
