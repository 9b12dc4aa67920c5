"""The hand-built peer of ``bench_vs_torch_pruning.py``: Torch-Pruning's DependencyGraph pruners
(``tp.pruner.MetaPruner``) inside a plain Optuna multi-objective study. What a user writes instead of
prunetune, kept to the obvious: prune the loaded dense model, fine-tune, evaluate.

Our CIFAR ResNets use the option-A ``ChannelPadShortcut`` (methods/layers.py: subsample, then copy
input channel ``source[j]`` to output ``j`` or a zero channel). Torch-Pruning's tracer would see
its slice / cat / index_select as channel-preserving element-wise ops and tie the 16-wide input to
the 32-wide output. So the peer registers a customized pruner for it (``ShortcutPruner``):
the shortcut becomes one graph node with separate in/out channels (like a convolution), and
pruning either side edits its ``source`` map. For the trace only, ``traced_shortcuts`` swaps its
forward for the same map written as a fixed 0/1 strided 1x1 convolution, whose autograd node
links straight to the input, so the tracer sees the module as one node.

Needs ``pip install 'torch-pruning>=1.5'`` (the ``bench`` extra).
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch
import torch_pruning as tp
from torch import nn
from torch.nn import functional as F

from methods.layers import ChannelPadShortcut

__all__ = ["ShortcutPruner", "IMPORTANCES", "prune_model", "run_peer_trial"]

#: importance name -> factory (Torch-Pruning 1.5/1.6 API)
IMPORTANCES = {
    "l1": lambda: tp.importance.MagnitudeImportance(p=1),
    "bn_scale": lambda: tp.importance.BNScaleImportance(),
    "group_l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "lamp": lambda: tp.importance.LAMPImportance(p=2),
    "random": lambda: tp.importance.RandomImportance(),
}


class ShortcutPruner(tp.pruner.function.BasePruningFunc):
    """Cuts a ``ChannelPadShortcut``: output channels leave ``source``; a removed input channel
    turns the outputs that copied it into zero channels and renumbers the rest."""

    TARGET_MODULES = ChannelPadShortcut

    def prune_out_channels(self, layer: ChannelPadShortcut, idxs):
        keep = torch.ones(layer.out_channels, dtype=torch.bool)
        keep[list(idxs)] = False
        layer.source = layer.source[keep].clone()
        return layer

    def prune_in_channels(self, layer: ChannelPadShortcut, idxs):
        removed = torch.zeros(layer.in_channels, dtype=torch.bool)
        removed[list(idxs)] = True
        new_index = torch.cumsum(~removed, 0) - 1  # old input channel -> new one
        src = layer.source.clone()
        copied = src >= 0
        gone = copied & removed[src.clamp(min=0)]
        src[copied] = new_index[src[copied]]
        src[gone] = -1
        layer.source = src
        layer.in_channels -= len(idxs)
        return layer

    def get_out_channels(self, layer):
        return layer.out_channels

    def get_in_channels(self, layer):
        return layer.in_channels


def _conv_forward(self: ChannelPadShortcut, x: torch.Tensor) -> torch.Tensor:
    weight = torch.zeros(self.out_channels, self.in_channels, 1, 1, dtype=x.dtype, device=x.device)
    rows = (self.source >= 0).nonzero().flatten()
    weight[rows, self.source[rows], 0, 0] = 1.0
    return F.conv2d(x, weight, stride=self.stride)


@contextmanager
def traced_shortcuts():
    original = ChannelPadShortcut.forward
    ChannelPadShortcut.forward = _conv_forward
    try:
        yield
    finally:
        ChannelPadShortcut.forward = original


def prune_model(model: nn.Module, input_shape, importance: str, ratio: float, global_pruning: bool,
                classifier: nn.Module) -> nn.Module:
    """Prune ``model`` in place with Torch-Pruning; the classifier's outputs (the classes) stay."""
    example = torch.randn(1, *input_shape)
    with traced_shortcuts():
        pruner = tp.pruner.MetaPruner(
            model, example, importance=IMPORTANCES[importance](), pruning_ratio=ratio,
            global_pruning=global_pruning, ignored_layers=[classifier],
            customized_pruners={ChannelPadShortcut: ShortcutPruner()})
    pruner.step()
    return model


