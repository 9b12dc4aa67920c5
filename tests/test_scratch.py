"""Pruning from Scratch's own properties: the gate regulariser is the written formula (and does
something, unlike the unofficial code's out-of-place ``.add``); the global threshold hits the MACs
target measured against the unexpanded model; the gate phase never touches the frozen weights;
the pruned architecture starts from fresh weights."""
import copy

import pytest
import torch
from torch import nn

from methods import DependencyGraph, PruneContext, create_method
from methods.cost import profile
from methods.budget import MacsModel, allocate
from methods.scratch import gate_regulariser
from trainables.data import load, make_loader
from trainables.models import create_model
from trainables.train import train_epoch

CIFAR = (3, 32, 32)


def _random_gates(method, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in method.gates.values():
            v.copy_(torch.rand(v.shape, generator=g))


# ---- (a) the regulariser -----------------------------------------------------------------------------

def test_regulariser_gradient_is_the_written_formula():
    method = create_method("scratch", **{"lambda": 0.3, "r": 0.2})
    method.prepare(create_model("resnet20", 10, in_channels=1))
    _random_gates(method)
    gates = list(method.gates.values())
    loss = method.extra_loss(None, None, None, None)
    loss.backward()
    flat = torch.cat([g.detach().flatten() for g in gates])
    mean = flat.abs().mean()
    # Written formula: lambda * (mean_i |g_i| - r)^2 over ALL gates -> d/dg_i = 2 lambda (mean - r) sign(g_i) / N.
    assert torch.allclose(loss, 0.3 * (mean - 0.2) ** 2)
    expected = 2 * 0.3 * (mean - 0.2) * flat.sign() / flat.numel()
    got = torch.cat([g.grad.flatten() for g in gates])
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-12)
    # Same as autograd of an independent copy of the formula.
    copies = [g.detach().clone().requires_grad_(True) for g in gates]
    (0.3 * (torch.cat([c.flatten() for c in copies]).abs().mean() - 0.2) ** 2).backward()
    assert torch.allclose(got, torch.cat([c.grad.flatten() for c in copies]))
    assert got.abs().min() > 0  # not the no-op regulariser


def test_regulariser_moves_gates_toward_r():
    method = create_method("scratch", **{"lambda": 1.0, "r": 0.2})
    model = method.prepare(create_model("resnet20", 10, in_channels=1))
    opt = method.make_optimizer(model, lr=0.1, momentum=0.9, weight_decay=5e-4)
    gaps = []
    for _ in range(20):
        gaps.append(float(torch.cat([g.detach().flatten() for g in method.gates.values()]).mean()) - 0.2)
        opt.zero_grad()
        method.extra_loss(model, None, None, None).backward()
        opt.step()
        method.after_step(model)
    assert gaps[0] == pytest.approx(0.8)  # gates start at 1
    assert all(b < a for a, b in zip(gaps, gaps[1:])) and gaps[-1] < 0.7
    assert gate_regulariser([torch.full((5,), 0.2)], 1.0, 0.2) == 0


