"""C-SGD: merging a cluster of identical filters is exact (also across residual adds and option-A
shortcuts), the centripetal update shrinks within-cluster differences by exactly
``1 - lr*(eta+epsilon)`` per plain SGD step, and after a short phase merging costs no accuracy."""
import copy

import pytest
import torch
from torch import nn

from methods import DependencyGraph, PruneContext, create_method
from methods.cost import profile
from methods.csgd import kmeans
from methods.importance import l1_filter
from methods.selection import plan_widths
from trainables.data import load, make_loader
from trainables.models import create_model
from trainables.train import evaluate, train_epoch

from helpers import randomise_bn

CPU = torch.device("cpu")
DIGITS = (1, 8, 8)


@torch.no_grad()
def _make_clusters_identical(model, method):
    """Copy each cluster's first channel onto its other members, in every clustered tensor
    (kernels, biases, BN gamma/beta and running statistics)."""
    for c in method.state_dict()["clusterings"]:
        for name in c["producers"] + c["followers"]:
            m = model.get_submodule(name)
            tensors = [getattr(m, a, None) for a in ("weight", "bias", "running_mean", "running_var")]
            for t in tensors:
                if not isinstance(t, torch.Tensor):
                    continue
                for members in c["clusters"]:
                    t.data[members[1:]] = t.data[members[0]].clone()


def test_kmeans_gives_exactly_k_nonempty_clusters_and_is_seeded():
    x = torch.cat([torch.randn(5, 3) + 10, torch.randn(7, 3) - 10, torch.randn(4, 3)])
    labels = kmeans(x, 3, seed=0)
    assert sorted(set(labels)) == [0, 1, 2]
    assert len(set(labels[:5])) == len(set(labels[5:12])) == len(set(labels[12:])) == 1  # the three blobs
    assert kmeans(x, 3, seed=0) == labels
    dup = torch.zeros(6, 2)  # all rows equal: still k non-empty clusters
    assert sorted(set(kmeans(dup, 4))) == [0, 1, 2, 3]


@pytest.mark.parametrize("clustering", ["kmeans", "even"])
def test_merging_identical_clusters_is_exact_across_residual_adds(clustering):
    model = randomise_bn(create_model("resnet20", 10))
    method = create_method("csgd", prune_ratio=0.5, clustering=clustering, scope="all")
    method.prepare(model, PruneContext((3, 32, 32)))
    clusterings = method.state_dict()["clusterings"]
    graph = DependencyGraph(model)
    residual = [c for c in clusterings if graph.group_of(c["producers"][0]).residual]
    assert len(residual) == 3 and len(clusterings) == 12  # 3 stage widths + 9 block-internal widths
    stage1 = next(c for c in residual if "conv1" in c["producers"])
    assert {"layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"} <= set(stage1["producers"])  # one shared clustering
    _make_clusters_identical(model, method)
    x = torch.randn(4, 3, 32, 32)
    before = model(x)
    pruned = method.prune(model, PruneContext((3, 32, 32))).eval()
    assert torch.allclose(pruned(x), before, atol=1e-5), (pruned(x) - before).abs().max()
    # prune_ratio is the fraction of MACs removed; every group (uniform allocation) loses the same share.
    assert profile(pruned, (3, 32, 32)).macs == pytest.approx(0.5 * profile(model, (3, 32, 32)).macs, rel=0.05)
    assert pruned.conv1.out_channels < 16 and pruned.layer3[2].conv1.out_channels < 64
    assert pruned.layer2[0].shortcut.out_channels == pruned.layer2[0].conv2.out_channels


