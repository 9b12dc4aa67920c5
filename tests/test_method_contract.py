"""The contract every registered method meets, parametrised over ``list_methods()`` so a new
method is tested by default: the pruned model runs, is smaller by about the asked ratio, survives
``torch.export`` and a save/load round trip with identical outputs."""
import pytest
import torch

import methods
from methods import PruneContext, create_method, get_method_class, list_methods
from methods.cost import profile
from trainables.model_io import load_model, model_spec, save_model
from trainables.models import create_model

INPUT = (1, 8, 8)  # digits-sized input keeps the suite fast


def _calibration(n_batches=2, batch=16):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, *INPUT, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(n_batches)]


def _pruned(name, ratio=0.5):
    dense = create_model("resnet20", 10, in_channels=1).eval()
    method = create_method(name, prune_ratio=ratio)
    model = method.prepare(create_model("resnet20", 10, in_channels=1) if method.from_scratch else dense)
    context = PruneContext(INPUT, calibration=_calibration(), finetune=lambda m, steps: None, seed=0)
    return dense, method, method.prune(model, context).eval()


def test_registry_lists_the_baselines():
    assert {"l1_norm", "random", "slimming"} <= set(list_methods())


def test_unknown_method_lists_valid_names():
    with pytest.raises(methods.ConfigError, match="valid methods: .*l1_norm"):
        create_method("nope")


@pytest.mark.parametrize("name", list_methods())
def test_declared_hyperparameters_are_valid(name):
    cls = get_method_class(name)
    names = [hp.name for hp in cls.hyperparameters]
    assert len(names) == len(set(names))
    method = create_method(name)  # defaults alone build a method
    assert set(method.hparams) == set(names)
    with pytest.raises(methods.ConfigError, match=f"{name}: unknown hyperparameter"):
        create_method(name, not_a_parameter=1)


@pytest.mark.parametrize("name", list_methods())
def test_pruned_model_runs_and_shrinks(name):
    dense, method, pruned = _pruned(name, 0.5)
    x = torch.randn(4, *INPUT)
    assert pruned(x).shape == (4, 10)
    before, after = profile(dense, INPUT), profile(pruned, INPUT)
    reduction = 1 - after.macs / before.macs
    # Block-internal pruning of a basic-block ResNet removes ~prune_ratio of the MACs.
    assert 0.3 <= reduction <= 0.7, reduction
    if not method.dynamic:
        assert after.params < before.params


@pytest.mark.parametrize("name", list_methods())
def test_larger_ratio_removes_more(name):
    _, _, small = _pruned(name, 0.3)
    _, _, large = _pruned(name, 0.7)
    assert profile(large, INPUT).macs < profile(small, INPUT).macs


@pytest.mark.parametrize("name", list_methods())
def test_export_and_reload_give_identical_outputs(name, tmp_path):
    _, method, pruned = _pruned(name, 0.5)
    x = torch.randn(3, *INPUT)
    expected = pruned(x)
    exported = torch.export.export(pruned, (x,))
    assert torch.allclose(exported.module()(x), expected, atol=1e-6)
    save_model(pruned, tmp_path / "m", model_spec(pruned, "resnet20", 10, in_channels=1))
    reloaded, spec = load_model(tmp_path / "m")
    assert spec["model"] == "resnet20"
    assert torch.equal(reloaded(x), expected)
