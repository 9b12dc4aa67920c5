"""ManiDP's own properties: the gating adds nothing but the mask, the two cost accountings agree,
the skipping path computes the masked network, hard samples get no sparsity pressure, MACs drop on
digits, and the gated model survives torch.export and a save/load round trip."""
import copy
import json
import math

import pytest
import torch
from helpers import calibrate_bn

from methods import PruneContext, SurgeryError, create_method
from methods.cost import profile
from methods.manidp import (
    MIN_CHANNELS, SkippingView, _gate_costs, active_channels, average_macs, complexity_weights, eta_for_target,
    keep_rate, plan_keep_rates, similarity_loss, skipping_forward, sparsity_loss, thresholds_from_saliency,
)
from methods.manidp_gates import DEFAULT_SQUEEZE_RATE, GatedBlock, gate_model, gated_blocks, named_gates
from trainables.data import load, make_loader
from trainables.model_io import load_model, model_spec, save_model
from trainables.models import create_model
from trainables.train import train_epoch

DIGITS = (1, 8, 8)


def _randomize_gates(model, threshold=1.0, std=0.1):
    """Gates with input-dependent saliencies around 1 and a threshold that turns about half off."""
    for _, gate in named_gates(model):
        torch.nn.init.normal_(gate.fc2.weight, std=std / gate.fc2.in_features ** 0.5)
        gate.threshold.fill_(threshold)
    return model


_DENSE = {}


def _dense(name, shape):
    """A calibrated dense model per (name, shape), built once per session (callers copy it)."""
    if (name, shape) not in _DENSE:
        torch.manual_seed(0)
        _DENSE[name, shape] = calibrate_bn(create_model(name, 10, in_channels=shape[0]), shape)
    return _DENSE[name, shape]


@pytest.fixture(scope="module")
def digits():
    return load("digits")


@pytest.fixture(scope="module")
def phase(digits):
    """Dense resnet20 -> prepare -> a 2-epoch ManiDP phase (a few real steps each) -> prune."""
    torch.manual_seed(0)
    dense = _dense("resnet20", DIGITS)
    method = create_method("manidp", prune_ratio=0.5, phase_epochs=2)
    model = method.prepare(copy.deepcopy(dense))
    loader = make_loader(digits.train, 32, shuffle=True, seed=0)
    optimizer = method.make_optimizer(model, lr=0.05, momentum=0.9, weight_decay=5e-4)
    history = []  # (epoch-mean saliency, thresholds) after each phase epoch
    for epoch in range(2):
        stats = train_epoch(model, loader, optimizer, device=torch.device("cpu"), method=method, max_steps=5)
        method.on_epoch_end(model, epoch, stats.loss)
        history.append((dict(method._last_saliency), {n: float(g.threshold) for n, g in named_gates(model)}))
    pruned = method.prune(model, PruneContext(DIGITS)).eval()
    return dense, method, model, pruned, history


@pytest.fixture(scope="module")
def val_batches(digits):
    return [x for x, _ in make_loader(digits.val, 128, shuffle=False)]


# ---- the gating adds nothing but the mask ---------------------------------------------------------------
@pytest.mark.parametrize("name,shape", [("resnet20", (3, 16, 16)), ("resnet18", (3, 16, 16)),
                                        ("resnet50", (3, 16, 16))])
def test_gating_with_open_gates_is_the_base_model(name, shape):
    dense = _dense(name, shape)
    gated = gate_model(copy.deepcopy(dense))
    blocks = gated_blocks(gated)
    assert blocks and all(isinstance(b, GatedBlock) for _, b in blocks)
    expected_gates = 3 if name == "resnet50" else 2
    assert all(len(b.gates()) == expected_gates for _, b in blocks)
    _randomize_gates(gated)
    for _, gate in named_gates(gated):  # saliencies forced to 1, thresholds at -inf
        torch.nn.init.zeros_(gate.fc2.weight)
        torch.nn.init.constant_(gate.fc2.bias, 1.0)
        gate.threshold.fill_(float("-inf"))
    gated.eval()
    x = torch.randn(2, *shape)
    with torch.no_grad():
        assert torch.equal(gated(x), dense(x))
    # The dense weights are all still there under their own names.
    dense_state = dense.state_dict()
    gated_state = gated.state_dict()
    assert all(torch.equal(gated_state[k], v) for k, v in dense_state.items())


