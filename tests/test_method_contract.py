"""The contract every registered method meets, parametrised over ``list_methods()`` so a new
method is tested by default: the pruned model runs, is smaller by about the asked ratio, survives
``torch.export`` and a save/load round trip with identical outputs."""
import copy
from pathlib import Path

import pytest
import torch

import methods
from methods import (PruneContext, PruneTuneError, PruningMethod, create_method, get_method_class, list_methods,
                     register_method)
from methods.cost import profile
from trainables.model_io import load_model, model_spec, save_model
from trainables.data import load, make_loader
from trainables.models import create_model
from trainables.train import train_epoch

INPUT = (1, 8, 8)  # digits-sized input keeps the suite fast


PHASE_STEPS = 12


@pytest.fixture(scope="module")
def digits_loader():
    return make_loader(load("digits").train, 64, shuffle=True, seed=0)


@pytest.fixture(scope="module")
def eval_batches():
    """Real digits images (the validation split): a dynamic method's cost depends on its inputs."""
    return [x for x, _ in make_loader(load("digits").val, 128, shuffle=False)]


def _macs(model, method, eval_batches):
    """MACs per sample as the trainable reports them, ``method.measure_macs``: ``profile`` at batch 1
    for a static method; for a dynamic one (keeps every weight, skips channels per input) the
    average over real images of what each input really uses."""
    return method.measure_macs(model, INPUT, eval_batches)


def _pruned(name, loader, ratio=0.5):
    """Dense resnet20 -> the method's training phase (a few real steps on digits) -> prune."""
    torch.manual_seed(0)
    dense = create_model("resnet20", 10, in_channels=1).eval()
    cls = get_method_class(name)
    declared = {hp.name for hp in cls.hyperparameters}
    method = create_method(name, **({"prune_ratio": ratio} if "prune_ratio" in declared else {}))
    start = create_model("resnet20", 10, in_channels=1) if method.from_scratch else copy.deepcopy(dense)
    model = method.prepare(start, PruneContext(INPUT))
    if method.phase_epochs:
        optimizer = method.make_optimizer(model, lr=0.05, momentum=0.9, weight_decay=5e-4)
        train_epoch(model, loader, optimizer, device=torch.device("cpu"), method=method, max_steps=PHASE_STEPS)
        method.on_epoch_end(model, 0, 1.0)
    context = PruneContext(INPUT, calibration=[b for _, b in zip(range(2), loader)],
                           finetune=lambda m, steps: None, seed=0)
    return dense, method, method.prune(model, context).eval()


def test_registry_lists_the_baselines():
    assert {"l1_norm", "random", "slimming"} <= set(list_methods())


def test_readme_method_table_is_the_registry():
    """The README's table is ``prunetune methods --markdown``: a new method's row comes from its class."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert methods.markdown_table() in readme
    rows = [line for line in readme.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows[:len(list_methods())]] == list_methods()


def test_a_method_without_paper_or_summary_is_refused_at_registration():
    class Unlabelled(PruningMethod):
        def prune(self, model, context):
            return model

    with pytest.raises(PruneTuneError, match="'unlabelled' .*declares no paper or summary"):
        register_method("unlabelled")(Unlabelled)
    assert "unlabelled" not in list_methods()


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
def test_pruned_model_runs_and_shrinks(name, digits_loader, eval_batches):
    dense, method, pruned = _pruned(name, digits_loader, 0.5)
    x = torch.randn(4, *INPUT)
    assert pruned(x).shape == (4, 10)
    before, after = profile(dense, INPUT), profile(pruned, INPUT)
    reduction = 1 - _macs(pruned, method, eval_batches) / before.macs
    if method.dynamic:  # per-input skipping lands near the average the schedule aims at
        assert abs(reduction - 0.5) <= 0.15, reduction
    else:  # prune_ratio is the fraction of the dense MACs removed, hit by bisection
        assert abs(reduction - 0.5) <= 0.03, reduction
    if not method.dynamic:
        assert after.params < before.params
    else:  # a dynamic method keeps every dense weight, unchanged in shape, under its own name
        pruned_state = pruned.state_dict()
        assert all(pruned_state[k].shape == v.shape for k, v in dense.state_dict().items())


@pytest.mark.parametrize("name", list_methods())
def test_larger_ratio_removes_more(name, digits_loader, eval_batches):
    if "prune_ratio" not in {hp.name for hp in get_method_class(name).hyperparameters}:
        pytest.skip(f"{name} takes no prune_ratio")
    _, method, small = _pruned(name, digits_loader, 0.3)
    _, _, large = _pruned(name, digits_loader, 0.7)
    assert _macs(large, method, eval_batches) < _macs(small, method, eval_batches)


@pytest.mark.parametrize("name", list_methods())
def test_export_and_reload_give_identical_outputs(name, tmp_path, digits_loader):
    _, method, pruned = _pruned(name, digits_loader, 0.5)
    x = torch.randn(3, *INPUT)
    expected = pruned(x)
    exported = torch.export.export(pruned, (x,))
    assert torch.allclose(exported.module()(x), expected, atol=1e-6)
    save_model(pruned, tmp_path / "m", model_spec(pruned, "resnet20", 10, in_channels=1))
    reloaded, spec = load_model(tmp_path / "m")
    assert spec["model"] == "resnet20"
    assert torch.equal(reloaded(x), expected)