@pytest.mark.parametrize("prune_ratio", [0.7, 0.97])
def test_global_allocation_takes_cluster_counts_from_the_shared_ranking(prune_ratio):
    """allocation: global changes how MANY clusters each group gets (the shared L1 ranking's widths,
    uneven across groups), not how they are formed; the merge stays exact and reaches the target."""
    model = randomise_bn(create_model("resnet20", 10))
    context = PruneContext((3, 32, 32))
    graph = DependencyGraph(model)
    groups = graph.prunable_groups(scope="all")
    method = create_method("csgd", prune_ratio=prune_ratio, scope="all", allocation="global")
    method.prepare(model, context)
    counts = {c["producers"][0]: len(c["clusters"]) for c in method.state_dict()["clusterings"]}
    plan = plan_widths(model, graph, groups, context, method.hparams, [l1_filter(graph, g) for g in groups])
    expected = {g.producers[0]: k for g, k in zip(groups, plan.kept) if k < g.size}
    assert counts == expected  # the shortcut classes never needed more clusters here
    assert len({k / g.size for g, k in zip(groups, plan.kept)}) > 2  # uneven fractions across groups
    if prune_ratio == 0.97:  # block-internal groups at one cluster, the residual stream clustered too
        assert sum(g.residual for g in groups if g.producers[0] in counts) == 3
        assert {counts[g.producers[0]] for g in groups if not g.residual} == {1}
    uniform = create_method("csgd", prune_ratio=prune_ratio, scope="all")  # the default: one fraction
    uniform.prepare(model, context)
    fractions = {len(c["clusters"]) / sum(map(len, c["clusters"])) for c in uniform.state_dict()["clusterings"]}
    assert max(fractions) - min(fractions) <= 1 / 16
    _make_clusters_identical(model, method)
    x = torch.randn(4, 3, 32, 32)
    before = model(x)
    pruned = method.prune(model, context).eval()
    assert torch.allclose(pruned(x), before, atol=1e-5), (pruned(x) - before).abs().max()
    dense = profile(model, (3, 32, 32)).macs
    assert profile(pruned, (3, 32, 32)).macs == pytest.approx((1 - prune_ratio) * dense, rel=0.05)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_shortcut_classes_keep_cluster_counts_a_multiple_of_round_to(allocation):
    # At 0.97 with round_to 8, stage 1 keeps 8 clusters, so stage 2's option-A shortcut makes 9
    # classes (pad + a copy of each): more than the 8 allocated, rounded up to 16, not 9.
    torch.manual_seed(0)
    model = create_model("resnet20", 10, in_channels=1)
    method = create_method("csgd", prune_ratio=0.97, scope="all", allocation=allocation, round_to=8)
    method.prepare(model, PruneContext(DIGITS))
    counts = {c["producers"][0]: len(c["clusters"]) for c in method.state_dict()["clusterings"]}
    assert counts["layer1.2.conv2"] == 8 and counts["layer2.2.conv2"] == 16, counts
    assert all(k % 8 == 0 for k in counts.values()), counts
    pruned = method.prune(model, PruneContext(DIGITS))
    assert all(m.out_channels % 8 == 0 for m in pruned.modules() if isinstance(m, nn.Conv2d))


def test_pad_shortcut_groups_only_merge_channels_with_equal_shortcut_inputs():
    model = create_model("resnet20", 10)
    method = create_method("csgd", prune_ratio=0.7, scope="all")
    method.prepare(model, PruneContext((3, 32, 32)))
    clusterings = {c["producers"][0]: c["clusters"] for c in method.state_dict()["clusterings"]}
    graph = DependencyGraph(model)
    for stage, prev in ((2, "conv1"), (3, "layer2.0.conv2")):
        group = graph.group_of(f"layer{stage}.0.conv2")
        source = model.get_submodule(f"layer{stage}.0.shortcut").source.tolist()
        prev_cluster = {ch: i for i, cl in enumerate(clusterings[graph.group_of(prev).producers[0]]) for ch in cl}
        for members in clusterings[group.producers[0]]:
            keys = {("pad",) if source[j] < 0 else ("src", prev_cluster[source[j]]) for j in members}
            assert len(keys) == 1, (stage, members, keys)


@pytest.fixture(scope="module")
def digits():
    return load("digits")


def _train_loader(data):
    # A fresh seeded loader per use, so a result does not depend on which tests ran before.
    return make_loader(data.train, 64, shuffle=True, seed=0)