def test_closed_gates_leave_only_the_shortcut():
    block = gate_model(copy.deepcopy(_dense("resnet20", (3, 16, 16))))
    name, gb = gated_blocks(block)[3]  # layer2.0: a stride-2 block with a pad shortcut
    for gate in gb.gates():
        gate.threshold.fill_(float("inf"))
    x = torch.randn(2, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(gb(x), torch.relu(gb.shortcut(x)))


def test_unsupported_model_is_refused():
    with pytest.raises(SurgeryError, match="no residual BasicBlock/Bottleneck"):
        gate_model(create_model("vgg16_cifar", 10))


# ---- the two accountings and the skipping path ----------------------------------------------------------
@pytest.mark.parametrize("name,shape", [("resnet20", (3, 16, 16)), ("resnet50", (3, 16, 16))])
def test_average_macs_equal_the_skipping_path_and_outputs_match(name, shape):
    torch.manual_seed(1)
    dense = _dense(name, shape)
    gated = _randomize_gates(gate_model(copy.deepcopy(dense)))
    x = torch.randn(3, *shape)
    with torch.no_grad():
        masked = gated(x)
    skipped, macs = skipping_forward(gated, x, return_macs=True)
    tol = 1e-5 * masked.abs().max().item()
    assert torch.allclose(skipped, masked, rtol=1e-4, atol=tol)
    assert torch.allclose(SkippingView(gated)(x), masked, rtol=1e-4, atol=tol)  # BN folded
    # The cost module's per-sample average x samples == MACs of the shapes the skipping path ran.
    assert round(average_macs(gated, [x], shape) * len(x)) == sum(macs)
    # And profile() at batch 1 reports the same active-channel cost through macs_hook.
    assert profile(gated, shape).macs == round(average_macs(gated, [torch.zeros(1, *shape)], shape))
    # Something really was skipped, and the samples differ (dynamic).
    dense_macs = profile(dense, shape).macs
    assert max(macs) < dense_macs
    assert len(set(macs)) > 1


def test_static_model_average_equals_profile():
    model = _dense("resnet20", DIGITS)
    assert average_macs(model, [torch.randn(5, *DIGITS)], DIGITS) == profile(model, DIGITS).macs


# ---- the training phase on digits ----------------------------------------------------------------------
def test_average_macs_drop_on_digits(phase, val_batches, digits):
    dense, method, _, pruned, _ = phase
    before = profile(dense, DIGITS).macs
    after = average_macs(pruned, val_batches, DIGITS)
    assert after <= 0.7 * before, after / before
    # What the trainable reports: measure_macs over an (inputs, targets) DataLoader.
    loader = make_loader(digits.val, 100, shuffle=False)
    assert method.measure_macs(pruned, DIGITS, loader) == pytest.approx(after)
    # Every layer keeps about 1 - eta of its channels on average (ties and per-sample spread aside).
    kept = []
    hooks = [g.register_forward_hook(lambda m, i, o: kept.append((o[1] > 0).float().mean().item()))
             for _, g in named_gates(pruned)]
    with torch.no_grad():
        pruned(val_batches[0])
    for h in hooks:
        h.remove()
    assert 0.3 <= sum(kept) / len(kept) <= 0.7


def test_skipping_path_on_digits_matches_the_masked_model(phase, val_batches):
    _, _, _, pruned, _ = phase
    x = val_batches[0][:8]
    with torch.no_grad():
        masked = pruned(x)
    skipped, macs = skipping_forward(pruned, x, return_macs=True)
    assert torch.allclose(skipped, masked, atol=1e-4)
    assert round(average_macs(pruned, [x], DIGITS) * len(x)) == sum(macs)


def test_thresholds_follow_the_cosine_schedule(phase):
    _, method, model, pruned, history = phase
    assert keep_rate(0, 2, 0.5) == pytest.approx(0.75)
    assert keep_rate(1, 2, 0.5) == pytest.approx(0.5)
    rates = [keep_rate(e, 10, 0.4) for e in range(10)]
    assert all(a > b for a, b in zip(rates, rates[1:])) and rates[-1] == pytest.approx(0.6)
    assert thresholds_from_saliency({"l": torch.arange(10.0)}, 0.75) == {"l": 2.0}  # 8th largest
    # After each phase epoch every layer's threshold keeps ceil(rho_e * C_l) of its channels by
    # epoch-mean saliency (more only on ties); prune froze the final ones at 1 - eta.
    for epoch, (saliency, thresholds) in enumerate(history):
        assert set(thresholds) == set(saliency) and len(saliency) == 18
        for name, sal in saliency.items():
            k = math.ceil(keep_rate(epoch, 2, 0.5) * sal.numel())
            assert math.isfinite(thresholds[name])
            assert (sal >= thresholds[name]).sum() >= k and (sal > thresholds[name]).sum() < k
    final = {n: float(g.threshold) for n, g in named_gates(pruned)}
    assert final == pytest.approx(thresholds_from_saliency(method._last_saliency, 0.5))
    assert method._C is not None and method._C > 0


def test_hard_samples_get_no_sparsity_gradient(digits):
    torch.manual_seed(0)
    method = create_method("manidp", prune_ratio=0.5, kappa=1.5)
    model = method.prepare(copy.deepcopy(_dense("resnet20", DIGITS)))
    for _, gate in named_gates(model):  # input-dependent saliencies, as after some training
        torch.nn.init.normal_(gate.fc2.weight, std=0.1)
    x, y = next(iter(make_loader(digits.train, 16, shuffle=False)))
    model.train()
    for m in model.modules():  # BN on running statistics: no coupling between the samples of a batch
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    logits = model(x)
    ce = torch.nn.functional.cross_entropy(logits.detach(), y, reduction="none")
    C = float(ce.median())
    method._C = C
    hard, easy = ce >= C, ce < C
    assert hard.any() and easy.any()
    records = dict(method._records)
    pis = [pi for pi, _ in records.values()]

    # The sparsity term alone: zero gradient on every hard sample's saliencies, positive on easy
    # ones (partial derivatives), and zero on hard samples through the network too (total
    # derivatives: a hard sample's later saliencies depend on its earlier ones, never on others').
    beta = complexity_weights(ce, C, 1.5)
    assert torch.all(beta[hard] == 0) and torch.all(beta[easy] > 0)
    leaves = [pi.detach().requires_grad_() for pi in pis]
    for g in torch.autograd.grad(sparsity_loss(leaves, beta), leaves):
        assert torch.all(g[hard] == 0)
        assert torch.all(g[easy] > 0)
    for g in torch.autograd.grad(sparsity_loss(pis, beta), pis, retain_graph=True):
        assert torch.all(g[hard] == 0)

    # Through the method's own loss: on hard samples it is exactly gamma * similarity.
    total = method.extra_loss(model, x, logits, y)
    similarity = method.hparams["gamma"] * sum(similarity_loss(feat, pi) for pi, feat in records.values())
    g_total = torch.autograd.grad(total, pis, retain_graph=True)
    g_sim = torch.autograd.grad(similarity, pis, retain_graph=True)
    for gt, gs in zip(g_total, g_sim):
        assert torch.allclose(gt[hard], gs[hard], atol=1e-9)
        assert not torch.allclose(gt[easy], gs[easy], atol=1e-9)
    # beta is a constant: no gradient reaches the logits through the sparsity weights.
    (g_logits,) = torch.autograd.grad(sparsity_loss(pis, complexity_weights(logits.logsumexp(1), C, 1.5)),
                                      logits, allow_unused=True, retain_graph=True)
    assert g_logits is None or torch.all(g_logits == 0)


def test_first_epoch_C_is_half_the_running_mean_ce(digits):
    method = create_method("manidp")
    model = method.prepare(create_model("resnet20", 10, in_channels=1))
    x, y = next(iter(make_loader(digits.train, 16, shuffle=False)))
    model.train()
    logits = model(x)
    method.extra_loss(model, x, logits, y)
    ce = torch.nn.functional.cross_entropy(logits.detach(), y)
    assert method._C is None and method._ce_count == 16
    method.on_epoch_end(model, 0, 123.0)
    assert method._C == pytest.approx(0.5 * float(ce), rel=1e-5)


def test_method_state_round_trips(phase):
    _, method, _, _, _ = phase
    state = json.loads(json.dumps(method.state_dict()))  # plain JSON types
    other = create_method("manidp", prune_ratio=0.5, phase_epochs=2)
    other.load_state_dict(state)
    assert other._C == method._C and other._epoch == 2
    assert thresholds_from_saliency(other._last_saliency, 0.5) == pytest.approx(
        thresholds_from_saliency(method._last_saliency, 0.5))


# ---- export and save/load ----------------------------------------------------------------------------------
def test_export_and_save_load_round_trip(phase, tmp_path):
    _, _, _, pruned, _ = phase
    x = torch.randn(3, *DIGITS)
    with torch.no_grad():
        expected = pruned(x)
    exported = torch.export.export(pruned, (x,))
    assert torch.allclose(exported.module()(x), expected, atol=1e-6)
    spec = model_spec(pruned, "resnet20", 10, in_channels=1)
    assert spec["gating"]["type"] == "manidp" and len(spec["gating"]["blocks"]) == 9
    save_model(pruned, tmp_path / "m", spec)
    reloaded, _ = load_model(tmp_path / "m")
    assert {n: float(g.threshold) for n, g in named_gates(reloaded)} == \
        {n: float(g.threshold) for n, g in named_gates(pruned)}
    with torch.no_grad():
        assert torch.equal(reloaded(x), expected)


def test_gates_carry_no_weight_decay_in_the_finetune():
    method = create_method("manidp", prune_ratio=0.5, phase_epochs=1)
    model = method.prepare(create_model("resnet20", 10, in_channels=1))
    pruned = method.prune(model, PruneContext((1, 8, 8), calibration=[(torch.randn(8, 1, 8, 8), torch.zeros(8, dtype=torch.long))]))
    optimizer = method.make_finetune_optimizer(pruned, lr=0.01, momentum=0.9, weight_decay=5e-4)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    gate_ids = {id(p) for _, g in named_gates(pruned) for p in g.parameters()}
    assert gate_ids and all(decay[i] == 0.0 for i in gate_ids)
    assert all(w == 5e-4 for i, w in decay.items() if i not in gate_ids)
    assert len(decay) == len(list(pruned.parameters()))


# ---- the trial times the skipping path ---------------------------------------------------------------------
def test_inference_model_is_the_skipping_path_with_the_masked_outputs(phase, val_batches):
    """``ManiDP.inference_model`` (what the trial times for ``latency_ms``) is the path that computes
    only active filters, and it computes the masked model's outputs (BN folded: equal up to rounding);
    every static method times its pruned model itself."""
    from methods import get_method_class, list_methods

    _, method, _, pruned, _ = phase
    view = method.inference_model(pruned)
    assert isinstance(view, SkippingView) and view.model is pruned
    x = val_batches[0][:16]
    with torch.no_grad():
        masked, skipped = pruned(x), view(x)
    torch.testing.assert_close(skipped, masked, rtol=1e-5, atol=1e-5)
    # The masked model computes every filter; the view only the active ones.
    assert average_macs(pruned, [x], DIGITS) < profile(_dense("resnet20", DIGITS), DIGITS).macs
    assert method.inference_model(pruned, batch_size=64) is pruned  # a batch runs the masked model
    dense = create_model("resnet20", 10, in_channels=1)
    assert method.inference_model(dense) is dense  # nothing gated, nothing to skip
    for name in list_methods():
        if not get_method_class(name).dynamic:
            assert create_method(name).inference_model(dense) is dense, name


def test_trial_latency_is_measured_on_the_skipping_path(tmp_path):
    """A real ManiDP trial reports ``latency_model: "SkippingView"`` with its final metrics: the
    latency it logs is that of ``inference_model`` (``trainables.trial._final_metrics`` times what
    the hook returns and names its class); a static method's trial times its pruned network."""
    from trainables.base_model import ensure_base_model
    from trainables.settings import TrainSettings, TrialSettings
    from trainables.trial import run_trial

    settings = TrialSettings(model="resnet20", dataset="digits", seed=0, use_gpu=False,
                             model_kwargs={"width_mult": 0.5}, base=TrainSettings(epochs=1, batch_size=128),
                             finetune=TrainSettings(epochs=1, lr=0.01, batch_size=256),
                             calibration_batches=2, base_dir=str(tmp_path / "base_models"))
    ensure_base_model(settings)
    reports = []
    final = run_trial(settings, "manidp", {"phase_epochs": 1, "prune_ratio": 0.5},
                      lambda metrics, save: reports.append(metrics))
    assert [m["epoch"] for m in reports] == [1, 2]
    assert final["latency_model"] == "SkippingView"
    assert math.isfinite(final["latency_ms"]) and final["latency_ms"] > 0
    assert all("latency_model" not in m for m in reports[:-1])  # measured once, at the end
    static = run_trial(settings, "l1_norm", {"prune_ratio": 0.5}, lambda metrics, save: None)
    assert static["latency_model"] == type(create_model("resnet20", 10, in_channels=1)).__name__


# ---- the cheap end: per-gate keep rates with a floor, the method's reach, the recalibrated cut -------------
def _gate_widths(model):
    return {n: g.fc2.out_features for n, g in named_gates(model)}


def test_keep_plan_is_the_papers_one_rate_at_moderate_targets():
    dense = _dense("resnet20", DIGITS)
    for target in (0.5, 0.6, 0.8, 0.9):
        plan = plan_keep_rates(dense, DIGITS, target)
        eta = eta_for_target(dense, DIGITS, target)
        assert not plan.floored and plan.target == plan.requested == target
        assert len(plan.etas) == 18 and set(plan.etas.values()) == {eta}  # exactly the paper's one eta


def test_keep_plan_holds_every_gate_at_the_floor_and_hits_the_target_or_its_reach():
    dense = _dense("resnet20", DIGITS)
    widths = _gate_widths(gate_model(copy.deepcopy(dense)))
    dense_macs = profile(dense, DIGITS).macs
    # The reach is what the real accounting measures with every gate at exactly min_channels per
    # input (threshold +inf, the floor keeps each input's two most salient channels).
    floored = _randomize_gates(gate_model(copy.deepcopy(dense)), threshold=float("inf"))
    for _, gate in named_gates(floored):
        gate.min_active = MIN_CHANNELS
    x = torch.randn(16, *DIGITS)
    reach = plan_keep_rates(dense, DIGITS, 0.5).reach
    assert 0.9 < reach < 0.95
    assert average_macs(floored, [x], DIGITS) == pytest.approx((1 - reach) * dense_macs, rel=1e-9)
    # Within reach: the floor binds in the thin layers, the others share what is left, the
    # planned cost is the target's.
    plan = plan_keep_rates(dense, DIGITS, 0.92)
    assert plan.floored and plan.target == 0.92 and plan.reach == pytest.approx(reach)
    keep = {n: 1 - eta for n, eta in plan.etas.items()}
    assert all(keep[n] * c >= MIN_CHANNELS - 1e-9 for n, c in widths.items())
    assert min(keep[n] * c for n, c in widths.items()) == pytest.approx(MIN_CHANNELS)
    costs = _gate_costs(dense, DIGITS, DEFAULT_SQUEEZE_RATE)
    assert 1 - costs.cost(keep) / dense_macs == pytest.approx(0.92, abs=1e-6)
    # Beyond reach (the 0.95-0.98): clipped to the reach, every gate at the floor.
    for target in (0.95, 0.98):
        plan = plan_keep_rates(dense, DIGITS, target)
        assert plan.requested == target and plan.target == pytest.approx(reach)
        assert {n: round((1 - eta) * widths[n], 9) for n, eta in plan.etas.items()} == \
            {n: MIN_CHANNELS for n in widths}


def test_prepare_says_in_one_line_when_the_target_is_beyond_reach(caplog):
    method = create_method("manidp", prune_ratio=0.98, phase_epochs=1)
    with caplog.at_level("WARNING", logger="methods.manidp"):
        method.prepare(copy.deepcopy(_dense("resnet20", DIGITS)), PruneContext(DIGITS))
    lines = [r.getMessage() for r in caplog.records if r.name == "methods.manidp"]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith("manidp: prune_ratio 0.980 is beyond its reach on CifarResNet") and "0.932" in lines[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="methods.manidp"):  # within reach: nothing to say
        create_method("manidp", prune_ratio=0.92).prepare(copy.deepcopy(_dense("resnet20", DIGITS)),
                                                          PruneContext(DIGITS))
    assert not caplog.records


def test_floor_keeps_the_most_salient_channels_per_input_on_every_path(tmp_path):
    torch.manual_seed(2)
    gated = _randomize_gates(gate_model(copy.deepcopy(_dense("resnet20", (3, 16, 16)))), threshold=float("inf"))
    for _, gate in named_gates(gated):
        gate.min_active = 3
    x = torch.randn(4, 3, 16, 16)
    pis, masks = [], []
    hooks = [g.register_forward_hook(lambda m, i, o: masks.append(o[1]) or pis.append(o[2]))
             for _, g in named_gates(gated)]
    with torch.no_grad():
        masked = gated(x)
    for h in hooks:
        h.remove()
    for pi, m in zip(pis, masks):  # exactly the 3 largest saliencies of each input, at their value
        top = torch.topk(pi, 3, dim=1).indices
        assert torch.equal(m, torch.zeros_like(pi).scatter(1, top, pi.gather(1, top)))
    skipped, macs = skipping_forward(gated, x, return_macs=True)
    torch.testing.assert_close(skipped, masked, rtol=1e-4, atol=1e-4)
    assert round(average_macs(gated, [x], (3, 16, 16)) * len(x)) == sum(macs)
    spec = model_spec(gated, "resnet20", 10, in_channels=3)
    assert set(spec["gating"]["min_active"].values()) == {3}
    save_model(gated, tmp_path / "m", spec)
    reloaded, _ = load_model(tmp_path / "m")
    assert {n: g.min_active for n, g in named_gates(reloaded)} == {n: 3 for n, _ in named_gates(gated)}
    with torch.no_grad():
        assert torch.equal(reloaded(x), masked)
    torch.testing.assert_close(torch.export.export(gated, (x,)).module()(x), masked)


@pytest.fixture(scope="module")
def cheap_phase(digits):
    """The issue's collapse case: dense resnet20 -> prepare at 95% of the MACs -> a 2-epoch phase
    (a few real steps each) -> prune with calibration batches."""
    torch.manual_seed(0)
    method = create_method("manidp", prune_ratio=0.95, phase_epochs=2)
    model = method.prepare(copy.deepcopy(_dense("resnet20", DIGITS)), PruneContext(DIGITS))
    loader = make_loader(digits.train, 32, shuffle=True, seed=0)
    optimizer = method.make_optimizer(model, lr=0.05, momentum=0.9, weight_decay=5e-4)
    for epoch in range(2):
        stats = train_epoch(model, loader, optimizer, device=torch.device("cpu"), method=method, max_steps=5)
        method.on_epoch_end(model, epoch, stats.loss)
    calibration = [b for _, b in zip(range(4), make_loader(digits.train, 64, shuffle=True, seed=1))]
    pruned = method.prune(model, PruneContext(DIGITS, calibration=calibration)).eval()
    return method, pruned


def test_cheap_end_keeps_the_floor_in_every_gate_and_lands_near_its_reach(cheap_phase, val_batches):
    method, pruned = cheap_phase
    active = active_channels(pruned, val_batches)
    assert len(active) == 18
    assert all(least >= MIN_CHANNELS for _, least in active.values()), active  # every gate, every input
    dense_macs = profile(_dense("resnet20", DIGITS), DIGITS).macs
    reach = plan_keep_rates(_dense("resnet20", DIGITS), DIGITS, 0.95).reach
    fraction = average_macs(pruned, val_batches, DIGITS) / dense_macs
    # The plan aims at 1 - reach; the floor adds channels to the inputs whose saliencies clear the
    # recalibrated threshold in fewer than two, so it lands at or a little above.
    assert 1.0 * (1 - reach) <= fraction <= 1.25 * (1 - reach), (fraction, 1 - reach)
    assert method.state_dict()["floored"] is True


def test_moderate_targets_keep_the_papers_thresholds_with_calibration(phase, digits):
    dense, method, model, pruned, _ = phase
    calibration = [b for _, b in zip(range(4), make_loader(digits.train, 64, shuffle=True, seed=1))]
    again = method.prune(model, PruneContext(DIGITS, calibration=calibration))
    assert {n: float(g.threshold) for n, g in named_gates(again)} == \
        {n: float(g.threshold) for n, g in named_gates(pruned)}
    assert all(g.min_active == 0 for _, g in named_gates(again))
    assert "min_active" not in model_spec(again, "resnet20", 10, in_channels=1)["gating"]


def test_cheap_end_trial_resumes_with_its_floor(tmp_path):
    """A real trial at 95% of the MACs (clipped to the reach) checkpointed after the cut resumes to
    the same metrics: the floor travels in the saved model's spec, the plan in the method state."""
    from trainables.base_model import ensure_base_model
    from trainables.settings import TrainSettings, TrialSettings
    from trainables.trial import MODEL_DIR, run_trial

    settings = TrialSettings(model="resnet20", dataset="digits", seed=0, use_gpu=False,
                             base=TrainSettings(epochs=1, batch_size=128),
                             finetune=TrainSettings(epochs=2, lr=0.01, batch_size=256),
                             calibration_batches=2, base_dir=str(tmp_path / "base_models"))
    ensure_base_model(settings)
    hparams = {"phase_epochs": 1, "prune_ratio": 0.95}

    def run(root, resume_from=None):
        reports = []

        def report(metrics, save):
            reports.append(dict(metrics))
            save(root / f"epoch{metrics['epoch']}")
        run_trial(settings, "manidp", hparams, report, resume_from=resume_from)
        return reports

    full = run(tmp_path / "full")
    saved, _ = load_model(tmp_path / "full" / "epoch1" / MODEL_DIR)  # right after the cut
    assert {g.min_active for _, g in named_gates(saved)} == {MIN_CHANNELS}
    resumed = run(tmp_path / "resumed", resume_from=tmp_path / "full" / "epoch1")
    assert [m["epoch"] for m in resumed] == [2, 3]
    for want, got in zip(full[1:], resumed):
        assert (got["accuracy"], got["macs"], got["loss"]) == (want["accuracy"], want["macs"], want["loss"])
    dense_macs = full[-1]["dense_macs"]
    assert full[-1]["macs"] >= (1 - plan_keep_rates(create_model("resnet20", 10, in_channels=1), DIGITS, 0.95).reach) \
        * dense_macs * (1 - 1e-9)  # the floor holds through the fine-tune: never below the reach


def test_cheap_end_without_calibration_batches_still_floors_every_gate(digits, val_batches):
    torch.manual_seed(0)
    method = create_method("manidp", prune_ratio=0.95, phase_epochs=1)
    model = method.prepare(copy.deepcopy(_dense("resnet20", DIGITS)), PruneContext(DIGITS))
    optimizer = method.make_optimizer(model, lr=0.05, momentum=0.9, weight_decay=5e-4)
    stats = train_epoch(model, make_loader(digits.train, 32, shuffle=True, seed=0), optimizer,
                        device=torch.device("cpu"), method=method, max_steps=3)
    method.on_epoch_end(model, 0, stats.loss)
    pruned = method.prune(model, PruneContext(DIGITS))  # no calibration: the paper's thresholds + the floor
    assert {g.min_active for _, g in named_gates(pruned)} == {MIN_CHANNELS}
    assert all(least >= MIN_CHANNELS for _, least in active_channels(pruned, val_batches).values())
