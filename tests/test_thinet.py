"""ThiNet's own properties: the sampled contributions are the consumer's real outputs split by input
channel; the greedy selection reconstructs better than L1 and random choices; least-squares
rescaling never hurts; and right after the surgery (no fine-tune) the pruned network is more
accurate than the L1-norm one."""
import copy

import pytest
import torch
from torch import nn

from methods import DependencyGraph, PruneContext, create_method
from methods.cost import profile
from methods.thinet import (calibration_inputs, least_squares_scale, prune_layer, reconstruction_error,
                            sample_contributions, thinet_select)
from trainables.data import load, make_loader
from trainables.models import create_model
from trainables.train import cosine_lr, evaluate, train_epoch

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def trained():
    """A resnet20 trained briefly on digits (~97% validation accuracy), its loaders and calibration."""
    torch.manual_seed(0)
    data = load("digits")
    loader = make_loader(data.train, 64, shuffle=True, seed=0)
    model = create_model("resnet20", 10, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    epochs = 4
    for epoch in range(epochs):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(0.1, epoch, epochs)
        train_epoch(model, loader, opt, device=CPU)
    model.eval()
    val = make_loader(data.val, 512, shuffle=False)
    calibration = [b for _, b in zip(range(2), loader)]
    return model, val, calibration


def _l1_keep(model, group, k):
    w = model.get_submodule(group.producers[0]).weight.detach()
    return torch.topk(w.abs().flatten(1).sum(1), k).indices.sort().values


# ---- sampling ------------------------------------------------------------------------------------------

class Toy(nn.Module):
    def __init__(self, consumer):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()
        self.consumer = consumer
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(consumer.out_channels, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.consumer(self.relu(self.bn(self.conv(x))))), 1))


@pytest.mark.parametrize("consumer", [
    nn.Conv2d(6, 5, 3, stride=2, padding=1, bias=True),
    nn.Conv2d(6, 5, 3, stride=1, padding=2, dilation=2, bias=False),
    nn.Conv2d(6, 5, 1, bias=True),
])
def test_sampled_targets_are_real_consumer_outputs(consumer):
    """Each sample's summed contributions equal one entry of the consumer's output minus its bias."""
    model = Toy(consumer).eval()
    x = torch.randn(3, 3, 9, 9)
    data = sample_contributions(model, [("consumer", 1)], 6, [x], 200, torch.Generator().manual_seed(0))
    assert data.contrib.shape == (200, 6)
    with torch.no_grad():
        act = model.relu(model.bn(model.conv(x)))
        out = nn.functional.conv2d(act, consumer.weight, None, consumer.stride, consumer.padding, consumer.dilation)
    values = out.flatten()
    gap = (data.target.view(-1, 1) - values.view(1, -1)).abs().min(1).values
    assert gap.max() < 1e-5
    assert data.target.abs().sum() > 0  # not trivially all zeros


