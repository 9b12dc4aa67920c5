"""Channel dependency graph: which channels of which layers must be cut together.

The model is traced with ``torch.fx``; every tensor gets a *channel space* (the layer that made its
channels). Batch norm, activations, pooling, flatten and depthwise convs pass a space through;
convs, linears and ``ChannelPadShortcut`` start a new one; an elementwise add (a residual join)
merges the spaces of its operands into one group. A ``ChannelGroup`` then lists

* ``producers``: modules whose *output* channels are the group (conv, linear, pad shortcut),
* ``followers``: modules cut along the group in every dimension (batch norm, depthwise conv),
* ``consumers``: modules whose *input* channels are the group (conv, linear, pad shortcut), with the
  number of input features per channel (a linear after ``flatten`` of a CxHxW map reads H*W each).

Groups touching the network input or output, or any op we do not understand (cat, grouped conv,
unknown modules), are marked not prunable. This covers what Torch-Pruning's DependencyGraph covers
for the model families here, plus the option-A pad shortcut, which Torch-Pruning does not model.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .errors import NotFoundError, SurgeryError
from .layers import ChannelPadShortcut

__all__ = ["ChannelGroup", "DependencyGraph"]

_PASS_MODULES = (
    nn.BatchNorm2d, nn.BatchNorm1d, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU, nn.Sigmoid,
    nn.Dropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
    nn.Identity, nn.Flatten,
)
_PASS_FUNCTIONS = {
    torch.relu, torch.nn.functional.relu, torch.nn.functional.relu6, torch.flatten,
    torch.nn.functional.adaptive_avg_pool2d, torch.nn.functional.max_pool2d,
    torch.nn.functional.avg_pool2d, torch.nn.functional.dropout, torch.nn.functional.hardtanh,
}
_PASS_METHODS = {"relu", "relu_", "flatten", "view", "reshape", "contiguous", "clone", "mean"}
_JOIN_FUNCTIONS = {operator.add, operator.iadd, torch.add, operator.sub, operator.mul, torch.mul}
_JOIN_METHODS = {"add", "add_", "mul", "mul_", "sub"}


@dataclass
class ChannelGroup:
    """Channels that must be removed together (see module docstring)."""

    id: int
    size: int
    producers: list[str] = field(default_factory=list)
    followers: list[str] = field(default_factory=list)
    consumers: list[tuple[str, int]] = field(default_factory=list)
    residual: bool = False
    prunable: bool = True
    reason: str = ""

    @property
    def internal(self) -> bool:
        """Prunable and not joined by a residual add: one producer, cut without touching a shortcut."""
        return self.prunable and not self.residual and len(self.producers) == 1

    @property
    def name(self) -> str:
        return self.producers[0] if self.producers else f"group{self.id}"


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, ChannelPadShortcut) or getattr(m, "_prunetune_leaf", False) or super().is_leaf_module(m, qualname)


class DependencyGraph:
    """Build with ``DependencyGraph(model)``; ``groups`` lists every channel group in graph order."""

    def __init__(self, model: nn.Module):
        self.model = model
        try:
            self.fx_graph = _Tracer().trace(model)
        except Exception as exc:  # fx raises many kinds; one clear message is what users need
            raise SurgeryError(f"cannot trace {type(model).__name__} with torch.fx: {exc}") from exc
        self._parent: dict[int, int] = {}
        self._info: dict[int, ChannelGroup] = {}
        self._space: dict[fx.Node, int] = {}
        self.next_module: dict[str, str] = {}  # conv -> the batch norm that directly reads it
        self._walk()
        self.groups = self._collect()

    # ---- union-find over channel spaces ------------------------------------------------------------
    def _new(self, size: int, **kw) -> int:
        gid = len(self._parent)
        self._parent[gid] = gid
        self._info[gid] = ChannelGroup(gid, size, **kw)
        return gid

    def _find(self, g: int) -> int:
        while self._parent[g] != g:
            self._parent[g] = self._parent[self._parent[g]]
            g = self._parent[g]
        return g

    def _union(self, a: int, b: int) -> int:
        ra, rb = self._find(a), self._find(b)
        if ra == rb:
            return ra
        A, B = self._info[ra], self._info[rb]
        if A.size != B.size:
            raise SurgeryError(f"joined channel spaces differ in size: {A.name} ({A.size}) vs {B.name} ({B.size})")
        self._parent[rb] = ra
        A.producers += B.producers
        A.followers += B.followers
        A.consumers += B.consumers
        A.residual = True
        if not B.prunable:
            A.prunable, A.reason = False, A.reason or B.reason
        return ra

    def _block(self, g: int, reason: str) -> None:
        info = self._info[self._find(g)]
        if info.prunable:
            info.prunable, info.reason = False, reason

    # ---- the walk ------------------------------------------------------------------------------------
    def _tensor_args(self, node: fx.Node) -> list[int]:
        out = []
        for a in node.all_input_nodes:
            if a in self._space:
                out.append(self._space[a])
        return out

    def _walk(self) -> None:
        modules = dict(self.model.named_modules())
        for node in self.fx_graph.nodes:
            args = self._tensor_args(node)
            if node.op == "placeholder":
                self._space[node] = self._new(-1, prunable=False, reason="network input")
            elif node.op == "get_attr":
                continue
            elif node.op == "call_module":
                self._module_node(node, modules[node.target], args)
            elif node.op in ("call_function", "call_method"):
                self._function_node(node, args)
            elif node.op == "output":
                for g in args:
                    self._block(g, "network output")
        # Sizes of spaces that came from the input are only known from their consumers; irrelevant.

    def _module_node(self, node: fx.Node, m: nn.Module, args: list[int]) -> None:
        name = node.target
        src = args[0] if args else None
        if isinstance(m, nn.Conv2d):
            if m.groups == 1:
                self._consume(src, name, 1)
                self._space[node] = self._new(m.out_channels, producers=[name])
                users = list(node.users)
                if len(users) == 1 and users[0].op == "call_module" and isinstance(self.model.get_submodule(users[0].target), nn.BatchNorm2d):
                    self.next_module[name] = users[0].target
            elif m.groups == m.in_channels == m.out_channels:
                self._info[self._find(src)].followers.append(name)
                self._space[node] = src
            else:
                self._block(src, f"grouped conv {name}")
                self._space[node] = self._new(m.out_channels, producers=[name], prunable=False, reason=f"grouped conv {name}")
        elif isinstance(m, nn.Linear):
            self._consume(src, name, None, in_features=m.in_features)
            self._space[node] = self._new(m.out_features, producers=[name])
        elif isinstance(m, ChannelPadShortcut):
            self._consume(src, name, 1)
            self._space[node] = self._new(m.out_channels, producers=[name])
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            self._info[self._find(src)].followers.append(name)
            self._space[node] = src
        elif isinstance(m, _PASS_MODULES):
            self._space[node] = src
        else:
            for g in args:
                self._block(g, f"unsupported module {name} ({type(m).__name__})")
            self._space[node] = self._new(-1, prunable=False, reason=f"output of unsupported module {name}")

    def _consume(self, src: int | None, name: str, per_channel: int | None, in_features: int | None = None) -> None:
        info = self._info[self._find(src)]
        if per_channel is None:  # a linear: features per channel from the flatten that feeds it
            if info.size <= 0 or in_features % info.size:
                self._block(src, f"cannot map {name}'s {in_features} inputs onto {info.size} channels")
                per_channel = 1
            else:
                per_channel = in_features // info.size
        info.consumers.append((name, per_channel))

    def _function_node(self, node: fx.Node, args: list[int]) -> None:
        target = node.target
        if (node.op == "call_function" and target in _JOIN_FUNCTIONS) or (node.op == "call_method" and target in _JOIN_METHODS):
            if len(args) >= 2:
                g = args[0]
                for other in args[1:]:
                    g = self._union(g, other)
                self._space[node] = g
            elif args:
                self._space[node] = args[0]  # x + constant keeps the space
            return
        if (node.op == "call_function" and target in _PASS_FUNCTIONS) or (node.op == "call_method" and target in _PASS_METHODS):
            if args:
                self._space[node] = args[0]
            return
        if node.op == "call_method" and target in ("size", "dim") or target is getattr:
            return  # not a tensor
        for g in args:
            self._block(g, f"unsupported op {target}")
        if args:
            self._space[node] = self._new(-1, prunable=False, reason=f"output of unsupported op {target}")

    def _collect(self) -> list[ChannelGroup]:
        roots = sorted({self._find(g) for g in self._parent})
        groups = []
        for r in roots:
            info = self._info[r]
            if not info.producers:
                continue  # the input space and unsupported outputs carry nothing to cut
            if any(self._is_linear(p) for p in info.producers) and info.prunable and not info.consumers:
                info.prunable, info.reason = False, "network output"
            groups.append(info)
        return groups

    def _is_linear(self, name: str) -> bool:
        return isinstance(self.model.get_submodule(name), nn.Linear)

    # ---- queries -------------------------------------------------------------------------------------
    def group_of(self, producer: str) -> ChannelGroup:
        for g in self.groups:
            if producer in g.producers:
                return g
        raise NotFoundError(f"no channel group is produced by {producer!r}")

    def prunable_groups(self, *, scope: str = "internal") -> list[ChannelGroup]:
        """Groups that may lose channels: the block-internal ones (``scope="internal"``), or every
        prunable group, residual-coupled ones included (``"all"``)."""
        if scope not in ("internal", "all"):
            raise SurgeryError(f"scope: expected internal or all, got {scope!r}")
        return [g for g in self.groups if g.prunable and (scope == "all" or g.internal)]

    def batch_norm_names(self, group: ChannelGroup) -> list[str]:
        """The affine batch norms that normalise the group's channels (one per conv producer of a
        residual group), in graph order."""
        out = []
        for name in group.followers:
            m = self.model.get_submodule(name)
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                out.append(name)
        return out
