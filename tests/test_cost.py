"""methods.cost: MACs/params against the published reference sizes, exact small cases, latency."""
from __future__ import annotations

import statistics

import pytest
import torch
from torch import nn

from methods.cost import Cost, LatencyResult, latency, profile
from trainables.models import create_model

# METHODS.md, "Reference sizes": MACs at batch 1 (conv + linear only) and params.
REFERENCE = {
    "resnet20": ((3, 32, 32), 10, 40.55e6, 0.270e6),
    "resnet56": ((3, 32, 32), 10, 125.49e6, 0.853e6),
    "resnet110": ((3, 32, 32), 10, 252.89e6, 1.728e6),
    "resnet18": ((3, 224, 224), 1000, 1.81e9, 11.69e6),
    "resnet50": ((3, 224, 224), 1000, 4.09e9, 25.56e6),
    "vgg16": ((3, 224, 224), 1000, 15.47e9, 138.36e6),
    "mobilenet_v2": ((3, 224, 224), 1000, 0.301e9, 3.50e6),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_sizes(name):
    shape, num_classes, ref_macs, ref_params = REFERENCE[name]
    torch.manual_seed(0)
    model = create_model(name, num_classes)
    cost = profile(model, shape)
    assert isinstance(cost.macs, int) and isinstance(cost.params, int)
    assert cost.macs == pytest.approx(ref_macs, rel=0.02), f"{name}: {cost.macs} MACs vs {ref_macs:.4g}"
    assert cost.params == pytest.approx(ref_params, rel=0.02), f"{name}: {cost.params} params vs {ref_params:.4g}"


class _ConvLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def test_small_network_exact():
    model = _ConvLinear()
    cost = profile(model, (3, 8, 8))
    conv_macs = 8 * 8 * 8 * 3 * 3 * 3  # out_h * out_w * out_c * in_c * kh * kw
    fc_macs = 8 * 8 * 8 * 10
    assert cost.macs == conv_macs + fc_macs == 18944
    # conv weight + bias, BN gamma + beta (running stats are buffers), fc weight + bias
    assert cost.params == (8 * 27 + 8) + (8 + 8) + (512 * 10 + 10) == 5370


def test_depthwise_and_grouped_conv_exact():
    depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    assert profile(depthwise, (8, 8, 8)).macs == 8 * 8 * 8 * 1 * 3 * 3 == 4608
    grouped = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2, bias=False)
    assert profile(grouped, (8, 8, 8)).macs == 4 * 4 * 16 * 4 * 3 * 3
    assert profile(grouped, (8, 8, 8)).params == 16 * 4 * 3 * 3


def test_linear_counts_leading_dims():
    assert profile(nn.Linear(4, 5), (3, 4)).macs == 3 * 4 * 5


def test_flops_is_twice_macs():
    cost = Cost(macs=123, params=4)
    assert cost.flops == 246
    assert profile(_ConvLinear(), (3, 8, 8)).flops == 2 * 18944


class _Gated(nn.Module):
    """A module declaring its own cost, with a Linear child counted by its own hook."""

    def __init__(self, n: int):
        super().__init__()
        self.fc = nn.Linear(n, n)

    def forward(self, x):
        return self.fc(x)

    def macs_hook(self, inputs, output):
        assert isinstance(inputs, tuple) and isinstance(output, torch.Tensor)
        return 7


def test_macs_hook_is_added():
    model = nn.Sequential(_Gated(4), _Gated(4))
    assert profile(model, (4,)).macs == 2 * (4 * 4 + 7)


def test_profile_restores_modes_and_removes_hooks():
    model = _ConvLinear()
    model.train()
    model.bn.eval()  # mixed modes must come back as they were
    profile(model, (3, 8, 8))
    assert model.training and model.conv.training and model.fc.training
    assert not model.bn.training
    assert all(not m._forward_hooks for m in model.modules())
    assert model.bn.num_batches_tracked.item() == 0  # ran in eval mode: BN stats untouched


def test_profile_rejects_bad_shape():
    with pytest.raises(ValueError, match="input_shape"):
        profile(_ConvLinear(), (3, 0, 8))


def test_latency_result():
    model = _ConvLinear()
    model.train()
    before = torch.get_num_threads()
    result = latency(model, (3, 8, 8), batch_size=2, warmup=1, repeats=5, threads=1)
    assert isinstance(result, LatencyResult)
    assert len(result.times_s) == 5 and all(t > 0 for t in result.times_s)
    assert result.median_s > 0
    assert result.median_s == statistics.median(result.times_s)
    assert result.batch_size == 2
    assert result.threads == 1
    assert result.device == "cpu"
    assert torch.get_num_threads() == before
    assert model.training and model.bn.training


def test_latency_even_repeats_median_and_default_threads():
    result = latency(_ConvLinear(), (3, 8, 8), warmup=0, repeats=4)
    assert result.median_s == statistics.median(result.times_s)
    assert result.threads == torch.get_num_threads()


@pytest.mark.parametrize("kwargs", [{"repeats": 0}, {"warmup": -1}, {"batch_size": 0}, {"threads": 0}])
def test_latency_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        latency(_ConvLinear(), (3, 8, 8), **kwargs)


def test_profile_uses_model_dtype():
    model = _ConvLinear().double()
    assert profile(model, (3, 8, 8)).macs == 18944


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_profile_and_latency():
    model = _ConvLinear().cuda()
    assert profile(model, (3, 8, 8)).macs == 18944
    result = latency(model, (3, 8, 8), warmup=1, repeats=3)
    assert result.device.startswith("cuda") and result.median_s > 0
    # measuring on another device moves the model there and back
    result = latency(model, (3, 8, 8), warmup=0, repeats=2, device="cpu")
    assert result.device == "cpu"
    assert next(model.parameters()).is_cuda
