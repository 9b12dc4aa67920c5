"""ISTA: channels whose BN gamma is exactly zero are removed without changing the function (exactly
when the consumer is 1x1), the gamma-W rescaling is invisible and undone, the per-layer cost weights
follow the paper's formula, and a short phase on digits really zeroes gammas and prunes."""
import copy
import logging

import pytest
import torch
from torch import nn

from methods import PruneContext, create_method
from methods.cost import profile
from methods.graph import DependencyGraph
from methods.ista import ISTA
from trainables.data import load, make_loader
from trainables.models import create_model
from trainables.train import evaluate, train_epoch

from helpers import randomise_bn

CPU = torch.device("cpu")
DIGITS = (1, 8, 8)


class _Block(nn.Module):
    """x -> conv3x3 -> BN -> act -> conv1x1 -> [BN] -> (+ x) -> act: the penalised channels
    (conv1's) are read by a 1x1 conv, where folding a constant channel is exact."""

    def __init__(self, width, hidden, act, consumer_bn):
        super().__init__()
        self.conv1 = nn.Conv2d(width, hidden, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.act1 = act()
        self.conv2 = nn.Conv2d(hidden, width, 1, bias=not consumer_bn)
        self.bn2 = nn.BatchNorm2d(width) if consumer_bn else nn.Identity()
        self.act2 = act()

    def forward(self, x):
        return self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))) + x)


