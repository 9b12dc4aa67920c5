"""The yardsticks' own properties: l1_norm keeps exactly the largest group-summed L1 filters,
slimming's phase adds exactly ``s * sign(gamma)`` to every penalised gamma's gradient (and nothing
else) and prunes by one global |gamma| ranking, random is seeded and differs from l1_norm. Each
test would fail on a method that did nothing (the contract suite only checks that MACs drop)."""
import copy

import pytest
import torch
from torch import nn

from methods import DependencyGraph, PruneContext, create_method
from methods.cost import profile
from trainables.models import create_model

from helpers import randomise_bn

CIFAR = (3, 32, 32)


@pytest.fixture(scope="module")
def resnet20():
    torch.manual_seed(0)
    return randomise_bn(create_model("resnet20", 10)).eval()


def _kept(dense, pruned, bn):
    """Indices of ``dense``'s channels that survive in ``pruned``, read off a batch norm's running
    mean (randomised, so every value is distinct)."""
    old = dense.get_submodule(bn).running_mean.tolist()
    return sorted(old.index(v) for v in pruned.get_submodule(bn).running_mean.tolist())


@pytest.mark.parametrize("scope", ["internal", "all"])
def test_l1_norm_keeps_the_largest_group_summed_filters(resnet20, scope):
    pruned = create_method("l1_norm", prune_ratio=0.5, scope=scope).prune(resnet20, PruneContext(CIFAR))
    graph = DependencyGraph(resnet20)
    groups = graph.prunable_groups(scope=scope)
    for group in groups:
        convs = [p for p in group.producers if isinstance(resnet20.get_submodule(p), nn.Conv2d)]
        score = sum(resnet20.get_submodule(p).weight.detach().abs().flatten(1).sum(1) for p in convs)
        bns = graph.batch_norm_names(group)
        kept = _kept(resnet20, pruned, bns[0])
        assert 0 < len(kept) < group.size, group.name
        assert kept == sorted(torch.topk(score, len(kept)).indices.tolist()), group.name
        assert all(_kept(resnet20, pruned, bn) == kept for bn in bns)  # one cut for the whole group
    assert len(groups) == (9 if scope == "internal" else 12)


def test_slimming_phase_adds_exactly_s_sign_gamma(resnet20):
    every_bn = {n for n, m in resnet20.named_modules() if isinstance(m, nn.BatchNorm2d)}
    for scope, penalised in (("internal", {n for n in every_bn if n.endswith("bn1") and n.startswith("layer")}),
                             ("all", every_bn)):  # all: the stem's and every block output's too (19)
        model = copy.deepcopy(resnet20).train()
        method = create_method("slimming", s=3e-4, scope=scope)
        method.prepare(model, PruneContext(CIFAR))
        x, y = torch.randn(4, *CIFAR), torch.tensor([0, 1, 2, 3])
        nn.functional.cross_entropy(model(x), y).backward()
        before = {n: p.grad.clone() for n, p in model.named_parameters()}
        method.after_backward(model)
        for n, p in model.named_parameters():
            module, _, kind = n.rpartition(".")
            if module in penalised and kind == "weight":
                assert torch.allclose(p.grad, before[n] + 3e-4 * torch.sign(p.detach()), atol=1e-9), n
                assert not torch.equal(p.grad, before[n]), n
            else:
                assert torch.equal(p.grad, before[n]), n


def test_slimming_prunes_by_one_global_gamma_ranking(resnet20):
    model = copy.deepcopy(resnet20)
    with torch.no_grad():  # layer3's internal gammas tiny: a global ranking takes them first
        for b in range(3):
            model.get_submodule(f"layer3.{b}.bn1").weight.mul_(1e-3)
    pruned = create_method("slimming", prune_ratio=0.3, allocation="global").prune(model, PruneContext(CIFAR))
    uniform = create_method("slimming", prune_ratio=0.3, allocation="uniform").prune(model, PruneContext(CIFAR))
    for b in range(3):
        assert pruned.get_submodule(f"layer3.{b}.conv1").out_channels < uniform.get_submodule(f"layer3.{b}.conv1").out_channels
    assert pruned.layer1[0].conv1.out_channels == 16  # the large gammas of layer1 all survive
    for p in (pruned, uniform):
        assert 1 - profile(p, CIFAR).macs / profile(model, CIFAR).macs == pytest.approx(0.3, abs=0.02)


def test_random_is_seeded_and_not_l1(resnet20):
    def widths_and_filters(method, seed):
        pruned = method.prune(resnet20, PruneContext(CIFAR, seed=seed))
        return [tuple(pruned.get_submodule(f"layer{s}.{b}.conv1").weight.detach().flatten()[:5].tolist())
                for s in (1, 2, 3) for b in range(3)]

    rnd = create_method("random", prune_ratio=0.5)
    assert widths_and_filters(rnd, 1) == widths_and_filters(rnd, 1)
    assert widths_and_filters(rnd, 1) != widths_and_filters(rnd, 2)
    assert widths_and_filters(rnd, 1) != widths_and_filters(create_method("l1_norm", prune_ratio=0.5), 1)