# ---- (b, c) the threshold ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet20", "vgg16_cifar"])
def test_bisection_hits_the_macs_target(name):
    torch.manual_seed(0)
    model = create_model(name, 10)
    dense = profile(model, CIFAR).macs
    for target in (0.3, 0.5, 0.7):
        method = create_method("scratch", prune_ratio=target)
        gated = method.prepare(copy.deepcopy(model))
        _random_gates(method, seed=int(target * 10))
        pruned = method.prune(gated, PruneContext(CIFAR))
        reduction = 1 - profile(pruned, CIFAR).macs / dense
        # No global threshold comes closer: the reduction grows monotonically with the number of
        # pruned gates, so |reduction - target| is unimodal and checking both neighbours suffices.
        graph = DependencyGraph(gated)
        groups = [g for g in graph.prunable_groups() if graph.next_module[g.producers[0]] in method.gates]
        gates = [method.gates[graph.next_module[g.producers[0]]].detach() for g in groups]
        macs = MacsModel(gated, graph, groups, CIFAR)
        order = torch.cat(gates).argsort(stable=True)
        owner = torch.cat([torch.full((g.numel(),), i) for i, g in enumerate(gates)])

        def widths(n):  # an independent global threshold: prune the n lowest gates, keep one per layer
            removed = torch.bincount(owner[order[:n]], minlength=len(gates))
            return [max(1, g.numel() - int(r)) for g, r in zip(gates, removed)]

        def achieved(n):
            return 1 - macs.macs(widths(n)) / dense

        grid = [achieved(n) for n in range(0, order.numel() + 1, max(1, order.numel() // 40))]
        assert all(a <= b + 1e-12 for a, b in zip(grid, grid[1:]))
        assert achieved(0) == pytest.approx(0) and grid[-1] > 0.9
        pruned_count = method.threshold.n
        assert method.threshold.evaluations <= 20
        got = [pruned.get_submodule(g.producers[0]).out_channels for g in groups]
        assert got == widths(pruned_count)
        assert reduction == pytest.approx(achieved(pruned_count), abs=1e-12)  # analytic MACs == measured
        for other in (pruned_count - 1, pruned_count + 1):
            assert abs(reduction - target) <= abs(achieved(other) - target) + 1e-12, (target, reduction)
        # One channel of an early layer moves the reduction by up to 0.7% (resnet20) or 0.2% (VGG),
        # so the paper's 0.1% relative is not always reachable by one global threshold.
        assert abs(reduction - target) < 0.01


class _Linear:
    """A MACs model in which every channel costs 1 (what ``allocate`` needs: sizes, total, macs)."""

    def __init__(self, sizes):
        self.sizes, self.total = sizes, float(sum(sizes))

    def macs(self, kept):
        return float(sum(kept))


def test_bisection_is_logarithmic():
    gates = [torch.rand(64) for _ in range(10)]
    result = allocate(_Linear([64] * 10), gates, 0.37, allocation="global", normalise=False)
    assert result.evaluations <= 12  # ceil(log2(641)) + 2
    assert result.reduction == pytest.approx(0.37, abs=1 / 640)


def test_expansion_is_measured_against_the_unexpanded_model():
    torch.manual_seed(0)
    reference = profile(create_model("resnet20", 10), CIFAR).macs
    method = create_method("scratch", prune_ratio=0.5, expansion=1.5)
    assert method.model_width_mult() == 1.5
    wide = create_model("resnet20", 10, width_mult=method.model_width_mult())
    assert profile(wide, CIFAR).macs > 2 * reference
    gated = method.prepare(wide)
    _random_gates(method)
    pruned = method.prune(gated, PruneContext(CIFAR, reference_macs=reference))
    assert 1 - profile(pruned, CIFAR).macs / reference == pytest.approx(0.5, abs=0.01)
    # Stage widths stay expanded; only the block-internal widths shrink.
    assert [pruned.get_submodule(f"layer{s}.0.conv2").out_channels for s in (1, 2, 3)] == [24, 48, 96]
    assert pruned.layer3[0].conv1.out_channels < 96
    # Without a reference the given (expanded) model is the reference: a much larger network.
    method2 = create_method("scratch", prune_ratio=0.5, expansion=1.5)
    gated2 = method2.prepare(create_model("resnet20", 10, width_mult=1.5))
    _random_gates(method2)
    pruned2 = method2.prune(gated2, PruneContext(CIFAR))
    assert profile(pruned2, CIFAR).macs > 1.5 * profile(pruned, CIFAR).macs


# ---- (d) the gate phase, and the cut -----------------------------------------------------------------

@pytest.fixture(scope="module")
def phased():
    """A resnet20 after 6 gate-phase steps on digits, with its dense weights from before."""
    torch.manual_seed(0)
    loader = make_loader(load("digits").train, 64, shuffle=True, seed=0)
    model = create_model("resnet20", 10, in_channels=1)
    before = copy.deepcopy(model.state_dict())
    method = create_method("scratch", prune_ratio=0.5, phase_epochs=1)
    model = method.prepare(model)
    opt = method.make_optimizer(model, lr=0.1, momentum=0.9, weight_decay=5e-4)
    stats = train_epoch(model, loader, opt, device=torch.device("cpu"), method=method, max_steps=6)
    assert stats.steps == 6
    return method, model, before, opt


def test_gate_phase_never_changes_the_frozen_weights(phased):
    method, model, before, opt = phased
    params = dict(model.named_parameters())
    assert params and all(not p.requires_grad for p in params.values())
    for name, p in params.items():
        assert torch.equal(p, before[name]), name  # bit-exact: conv, linear and BN affine
    moved = [n for n, b in model.named_buffers() if "running_mean" in n and not torch.equal(b, before[n])]
    assert moved  # BN statistics did update
    opt_params = [p for group in opt.param_groups for p in group["params"]]
    assert {id(p) for p in opt_params} == {id(g) for g in method.gates.values()}
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["lr"] == 0.01
    flat = torch.cat([g.detach().flatten() for g in method.gates.values()])
    assert (flat < 1).any() and flat.min() >= 0 and flat.max() <= 1  # trained and clamped


def test_gates_checkpoint_round_trip(phased):
    method, model, _, _ = phased
    state = method.state_dict()
    fresh = create_method("scratch", prune_ratio=0.5)
    fresh.load_state_dict(state)  # before prepare, as a restart may do: applied at prepare
    fresh.prepare(create_model("resnet20", 10, in_channels=1))
    for name, g in method.gates.items():
        assert torch.equal(fresh.gates[name], g.detach())


def test_prune_removes_gates_and_reinitialises(phased):
    trained_method, model, before, _ = phased
    method = create_method("scratch", prune_ratio=0.5)
    gated = create_model("resnet20", 10, in_channels=1)
    gated.load_state_dict(model.state_dict())
    method.prepare(gated)
    method.load_state_dict(trained_method.state_dict())
    pruned = method.prune(gated, PruneContext((1, 8, 8), seed=0))
    assert all(not m._forward_hooks for m in gated.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(p.requires_grad for p in pruned.parameters())
    assert not torch.equal(pruned.conv1.weight, before["conv1.weight"])  # fresh weights, same shape
    assert pruned.conv1.weight.shape == before["conv1.weight"].shape
    bn = pruned.layer1[0].bn1
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    again = method.prune(gated, PruneContext((1, 8, 8), seed=0))
    for a, b in zip(pruned.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)  # seeded re-initialisation
