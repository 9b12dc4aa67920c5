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
    from trainables.data import make_loader
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
    train_loader = make_loader(data.train, ft.batch_size, shuffle=True, seed=settings.seed)
    val_loader = make_loader(data.val, 256, shuffle=False)
    for epoch in range(ft.epochs):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(ft.lr, epoch, ft.epochs)
        train_epoch(model, train_loader, opt, device=device)
    accuracy, _ = evaluate(model, val_loader, device=device)
    return {"accuracy": accuracy, "macs": float(macs), "dense_macs": float(dense_macs),
            "seconds": time.perf_counter() - t0}
