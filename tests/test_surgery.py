"""Channel surgery is lossless where it should be: removing channels that carry nothing (or a
constant, or a copy of another channel) leaves the network function unchanged."""
import copy

import pytest
import torch
from torch import nn

from methods import DependencyGraph, SurgeryError, prune_group
from methods.cost import profile
from trainables.models import create_model

from helpers import randomise_bn


class OneByOneNet(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv1x1 (consumer, no padding) -> BN -> ReLU -> pool -> fc."""

    def __init__(self, consumer_bias=False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 6, 1, bias=consumer_bias)
        self.bn2 = nn.BatchNorm2d(6)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def test_graph_groups_resnet20():
    graph = DependencyGraph(create_model("resnet20", 10))
    internal = graph.prunable_groups()
    residual = [g for g in graph.prunable_groups(scope="all") if g.residual]
    assert len(internal) == 9  # conv1 of each of the 9 blocks
    assert all(g.producers[0].endswith("conv1") and g.producers[0].startswith("layer") for g in internal)
    assert len(residual) == 3  # one residual width per stage
    stage2 = next(g for g in residual if "layer2.0.conv2" in g.producers)
    assert "layer2.0.shortcut" in stage2.producers  # the pad shortcut writes into the stage-2 group
    stage1 = next(g for g in residual if "conv1" in g.producers)
    assert ("layer2.0.shortcut", 1) in stage1.consumers and ("layer2.0.conv1", 1) in stage1.consumers
    assert not graph.group_of("fc").prunable


@pytest.mark.parametrize("consumer_bias", [False, True])
def test_constant_channels_fold_into_consumer(consumer_bias):
    model = randomise_bn(OneByOneNet(consumer_bias))
    dead = torch.tensor([1, 4, 6])
    model.bn1.weight.data[dead] = 0.0  # gamma == 0: channel outputs relu(beta), a constant
    model.bn1.bias.data[dead] = torch.tensor([0.3, -0.2, 0.9])
    x = torch.randn(5, 3, 7, 7)
    before = model(x)
    graph = DependencyGraph(model)
    group = graph.group_of("conv1")
    constants = torch.relu(model.bn1.bias.detach())
    keep = [c for c in range(8) if c not in dead.tolist()]
    prune_group(graph, group, keep, constants=constants)
    assert model.conv1.out_channels == 5 and model.conv2.in_channels == 5 and model.bn1.num_features == 5
    assert torch.allclose(model(x), before, atol=1e-5)


def test_removing_zero_channels_resnet20_internal_and_residual():
    model = randomise_bn(create_model("resnet20", 10))
    graph = DependencyGraph(model)
    # Internal group: zero two channels of layer1.1's first BN.
    model.layer1[1].bn1.weight.data[[2, 5]] = 0
    model.layer1[1].bn1.bias.data[[2, 5]] = 0
    # Residual group of stage 1: a channel is zero everywhere if the stem BN and every bn2 of the
    # stage emit zero for it; the option-A shortcut then carries zeros into stage 2.
    for bn in [model.bn1] + [blk.bn2 for blk in model.layer1]:
        bn.weight.data[[0, 7]] = 0
        bn.bias.data[[0, 7]] = 0
    x = torch.randn(3, 3, 32, 32)
    before = model(x)
    macs_before = profile(model, (3, 32, 32)).macs
    prune_group(graph, graph.group_of("layer1.1.conv1"), [c for c in range(16) if c not in (2, 5)])
    prune_group(graph, graph.group_of("conv1"), [c for c in range(16) if c not in (0, 7)])
    assert torch.allclose(model(x), before, atol=1e-5)
    assert model.layer2[0].shortcut.in_channels == 14
    assert profile(model, (3, 32, 32)).macs < macs_before


def test_pruning_stage2_residual_cuts_shortcut_output():
    model = randomise_bn(create_model("resnet20", 10))
    # Stage-2 channels 0 and 31 come from the shortcut's zero padding; zero them in every bn2.
    for blk in model.layer2:
        blk.bn2.weight.data[[0, 31]] = 0
        blk.bn2.bias.data[[0, 31]] = 0
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    graph = DependencyGraph(model)
    prune_group(graph, graph.group_of("layer2.0.conv2"), list(range(1, 31)))
    assert model.layer2[0].shortcut.out_channels == 30
    assert torch.allclose(model(x), before, atol=1e-5)


def test_merging_identical_channels_sums_consumer_slices():
    model = randomise_bn(create_model("resnet20", 10))
    blk = model.layer2[1]
    clusters = [[c for c in range(32) if c not in (0, 3, 9)][i:i + 1] for i in range(29)] + [[0, 3, 9]]
    for c in (3, 9):  # make the cluster's filters and BN entries identical to channel 0's
        blk.conv1.weight.data[c] = blk.conv1.weight.data[0]
        for t in (blk.bn1.weight, blk.bn1.bias, blk.bn1.running_mean, blk.bn1.running_var):
            t.data[c] = t.data[0]
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    graph = DependencyGraph(model)
    kept = prune_group(graph, graph.group_of("layer2.1.conv1"), clusters=clusters)
    assert len(kept) == 30 and blk.conv2.in_channels == 30
    assert torch.allclose(model(x), before, atol=1e-5)


def test_scale_multiplies_kept_consumer_slices():
    model = randomise_bn(OneByOneNet())
    reference = copy.deepcopy(model)
    graph = DependencyGraph(model)
    keep = [0, 2, 3, 5, 7]
    scale = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0])
    prune_group(graph, graph.group_of("conv1"), keep, scale=scale)
    expected = reference.conv2.weight.data[:, keep] * scale.view(1, -1, 1, 1)
    assert torch.allclose(model.conv2.weight.data, expected)


def test_linear_consumer_after_flatten_of_spatial_map():
    model = create_model("vgg16", 10)
    graph = DependencyGraph(model)
    last = graph.group_of("features.28")
    assert ("classifier.0", 49) in last.consumers  # 7x7 features per channel after flatten
    prune_group(graph, last, list(range(0, 512, 2)))
    assert model.classifier[0].in_features == 256 * 49
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_mobilenet_depthwise_follows_expand_group():
    model = randomise_bn(create_model("mobilenet_v2", 10))
    graph = DependencyGraph(model)
    group = graph.group_of("features.2.conv.0.0")  # expand 1x1 of block 2
    assert "features.2.conv.1.0" in group.followers  # its depthwise conv is cut along with it
    prune_group(graph, group, list(range(0, group.size, 2)))
    assert model.features[2].conv[1][0].groups == model.features[2].conv[1][0].out_channels
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_bad_cuts_are_refused():
    graph = DependencyGraph(create_model("resnet20", 10))
    with pytest.raises(SurgeryError, match="not prunable"):
        prune_group(graph, graph.group_of("fc"), [0])
    with pytest.raises(SurgeryError, match="every channel"):
        prune_group(graph, graph.group_of("layer1.0.conv1"), [])
    with pytest.raises(SurgeryError, match="distinct"):
        prune_group(graph, graph.group_of("layer1.0.conv1"), [0, 0, 99])
