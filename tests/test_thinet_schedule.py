"""ThiNet's schedule against a straightforward reference: the method's cuts (kept channels and
rescaled consumer weights, group by group) equal those of a plain loop written from the paper's
recipe (sample, naive greedy, least squares, cut, recovery fine-tune after EVERY layer), for both
scopes and both allocations on a ResNet-20 with option-A pad shortcuts; and skipping the recovery
after the last cut (the default since issue 12) changes nothing but that recovery."""
import copy

import pytest
import torch
import torch.nn.functional as F

import methods.thinet as thinet
from methods import DependencyGraph, PruneContext, create_method
from methods.budget import keep_top
from methods.importance import l1_filter
from methods.layers import ChannelPadShortcut
from methods.selection import plan_widths
from methods.surgery import prune_group
from methods.thinet import calibration_inputs, least_squares_scale, sample_contributions
from trainables.models import create_model

SHAPE = (3, 16, 16)
STEPS = 3
REAL_CUT = thinet.prune_group


@pytest.fixture(scope="module")
def setup():
    """A ResNet-20 (option-A pad shortcuts) given a few SGD steps so its weights and BN statistics are
    not at their initial values, and calibration/fine-tune batches."""
    torch.manual_seed(0)
    model = create_model("resnet20", 10, in_channels=3, width_mult=0.5)
    assert any(isinstance(m, ChannelPadShortcut) for m in model.modules())
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, *SHAPE, generator=g), torch.randint(10, (16,), generator=g)) for _ in range(3)]
    _sgd(model, batches, 6)
    return model.eval(), batches


def _sgd(model, batches, steps):
    """The recovery fine-tune used by both sides: ``steps`` plain SGD steps over ``batches`` in turn."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for i in range(steps):
        x, y = batches[i % len(batches)]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _naive_order(contrib):
    """Greedy removal as the formula reads: each step, every candidate's ||sum_T xhat||^2 recomputed."""
    x = contrib.double()
    removed, errors = [], []
    while len(removed) < x.shape[1]:
        errs = {c: float(x[:, removed + [c]].sum(1).pow(2).sum()) for c in range(x.shape[1]) if c not in removed}
        best = min(errs, key=errs.get)
        removed.append(best)
        errors.append(errs[best])
    return removed, errors


def _naive_scores(contrib):
    """Relative error at the step removing each channel, made non-decreasing along the order."""
    order, errors = _naive_order(contrib)
    energy = float(contrib.double().sum(1).pow(2).sum()) or 1.0
    scores, best = torch.empty(contrib.shape[1], dtype=torch.float64), 0.0
    for c, e in zip(order, errors):
        best = max(best, e / energy)
        scores[c] = best
    return scores


def _consumers(graph, group):
    model = graph.model
    cs = [(n, pc) for n, pc in group.consumers if not isinstance(model.get_submodule(n), ChannelPadShortcut)]
    return cs if cs and all(thinet.supports_consumer(model.get_submodule(n)) for n, _ in cs) else None


def _reference(model, batches, hparams, seed):
    """ThiNet written out plainly: returns the cuts [(group, kept indices, scale or None)] and the
    model after every cut's recovery."""
    model = copy.deepcopy(model)
    samples = hparams["samples_per_layer"]
    inputs = calibration_inputs(batches, samples, torch.device("cpu"))
    graph = DependencyGraph(model)
    gen = torch.Generator().manual_seed(seed)
    groups = graph.prunable_groups(scope=hparams["scope"])
    scores = None
    if hparams["allocation"] == "global":
        scores = []
        for group in groups:
            cs = _consumers(graph, group)
            if cs is None:
                l1 = l1_filter(graph, group).double()
                scores.append(l1 / (l1.mean() or 1.0))
            else:
                scores.append(_naive_scores(sample_contributions(model, cs, group.size, inputs, samples, gen).contrib))
    plan = plan_widths(model, graph, groups, PruneContext(SHAPE), hparams, scores, normalise=False)
    cuts = []
    for group, n_keep in zip(groups, plan.kept):
        if n_keep == group.size:
            continue
        cs = _consumers(graph, group)
        if cs is None:
            keep, scale = keep_top(l1_filter(graph, group), n_keep), None
        else:
            contrib = sample_contributions(model, cs, group.size, inputs, samples, gen).contrib
            order, _ = _naive_order(contrib)
            keep = torch.tensor(sorted(set(range(group.size)) - set(order[: group.size - n_keep])))
            scale = least_squares_scale(contrib, keep)
        cuts.append((group.name, keep, scale))
        prune_group(graph, group, keep, scale=scale)
        _sgd(model, batches, hparams["finetune_steps"])
    return cuts, model