class PointwiseResNet(nn.Module):
    """A digits-sized residual net with 1x1 consumers of its block-internal channels."""

    def __init__(self, width=16, hidden=32, blocks=2, act=nn.ReLU, consumer_bn=True):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.act = act()
        self.blocks = nn.Sequential(*[_Block(width, hidden, act, consumer_bn) for _ in range(blocks)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        x = self.blocks(self.act(self.bn(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.mark.parametrize("act,consumer_bn", [(nn.ReLU, True), (nn.ReLU, False), (nn.ReLU6, True)])
def test_removing_zero_gamma_channels_is_exact_with_1x1_consumers(act, consumer_bn):
    model = randomise_bn(PointwiseResNet(act=act, consumer_bn=consumer_bn))
    first, second = model.blocks[0].bn1, model.blocks[1].bn1
    with torch.no_grad():
        first.weight[[1, 4, 6, 20]] = 0.0  # constants act(beta): beta > 0 folds a value, beta < 0 nothing
        first.bias[[1, 4, 6, 20]] = torch.tensor([0.7, -0.3, 1.5, 0.2])
        second.weight[:] = 0.0  # every gamma zero: the group keeps one channel
    x = torch.randn(5, *DIGITS)
    expected = model(x)
    method = create_method("ista", alpha=0.3)
    method.prepare(model)  # rescales; prune must undo it
    assert all(layer["rescalable"] == (act is nn.ReLU) for layer in method.state_dict()["layers"])
    pruned = method.prune(model, PruneContext(DIGITS)).eval()
    assert pruned.blocks[0].conv1.out_channels == 28 and pruned.blocks[0].conv2.in_channels == 28
    assert pruned.blocks[1].bn1.num_features == 1
    assert (pruned(x) - expected).abs().max() <= 1e-5


def test_rescaling_keeps_the_function_and_undoing_restores_the_parameters():
    model = randomise_bn(create_model("resnet20", 10))
    original = copy.deepcopy(model)
    x = torch.randn(4, 3, 32, 32)
    expected = model(x)
    method = create_method("ista", alpha=0.05)
    method.prepare(model)
    layers = method.state_dict()["layers"]
    assert len(layers) == 9 and all(layer["rescalable"] for layer in layers)  # BN -> ReLU -> conv2
    blk, ref = model.layer2[1], original.layer2[1]
    assert torch.allclose(blk.bn1.weight, 0.05 * ref.bn1.weight) and torch.allclose(blk.bn1.bias, 0.05 * ref.bn1.bias)
    assert torch.allclose(blk.conv2.weight, ref.conv2.weight / 0.05)
    assert torch.equal(blk.bn2.weight, ref.bn2.weight) and torch.equal(blk.conv1.weight, ref.conv1.weight)
    assert torch.allclose(model(x), expected, atol=1e-5)
    method.undo_rescaling(model)
    for (name, p), q in zip(model.state_dict().items(), original.state_dict().values()):
        assert torch.allclose(p, q, rtol=1e-6, atol=0), name


def test_cost_weights_follow_the_paper_formula():
    model = create_model("resnet20", 10, in_channels=1)
    method = create_method("ista")
    method.prepare(model)
    lambdas = method.layer_cost_weights(model, DIGITS)
    # (out_h*out_w + k*k*c_in + k'*k'*c_out') / (in_h*in_w), input 8x8
    assert lambdas["layer1.0.bn1"] == pytest.approx((64 + 9 * 16 + 9 * 16) / 64)
    assert lambdas["layer2.0.bn1"] == pytest.approx((16 + 9 * 16 + 9 * 32) / 64)  # stride 2: 4x4 out
    assert lambdas["layer2.1.bn1"] == pytest.approx((16 + 9 * 32 + 9 * 32) / 64)
    assert lambdas["layer3.0.bn1"] == pytest.approx((4 + 9 * 32 + 9 * 64) / 64)


def test_phase_optimizer_and_ista_step():
    model = create_model("resnet20", 10, in_channels=1)
    method = create_method("ista", mu=0.02, rho=0.01, alpha=1.0)
    method.prepare(model)
    optimizer = method.make_optimizer(model, lr=0.5, momentum=0.9, weight_decay=1e-3)
    gammas = {id(model.get_submodule(f"layer{s}.{b}.bn1").weight) for s in (1, 2, 3) for b in range(3)}
    others, penalised = optimizer.param_groups
    assert {id(p) for p in penalised["params"]} == gammas and penalised["weight_decay"] == 0.0
    assert others["weight_decay"] == 1e-3 and len(others["params"]) + 9 == len(list(model.parameters()))
    assert all(g["lr"] == 0.02 and g["momentum"] == 0.0 for g in optimizer.param_groups)  # lr = mu, no momentum
    gamma = model.layer3[0].bn1.weight
    with torch.no_grad():
        gamma.copy_(torch.linspace(-0.01, 0.01, 64))
    before = gamma.detach().clone()
    method.extra_loss(model, torch.zeros(2, *DIGITS), None, None)  # the loop shows the input shape
    method.after_step(model)
    t = 0.02 * 0.01 * (4 + 9 * 32 + 9 * 64) / 64
    assert torch.equal(gamma.detach() == 0, before.abs() <= t)
    assert torch.allclose(gamma.detach(), torch.sign(before) * (before.abs() - t).clamp(min=0))


@pytest.fixture(scope="module")
def digits():
    return load("digits")


def _train_loader(data):
    # A fresh seeded loader per use, so a result does not depend on which tests ran before.
    return make_loader(data.train, 64, shuffle=True, seed=0)


def _test_loader(data):
    return make_loader(data.test, 512, shuffle=False)


def _train(model, loader, epochs, lr=0.1):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    for _ in range(epochs):
        train_epoch(model, loader, optimizer, device=CPU)
    return model


def _ista_phase(model, method, loader, epochs):
    model = method.prepare(model)
    optimizer = method.make_optimizer(model, lr=0.05, momentum=0.9, weight_decay=5e-4)
    for epoch in range(epochs):
        train_epoch(model, loader, optimizer, device=CPU, method=method)
        method.on_epoch_end(model, epoch, 0.0)
    return model


@pytest.fixture(scope="module")
def ista_resnet20(digits):
    """resnet20 briefly trained on digits, then one epoch of ISTA with the default hyperparameters."""
    torch.manual_seed(0)
    dense = _train(create_model("resnet20", 10, in_channels=1), _train_loader(digits), 3)
    method = create_method("ista")
    return dense, method, _ista_phase(copy.deepcopy(dense), method, _train_loader(digits), 1)


def _spatial(model, input_shape):
    sizes, handles = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(lambda mod, i, o, name=name: sizes.__setitem__(name, o.shape[-1] * o.shape[-2])))
    with torch.no_grad():
        model.eval()(torch.zeros(1, *input_shape))
    for h in handles:
        h.remove()
    return sizes


def _zeros_only(method):
    """The same method with a target its zero gammas already meet: the cut removes exactly them."""
    zeros_only = copy.deepcopy(method)
    zeros_only.hparams["prune_ratio"] = 0.05
    return zeros_only


def test_short_phase_zeroes_gammas_and_macs_drop_by_the_zero_counts(ista_resnet20):
    dense, method, model = ista_resnet20
    assert method.zero_fraction(model) > 0.05
    pruned = _zeros_only(method).prune(model, PruneContext(DIGITS))
    # MACs expected from the zero counts alone: each removed channel of block conv1 saves its own
    # filter (out_hw * 9 * c_in) and its input slice of conv2 (out_hw * 9 * c_out).
    hw = _spatial(dense, DIGITS)
    saved = 0
    for stage in (1, 2, 3):
        for b in range(3):
            blk = model.get_submodule(f"layer{stage}.{b}")
            zeros = int((blk.bn1.weight == 0).sum())
            removed = min(zeros, blk.bn1.num_features - 1)
            conv1, conv2 = f"layer{stage}.{b}.conv1", f"layer{stage}.{b}.conv2"
            saved += removed * (hw[conv1] * blk.conv1.weight[0].numel() + hw[conv2] * blk.conv2.weight[:, 0].numel())
            assert pruned.get_submodule(conv1).out_channels == blk.bn1.num_features - removed
    assert saved > 0
    assert profile(pruned, DIGITS).macs == profile(dense, DIGITS).macs - saved


def test_resnet20_surgery_is_exact_where_no_padded_tap_sees_a_constant(ista_resnet20, digits):
    # resnet20's consumers are zero-padded 3x3 convs: the folded constant act(beta) is right at
    # interior pixels but too large at the borders, and on 8x8 digits most pixels are borders
    # (layer3's maps are 2x2), so the raw pruned/masked agreement here is only ~85-95 %. A zero
    # constant (beta <= 0) needs no folding and is exact everywhere, so with the dead channels'
    # betas made non-positive the whole resnet20 surgery (9 groups, constants folded into the
    # consumers' BN statistics) must reproduce the masked model exactly.
    _, method, model = ista_resnet20
    model = copy.deepcopy(model)
    with torch.no_grad():
        for layer in method.state_dict()["layers"]:
            bn = model.get_submodule(layer["bn"])
            dead = bn.weight == 0
            bn.bias[dead] = -bn.bias[dead].abs()
    masked = method.unscaled_copy(model).eval()
    pruned = _zeros_only(method).prune(model, PruneContext(DIGITS)).eval()
    x = torch.cat([x for x, _ in _test_loader(digits)])
    with torch.no_grad():
        assert (pruned(x) - masked(x)).abs().max() <= 1e-4
    test = _test_loader(digits)
    assert evaluate(pruned, test, device=CPU)[0] == evaluate(masked, test, device=CPU)[0]


def test_accuracy_after_surgery_equals_the_masked_accuracy_with_1x1_consumers(digits):
    # (Here training tends to leave the dead channels' beta <= 0, i.e. constants of 0; that a
    # positive constant is folded exactly is checked by test_removing_zero_gamma_channels_....)
    train, test = _train_loader(digits), _test_loader(digits)
    torch.manual_seed(0)
    dense = _train(PointwiseResNet(), train, 3)
    method = create_method("ista", alpha=0.03)
    model = _ista_phase(copy.deepcopy(dense), method, train, 2)
    assert method.zero_fraction(model) > 0.1
    masked = method.unscaled_copy(model).eval()
    pruned = _zeros_only(method).prune(model, PruneContext(DIGITS)).eval()
    assert profile(pruned, DIGITS).macs < profile(dense, DIGITS).macs
    x = torch.cat([x for x, _ in test])
    with torch.no_grad():
        assert (pruned(x) - masked(x)).abs().max() <= 1e-4
    accuracy, _ = evaluate(masked, test, device=CPU)
    assert accuracy > 0.5
    assert evaluate(pruned, test, device=CPU)[0] == accuracy


def test_a_phase_short_of_the_target_is_completed_by_the_cut(ista_resnet20):
    """prune_ratio 0.6 is more than one short phase zeroes: every zero-gamma channel goes, then the
    smallest |gamma| ones, until 60% of the dense MACs are gone."""
    dense, method, model = ista_resnet20
    short = copy.deepcopy(method)
    short.hparams["prune_ratio"] = 0.6
    zeros_only = _zeros_only(method).prune(model, PruneContext(DIGITS))
    assert 1 - profile(zeros_only, DIGITS).macs / profile(dense, DIGITS).macs < 0.6
    pruned = short.prune(model, PruneContext(DIGITS))
    assert 1 - profile(pruned, DIGITS).macs / profile(dense, DIGITS).macs == pytest.approx(0.6, abs=0.02)
    for stage in (1, 2, 3):
        for b in range(3):
            conv1 = f"layer{stage}.{b}.conv1"
            dead = int((model.get_submodule(f"layer{stage}.{b}.bn1").weight == 0).sum())
            assert pruned.get_submodule(conv1).out_channels <= max(1, model.get_submodule(conv1).out_channels - dead)


def test_state_dict_resumes_a_phase(ista_resnet20, digits, tmp_path):
    dense, method, model = ista_resnet20
    torch.save(method.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)  # what the trial's checkpoint does
    assert state["applied_alpha"] == method.hparams["alpha"] and state["lambdas"]
    # The trial's resume: prepare a fresh method on the dense model, then load weights and state.
    resumed = create_method("ista")
    fresh = resumed.prepare(copy.deepcopy(dense))
    fresh.load_state_dict(model.state_dict())
    resumed.load_state_dict(state)
    x = torch.randn(3, *DIGITS)
    a = method.prune(model, PruneContext(DIGITS)).eval()
    b = resumed.prune(fresh, PruneContext(DIGITS)).eval()
    assert torch.equal(a(x), b(x))
    # Loading the state first and preparing the checkpointed model must not rescale it twice.
    again = create_method("ista")
    again.load_state_dict(state)
    restored = again.prepare(copy.deepcopy(model))
    assert torch.equal(again.prune(restored, PruneContext(DIGITS)).eval()(x), a(x))


# ---- the cheap end (beyond the paper: the floor, the residual groups' order, the clip) -----------
def _groups(model):
    return DependencyGraph(model).prunable_groups(scope="all")


def _residual_widths(before, after):
    """(kept, size) of every residual-coupled group (more than one producer)."""
    return [(a.size, b.size) for b, a in zip(_groups(before), _groups(after)) if len(b.producers) > 1]


@pytest.fixture(scope="module")
def ista_all(ista_resnet20, digits):
    """The same dense resnet20, one epoch of ISTA with scope all (residual groups penalised too)."""
    dense, _, _ = ista_resnet20
    method = create_method("ista", scope="all")
    return dense, method, _ista_phase(copy.deepcopy(dense), method, _train_loader(digits), 1)


def _with_ratio(method, ratio):
    out = copy.deepcopy(method)
    out.hparams["prune_ratio"] = ratio
    return out


class _PlainRanking(ISTA):
    """The cut as it was before the cheap-end change: live channels by the plain |gamma| norm."""

    @staticmethod
    def _order(groups, removable, norms):
        return [torch.where(ok, torch.full_like(n, -1.0), n).double() for ok, n in zip(removable, norms)]


def _plain(method):
    plain = copy.deepcopy(method)
    plain.__class__ = _PlainRanking
    return plain


@pytest.mark.parametrize("ratio", [0.97, 0.98])
def test_cheap_end_keeps_every_group_and_cuts_residual_groups_last(ista_all, ratio):
    """At 97-98% removed with scope all, every group keeps >= min_channels, the target is met, and
    the residual-coupled groups keep a common share of their width (the plain |gamma| ranking took
    one of them to a single channel)."""
    dense, method, model = ista_all
    pruned = _with_ratio(method, ratio).prune(model, PruneContext(DIGITS))
    assert len(_groups(pruned)) == len(_groups(dense))
    assert min(g.size for g in _groups(pruned)) >= ISTA.min_channels >= 1
    assert 1 - profile(pruned, DIGITS).macs / profile(dense, DIGITS).macs == pytest.approx(ratio, abs=0.003)
    shares = [kept / size for kept, size in _residual_widths(dense, pruned)]
    assert min(shares) >= 0.35 and max(shares) - min(shares) <= 1 / 16 + 1e-9
    plain = _plain(_with_ratio(method, ratio)).prune(model, PruneContext(DIGITS))
    assert min(kept for kept, _ in _residual_widths(dense, plain)) <= 2  # what collapsed the trials


@pytest.mark.parametrize("ratio", [0.3, 0.6, 0.8])
def test_moderate_targets_cut_exactly_as_the_plain_gamma_ranking(ista_all, ratio):
    """Where the cut removes no live residual channel, the pruned model is the plain ranking's, bit for bit."""
    _, method, model = ista_all
    x = torch.randn(4, *DIGITS)
    ours = _with_ratio(method, ratio).prune(model, PruneContext(DIGITS)).eval()
    plain = _plain(_with_ratio(method, ratio)).prune(model, PruneContext(DIGITS)).eval()
    a, b = ours.state_dict(), plain.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(ours(x), plain(x))


def test_the_phase_is_the_papers_step_where_the_floor_does_not_bind(ista_resnet20, digits):
    """One epoch of the phase with the floor and without it (min_channels 0) gives the same
    parameters, bit for bit; where a step would zero a whole group, its largest channel skips it."""
    dense, _, _ = ista_resnet20
    models = []
    for floor in (ISTA.min_channels, 0):
        method = create_method("ista", scope="all")
        method.min_channels = floor
        torch.manual_seed(0)
        models.append(_ista_phase(copy.deepcopy(dense), method, _train_loader(digits), 1))
    a, b = models[0].state_dict(), models[1].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    model = create_model("resnet20", 10, in_channels=1)
    method = create_method("ista", mu=0.02, rho=0.01, alpha=1.0, scope="all")
    method.prepare(model)
    method.make_optimizer(model, lr=0.02, momentum=0.0, weight_decay=0.0)
    doomed, kept = model.layer2[1].bn1.weight, model.layer2[2].bn1.weight
    t = 0.02 * 0.01 * (16 + 9 * 32 + 9 * 32) / 64  # lambda of layer2.1.bn1 / layer2.2.bn1
    with torch.no_grad():
        doomed.copy_(torch.linspace(-0.5, 0.9, 32) * t)  # every |gamma| <= t: the step zeroes them all
        kept.copy_(torch.linspace(-0.5, 3.0, 32) * t)
    before_doomed, before_kept = doomed.detach().clone(), kept.detach().clone()
    method.extra_loss(model, torch.zeros(2, *DIGITS), None, None)
    method.after_step(model)
    assert int((doomed != 0).sum()) == 1 and doomed[31] == before_doomed[31]
    assert torch.equal(kept.detach(), torch.sign(before_kept) * (before_kept.abs() - t).clamp(min=0))


def test_a_target_beyond_the_reach_is_clipped_with_one_warning(ista_resnet20, digits, caplog):
    """scope internal at 97%: block-internal groups at one channel each remove ~96% of the dense
    MACs on digits; the phase and the cut aim there, and say so in one warning line."""
    dense, _, _ = ista_resnet20
    method = create_method("ista", prune_ratio=0.97)
    reference = profile(dense, DIGITS).macs
    with caplog.at_level(logging.WARNING, logger="methods.ista"):
        model = _ista_phase(method.prepare(copy.deepcopy(dense), PruneContext(DIGITS, reference_macs=reference)),
                            method, _train_loader(digits), 1)
        pruned = method.prune(model, PruneContext(DIGITS, reference_macs=reference))
        method.prune(model, PruneContext(DIGITS, reference_macs=reference))
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "methods.ista"]
    assert len(warnings) == 1 and "prune_ratio 0.970 is beyond its reach with scope internal" in warnings[0].message
    reach = 1 - profile(pruned, DIGITS).macs / reference
    assert 0.9 < reach < 0.97 and f"at most {reach:.3f}" in warnings[0].getMessage()
    assert all(pruned.get_submodule(f"layer{s}.{b}.conv1").out_channels == 1 for s in (1, 2, 3) for b in range(3))
    assert method.state_dict()["clip_warned"] is True