@pytest.fixture(scope="module")
def trained_resnet20(digits):
    """resnet20 briefly trained on digits (plain SGD), the dense model the phase starts from."""
    train = _train_loader(digits)
    torch.manual_seed(0)
    model = create_model("resnet20", 10, in_channels=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(3):
        train_epoch(model, train, optimizer, device=CPU)
    return model


def test_within_cluster_distance_shrinks_by_one_minus_lr_eta_plus_epsilon(trained_resnet20, digits):
    lr, eta, eps = 0.05, 5e-4, 0.03
    model = copy.deepcopy(trained_resnet20)
    method = create_method("csgd", epsilon=eps, scope="all")
    method.prepare(model, PruneContext(DIGITS))
    # Momentum 0 makes the ratio exact: the averaged gradient is the same for every member of a
    # cluster, so the loss (any loss) moves the cluster centre but never the differences.
    optimizer = method.make_optimizer(model, lr=lr, momentum=0.0, weight_decay=eta)
    kernel, vector = 1 - lr * (eta + eps), 1 - lr * 0.1 * eps
    bns = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    loader = _train_loader(digits)
    for step in range(3):
        before = method.cluster_distance(model)
        train_epoch(model, loader, optimizer, device=CPU, method=method, max_steps=1)
        after = method.cluster_distance(model)
        assert len(after) == 57  # 9 internal groups x 3 + stage 1 (4 convs, 4 BNs) x 3 + stages 2, 3 (3 convs, 3 BNs)
        for name, d0 in before.items():
            expected = vector if name.rpartition(".")[0] in bns else kernel
            assert after[name] / d0 == pytest.approx(expected, rel=1e-4), (step, name)


def test_merging_after_a_short_phase_keeps_accuracy(trained_resnet20, digits):
    train, test = _train_loader(digits), make_loader(digits.test, 512, shuffle=False)
    model = copy.deepcopy(trained_resnet20)
    method = create_method("csgd", prune_ratio=0.5, epsilon=0.1)
    method.prepare(model, PruneContext(DIGITS))
    optimizer = method.make_optimizer(model, lr=0.05, momentum=0.9, weight_decay=5e-4)
    start = method.cluster_distance(model)
    for _ in range(8):
        train_epoch(model, train, optimizer, device=CPU, method=method)
    end = method.cluster_distance(model)
    kernels = [n for n in start if n.endswith("conv1.weight")]
    assert all(end[n] < 1e-2 * start[n] for n in kernels)  # the kernels collapsed onto their centres
    accuracy, _ = evaluate(model, test, device=CPU)
    pruned = method.prune(model, PruneContext(DIGITS))
    merged_accuracy, _ = evaluate(pruned, test, device=CPU)
    assert accuracy > 0.8
    assert abs(merged_accuracy - accuracy) <= 0.01, (accuracy, merged_accuracy)
    assert profile(pruned, DIGITS).macs == pytest.approx(0.5 * profile(model, DIGITS).macs, rel=0.05)


def test_state_dict_resumes_the_same_clustering(trained_resnet20, tmp_path):
    model = copy.deepcopy(trained_resnet20)
    method = create_method("csgd", scope="all")
    method.prepare(model, PruneContext(DIGITS))
    method.make_optimizer(model, lr=0.05, momentum=0.9, weight_decay=1e-4)
    torch.save(method.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)  # what the trial's checkpoint does
    assert state == method.state_dict() and state["eta"] == 1e-4
    # What the trial does on resume: prepare a fresh method on the dense model, load the state.
    resumed = create_method("csgd", scope="all")
    other = create_model("resnet20", 10, in_channels=1)  # different weights: k-means would differ
    resumed.prepare(other, PruneContext(DIGITS))
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    x = torch.randn(2, *DIGITS)
    a = method.prune(model, PruneContext(DIGITS)).eval()
    b = resumed.prune(model, PruneContext(DIGITS)).eval()
    assert torch.equal(a(x), b(x))