def _method(model, batches, hparams, seed, monkeypatch, recover_after_last=False):
    """The method's own prune with every cut and every recovery recorded."""
    cuts, snapshots = [], []

    def recording_cut(graph, group, keep, scale=None):
        cuts.append((group.name, torch.as_tensor(keep).clone(), None if scale is None else scale.clone()))
        return REAL_CUT(graph, group, keep, scale=scale)

    def recovery(m, steps):
        snapshots.append(copy.deepcopy(m.state_dict()))
        _sgd(m, batches, steps)

    monkeypatch.setattr(thinet, "prune_group", recording_cut)
    monkeypatch.setattr(thinet.ThiNet, "recover_after_last", recover_after_last)
    method = create_method("thinet", **hparams)
    pruned = method.prune(model, PruneContext(SHAPE, calibration=batches, seed=seed, finetune=recovery))
    return cuts, snapshots, pruned


# scope all + global at 0.95: the global ranking cuts residual-coupled groups only once every
# internal group is at its floor (methods.budget.residual_last), so 0.8 no longer reaches them.
CASES = [("internal", "uniform", 0.5), ("internal", "global", 0.4), ("all", "uniform", 0.7), ("all", "global", 0.95)]


@pytest.mark.parametrize("scope,allocation,ratio", CASES)
def test_cuts_equal_the_plain_reference(setup, monkeypatch, scope, allocation, ratio):
    model, batches = setup
    hp = dict(prune_ratio=ratio, scope=scope, allocation=allocation, samples_per_layer=256, finetune_steps=STEPS)
    ref_cuts, ref_model = _reference(model, batches, hp, seed=3)
    cuts, snapshots, pruned = _method(model, batches, hp, 3, monkeypatch)
    assert len(ref_cuts) >= (9 if scope == "internal" else 11)
    assert [c[0] for c in cuts] == [c[0] for c in ref_cuts]
    for (name, keep, scale), (_, ref_keep, ref_scale) in zip(cuts, ref_cuts):
        assert keep.tolist() == ref_keep.tolist(), name
        assert (scale is None) == (ref_scale is None), name
        if scale is not None:
            assert torch.allclose(scale, ref_scale, rtol=1e-6, atol=1e-7), name
    # One recovery fewer: none after the last cut, so the pruned model is the reference's just before it.
    assert len(snapshots) == len(ref_cuts) - 1
    assert sum(p.numel() for p in pruned.parameters()) == sum(p.numel() for p in ref_model.parameters())


@pytest.mark.parametrize("scope,allocation,ratio", CASES[1:3])
def test_skipping_the_last_recovery_changes_nothing_else(setup, monkeypatch, scope, allocation, ratio):
    """The previous schedule (a recovery after every cut, still reachable) makes bit-identical cuts;
    its model before the last recovery is bit-identical to the new schedule's result."""
    model, batches = setup
    hp = dict(prune_ratio=ratio, scope=scope, allocation=allocation, samples_per_layer=256, finetune_steps=STEPS)
    old_cuts, old_snapshots, old = _method(model, batches, hp, 5, monkeypatch, recover_after_last=True)
    new_cuts, new_snapshots, new = _method(model, batches, hp, 5, monkeypatch)
    assert len(old_snapshots) == len(old_cuts) == len(new_cuts) == len(new_snapshots) + 1
    for (name, keep, scale), (_, k2, s2) in zip(old_cuts, new_cuts):
        assert torch.equal(keep, k2) and (scale is None or torch.equal(scale, s2)), name
    final = new.state_dict()
    assert final.keys() == old_snapshots[-1].keys()
    assert all(torch.equal(final[k], old_snapshots[-1][k]) for k in final)
    assert not all(torch.equal(final[k], v) for k, v in old.state_dict().items())  # the old one trained on
