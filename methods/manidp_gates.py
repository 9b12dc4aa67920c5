"""ManiDP's gated residual blocks: channel gates, their insertion into ResNets, their cost, and the
batch-1 path that really skips masked channels.

A gate governs ONE convolution of a residual block. From that conv's *input* x it computes the
saliency of the conv's output channels,
``pi(x) = clamp(relu(fc2(relu(fc1(GAP(x))))), max=clamp_max)`` (fc1 without bias, fc2 bias 1),
and the mask ``m = pi * 1[pi >= threshold]``, which multiplies the layer's output channel-wise.
Placement follows the official code (huawei-noah/Pruning, ManiDP/models/resnet_*.py):

* internal layers (basic block conv1; bottleneck conv1, conv2): the mask multiplies the output
  after BN *and* ReLU. Because ``m >= 0``, this equals masking after BN and before the ReLU.
* the last conv of a block (basic conv2; bottleneck conv3): the mask multiplies the BN output
  before the residual add (an off channel adds nothing to the shortcut).

``ChannelGate.min_active`` (0, the paper's gate, unless ManiDP sets it at the cheap end) keeps each
input's ``min_active`` most salient channels on whatever the threshold.

Every conv of a block is gated (the official code has no bottleneck; gating conv3 as well is our
choice, the same rule as the basic block's last conv). The stem, the shortcut convs and the
classifier are never gated.

Accounting. A gated block calls its convs functionally (``F.conv2d`` on the module's weights), so
``methods.cost`` never counts them at their dense size; instead each gate's ``macs_hook`` reports
the cost of the conv it governs with only its active channels,
``sum_i active_in_i * active_out_i * kh * kw * out_h * out_w`` (a channel is active where its mask
is > 0; the input channels of a conv are masked by the previous gate, or all active for a block's
first conv). The gates' own fc1/fc2 are ordinary ``nn.Linear`` children and are counted by the
default rule. At batch B everything is a sum over samples, so one forward gives B times the average.

Pure PyTorch; the masked path has no data-dependent Python control flow, so ``torch.export`` works.
"""
from __future__ import annotations

import logging
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ArgumentError, NotFoundError, SurgeryError

__all__ = ["ChannelGate", "GatedBlock", "gate_model", "gated_blocks", "named_gates", "set_thresholds", "fold_batchnorm",
           "gating_spec", "apply_gating", "hidden_width", "DEFAULT_CLAMP_MAX", "DEFAULT_SQUEEZE_RATE"]

log = logging.getLogger(__name__)

#: The official defaults (``--clamp_max 1000``, ``--squeeze_rate 2``).
DEFAULT_CLAMP_MAX = 1000.0
DEFAULT_SQUEEZE_RATE = 2
_BLOCK_TYPES = ("BasicBlock", "Bottleneck")  # CIFAR BasicBlock, torchvision BasicBlock / Bottleneck


