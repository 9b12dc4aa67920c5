"""Batch-norm folding for inference (methods.fold): exact within float rounding on real models,
conservative where folding would change what another reader sees, all-or-none for timing."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from methods import PruneContext, create_method
from methods.errors import SurgeryError
from methods.fold import conv_bn_pairs, fold_alike, fold_batchnorm
from methods.layers import ChannelPadShortcut
from trainables.models import create_model


def calibrated(model: nn.Module, shape, batches: int = 4) -> nn.Module:
    """Real running statistics (cumulative average over random batches) and non-trivial affine
    parameters, then eval mode: folding must reproduce these, not the init's 0 / 1."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(16, *shape))
    return model.eval()


def assert_same_outputs(model, folded, shape):
    x = torch.randn(32, *shape)
    with torch.no_grad():
        a, b = model(x), folded(x)
    scale = max(1.0, a.abs().max().item())
    assert (a - b).abs().max().item() <= 1e-5 * scale


def batch_norms(model) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_folds_every_bn_of_resnet56_pruned_at_scope_all_with_pad_shortcuts():
    shape = (3, 32, 32)
    dense = create_model("resnet56", 10)
    pruned = create_method("l1_norm", prune_ratio=0.5, scope="all", round_to=1).prune(dense, PruneContext(shape))
    model = calibrated(pruned, shape)
    assert sum(isinstance(m, ChannelPadShortcut) for m in model.modules()) == 2
    before = copy.deepcopy(model.state_dict())
    folded = fold_batchnorm(model)
    assert len(conv_bn_pairs(model)) == 55 and batch_norms(model) == 55 and batch_norms(folded) == 0
    assert sum(isinstance(m, ChannelPadShortcut) for m in folded.modules()) == 2
    assert all(m.bias is not None for m in folded.modules() if isinstance(m, nn.Conv2d))
    assert_same_outputs(model, folded, shape)
    # The model passed in is untouched.
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert type(folded) is type(model) and not folded.training


def test_folds_torchvision_resnet18_including_downsample_shortcuts():
    shape = (3, 64, 64)
    model = calibrated(torchvision.models.resnet18(num_classes=10), shape)
    folded = fold_batchnorm(model)
    assert len(conv_bn_pairs(model)) == 20 and batch_norms(folded) == 0
    assert isinstance(folded.layer2[0].downsample[1], nn.Identity)
    assert_same_outputs(model, folded, shape)


class _ConvReadTwice(nn.Module):
    """The conv's output feeds the batch norm and the add: folding would change the add's input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn2(self.conv2(self.bn(y) + y))


def test_leaves_a_bn_whose_conv_output_has_another_reader():
    shape = (3, 8, 8)
    model = calibrated(_ConvReadTwice(), shape)
    assert conv_bn_pairs(model) == [("conv2", "bn2")]
    folded = fold_batchnorm(model)
    assert isinstance(folded.bn, nn.BatchNorm2d) and isinstance(folded.bn2, nn.Identity)
    assert_same_outputs(model, folded, shape)


def test_leaves_a_pair_with_a_forward_hook():
    """A hook on the batch norm (a scratch gate multiplies its output) must keep seeing its output."""
    shape = (3, 8, 8)
    model = calibrated(_ConvReadTwice(), shape)
    gate = torch.linspace(0.0, 1.0, 4).view(1, 4, 1, 1)
    model.bn2.register_forward_hook(lambda m, args, out: out * gate)
    assert conv_bn_pairs(model) == []
    assert_same_outputs(model, fold_batchnorm(model), shape)


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) if x.sum() > 0 else x


def test_untraceable_model_raises_and_fold_alike_folds_none():
    with pytest.raises(SurgeryError, match="cannot fold batch norms of _DataDependent"):
        fold_batchnorm(_DataDependent())
    dense = create_model("resnet20", 10).eval()
    odd = _DataDependent().eval()
    models, folded = fold_alike([odd, dense])
    assert folded is False and models[0] is odd and models[1] is dense
    models, folded = fold_alike([dense, copy.deepcopy(dense)])
    assert folded is True and all(batch_norms(m) == 0 for m in models) and batch_norms(dense) == 19
