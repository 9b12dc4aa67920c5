"""methods.cost: MACs/params against the published reference sizes, exact small cases, latency."""
from __future__ import annotations

import statistics

import pytest
import torch
from torch import nn

from methods.cost import Cost, LatencyResult, latencies, latency, profile
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


def _conv_net(width: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, width, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, 10))


def test_latencies_time_models_interleaved():
    """Every model gets rounds x repeats timed passes; the model with over 100x the MACs measures slower; each
    model's train/eval flags are restored and the thread count put back."""
    small, large = _conv_net(4).eval(), _conv_net(64).train()
    before = torch.get_num_threads()
    res_small, res_large = latencies([small, large], (3, 32, 32), warmup=1, repeats=2, rounds=3, threads=1)
    for r in (res_small, res_large):
        assert isinstance(r, LatencyResult) and r.device == "cpu" and r.threads == 1 and r.batch_size == 1
        assert len(r.times_s) == 6 and all(t > 0 for t in r.times_s)
        assert r.median_s == statistics.median(r.times_s)
    assert profile(large, (3, 32, 32)).macs > 100 * profile(small, (3, 32, 32)).macs
    assert res_large.median_s > res_small.median_s
    assert large.training and not small.training and torch.get_num_threads() == before


@pytest.mark.parametrize("kwargs", [{"rounds": 0}, {"repeats": 0}])
def test_latencies_reject_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        latencies([_ConvLinear()], (3, 8, 8), **kwargs)
    with pytest.raises(ValueError, match="at least one model"):
        latencies([], (3, 8, 8))


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_latency_runs_as_the_trials_do_and_restores_the_model():
    """On CUDA the timed passes see a channels_last input and weights under bf16 autocast (as the
    trials train and evaluate); afterwards the model has its own tensors back, on its own device."""
    model = _conv_net(16)  # on the CPU: latencies moves it to CUDA and back
    params = {n: p for n, p in model.named_parameters()}
    data = {n: p.data for n, p in params.items()}
    seen = []

    def hook(module, inputs, output):
        seen.append((inputs[0].is_contiguous(memory_format=torch.channels_last),
                     module.weight.is_contiguous(memory_format=torch.channels_last), output.dtype))

    model[3].register_forward_hook(hook)
    timed, other = latencies([model, _conv_net(4)], (3, 32, 32), batch_size=8, warmup=1, repeats=2, rounds=2,
                             device="cuda")
    assert timed.device.startswith("cuda") and other.device == timed.device
    assert len(timed.times_s) == 4 and timed.median_s > 0
    assert len(seen) == 1 + 4 and all(s == (True, True, torch.bfloat16) for s in seen), seen
    for n, p in model.named_parameters():  # the same parameters, back on the CPU, contiguous, unchanged
        assert p is params[n] and p.device.type == "cpu" and p.is_contiguous() and torch.equal(p.detach(), data[n])
    seen.clear()
    latency(model.cuda(), (3, 32, 32), warmup=0, repeats=1, cuda_amp=False)
    assert seen == [(False, False, torch.float32)]