def hidden_width(out_channels: int, squeeze_rate: int) -> int:
    """The gate's hidden width, as in the official code: ``out // (squeeze_rate // 2)`` below 80
    output channels, else ``out // squeeze_rate``."""
    rate = max(1, squeeze_rate // 2) if out_channels < 80 else max(1, squeeze_rate)
    return max(1, out_channels // rate)


class ChannelGate(nn.Module):
    """Saliency and mask of one conv's output channels (see module docstring).

    ``forward(x, y, in_mask)``: ``x`` the governed conv's input, ``y`` the layer's output (after its
    BN, and its ReLU for internal layers), ``in_mask`` the mask on ``x``'s channels (None: all on).
    Returns ``(y * m, m, pi)``. ``threshold`` is a buffer (``-inf``: every channel with ``pi > 0``
    is on), so it travels in the state dict.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int, *, kernel_size: tuple[int, int],
                 clamp_max: float = DEFAULT_CLAMP_MAX, squeeze_rate: int = DEFAULT_SQUEEZE_RATE):
        super().__init__()
        self.fc1 = nn.Linear(in_channels, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, out_channels, bias=True)
        nn.init.kaiming_normal_(self.fc1.weight)
        # Departure from the official kaiming init of fc2: zeros, so pi == 1 for every input at the
        # start and the gated network computes exactly the dense one it was made from.
        nn.init.zeros_(self.fc2.weight)
        nn.init.constant_(self.fc2.bias, 1.0)
        self.clamp_max = float(clamp_max)
        self.squeeze_rate = int(squeeze_rate)
        self.kernel_size = (int(kernel_size[0]), int(kernel_size[1]))
        self.register_buffer("threshold", torch.tensor(float("-inf")))
        #: Channels each input keeps whatever the threshold (0: none, the paper's gate); a plain
        #: attribute (a structural choice, like the widths), carried by ``gating_spec``.
        self.min_active = 0

    def saliency_from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """``pi`` from the globally average-pooled conv input ``(B, C_in)``."""
        # clamp(relu(z), max) as one clamp(z, 0, max): the same values, one op fewer.
        return torch.clamp(self.fc2(F.relu(self.fc1(pooled))), 0.0, self.clamp_max)

    def saliency(self, x: torch.Tensor) -> torch.Tensor:
        return self.saliency_from_pooled(x.mean(dim=(2, 3)))

    def mask(self, pi: torch.Tensor) -> torch.Tensor:
        """``pi * 1[pi >= threshold]`` (no data-dependent control flow). With ``min_active`` = n > 0
        (set by ManiDP at the cheap end only; 0, the paper's gate, everywhere else) each input's n
        most salient channels are kept whatever the threshold: ``1[pi >= threshold or pi >= its
        n largest pi]`` (exactly n on ties, as ``torch.topk`` picks them; a channel with ``pi == 0``
        stays off: its output is zero anyway)."""
        keep = pi >= self.threshold
        if self.min_active > 0:
            top = torch.topk(pi, min(self.min_active, pi.shape[1]), dim=1).indices
            keep = keep.scatter(1, top, True)
        return torch.where(keep, pi, torch.zeros_like(pi))

    def forward(self, x: torch.Tensor, y: torch.Tensor,
                in_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pi = self.saliency(x)
        m = self.mask(pi)
        return y * m[:, :, None, None], m, pi

    def conv_macs(self, x: torch.Tensor, y: torch.Tensor, in_mask: torch.Tensor | None,
                  mask: torch.Tensor) -> torch.Tensor:
        """Per-sample MACs of the governed conv with only its active channels: ``(B,)`` int64."""
        active_out = (mask > 0).sum(dim=1)
        if in_mask is None:
            active_in = torch.full_like(active_out, x.shape[1])
        else:
            active_in = (in_mask > 0).sum(dim=1)
        kh, kw = self.kernel_size
        return active_in * active_out * (kh * kw * y.shape[2] * y.shape[3])

    def macs_hook(self, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> int:
        """For ``methods.cost``: the governed conv's active-channel MACs, summed over the batch."""
        x, y = inputs[0], inputs[1]
        in_mask = inputs[2] if len(inputs) > 2 else None
        return int(self.conv_macs(x, y, in_mask, output[1]).sum())

    def extra_repr(self) -> str:
        floor = f", min_active={self.min_active}" if self.min_active else ""
        return (f"kernel_size={self.kernel_size}, clamp_max={self.clamp_max}, "
                f"threshold={float(self.threshold):.4g}{floor}")


def _conv(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor | None = None,
          bias: torch.Tensor | None = None) -> torch.Tensor:
    """The conv computed functionally (module hooks do not fire: the gate accounts for it)."""
    w = conv.weight if weight is None else weight
    b = conv.bias if weight is None else bias
    return F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)


def _conv_out_hw(conv: nn.Conv2d, h: int, w: int) -> tuple[int, int]:
    sizes = []
    for n, k, s, p, d in zip((h, w), conv.kernel_size, conv.stride, conv.padding, conv.dilation):
        sizes.append((n + 2 * p - d * (k - 1) - 1) // s + 1)
    return sizes[0], sizes[1]


class _SkipState:
    """Set on every gated block while ``skipping_forward`` runs; collects the gated convs' MACs.
    ``folded`` maps a block to its layers' BN-folded ``(weight, bias)`` (see ``fold_batchnorm``)."""

    def __init__(self, folded: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] | None = None) -> None:
        self.macs = 0
        self.folded = folded


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Each gated conv with its BN folded in (running statistics): ``{id(block): [(w, b), ...]}``.
    A snapshot for inference: recompute after the weights change."""
    folded = {}
    for _, block in gated_blocks(model):
        layers = []
        for c, b in block._layers:
            conv, bn = getattr(block, c), getattr(block, b)
            scale = torch.rsqrt(bn.running_var + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight
            shift = -bn.running_mean * scale
            if bn.bias is not None:
                shift = shift + bn.bias
            if conv.bias is not None:
                shift = shift + conv.bias * scale
            layers.append(((conv.weight * scale[:, None, None, None]).contiguous(), shift.contiguous()))
        folded[id(block)] = layers
    return folded


class GatedBlock(nn.Module):
    """A residual block (basic or bottleneck) with a gate on every conv.

    The original block's children keep their names (``conv1``, ``bn1``, ..., ``shortcut`` or
    ``downsample``), so its state dict keys are unchanged; the gates are ``gate1``, ``gate2``
    (``gate3``). ``forward`` is the masked path (training, export); while ``_skip`` is set (by
    ``methods.manidp.skipping_forward``) it runs the batch-1 path that computes only active filters.
    """

    def __init__(self, block: nn.Module, *, clamp_max: float = DEFAULT_CLAMP_MAX,
                 squeeze_rate: int = DEFAULT_SQUEEZE_RATE):
        super().__init__()
        n = 3 if hasattr(block, "conv3") else 2
        self.block_type = type(block).__name__
        for name, child in block.named_children():
            self.add_module(name, child)
        self._layers = tuple((f"conv{i}", f"bn{i}") for i in range(1, n + 1))
        shortcut = getattr(block, "shortcut", None)
        if shortcut is None:
            shortcut = getattr(block, "downsample", None)
        self._shortcut = None if shortcut is None else ("shortcut" if hasattr(block, "shortcut") else "downsample")
        for i, (c, b) in enumerate(self._layers, 1):
            conv, bn = getattr(self, c), getattr(self, b)
            if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
                raise SurgeryError(f"manidp: {self.block_type}.{c}/{b} must be Conv2d/BatchNorm2d, got "
                                   f"{type(conv).__name__}/{type(bn).__name__}")
            if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
                raise SurgeryError(f"manidp: {self.block_type}.{c} must be an ungrouped, zero-padded conv "
                                   f"(groups={conv.groups}, padding={conv.padding!r}, mode={conv.padding_mode})")
            self.add_module(f"gate{i}", ChannelGate(conv.in_channels, conv.out_channels,
                                                    hidden_width(conv.out_channels, squeeze_rate),
                                                    kernel_size=conv.kernel_size, clamp_max=clamp_max,
                                                    squeeze_rate=squeeze_rate))
        self._skip: _SkipState | None = None

    def gates(self) -> list[ChannelGate]:
        return [getattr(self, f"gate{i}") for i in range(1, len(self._layers) + 1)]

    def _residual(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._shortcut is None else getattr(self, self._shortcut)(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._skip is not None:
            return self._forward_skipping(x, self._skip)
        h, in_mask = x, None
        last = len(self._layers) - 1
        for i, (c, b) in enumerate(self._layers):
            y = getattr(self, b)(_conv(getattr(self, c), h))
            if i < last:
                y = torch.relu(y)
            h, in_mask, _ = getattr(self, f"gate{i + 1}")(h, y, in_mask)
        return torch.relu(h + self._residual(x))

    @torch.no_grad()
    def _forward_skipping(self, x: torch.Tensor, state: _SkipState) -> torch.Tensor:
        """Batch 1, inference (BN running statistics): gather the active filters of each conv (and
        the matching input slices of the next), compute only those, scatter into the residual."""
        if x.shape[0] != 1:
            raise ArgumentError(f"the skipping path runs one sample at a time, got a batch of {x.shape[0]}")
        h = x                      # the active input channels only
        active_in: torch.Tensor | None = None  # indices of h's channels in the full width (None: all)
        full_in = x.shape[1]
        last = len(self._layers) - 1
        folded = None if state.folded is None else state.folded[id(self)]
        for i, (c, b) in enumerate(self._layers):
            conv, bn, gate = getattr(self, c), getattr(self, b), getattr(self, f"gate{i + 1}")
            weight, bias = (conv.weight, conv.bias) if folded is None else folded[i]
            pooled = h.mean(dim=(2, 3))
            if active_in is not None:  # inactive channels are zeros in the masked network
                pooled = h.new_zeros(1, full_in).index_copy_(1, active_in, pooled)
            m = gate.mask(gate.saliency_from_pooled(pooled))
            active = m[0].nonzero().flatten()  # m >= 0: nonzero == active
            n_out, n_in = active.numel(), (full_in if active_in is None else active_in.numel())
            if n_out == 0 or n_in == 0:
                oh, ow = _conv_out_hw(conv, h.shape[2], h.shape[3])
                y = h.new_zeros(1, n_out, oh, ow)  # a conv of zeros (no filters, or no input)
                if bias is not None:
                    y = y + bias.index_select(0, active)[None, :, None, None]
            else:
                w = weight.index_select(0, active)
                if active_in is not None:
                    w = w.index_select(1, active_in)
                y = _conv(conv, h, w, None if bias is None else bias.index_select(0, active))
                state.macs += y.numel() * w.shape[1] * w.shape[2] * w.shape[3]
            if n_out:
                if folded is None:
                    y = F.batch_norm(y, bn.running_mean.index_select(0, active),
                                     bn.running_var.index_select(0, active),
                                     None if bn.weight is None else bn.weight.index_select(0, active),
                                     None if bn.bias is None else bn.bias.index_select(0, active),
                                     False, 0.0, bn.eps)
                if i < last:
                    y = torch.relu(y)
                y = y * m.index_select(1, active)[:, :, None, None]
            h, active_in, full_in = y, active, conv.out_channels
        out = self._residual(x)
        if active_in is not None and active_in.numel():
            # Under autocast a zero-input conv's fp32 bias can leave h in fp32 beside a bf16 residual.
            out = out.index_add(1, active_in, h.to(out.dtype))
        return torch.relu(out)


def _is_block(module: nn.Module) -> bool:
    if isinstance(module, GatedBlock) or type(module).__name__ not in _BLOCK_TYPES:
        return False
    needed = ("conv1", "bn1", "conv2", "bn2") + (("conv3", "bn3") if hasattr(module, "conv3") else ())
    return all(isinstance(getattr(module, a, None), nn.Module) for a in needed)


def gated_blocks(model: nn.Module) -> list[tuple[str, GatedBlock]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, GatedBlock)]


def named_gates(model: nn.Module) -> Iterator[tuple[str, ChannelGate]]:
    for name, m in model.named_modules():
        if isinstance(m, ChannelGate):
            yield name, m


def gate_model(model: nn.Module, *, clamp_max: float = DEFAULT_CLAMP_MAX,
               squeeze_rate: int = DEFAULT_SQUEEZE_RATE) -> nn.Module:
    """Replace (in place) every basic / bottleneck residual block of ``model`` by a ``GatedBlock``.

    Supported: the CIFAR ResNets (``trainables.cifar_models.BasicBlock``) and torchvision
    ResNet-18/34/50 (``BasicBlock``, ``Bottleneck``). Raises ``SurgeryError`` if nothing is gateable.
    Already gated blocks are left alone. Returns ``model``.
    """
    targets = [(name, m) for name, m in model.named_modules() if name and _is_block(m)]
    if not targets and not gated_blocks(model):
        raise SurgeryError(f"manidp: {type(model).__name__} has no residual BasicBlock/Bottleneck to gate; "
                           f"supported: CIFAR ResNets (resnet20/56/110) and torchvision resnet18/34/50")
    for name, block in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, GatedBlock(block, clamp_max=clamp_max, squeeze_rate=squeeze_rate))
    if targets:
        ref = next(model.parameters())
        model.to(device=ref.device, dtype=ref.dtype)  # new gates follow the model's device and dtype
        log.debug("manidp: gated %d blocks of %s", len(targets), type(model).__name__)
    return model


def set_thresholds(model: nn.Module, thresholds: dict[str, float]) -> None:
    """Set each named gate's threshold (names as in ``named_gates``)."""
    gates = dict(named_gates(model))
    unknown = sorted(set(thresholds) - set(gates))
    if unknown:
        raise NotFoundError(f"no gate named {unknown[:3]}...; gates: {sorted(gates)[:3]}...")
    for name, value in thresholds.items():
        gates[name].threshold.fill_(float(value))


# ---- weights + JSON spec -------------------------------------------------------------------------
def gating_spec(model: nn.Module) -> dict[str, Any] | None:
    """What ``apply_gating`` needs to re-insert the gates into a freshly built model (None if the
    model is not gated). Widths of the gates' fc layers are in the layer spec like any Linear."""
    blocks = gated_blocks(model)
    if not blocks:
        return None
    gate = blocks[0][1].gate1
    spec = {"type": "manidp", "blocks": [name for name, _ in blocks], "clamp_max": gate.clamp_max,
            "squeeze_rate": gate.squeeze_rate}
    floors = {name: g.min_active for name, g in named_gates(model) if g.min_active}
    if floors:  # only where set (ManiDP's cheap end): specs written before it load unchanged
        spec["min_active"] = floors
    return spec


def apply_gating(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Gate a freshly built dense model as described by ``gating_spec`` (before its layer spec and
    state dict are applied)."""
    if spec.get("type") != "manidp":
        raise SurgeryError(f"unknown gating type {spec.get('type')!r} in the model spec (known: 'manidp')")
    gate_model(model, clamp_max=float(spec["clamp_max"]), squeeze_rate=int(spec["squeeze_rate"]))
    names = [name for name, _ in gated_blocks(model)]
    if names != list(spec["blocks"]):
        raise SurgeryError(f"gated blocks {names} do not match the spec's {list(spec['blocks'])}")
    gates = dict(named_gates(model))
    for name, n in spec.get("min_active", {}).items():
        if name not in gates:
            raise SurgeryError(f"the spec's min_active names a gate {name!r} the model does not have")
        gates[name].min_active = int(n)
    return model