def run_peer_trial(base_dir: str, settings, params: dict) -> dict:
    """One peer trial in a worker process: prune the dense base, fine-tune as prunetune's finetune
    section says (same optimizer, cosine schedule, loader seed), evaluate on the same val split."""
    torch.set_num_threads(1)  # one core per trial, as prunetune's trials get
    from methods.cost import profile
    from trainables.device_data import trial_loader
    from trainables.model_io import load_model
    from trainables.train import cosine_lr, evaluate, train_epoch
    from trainables.workspace import load_data

    t0 = time.perf_counter()
    torch.manual_seed(settings.seed)
    data = load_data(settings)
    shape = tuple(data.input_shape)
    model, _ = load_model(base_dir)
    dense_macs = profile(model, shape).macs
    try:
        prune_model(model, shape, params["importance"], params["ratio"], params["global"], model.fc)
    except Exception as exc:  # a crash of the peer's pruning is a failed trial, as Optuna would record it
        return {"failed": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - t0}
    macs = profile(model, shape).macs
    ft = settings.finetune
    device = torch.device("cpu")
    opt = torch.optim.SGD(model.parameters(), lr=ft.lr, momentum=ft.momentum, weight_decay=ft.weight_decay)
    # The loaders prunetune's trials use (digits: the whole split as tensors, seeded order).
    train_loader = trial_loader(data.train, ft.batch_size, shuffle=True, seed=settings.seed, device=device)
    val_loader = trial_loader(data.val, 256, shuffle=False, device=device)
    for epoch in range(ft.epochs):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(ft.lr, epoch, ft.epochs)
        train_epoch(model, train_loader, opt, device=device)
    accuracy, _ = evaluate(model, val_loader, device=device)
    return {"accuracy": accuracy, "macs": float(macs), "dense_macs": float(dense_macs),
            "seconds": time.perf_counter() - t0}


def check_shortcut_pruner(atol: float = 1e-5) -> float:
    """Self-check of ``ShortcutPruner`` (the benchmark runs it first): cutting residual channels of
    ResNet-20 through Torch-Pruning (stage 1: the shortcut's inputs; stage 2: its outputs too) gives
    the same function as the dense model with those channels zeroed at every producer and dropped
    from the shortcut's map. Returns the largest output difference; raises if above ``atol``."""
    import copy

    from trainables.models import create_model

    torch.manual_seed(0)
    dense = create_model("resnet20", 10)
    for bn in dense.modules():
        if isinstance(bn, nn.BatchNorm2d):  # non-trivial statistics, so a wrong channel shows
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.2, 0.2)
            bn.running_mean.uniform_(-0.1, 0.1)
    dense.eval()
    cut = {"layer1": [0, 3], "layer2": [1, 20]}
    zeroed = copy.deepcopy(dense)
    for bn in [zeroed.bn1] + [b.bn2 for b in zeroed.layer1]:
        bn.weight.data[cut["layer1"]] = 0
        bn.bias.data[cut["layer1"]] = 0
    for b in zeroed.layer2:
        b.bn2.weight.data[cut["layer2"]] = 0
        b.bn2.bias.data[cut["layer2"]] = 0
    zeroed.layer2[0].shortcut.source[cut["layer2"]] = -1
    pruned = copy.deepcopy(dense)
    with traced_shortcuts():
        graph = tp.DependencyGraph().build_dependency(pruned, torch.randn(1, 3, 32, 32),
                                                      customized_pruners={ChannelPadShortcut: ShortcutPruner()})
    for stage, idxs in cut.items():
        graph.get_pruning_group(getattr(pruned, stage)[-1].conv2, tp.prune_conv_out_channels, idxs=idxs).prune()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        diff = (pruned(x) - zeroed(x)).abs().max().item()
    if diff > atol:
        raise AssertionError(f"ShortcutPruner: pruned model differs from the zeroed dense one by {diff:.3g}")
    return diff