def test_linear_consumer_samples_per_channel_features():
    fc = nn.Linear(6 * 4, 3, bias=True)
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), fc).eval()
    x = torch.randn(5, 2, 6, 6)
    data = sample_contributions(model, [("4", 4)], 6, [x], 50, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model[:4](x) @ fc.weight.T  # minus bias
    gap = (data.target.view(-1, 1) - out.flatten().view(1, -1)).abs().min(1).values
    assert gap.max() < 1e-5


# ---- selection and rescaling --------------------------------------------------------------------------

def _naive_greedy(contrib, n_keep):
    """The selection as METHODS.md writes it, without the Gram-matrix shortcut."""
    removed = []
    C = contrib.shape[1]
    x = contrib.double()
    while len(removed) < C - n_keep:
        errs = {c: float(x[:, removed + [c]].sum(1).pow(2).sum()) for c in range(C) if c not in removed}
        removed.append(min(errs, key=errs.get))
    return sorted(set(range(C)) - set(removed))


@pytest.mark.parametrize("seed", range(3))
def test_vectorised_greedy_matches_the_naive_one(seed):
    g = torch.Generator().manual_seed(seed)
    contrib = torch.randn(300, 12, generator=g) + 0.3 * torch.randn(1, 12, generator=g)
    for n_keep in (1, 4, 6, 11, 12):
        assert thinet_select(contrib, n_keep).tolist() == _naive_greedy(contrib, n_keep)


def test_selection_beats_l1_and_random_on_real_activations(trained):
    model, _, calibration = trained
    graph = DependencyGraph(model)
    inputs = calibration_inputs(calibration, 512, CPU)
    g = torch.Generator().manual_seed(0)
    for group in graph.prunable_groups():
        data = sample_contributions(model, group.consumers, group.size, inputs, 512, torch.Generator().manual_seed(1))
        k = group.size // 2
        ours = reconstruction_error(data.contrib, thinet_select(data.contrib, k))
        assert ours <= reconstruction_error(data.contrib, _l1_keep(model, group, k)), group.name
        for _ in range(20):
            rand = torch.randperm(group.size, generator=g)[:k]
            assert ours <= reconstruction_error(data.contrib, rand), group.name


def test_least_squares_rescaling_never_increases_the_error(trained):
    model, _, calibration = trained
    graph = DependencyGraph(model)
    inputs = calibration_inputs(calibration, 512, CPU)
    g = torch.Generator().manual_seed(0)
    improved = 0
    for group in graph.prunable_groups():
        data = sample_contributions(model, group.consumers, group.size, inputs, 512, torch.Generator().manual_seed(1))
        k = group.size // 2
        for keep in (thinet_select(data.contrib, k), _l1_keep(model, group, k), torch.randperm(group.size, generator=g)[:k]):
            w = least_squares_scale(data.contrib, keep)
            assert w.shape == (k,) and torch.isfinite(w).all()
            before, after = reconstruction_error(data.contrib, keep), reconstruction_error(data.contrib, keep, w)
            assert after <= before * (1 + 1e-9)
            improved += after < 0.99 * before
    assert improved > 0  # the rescaling does something


@pytest.mark.parametrize("case", ["dead_channels", "duplicate_columns", "too_few_samples", "all_zero"])
def test_rescaling_guards_degenerate_data(case):
    g = torch.Generator().manual_seed(0)
    contrib = torch.randn(200, 10, generator=g)
    keep = torch.arange(6)
    if case == "dead_channels":
        contrib[:, [1, 3]] = 0
    elif case == "duplicate_columns":
        contrib[:, 2] = contrib[:, 0]
    elif case == "too_few_samples":
        contrib = contrib[:8]
    else:
        contrib.zero_()
    w = least_squares_scale(contrib, keep)
    assert torch.isfinite(w).all()
    assert reconstruction_error(contrib, keep, w) <= reconstruction_error(contrib, keep) * (1 + 1e-9)
    if case == "dead_channels":
        assert w[1] == 1 and w[3] == 1  # no evidence about them: left alone
    if case == "all_zero":
        assert torch.equal(w, torch.ones(6))


# ---- the method -------------------------------------------------------------------------------------

def test_surgery_applies_the_selection_and_the_scale(trained):
    """After one layer's surgery the consumer computes exactly sum_{c in S} w_c xhat_c."""
    model, _, calibration = trained
    model = copy.deepcopy(model)
    graph = DependencyGraph(model)
    group = graph.prunable_groups()[4]
    consumer_name = group.consumers[0][0]
    before = model.get_submodule(consumer_name).weight.detach().clone()
    inputs = calibration_inputs(calibration, 512, CPU)
    data = sample_contributions(model, group.consumers, group.size, inputs, 512, torch.Generator().manual_seed(3))
    keep = thinet_select(data.contrib, group.size // 2)
    w = least_squares_scale(data.contrib, keep)
    prune_layer(graph, group, group.size // 2, inputs, 512, torch.Generator().manual_seed(3))
    after = model.get_submodule(consumer_name).weight.detach()
    assert torch.allclose(after, before[:, keep] * w.view(1, -1, 1, 1))


def test_schedule_finetunes_after_each_layer(trained):
    model, _, calibration = trained
    calls = []
    method = create_method("thinet", prune_ratio=0.5, finetune_steps=7, samples_per_layer=128)
    pruned = method.prune(model, PruneContext((1, 8, 8), calibration=calibration,
                                              finetune=lambda m, steps: calls.append((m, steps))))
    # A recovery after every cut but the last (the trial's own fine-tune follows that one).
    assert len(calls) == len(DependencyGraph(model).prunable_groups()) - 1 == 8
    assert all(m is pruned and steps == 7 for m, steps in calls)
    assert len(method.layer_report) == 9
    assert profile(pruned, (1, 8, 8)).macs < profile(model, (1, 8, 8)).macs


def test_unsampleable_consumer_falls_back_to_l1():
    model = Toy(nn.Conv2d(6, 5, 3, padding=1, padding_mode="reflect")).eval()
    x = [(torch.randn(8, 3, 9, 9), torch.zeros(8, dtype=torch.long))]
    pruned = create_method("thinet", prune_ratio=0.5, finetune_steps=0).prune(model, PruneContext((3, 9, 9), calibration=x))
    kept = pruned.conv.out_channels
    assert 1 <= kept < 6
    expected = _l1_keep(model, DependencyGraph(model).group_of("conv"), kept)
    assert torch.equal(pruned.conv.weight, model.conv.weight[expected])


def test_accuracy_right_after_surgery_beats_l1(trained):
    """All nine internal layers of the trained resnet20 cut to 50%, no fine-tune at all: ThiNet's
    network (selection + rescaling, layer by layer on the already-cut model) is far more accurate
    on held-out data than the L1-norm one. Neither recovers dense accuracy without fine-tuning."""
    model, val, calibration = trained
    dense, _ = evaluate(model, val, device=CPU)
    context = PruneContext((1, 8, 8), calibration=calibration, seed=0)
    thinet, _ = evaluate(create_method("thinet", prune_ratio=0.5, finetune_steps=0).prune(model, context), val, device=CPU)
    l1, _ = evaluate(create_method("l1_norm", prune_ratio=0.5).prune(model, context), val, device=CPU)
    assert dense > 0.9
    assert thinet > l1 + 0.1, (thinet, l1)
