"""Width multipliers for torchvision resnet18/34/50 and vgg16 (issue 11, item 5: scratch's
``expansion > 1`` crashed on them): every channel width scales by one factor, residual-joined
channels share one width, the classifier follows, the input channels and the classes stay; the
weights are drawn as torchvision draws them; saved widened models load back; MACs grow by the
square of the factor except in the stem and classifier; scratch runs on them; preflight checks them."""
import math

import pytest
import torch
from torch import nn

from methods import DependencyGraph, PruneContext, create_method
from methods.cost import profile
from methods.errors import ConfigError
from search.config import load_config
from search.preflight import check_expansion, preflight
from trainables.cifar_models import scaled
from trainables.model_io import load_model, model_spec, save_model
from trainables.models import create_model
from trainables.settings import TrainSettings, TrialSettings
from trainables.trial import MODEL_DIR, run_trial

SMALL = (3, 64, 64)
TORCHVISION = ["resnet18", "resnet34", "resnet50", "vgg16"]


def _widths(model):
    return {n: (m.in_channels, m.out_channels) if isinstance(m, nn.Conv2d) else (m.in_features, m.out_features)
            for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


@pytest.mark.parametrize("name", TORCHVISION)
def test_widened_model_runs_with_every_width_scaled(name):
    dense = _widths(create_model(name, 10))
    model = create_model(name, 10, width_mult=1.5).eval()
    wide = _widths(model)
    assert wide.keys() == dense.keys()
    stem, classifier = next(iter(dense)), list(dense)[-1]
    for layer, (c_in, c_out) in dense.items():
        per = 49 if name == "vgg16" and layer == "classifier.0" else 1  # 512 x 7 x 7 flattened features
        want_in = c_in if layer == stem else scaled(c_in // per, 1.5) * per
        want_out = c_out if layer == classifier else scaled(c_out, 1.5)
        assert wide[layer] == (want_in, want_out), layer
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        assert bn.num_features == bn.weight.numel() == bn.running_mean.numel()
    with torch.no_grad():
        out = model(torch.randn(2, *SMALL))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_residual_joins_share_one_width_at_odd_multipliers():
    """0.3 x (64, 128, 256, 512) = 19.2, 38.4, 76.8, 153.6: one rounded width per joined group."""
    for name, last in (("resnet18", 154), ("resnet50", 614)):
        model = create_model(name, 10, width_mult=0.3).eval()
        for group in DependencyGraph(model).groups:
            sizes = {model.get_submodule(p).out_channels if isinstance(model.get_submodule(p), nn.Conv2d)
                     else model.get_submodule(p).out_features for p in group.producers}
            assert len(sizes) == 1, group.name
        assert model.fc.in_features == last  # scaled(512, 0.3) / scaled(2048, 0.3)
        with torch.no_grad():
            assert model(torch.randn(1, *SMALL)).shape == (1, 10)


@pytest.mark.parametrize("name", ["resnet18", "vgg16"])
def test_widened_weights_are_drawn_as_torchvision_draws_them(name):
    torch.manual_seed(0)
    model = create_model(name, 10, width_mult=1.5)
    for layer, m in model.named_modules():
        if isinstance(m, nn.Conv2d):  # Kaiming normal, fan_out, ReLU gain
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            assert float(m.weight.detach().std()) == pytest.approx(math.sqrt(2 / fan_out), rel=0.1), layer
            assert m.bias is None or not m.bias.any()
        elif isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any()
            assert not m.running_mean.any() and torch.equal(m.running_var, torch.ones_like(m.running_var))
        elif isinstance(m, nn.Linear) and name == "vgg16":  # torchvision VGG: N(0, 0.01), zero bias
            assert float(m.weight.detach().std()) == pytest.approx(0.01, rel=0.05) and not m.bias.any(), layer
        elif isinstance(m, nn.Linear):  # torchvision ResNet: nn.Linear's default
            bound = 1 / math.sqrt(m.in_features)
            assert float(m.weight.detach().abs().max()) <= bound and float(m.bias.detach().abs().max()) <= bound
            assert float(m.weight.detach().abs().max()) > 0.9 * bound


def test_widened_resnet18_costs_the_square_of_the_width():
    """At 1.5x every width of resnet18 scales exactly (64..512 x 1.5 are integers), so a conv's MACs
    (in x out channels) grow 1.5^2 = 2.25x, except the stem (3 input channels stay) and the
    classifier (10 outputs stay), which grow 1.5x. They hold 6.5% of the dense MACs at 224, so the
    whole network grows 2.25 - 0.75 x 0.065 = 2.20x: within 3% of 1.5^2, and exactly this sum."""
    shape = (3, 224, 224)
    dense = profile(create_model("resnet18", 1000), shape).macs
    wide = profile(create_model("resnet18", 1000, width_mult=1.5), shape).macs
    stem, fc = 112 * 112 * 64 * 3 * 7 * 7, 512 * 1000
    assert dense == 1_814_073_344  # torchvision's published 1.82 GMACs
    assert wide == 2.25 * (dense - stem - fc) + 1.5 * (stem + fc)
    assert wide / dense == pytest.approx(1.5 ** 2, rel=0.03)


def test_saved_widened_model_loads_back(tmp_path):
    """model_io rebuilds a widened model from its spec (builder kwargs carry width_mult)."""
    model = create_model("resnet18", 10, width_mult=1.5).eval()
    save_model(model, tmp_path / "m", model_spec(model, "resnet18", 10, width_mult=1.5))
    loaded, spec = load_model(tmp_path / "m")
    assert spec["kwargs"] == {"width_mult": 1.5}
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    x = torch.randn(2, *SMALL)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_scratch_with_expansion_prunes_a_widened_resnet18(tmp_path):
    """Scratch's gate phase and cut on resnet18 built 1.5x wide: the MACs target is met against the
    unexpanded model, stage widths stay expanded, and the pruned model saves and loads back."""
    reference = profile(create_model("resnet18", 10), SMALL).macs
    method = create_method("scratch", prune_ratio=0.5, expansion=1.5)
    gated = method.prepare(create_model("resnet18", 10, width_mult=method.model_width_mult()))
    assert len(method.gates) == 8  # conv1 of each basic block
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for v in method.gates.values():
            v.copy_(torch.rand(v.shape, generator=g))
    pruned = method.prune(gated, PruneContext(SMALL, reference_macs=reference)).eval()
    assert 1 - profile(pruned, SMALL).macs / reference == pytest.approx(0.5, abs=0.01)
    assert [pruned.get_submodule(f"layer{s}.0.conv2").out_channels for s in (1, 2, 3, 4)] == [96, 192, 384, 768]
    assert all(pruned.get_submodule(f"layer{s}.0.conv1").out_channels < w for s, w in zip((1, 2, 3, 4), (96, 192, 384, 768)))
    save_model(pruned, tmp_path / "p", model_spec(pruned, "resnet18", 10, width_mult=1.5))
    loaded, _ = load_model(tmp_path / "p")
    x = torch.randn(2, *SMALL)
    with torch.no_grad():
        assert torch.equal(pruned(x), loaded(x))


def test_scratch_trial_with_expansion_runs_on_resnet18(tmp_path):
    """The whole trial (gate phase, cut, training from scratch, checkpoint) with expansion 1.5 on
    torchvision resnet18: this raised ValueError in create_model before."""
    settings = TrialSettings(model="resnet18", dataset="digits", seed=0, use_gpu=False,
                             base=TrainSettings(epochs=1, lr=0.1, batch_size=256),
                             finetune=TrainSettings(epochs=0, lr=0.01, batch_size=256),
                             calibration_batches=1, base_dir=str(tmp_path / "base"))
    saved = []

    def report(metrics, save):
        save(tmp_path / f"epoch{metrics['epoch']}")
        saved.append(dict(metrics))

    final = run_trial(settings, "scratch", {"prune_ratio": 0.5, "expansion": 1.5, "phase_epochs": 1}, report)
    assert [m["stage"] for m in saved] == ["phase", "finetune"]
    dense = profile(create_model("resnet18", 10, in_channels=1), (1, 8, 8)).macs
    assert final["macs"] == pytest.approx(0.5 * dense, rel=0.02)
    model, spec = load_model(tmp_path / "epoch2" / MODEL_DIR)
    assert spec["kwargs"]["width_mult"] == 1.5 and model.layer4[0].conv2.out_channels == 768
    assert profile(model, (1, 8, 8)).macs == final["macs"]


# ---- preflight -----------------------------------------------------------------------------------

def _cfg(*overrides):
    return load_config("configs/quickstart.yaml", ["methods=[scratch]", *overrides])


@pytest.mark.parametrize("name", TORCHVISION)
def test_preflight_accepts_expansion_on_torchvision_models(name):
    cfg = _cfg(f"model={name}", "image_size=32", "space.scratch.expansion=[1.0, 2.0]")
    check_expansion(cfg)
    if name != "vgg16":
        preflight(cfg)
        return
    # torchvision's VGG-16 has no batch norm for scratch's gates: refused in one line, not a traceback.
    with pytest.raises(ConfigError, match=r"^methods\[0\]: scratch cannot prune vgg16: .*no prunable group "
                                          r"followed by a batch norm$"):
        preflight(cfg)


def test_preflight_refuses_an_expansion_the_weights_cannot_take(tmp_path):
    """Scratch builds the configured model ``expansion`` x wider and loads model_kwargs.weights into
    it, as the trial does: a dense state dict cannot fill a 1.5x network. Before, preflight passed
    and every scratch trial crashed."""
    path = tmp_path / "resnet20.pt"
    torch.save(create_model("resnet20", 10, in_channels=1).state_dict(), path)
    with pytest.raises(ConfigError, match=r"^space\.scratch\.expansion: resnet20 cannot be built 1\.5x wide "
                                          r"\(scratch expansion 1\.5 x model_kwargs\.width_mult 1\): "
                                          r"model_kwargs\.weights .* holds the unexpanded model") as err:
        preflight(_cfg(f"model_kwargs.weights={path}", "space.scratch.expansion=[1.0, 1.5]"))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"^space\.expansion: resnet20 cannot be built 2\.5x wide "
                                          r"\(scratch expansion 2 x model_kwargs\.width_mult 1\.25\)"):
        check_expansion(_cfg(f"model_kwargs.weights={path}", "space.expansion=2.0", "model_kwargs.width_mult=1.25"))
    check_expansion(_cfg(f"model_kwargs.weights={path}", "space.expansion=1.0"))  # the unexpanded model loads
